"""`recipec plan FILE [--json]`: the step graph and, per stage, what the model will see."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recipec.cli.common import add_root_option, compile_reporting, failure_code, json_text
from recipec.diagnostics import printable
from recipec.plan import MODEL_OPS, build_plan, plan_json


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--store", metavar="DIR",
                        help="mark the steps a run would find cached in this store "
                             "(default $RECIPEC_STORE, else .recipec/store when it exists)")
    add_root_option(parser)


def _cached(plan, store: str | None, recipe_file: str) -> tuple[set[str] | None, set[str] | None]:
    import os

    from recipec.cli.run import DEFAULT_STORE

    store = store or os.environ.get("RECIPEC_STORE") or (str(DEFAULT_STORE) if DEFAULT_STORE.is_dir() else None)
    if not store:
        return None, None
    from recipec.runtime.store import cache_status

    status = cache_status(plan, store, Path(recipe_file).parent)
    return ({s for s, v in status.items() if v == "cached"}, {s for s, v in status.items() if v == "may stay cached"})


def run(args: argparse.Namespace) -> int:
    result = compile_reporting(args.file, args.root)
    if not result.ok:
        return failure_code(result)
    plan = build_plan(result.recipe)
    cached, may_stay = _cached(plan, args.store, args.file)
    data = plan_json(plan, cached, may_stay)
    if args.json:
        sys.stdout.write(json_text(data) + "\n")
        return 0
    _print_rich(data)
    return 0


def _n(value) -> str:
    return "?" if value is None else f"{value:,}"


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _text(value) -> str:
    """A value from the recipe, shown literally: no rich markup, no terminal controls."""
    from rich.markup import escape

    return escape(printable(str(value)))


def _print_rich(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree

    console = Console()
    base = f" (derived from {_text(data['base'])})" if data.get("base") else ""
    console.print(f"[bold]recipe[/] {_text(data['recipe'])}{base}  seed {data['seed']}  fingerprint {data['fingerprint'][:12]}")

    models = Table(title="models", title_justify="left")
    for column in ("model", "vision", "language", "projector", "tokens/tile", "vision", "projector", "language", "total"):
        models.add_column(column, justify="right" if column in ("tokens/tile", "total") else "left")
    for name, m in data["models"].items():
        p = m["params"]
        models.add_row(name, _text(m["vision"]), _text(m["language"]), m["projector"], str(m["tokens_per_tile"]),
                       _human(p["vision"]), _human(p["projector"]), _human(p["language"]), f"{p['total']:,}")
    console.print(models)

    tree = Tree("[bold]steps[/]")
    for step in data["steps"]:
        marks = []
        if step.get("cached") is True:
            marks.append("[green]cached[/]")
        elif step.get("may_stay_cached"):
            marks.append("[yellow]will run[/] [cyan](may stay cached if unchanged)[/]")
        elif step.get("cached") is False:
            marks.append("[yellow]will run[/]")
        if step["op"] in MODEL_OPS:
            marks.append("[magenta]model[/]")
        inputs = f" ← {', '.join(step['inputs'])}" if step["inputs"] else ""
        tree.add(f"{step['id']} [dim]{step['op']} {step['fingerprint'][:10]}[/] {' '.join(marks)}[dim]{inputs}[/]")
    console.print(tree)

    stages = Table(title="stages", title_justify="left")
    for column in ("stage", "samples", "grid", "max image tokens", "train", "trainable", "total", "lr", "batch", "epochs"):
        stages.add_column(column, justify="left" if column in ("stage", "train", "grid") else "right")
    for s in data["stages"]:
        tiles = s["max_image_tokens"] // s["tokens_per_tile"]
        tokens = f"{tiles}×{s['tokens_per_tile']} = {s['max_image_tokens']:,}" if tiles > 1 else f"{s['max_image_tokens']:,}"
        stages.add_row(s["name"], _human(s["samples"]), s["grid"], tokens, "+".join(s["train"]),
                       _human(s["trainable_params"]), _human(s["total_params"]), f"{s['lr']:g}",
                       str(s["batch_size"]), f"{s['epochs']:g}")
    console.print(stages)

    for s in data["stages"]:
        table = Table(title=f"stage {s['name']}: composition", title_justify="left")
        table.add_column("by")
        table.add_column("name")
        table.add_column("samples", justify="right")
        table.add_column("share", justify="right")
        total = s["samples"] or 0
        for by, values in (("source", s["mixture"]), ("data type", s["by_data_type"]), ("category", s["by_category"])):
            for name, count in values.items():
                share = f"{100 * count / total:.1f}%" if (total and count is not None) else "?"
                table.add_row(by, name, _n(count), share)
                by = ""
        console.print(table)
