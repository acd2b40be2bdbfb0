"""`recipec why` on a generated million-record run: index build time, then the time of one question.

    .venv/bin/python benchmarks/bench_why.py [--records 1000000] [--dir /tmp/bench-why]

Generates a store and report.json shaped like a real run (ingest of N records in 64K-row shards, a
collect, an exact dedup dropping 3%, a threshold dropping 10%, two stage mixes taking disjoint
halves), then times, as separate processes like a user would run them: the first `recipec why`
(which builds the index), and `recipec why` by recipec id, by the data set's own id, by origin, for a
dropped record and for a near duplicate. No timing is asserted anywhere; BENCHMARKS.md has figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARD = 65_536


def generate(root: Path, n: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from recipec import records
    from recipec.runtime.store import Store

    store = Store(root / "store")
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 10, n)

    def table(rows: list[int], provenance: list[str]) -> pa.Table:
        return pa.table({
            "id": [ids[i] for i in rows], "source": ["web"] * len(rows),
            "origin": [f"data/web.jsonl:{i + 1} id=web-{i}" for i in rows],
            "images": [[{"path": f"img/{i}.jpg", "sha256": ids[i] * 2, "width": 384, "height": 384}] for i in rows],
            "conversations": [[{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                               {"from": "gpt", "value": f"Picture {i}."}] for i in rows],
            "category": ["comprehensive"] * len(rows), "data_type": ["general"] * len(rows),
            "image_tags": [[] for _ in rows], "instruction_tags": [[] for _ in rows],
            "scores": [[("score", float(score[i]))] for i in rows],
            "provenance": [provenance for _ in rows], "source_id": [f"web-{i}" for i in rows],
        }, schema=records.SCHEMA)

    def rejects(step: str, rows: list[int], reason: str, detail) -> pa.Table:
        return pa.table({"step": [step] * len(rows), "id": [ids[i] for i in rows], "source": ["web"] * len(rows),
                         "origin": [f"data/web.jsonl:{i + 1} id=web-{i}" for i in rows], "reason": [reason] * len(rows),
                         "detail": [detail(i) for i in rows], "record": ["{}"] * len(rows)}, schema=records.REJECT_SCHEMA)

    steps = []
    alive = list(range(n))
    provenance: list[str] = []

    def step(step_id: str, op: str, kept: list[int], dropped: list[int], reason: str = "", detail=None,
             params: dict | None = None) -> list[int]:
        key = hashlib.sha256(step_id.encode()).hexdigest()
        if store.done(key) is None:
            writer = store.writer(key)
            for start in range(0, len(kept), SHARD):
                writer.add_records(table(kept[start:start + SHARD], provenance))
            for start in range(0, len(dropped), SHARD):
                writer.add_rejects(rejects(step_id, dropped[start:start + SHARD], reason, detail))
            writer.commit({"step": step_id, "op": op, "params": params or {}, "records_in": len(kept) + len(dropped),
                           "records_out": len(kept), "dropped": {reason: len(dropped)} if dropped else {}})
        steps.append({"id": step_id, "op": op, "key": key, "records_in": len(kept) + len(dropped),
                      "records_out": len(kept), "dropped": {reason: len(dropped)} if dropped else {}})
        return kept

    provenance = ["ingest.web"]
    alive = step("ingest.web", "ingest", alive, [])
    alive = step("collect", "collect", alive, [])
    dup = set(range(1, n, 33))
    provenance = [*provenance, "filter.dedup_exact"]
    alive = step("filter.dedup_exact", "dedup_exact", [i for i in alive if i not in dup], sorted(dup),
                 "exact_duplicate", lambda i: f"same image, text as {ids[i - 1]} (first in input order)")
    low = {i for i in alive if score[i] < 1.0}
    provenance = [*provenance, "filter.keep_score"]
    alive = step("filter.keep_score", "threshold", [i for i in alive if i not in low], sorted(low),
                 "threshold_score", lambda i: f"score = {score[i]:.4f} is not >= 1")
    half = len(alive) // 2
    step("mix.s1", "mix", alive[:half], alive[half:], "not_selected", lambda i: "", {"stage": "s1"})
    step("mix.s2", "mix", alive[half:], alive[:half], "not_selected", lambda i: "", {"stage": "s2"})
    report = {"recipe": "bench", "fingerprint": "0" * 64, "seed": 0, "status": "complete", "steps": steps,
              "stages": [], "warnings": [], "run": {"store": str(store.root)}}
    (root / "out").mkdir(parents=True, exist_ok=True)
    (root / "out" / "report.json").write_text(json.dumps(report, indent=2))
    return {"kept": ids[0], "dup": ids[1], "low": ids[min(low)], "own": f"web-{n - 1}",
            "origin": f"data/web.jsonl:{n // 2 + 1}"}


def timed(root: Path, query: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recipec", "why", query, "--out", str(root / "out")],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"why {query} failed: {done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dir", default="/tmp/bench-why")
    args = parser.parse_args()
    root = Path(args.dir)
    started = time.perf_counter()
    queries = generate(root, args.records)
    print(f"generated {args.records:,} records in {time.perf_counter() - started:.1f} s under {root}")
    shutil.rmtree(root / "store" / "index", ignore_errors=True)
    print(f"first question (builds the index): {timed(root, queries['kept']):.2f} s")
    index = next((root / "store" / "index").glob("*.sqlite"))
    print(f"index: {index.stat().st_size / 1e6:.0f} MB")
    for name, query in queries.items():
        best = min(timed(root, query) for _ in range(3))
        print(f"why {name:<6} {query[:40]:<40} {best:.3f} s (best of 3, whole process)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
