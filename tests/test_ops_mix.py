"""recipec.ops.mix: counts as `allocate` says, disjoint parts, stable seeded draws, balancing, order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recipec import ir, records
from recipec.allocate import allocate, part_size
from recipec.ops import mix
from recipec.ops.base import OperationError, StepContext


def rec(source: str, i: int, data_type: str = "general", **scores: float) -> dict[str, Any]:
    conv = [{"from": "human", "value": f"{source} question {i}"}, {"from": "gpt", "value": "answer"}]
    return {"id": records.record_id(source, [], conv), "source": source, "origin": f"{source}:{i}", "images": [],
            "conversations": conv, "category": "other", "data_type": data_type, "image_tags": [],
            "instruction_tags": [], "scores": list(scores.items()), "provenance": []}


def corpus(sizes: dict[str, int], types: dict[str, str] | None = None) -> list[dict[str, Any]]:
    types = types or {}
    return [rec(s, i, types.get(s, "general")) for s, n in sizes.items() for i in range(n)]


def params(entries: list[dict[str, Any]], *, stage: str = "s1", samples: int | None = None,
           pools: dict[str, list[str]] | None = None, balance: dict[str, Any] | None = None,
           order: dict[str, Any] | None = None, seed: int = 42) -> dict[str, Any]:
    return {"stage": stage, "mix": [ir.MixEntry(**e).model_dump(mode="json") for e in entries],
            "pools": pools or {}, "samples": samples, "balance": balance, "order": order or {"kind": "shuffle"},
            "seed": seed, "data_types": {}, "categories": {}}


def run(p: dict[str, Any], rows: list[dict[str, Any]] | list[pa.Table], tmp_path: Path):
    tables = [pa.Table.from_pylist(rows, schema=records.SCHEMA)] if rows and isinstance(rows[0], dict) else rows
    ctx = StepContext(f"mix.{p['stage']}", "mix", p, "f", tmp_path)
    chunks = list(mix.run(ctx, tables))
    out = pa.concat_tables([c.records for c in chunks])
    skipped: dict[str, int] = {}
    for c in chunks:
        for k, v in c.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert not any(c.rejects for c in chunks)
    assert sum(c.consumed for c in chunks) == sum(t.num_rows for t in tables) == out.num_rows + sum(skipped.values())
    files = {k: v for c in chunks for k, v in c.files.items()}
    return out, skipped, json.loads(files["composition.json"])


def by_source(out: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in out.column("source").to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return counts


def test_counts_follow_allocate(tmp_path: Path) -> None:
    rows = corpus({"a": 50, "b": 40, "c": 30, "d": 20, "e": 10})
    entries = [{"name": "a", "kind": "random", "count": 30}, {"name": "b", "kind": "share", "share": 0.2},
               {"name": "p", "kind": "weight", "weight": 1.0}, {"name": "e", "kind": "first", "count": 4}]
    p = params(entries, samples=100, pools={"p": ["c", "d"]})
    out, skipped, composition = run(p, rows, tmp_path)
    expected = allocate(tuple(ir.MixEntry(**e) for e in entries),
                        {"a": {"a": 50}, "b": {"b": 40}, "p": {"c": 30, "d": 20}, "e": {"e": 10}}, samples=100)
    assert composition["by_entry"] == expected.by_entry
    assert by_source(out) == expected.by_source() and out.num_rows == 100
    assert skipped == {"not_selected": 150 - 100}
    assert composition["by_data_type"] == {"general": 100} and composition["total"] == 100
    assert all(p == ["mix.s1"] for p in out.column("provenance").to_pylist())


def test_first_takes_the_input_order(tmp_path: Path) -> None:
    rows = corpus({"a": 10, "b": 5})
    out, skipped, _ = run(params([{"name": "a", "kind": "first", "count": 3}], order={"kind": "sequential"}),
                          rows, tmp_path)
    assert out.column("origin").to_pylist() == ["a:0", "a:1", "a:2"]
    assert skipped == {"not_selected": 7, "not_in_stage": 5}


def test_parts_are_disjoint_and_cover_the_pool(tmp_path: Path) -> None:
    rows = corpus({"x": 101, "y": 37, "z": 9})
    taken = []
    for k in (1, 2, 3):
        p = params([{"name": "pool", "kind": "part", "part": (k, 3)}], stage=f"s{k}", pools={"pool": ["x", "y"]})
        out, _, _ = run(p, rows, tmp_path)
        assert by_source(out) == {"x": part_size(101, k, 3), "y": part_size(37, k, 3)}
        taken.append(set(out.column("id").to_pylist()))
    assert not (taken[0] & taken[1]) and not (taken[0] & taken[2]) and not (taken[1] & taken[2])
    assert set().union(*taken) == {r["id"] for r in rows if r["source"] in ("x", "y")}


def test_seeded_draws_survive_reordering_and_resharding(tmp_path: Path) -> None:
    rows = corpus({"a": 300, "b": 200})
    entries = [{"name": "a", "kind": "random", "count": 40}, {"name": "pool", "kind": "part", "part": (2, 3)}]
    p = params(entries, pools={"pool": ["b"]})
    first = set(run(p, rows, tmp_path)[0].column("id").to_pylist())
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    shards = [pa.Table.from_pylist(shuffled[i:i + 33], schema=records.SCHEMA) for i in range(0, len(rows), 33)]
    again = set(run(p, shards, tmp_path)[0].column("id").to_pylist())
    assert first == again
    # a smaller draw is a subset of a larger one; another seed draws another sample
    small = set(run(params([{"name": "a", "kind": "random", "count": 10}]), rows, tmp_path)[0].column("id").to_pylist())
    large = set(run(params([{"name": "a", "kind": "random", "count": 20}]), rows, tmp_path)[0].column("id").to_pylist())
    other = set(run(params([{"name": "a", "kind": "random", "count": 20}], seed=7), rows, tmp_path)[0].column("id").to_pylist())
    assert small < large and other != large


def test_balancing_by_data_type(tmp_path: Path) -> None:
    rows = corpus({"gen": 100, "ocr": 12, "math": 40}, {"gen": "general", "ocr": "ocr", "math": "math_reasoning"})
    rows += [rec("mixed", i, "ocr" if i % 2 else "math_reasoning") for i in range(20)]
    entries = [{"name": n, "kind": "all"} for n in ("gen", "ocr", "math", "mixed")]
    out, _, composition = run(params(entries, samples=90, balance={"by": "data_type"}), rows, tmp_path)
    # 30 each, but ocr has only 22 (12 + 10 from `mixed`): the 8 left go to the others
    assert composition["by_data_type"] == {"general": 34, "ocr": 22, "math_reasoning": 34}
    assert out.num_rows == 90


def test_balancing_respects_counts_and_parts(tmp_path: Path) -> None:
    rows = corpus({"gen": 100, "ocr": 100}, {"gen": "general", "ocr": "ocr"})
    entries = [{"name": "gen", "kind": "random", "count": 10}, {"name": "ocr", "kind": "part", "part": (1, 2)}]
    out, _, composition = run(params(entries, samples=40, balance={"by": "data_type"}), rows, tmp_path)
    assert composition["by_source"] == {"gen": 10, "ocr": 30}
    drawn = set(run(params([entries[0]]), rows, tmp_path)[0].column("id").to_pylist())
    assert {i for i, s in zip(out.column("id").to_pylist(), out.column("source").to_pylist()) if s == "gen"} == drawn


def test_orders(tmp_path: Path) -> None:
    rows = [rec("a", i, score=float(i % 4)) for i in range(12)] + [rec("a", 12)] + corpus({"b": 5})
    entries = [{"name": "b", "kind": "all"}, {"name": "a", "kind": "all"}]
    seq = run(params(entries, order={"kind": "sequential"}), rows, tmp_path)[0].column("origin").to_pylist()
    assert seq == [f"b:{i}" for i in range(5)] + [f"a:{i}" for i in range(13)]
    shuffled = run(params(entries), rows, tmp_path)[0].column("id").to_pylist()
    assert shuffled == run(params(entries), rows[::-1], tmp_path)[0].column("id").to_pylist()
    assert shuffled != run(params(entries, stage="s2"), rows, tmp_path)[0].column("id").to_pylist()
    out = run(params([entries[1]], order={"kind": "descending", "field": "score"}), rows, tmp_path)[0]
    scores = [dict(s).get("score") for s in out.column("scores").to_pylist()]
    assert scores == [3.0] * 3 + [2.0] * 3 + [1.0] * 3 + [0.0] * 3 + [None]
    ids = out.column("id").to_pylist()
    assert ids[:3] == sorted(ids[:3])
    up = run(params([entries[1]], order={"kind": "ascending", "field": "score"}), rows, tmp_path)[0]
    assert [dict(s).get("score") for s in up.column("scores").to_pylist()][:4] == [0.0, 0.0, 0.0, 1.0]


def test_errors(tmp_path: Path) -> None:
    rows = corpus({"a": 10, "b": 10})
    with pytest.raises(OperationError, match="needs 30 samples"):
        run(params([{"name": "a", "kind": "all"}, {"name": "b", "kind": "all"}], samples=30), rows, tmp_path)
    with pytest.raises(OperationError, match="asks for 11"):
        run(params([{"name": "a", "kind": "random", "count": 11}]), rows, tmp_path)
    with pytest.raises(OperationError, match="both"):
        run(params([{"name": "a", "kind": "all"}, {"name": "p", "kind": "all"}], pools={"p": ["a", "b"]}), rows, tmp_path)
    out, _, _ = run(params([{"name": "a", "kind": "cap", "count": 11}]), rows, tmp_path)
    assert out.num_rows == 10  # cap: at most


def test_id_keys_fast_and_slow_paths_agree() -> None:
    ids = [records.record_id("s", [], [{"from": "human", "value": str(i)}]) for i in range(50)]
    fast = mix.id_keys(pa.chunked_array([pa.array(ids[:20]), pa.array(ids[20:])]))
    slow = mix.id_keys(pa.array(ids[:20] + ["short-id"] + ids[20:]))
    assert np.array_equal(fast, np.delete(slow, 20))
    assert np.array_equal(mix.id_keys(pa.array(ids).slice(5, 30)), fast[5:35])
    assert len(set(fast.tolist())) == 50


def test_sort_by_keys_settles_ties_by_id() -> None:
    keys = np.array([5, 1, 5, 3, 1], dtype=np.uint64)
    ids = ["e", "d", "c", "b", "a"]
    payload = np.arange(5)
    tie = lambda run: [(int(keys[i]), ids[i]) for i in run]  # noqa: E731
    assert mix.sort_by_keys(keys, payload, tie).tolist() == [4, 1, 3, 2, 0]
    big = np.random.default_rng(0).integers(0, 2**63, size=10_000, dtype=np.uint64)
    rows = np.arange(10_000)
    assert np.array_equal(mix.sort_by_keys(big, rows, lambda run: [int(big[i]) for i in run]), np.argsort(big, kind="stable"))


def test_mix_in_pieces_is_mix_whole(tmp_path: Path) -> None:
    """The Ray executor's split: the column pass per piece, combined, then the selection: the op's output."""
    rows = [rec("a", i, "general" if i % 2 else "ocr", loss=float(i % 5)) for i in range(30)]
    rows += [rec("b", i, "math") for i in range(20)]
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    for order, balance, samples in (({"kind": "descending", "field": "loss"}, None, None),
                                    ({"kind": "shuffle"}, {"by": "data_type"}, 24)):
        p = params([{"name": "a", "kind": "random", "count": 12}, {"name": "b", "kind": "all"}], order=order,
                   balance=balance, samples=samples)
        ctx = StepContext("mix.s1", "mix", p, "f", tmp_path)
        found = mix.run.combine([mix.run.per_record(ctx, [table.slice(a, 7)]) for a in range(0, table.num_rows, 7)])
        split, whole = list(mix.run.decide(ctx, [table], found)), list(mix.run(ctx, [table]))
        assert [c.records.equals(w.records) for c, w in zip(split, whole)] == [True] * len(whole)
        assert [(c.files, c.skipped, c.consumed) for c in split] == [(c.files, c.skipped, c.consumed) for c in whole]
