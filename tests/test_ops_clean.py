"""recipec.ops.clean: every rule and its reason, rule precedence, `on`, conservation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recipec import records
from recipec.ops import clean
from recipec.ops.base import OperationError, StepContext


def rec(name: str, turns: list[tuple[str, str]] | None = None, sizes: list[tuple[int, int]] = (),
        source: str = "s") -> dict[str, Any]:
    turns = turns if turns is not None else [("<image>\nWhat?", "A cat sitting on a mat.")]
    conv = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    images = [{"path": f"{name}{i}.png", "sha256": f"{name}{i}", "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    return {"id": name, "source": source, "origin": name, "images": images, "conversations": conv, "category": "other",
            "data_type": "general", "image_tags": [], "instruction_tags": [], "scores": [], "provenance": []}


def run(rules: dict[str, Any], rows: list[dict[str, Any]], tmp_path: Path, on: list[str] | None = None):
    ctx = StepContext("filter.f.1.clean", "clean", {"rules": rules, "on": on}, "f", tmp_path)
    chunks = list(clean.run(ctx, [pa.Table.from_pylist(rows, schema=records.SCHEMA)]))
    out = pa.concat_tables([c.records for c in chunks])
    rejects = [r for c in chunks for r in c.rejects]
    assert sum(c.consumed for c in chunks) == len(rows) == out.num_rows + len(rejects)
    return out, {r.id: r.reason for r in rejects}


def test_every_rule(tmp_path: Path) -> None:
    ok = [("<image>\nWhat is this?", "A cat sitting on a mat.")]
    rows = [
        rec("good", ok, [(100, 80)]),
        rec("no_turns", [], [(100, 80)]),
        rec("chatty", ok * 4, [(100, 80)]),
        rec("terse", [("<image>\nWhat?", "Cat")], [(100, 80)]),
        rec("long", [("<image>\n" + "x" * 300, "A cat sitting on a mat.")], [(100, 80)]),
        rec("tiny", ok, [(100, 80), (20, 80)]),
        rec("strip", ok, [(400, 50)]),
        rec("text", [("What is 2+2?", "It is four, of course.")]),
    ]
    rules = {"min_turns": 1, "max_turns": 3, "min_answer_chars": 5, "max_text_chars": 200, "min_image_side": 32,
             "max_aspect_ratio": 4.0, "require_image": True}
    out, reasons = run(rules, rows, tmp_path)
    assert out.column("id").to_pylist() == ["good"]
    assert reasons == {"no_turns": "clean_min_turns", "chatty": "clean_max_turns", "terse": "clean_min_answer_chars",
                       "long": "clean_max_text_chars", "tiny": "clean_min_image_side",
                       "strip": "clean_max_aspect_ratio", "text": "clean_require_image"}
    assert out.column("provenance").to_pylist() == [["filter.f.1.clean"]]


def test_empty_answers_and_precedence(tmp_path: Path) -> None:
    rows = [rec("blank", [("<image>\nWhat?", "   ")], [(100, 80)]), rec("fine", None, [(100, 80)])]
    _, reasons = run({"drop_empty_answers": True}, rows, tmp_path)
    assert reasons == {"blank": "clean_drop_empty_answers"}
    _, reasons = run({"drop_empty_answers": True, "min_answer_chars": 2}, rows, tmp_path)
    assert reasons == {"blank": "clean_min_answer_chars"}  # the first rule in order names it
    _, reasons = run({"drop_empty_answers": False, "require_image": False}, rows, tmp_path)
    assert reasons == {}


def test_only_on_is_judged(tmp_path: Path) -> None:
    rows = [rec("a", [], source="a"), rec("b", [], source="b")]
    out, reasons = run({"min_turns": 1}, rows, tmp_path, on=["b"])
    assert reasons == {"b": "clean_min_turns"} and out.column("provenance").to_pylist() == [[]]


def test_unknown_rule(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="unknown cleaning rule"):
        run({"min_words": 3}, [rec("a")], tmp_path)


def test_empty_table(tmp_path: Path) -> None:
    out, reasons = run({"min_turns": 1, "min_image_side": 3}, [], tmp_path)
    assert out.num_rows == 0 and reasons == {}


def test_stored_shards_clean_as_one_table(tmp_path: Path) -> None:
    from recipec.runtime.store import StoredTable, write_parquet

    ok = [("<image>\nWhat is this?", "A cat sitting on a mat.")]
    rows = [rec(f"r{i}", [] if i % 8 == 0 else ok * (1 + i % 5), [(100, 80)] if i % 3 else [(400, 20 + i)],
                source="ab"[i % 2]) for i in range(23)]
    rules = {"min_turns": 1, "max_turns": 3, "max_aspect_ratio": 4.0, "min_image_side": 30}
    ctx = StepContext("filter.f.1.clean", "clean", {"rules": rules, "on": ["a"]}, "f", tmp_path)
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    paths, sizes = [], [5, 0, 7, 1, 10]  # uneven shards, one empty
    for k, start in enumerate(np.cumsum([0, *sizes[:-1]])):
        paths.append(tmp_path / f"shard-{k}.parquet")
        write_parquet(table.slice(int(start), sizes[k]), paths[-1])
    stored = StoredTable(paths, sizes)
    assert clean.run.streams
    whole = list(clean.run(ctx, [table]))
    sharded = list(clean.run(ctx, [stored]))
    pieces = list(clean.run(ctx, [table.slice(0, 9), table.slice(9)]))
    for chunks in (sharded, pieces):
        assert [c.records.to_pylist() for c in chunks] == [c.records.to_pylist() for c in whole]
        assert [(c.consumed, c.rejects) for c in chunks] == [(c.consumed, c.rejects) for c in whole]
    rejects = [r for c in whole for r in c.rejects]
    assert {r.reason for r in rejects} == {"clean_min_turns", "clean_max_turns", "clean_max_aspect_ratio",
                                           "clean_min_image_side"}
    assert all(r.source == "a" for r in rejects) and sum(c.consumed for c in whole) == 23
