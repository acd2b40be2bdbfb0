"""The `--out` folder of a run: per stage its exported data, the rejects, `report.json` and the log.

Layout::

    OUT/
      <stage>/...              the files of the stage's export step (its record shards if it has none)
      <stage>/images/<source>  a link to the image root of each source in the stage: the image
                               folder (`--image_folder`) the exported `<source>/<path>` names are
                               relative to; relative links, so they hold no machine's absolute path
      rejects/<step id>.jsonl  every record a step dropped with a reason: one JSON object a line with
                               step, id, source, origin, reason, detail, record (the record as JSON
                               text, or the raw input line when it never became a record)
      report.json              what ran and what came out (below)
      run.log                  the log of every run into this folder, appended (cli/run.py)

`report.json` holds `recipe`, `fingerprint`, `seed`, `selection` (the run's --until/--only),
`steps` (per step: `id`, `op`, `key`, `records_in`, `records_out`, `dropped` by reason, `rejects`
(the file, or null), `seconds`, `cached`), `stages` (per stage: `planned` and `realised`
composition by source, data type and category, `max_image_tokens`, `trainable_params`, `outputs`,
`image_folder`) and `run`. For every step `records_in == records_out + sum(dropped.values())`.

Determinism: everything in OUT is a function of the recipe, the data and the seed, except what
describes this particular run: `run.log`, and in `report.json` the `run` object (total seconds,
workers, store) and each step's `seconds` and `cached`. `RUN_SPECIFIC` names those keys and
`deterministic_view` removes them.

Rewriting the outputs on every run would make a no-op re-run slow on big data, so the store keeps an
index per OUT folder (`STORE/outputs/<digest of its path>.json`): for each file written, what it
was made from and its (size, mtime_ns, inode) right after writing. A file whose stat and origin
still match is left alone; anything else is written again (temporary file, then rename). Files
recorded there and no longer produced are removed: all of them after a full run, and within the
stages and steps it covered after an `--until`/`--only` run. Files recipec did not write are never
touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from recipec import ir
from recipec.runtime.executor import RunResult
from recipec.runtime.store import Store, atomic_write, canonical

REPORT_VERSION = 1
RUN_SPECIFIC = ("run", "seconds", "cached")
_REJECTS_FORMAT = 1  # bump when the rejects lines change shape, so existing files are rewritten


def deterministic_view(report: dict[str, Any]) -> dict[str, Any]:
    """`report` without what describes one particular run (timings, cache hits, workers, store)."""
    view = {k: v for k, v in report.items() if k != "run"}
    view["steps"] = [{k: v for k, v in s.items() if k not in RUN_SPECIFIC} for s in report["steps"]]
    return view


def reserved_names() -> set[str]:
    """Names at the top of OUT that are not stage folders."""
    return {"rejects", "report.json", "run.log"}


def image_roots(recipe: ir.Recipe) -> dict[str, str]:
    """Each dataset's image root (relative to the recipe); a synthesized set shares its seeds' one."""
    roots = {name: src.images for name, src in recipe.sources.items() if src.images}
    for name, syn in recipe.syntheses.items():
        seeds = {roots.get(s) for s in syn.from_sources}
        if len(seeds) == 1 and None not in seeds:
            roots[name] = seeds.pop()
    return roots


def _stage_sources(stage: ir.Stage, realised: dict[str, Any] | None) -> list[str]:
    names = set(stage.composition.by_source) | set((realised or {}).get("by_source", {}))
    return sorted(names)


def build_report(result: RunResult, store: Store) -> dict[str, Any]:
    plan = result.plan
    recipe = plan.recipe
    outcomes = {o.id: o for o in result.outcomes}
    steps = []
    for o in result.outcomes:
        steps.append({
            "id": o.id, "op": o.op, "key": o.key, "records_in": o.records_in, "records_out": o.records_out,
            "dropped": dict(sorted(o.dropped.items())),
            "rejects": f"rejects/{o.id}.jsonl" if o.manifest["rejects"] else None,
            "seconds": round(o.seconds, 3), "cached": o.cached,
        })
    stages = []
    for stage in recipe.stages:
        mix = _stage_step(result, "mix", stage.name)
        export = _stage_step(result, "export", stage.name)
        realised = None
        if mix in outcomes:
            realised = _composition(outcomes[mix].manifest.get("composition"), outcomes[mix].records_out)
        stages.append({
            "name": stage.name,
            "planned": {"total": stage.composition.total, "by_source": dict(stage.composition.by_source),
                        "by_data_type": dict(stage.composition.by_data_type),
                        "by_category": dict(stage.composition.by_category)},
            "realised": realised,
            "max_image_tokens": stage.max_image_tokens,
            "trainable_params": stage.trainable_params,
            "mix_step": mix,
            "export_step": export,
            "outputs": _stage_outputs(outcomes[export].manifest, stage.name) if export in outcomes else None,
            "image_folder": f"{stage.name}/images" if export in outcomes and _stage_links(recipe, stage, realised)
            else None,
        })
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe.name,
        "fingerprint": ir.fingerprint(recipe),
        "seed": recipe.seed,
        "selection": {"until": result.until, "only": result.only},
        "steps": steps,
        "stages": stages,
        "run": {"seconds": round(result.seconds, 3), "workers": result.workers, "store": str(store.root)},
    }


def _composition(counts: dict[str, Any] | None, total: int) -> dict[str, Any]:
    """A step's output by source, data type and category (just its total for non-record outputs)."""
    if counts is None:
        return {"total": total}
    return {"total": total, **{k: dict(sorted(counts[k].items())) for k in ("by_source", "by_data_type", "by_category")}}


