"""recipec.ops.collect: concatenation in plan order, and the plumbing every data op shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recipec import records
from recipec.ops import collect
from recipec.ops.base import StepContext


def rec(source: str, i: int, **fields: Any) -> dict[str, Any]:
    conv = [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]
    return {"id": records.record_id(source, [], conv), "source": source, "origin": f"{source}:{i}", "images": [],
            "conversations": conv, "category": "other", "data_type": "text", "image_tags": [],
            "instruction_tags": [], "scores": [], "provenance": [], **fields}


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=records.SCHEMA)


def test_collect_concatenates_in_input_order(tmp_path: Path) -> None:
    a = table([rec("a", i) for i in range(3)])
    b = table([rec("b", i) for i in range(2)])
    ctx = StepContext("collect", "collect", {"order": ["b", "a"]}, "f", tmp_path)
    chunks = list(collect.run(ctx, [b, a]))
    out = pa.concat_tables([c.records for c in chunks])
    assert sum(c.consumed for c in chunks) == 5 == out.num_rows
    assert out.column("source").to_pylist() == ["b", "b", "a", "a", "a"]
    assert not any(c.rejects or c.skipped for c in chunks)


def test_collect_of_nothing_keeps_the_schema(tmp_path: Path) -> None:
    chunks = list(collect.run(StepContext("collect", "collect", {}, "f", tmp_path), []))
    assert len(chunks) == 1 and chunks[0].records.schema.equals(records.SCHEMA) and chunks[0].consumed == 0


def test_emit_cuts_fixed_size_chunks(monkeypatch) -> None:
    monkeypatch.setattr(collect, "CHUNK_ROWS", 2)
    t = table([rec("a", i) for i in range(5)])
    chunks = list(collect.emit(t, consumed=7, skipped={"x": 2, "y": 0}, files={"f": b"1"}))
    assert [c.records.num_rows for c in chunks] == [2, 2, 1]
    assert [c.consumed for c in chunks] == [7, 0, 0] and chunks[0].skipped == {"x": 2} and chunks[0].files == {"f": b"1"}


def test_add_provenance_to_some_rows() -> None:
    rows = [rec("a", 0, provenance=["ingest.a"]), rec("a", 1), rec("a", 2, provenance=["x", "y"]), rec("a", 3)]
    t = pa.concat_tables([table(rows[:2]), table(rows[2:])]).slice(0, 4)
    out = collect.add_provenance(t, "step", np.array([True, False, True, True]))
    assert out.column("provenance").to_pylist() == [["ingest.a", "step"], [], ["x", "y", "step"], ["step"]]
    assert collect.add_provenance(t.slice(1, 2), "s").column("provenance").to_pylist() == [["s"], ["x", "y", "s"]]


def test_source_mask() -> None:
    t = table([rec("a", 0), rec("b", 0), rec("c", 0)])
    assert collect.source_mask(t, ["a", "c"]).tolist() == [True, False, True]
    assert collect.source_mask(t, None).tolist() == [True, True, True]


def test_smallest_breaks_ties_by_id_whatever_the_order() -> None:
    values = np.array([3, 1, 2, 2, 2, 5])
    ids = ["f", "e", "d", "c", "b", "a"]
    mask = collect.smallest(values, 3, ids)
    assert [ids[i] for i in np.flatnonzero(mask)] == ["e", "c", "b"]
    perm = np.random.default_rng(0).permutation(6)
    again = collect.smallest(values[perm], 3, [ids[i] for i in perm])
    assert sorted(ids[i] for i in perm[again]) == ["b", "c", "e"]
    assert collect.smallest(values, 0, ids).sum() == 0 and collect.smallest(values, 9, ids).all()


def test_rejects_carry_the_record() -> None:
    t = table([rec("a", 0, scores=[("loss", 1.5)]), rec("a", 1)])
    (reject,) = collect.rejects_for(t, {0: ("why", "because")})
    assert reject.reason == "why" and reject.origin == "a:0" and '"scores":{"loss":1.5}' in reject.record
