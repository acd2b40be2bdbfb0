"""recipec.ops.cuts: thresholds and exact global percentiles over a score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recipec import records
from recipec.ops import cuts
from recipec.ops.base import StepContext


def rec(name: str, source: str = "s", **scores: float) -> dict[str, Any]:
    return {"id": name, "source": source, "origin": name, "images": [], "conversations": [], "category": "other",
            "data_type": "text", "image_tags": [], "instruction_tags": [], "scores": list(scores.items()),
            "provenance": []}


def run(op, condition: dict[str, Any], tables: list[pa.Table] | list[dict[str, Any]], tmp_path: Path,
        on: list[str] | None = None):
    if tables and isinstance(tables[0], dict):
        tables = [pa.Table.from_pylist(tables, schema=records.SCHEMA)]
    ctx = StepContext("cut", "cut", {"condition": condition, "on": on}, "f", tmp_path)
    chunks = list(op(ctx, tables))
    out = pa.concat_tables([c.records for c in chunks])
    rejects = [r for c in chunks for r in c.rejects]
    assert sum(c.consumed for c in chunks) == sum(t.num_rows for t in tables) == out.num_rows + len(rejects)
    return out.column("id").to_pylist(), {r.id: (r.reason, r.detail) for r in rejects}


def cond(verb: str, field: str, op: str, value: float) -> dict[str, Any]:
    return {"verb": verb, "field": field, "op": op, "value": value}


def test_threshold_keep_and_drop(tmp_path: Path) -> None:
    rows = [rec("a", score=9), rec("b", score=8), rec("c", score=7), rec("d"), rec("e", source="other")]
    kept, dropped = run(cuts.run_threshold, cond("keep", "score", ">=", 8), rows, tmp_path, on=["s"])
    assert kept == ["a", "b", "e"]
    assert dropped == {"c": ("threshold_score", "score = 7 is not >= 8"),
                       "d": ("score_missing", "no `score` score to judge")}
    kept, dropped = run(cuts.run_threshold, cond("drop", "score", ">", 8), rows, tmp_path, on=None)
    assert kept == ["b", "c"] and dropped["a"] == ("threshold_score", "score = 9 is > 8")
    assert dropped["e"][0] == "score_missing"


def test_percentile_drops_the_top_exactly(tmp_path: Path) -> None:
    rows = [rec(f"r{i:03d}", loss=float(i)) for i in range(100)]
    kept, dropped = run(cuts.run_percentile, cond("drop", "loss", "top", 0.05), rows, tmp_path)
    assert sorted(dropped) == [f"r{i:03d}" for i in range(95, 100)]  # 5% of 100 is 5, not 6
    assert len(kept) == 95
    assert dropped["r099"][0] == "percentile_loss" and "cut at 95" in dropped["r099"][1]


def test_percentile_rounds_up_and_breaks_ties_by_id(tmp_path: Path) -> None:
    rows = [rec(name, loss=v) for name, v in [("e", 1.0), ("d", 3.0), ("c", 3.0), ("b", 3.0), ("a", 0.5)]]
    _, dropped = run(cuts.run_percentile, cond("drop", "loss", "top", 0.3), rows, tmp_path)
    assert sorted(dropped) == ["b", "c"]  # ceil(1.5) = 2 of the three tied at 3.0: the smaller ids
    kept, _ = run(cuts.run_percentile, cond("keep", "loss", "bottom", 0.2), rows, tmp_path)
    assert kept == ["a"]


def test_percentile_is_global_and_order_independent(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = [rec(f"r{i}", loss=float(v)) for i, v in enumerate(rng.integers(0, 20, 500))]
    whole = run(cuts.run_percentile, cond("drop", "loss", "top", 0.1), rows, tmp_path)[1]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    shards = [pa.Table.from_pylist(shuffled[i:i + 70], schema=records.SCHEMA) for i in range(0, 500, 70)]
    again = run(cuts.run_percentile, cond("drop", "loss", "top", 0.1), shards, tmp_path)[1]
    assert set(whole) == set(again) and len(whole) == 50


def test_percentile_missing_scores(tmp_path: Path) -> None:
    rows = [rec("a", loss=1.0), rec("b", loss=2.0), rec("c"), rec("d", loss=float("nan"))]
    kept, dropped = run(cuts.run_percentile, cond("drop", "loss", "top", 0.5), rows, tmp_path)
    assert kept == ["a"] and {k: v[0] for k, v in dropped.items()} == {
        "b": "percentile_loss", "c": "score_missing", "d": "score_missing"}


@pytest.mark.parametrize("fraction, n, expected", [(0.05, 100, 5), (0.05, 30, 2), (0.07, 100, 7), (0.0, 10, 0),
                                                   (1.0, 10, 10), (0.05, 0, 0)])
def test_cut_size(fraction: float, n: int, expected: int) -> None:
    assert cuts.cut_size(fraction, n) == expected


def test_percentile_in_pieces_is_percentile_whole(tmp_path: Path) -> None:
    """The Ray executor's split: the score pass per piece, combined, then the cut: the op's output."""
    rows = [rec(f"r{i:02d}", "s" if i % 3 else "t", loss=float(i % 7)) for i in range(40)] + [rec("none")]
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    ctx = StepContext("cut", "cut", {"condition": cond("drop", "loss", "top", 0.1), "on": ["s"]}, "f", tmp_path)
    op = cuts.run_percentile
    found = op.combine([op.per_record(ctx, [table.slice(a, 13)]) for a in range(0, table.num_rows, 13)])
    split, whole = list(op.decide(ctx, [table], found)), list(op(ctx, [table]))
    assert [c.records.equals(w.records) for c, w in zip(split, whole)] == [True] * len(whole)
    assert [(r.id, r.detail) for c in split for r in c.rejects] == [(r.id, r.detail) for c in whole for r in c.rejects]