def _stage_step(result: RunResult, op: str, stage: str) -> str | None:
    for step in result.plan.steps.values():
        if step.op == op and step.params.get("stage") == stage:
            return step.id
    return None


def _stage_links(recipe: ir.Recipe, stage: ir.Stage, realised: dict[str, Any] | None) -> dict[str, str]:
    """The links of a stage's image folder: dataset name -> its image root, relative to the recipe."""
    roots = image_roots(recipe)
    return {name: roots[name] for name in _stage_sources(stage, realised) if name in roots}


def _stage_outputs(manifest: dict[str, Any], stage: str) -> list[str]:
    """Paths under OUT of a stage's exported files."""
    if manifest["files"]:
        return [f"{stage}/{e['name'].removeprefix('files/')}" for e in manifest["files"]]
    return [f"{stage}/{e['name']}" for e in manifest["records"]]


def write_outputs(result: RunResult, store: Store, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Fill OUT from the store; returns the report. Call it while holding the store's lock."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = _OutputIndex(store, out)
    produced: set[str] = set()
    covered_dirs: set[str] = set()  # where files no longer produced are removed after a partial run
    covered_files: set[str] = set()

    recipe = result.plan.recipe
    stages = {s.name: s for s in recipe.stages}
    mixes = {result.plan.steps[o.id].params.get("stage"): o for o in result.outcomes if o.op == "mix"}
    for o in result.outcomes:
        if o.op == "export":
            stage = result.plan.steps[o.id].params["stage"]
            covered_dirs.add(f"{stage}/")
            items = o.manifest["files"] or o.manifest["records"]
            for entry, rel in zip(items, _stage_outputs(o.manifest, stage)):
                source = store.path(o.key, entry["name"])
                index.put(rel, f"copy:{entry['sha256']}", lambda tmp, source=source: shutil.copyfile(source, tmp))
                produced.add(rel)
            mix = mixes.get(stage)
            realised = mix.manifest.get("composition") if mix is not None else None
            folder = os.path.realpath(out / stage / "images")
            for name, root in _stage_links(recipe, stages[stage], realised).items():
                target = os.path.relpath(os.path.realpath(result.recipe_dir / root), folder)
                index.put_link(f"{stage}/images/{name}", target)
                produced.add(f"{stage}/images/{name}")
        rel = f"rejects/{o.id}.jsonl"
        covered_files.add(rel)
        if o.manifest["rejects"]:
            token = f"rejects:{_REJECTS_FORMAT}:{o.key}"
            index.put(rel, token, lambda tmp, o=o: _write_rejects(store, o.key, o.manifest, tmp))
            produced.add(rel)

    for rel in index.recorded():
        if rel in produced:
            continue
        if result.full or rel in covered_files or any(rel.startswith(d) for d in covered_dirs):
            index.remove(rel)

    report = build_report(result, store)
    atomic_write(out / "report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    index.save()
    return report


def _write_rejects(store: Store, key: str, manifest: dict[str, Any], path: Path) -> None:
    table = store.read_rejects(key, manifest)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for batch in table.to_batches(max_chunksize=65_536):
            for row in batch.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _OutputIndex:
    """What recipec last wrote into one OUT folder, kept in the store (see the module docstring)."""

    def __init__(self, store: Store, out: Path):
        self.out = out
        where = str(out.resolve())
        self.path = store.root / "outputs" / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"
        try:
            data = json.loads(self.path.read_text("utf-8"))
            self.files: dict[str, list] = data["files"] if data.get("out") == where else {}
        except (OSError, ValueError, KeyError):
            self.files = {}
        self.where = where
        self._dirty = False

    def recorded(self) -> list[str]:
        return sorted(self.files)

    def _stat(self, rel: str) -> list[int] | None:
        try:
            st = os.lstat(self.out / rel)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _unchanged(self, rel: str, token: str) -> bool:
        """Written by recipec with this content and not touched since."""
        entry = self.files.get(rel)
        return entry is not None and entry[0] == token and entry[1:] == self._stat(rel)

    def _temporary(self, rel: str) -> tuple[Path, Path]:
        dest = self.out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest, dest.with_name(f".{dest.name}.tmp-{os.getpid()}")

    def put(self, rel: str, token: str, produce: Callable[[Path], None]) -> None:
        if self._unchanged(rel, token):
            return
        dest, tmp = self._temporary(rel)
        try:
            produce(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.files[rel] = [token, *self._stat(rel)]
        self._dirty = True

    def put_link(self, rel: str, target: str) -> None:
        token = f"link:{target}"
        if self._unchanged(rel, token):
            return
        dest, tmp = self._temporary(rel)
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, dest)
        self.files[rel] = [token, *self._stat(rel)]
        self._dirty = True

    def remove(self, rel: str) -> None:
        path = self.out / rel
        path.unlink(missing_ok=True)
        self.files.pop(rel, None)
        self._dirty = True
        parent = path.parent
        while parent != self.out and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def save(self) -> None:
        if self._dirty:
            atomic_write(self.path, canonical({"out": self.where, "files": self.files}).encode("utf-8"))
