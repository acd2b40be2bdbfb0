"""Mixing a pool into stages: recipec's mixer against `datasets.interleave_datasets`.

    python benchmarks/bench_mix.py [--records 10000000] [--sources 6] [--repeat 1] [--read-interleaved]
                                   [--scenarios shares,random,parts] [--out FILE]

A synthetic pool of `--records` records (32-hex ids, source, data_type; the columns a mix reads),
as Arrow in memory, sources in contiguous blocks as after `collect`. Generating it is not timed.
Three scenarios, each built by both sides from the same Arrow tables (the `datasets` side gets
one in-memory `Dataset` per source, made before the clock starts):

    shares   one stage: a share of the stage's total per source, shuffled; the total is the most the
             sources allow (what interleave gives too, give or take a few records).
             datasets: interleave_datasets(probabilities=shares, stopping_strategy="first_exhausted").
    random   one stage: random(N) per source, N = half the source, shuffled.
             datasets: shuffle(seed).select(range(N)) per source, then interleave_datasets
             (probabilities = N / total, "all_exhausted" stops once each has been used up).
    parts    three stages: part(k, 3) of a pool of all sources, shuffled.
             datasets: per source shuffle(seed).shard(3, k - 1, contiguous=True), interleaved.

Build = from the input tables to the stage's records (ours: the mix op's selection, order and
`take` of the rows, materialised; theirs: the `datasets` calls, which give an indices mapping).
Index = ours without the `take`: the selection in order, as row positions, which is what
`interleave_datasets` gives (an indices mapping over the concatenated sources).
Read = iterate every row of the result into Python values, in batches of 64K, against the same
for a plain sequential read of as many rows from the start of the pool (median of at least 3,
alternating), and
with --read-interleaved the interleaved `Dataset` read with `Dataset.iter`, for reference. Prints a
table of medians and ratios; writes them as JSON (--out).
Targets: build at least 50x faster than interleave_datasets; reading ours not slower than a
plain sequential read (ratio <= ~1).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipec import ir  # noqa: E402
from recipec.ops import mix  # noqa: E402

SEED = 1234
SIZES = (0.30, 0.20, 0.20, 0.12, 0.10, 0.08)  # of the pool, per source (cycled for more sources)
SHARES = (0.20, 0.25, 0.15, 0.15, 0.15, 0.10)  # the mixture asked for in `shares`
TYPES = ("general", "ocr", "doc_chart_screen", "math_reasoning", "text", "general")
BATCH = 65_536


# ---- the pool -----------------------------------------------------------------------------------


def make_pool(records: int, sources: int) -> pa.Table:
    """ids (32 lowercase hex digits, like records.record_id), source and data_type, sources in blocks."""
    rng = np.random.default_rng(SEED)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[rng.integers(0, 16, (records, 32), dtype=np.uint8)]
    offsets = pa.py_buffer((np.arange(records + 1, dtype=np.int32) * 32).tobytes())
    ids = pa.Array.from_buffers(pa.string(), records, [None, offsets, pa.py_buffer(digits.tobytes())])
    weights = np.array([SIZES[i % len(SIZES)] for i in range(sources)])
    counts = np.floor(weights / weights.sum() * records).astype(int)
    counts[0] += records - counts.sum()
    names = [f"source_{i}" for i in range(sources)]
    source = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(sources), counts), pa.int32()),
                                            pa.array(names)).cast(pa.string())
    types = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(sources), counts), pa.int32()),
                                           pa.array([TYPES[i % len(TYPES)] for i in range(sources)])).cast(pa.string())
    return pa.table({"id": ids, "source": source, "data_type": types})


def per_source(pool: pa.Table) -> dict[str, pa.Table]:
    result, start = {}, 0
    runs = mix.positions_by_value(pool.column("source"))
    for name, rows in runs.items():
        result[name] = pool.slice(int(rows[0]), len(rows))
        start += len(rows)
    return result


# ---- the two sides ------------------------------------------------------------------------------


def ours(pool: pa.Table, entries: list[dict[str, Any]], stage: str, samples: int | None = None,
         pools: dict[str, tuple[str, ...]] | None = None, materialize: bool = True) -> Any:
    """The mix op's work on the pool: selection and order, then (unless asked not to) the rows."""
    spec = mix.MixSpec(stage=stage, entries=tuple(ir.MixEntry(**e) for e in entries), pools=pools or {},
                       samples=samples, balance=None, order=ir.Order(kind="shuffle"), seed=SEED)
    if not materialize:
        return mix.select(pool.column("id"), pool.column("source"), spec).positions
    with ThreadPoolExecutor(1) as background:  # as the mix op does
        data_type = background.submit(mix.runs_of, pool.column("data_type"))
        chosen = mix.select(pool.column("id"), pool.column("source"), spec)
        runs = {"source": chosen.source_runs, "data_type": data_type.result()}
    return mix.take_rows(pool, chosen.positions, runs)


def scenario_shares(pool, tables, datasets_mod, hf):
    names = list(tables)
    shares = np.array([SHARES[i % len(SHARES)] for i in range(len(names))])
    shares = shares / shares.sum()

    def theirs():
        return datasets_mod.interleave_datasets([hf[n] for n in names], probabilities=shares.tolist(), seed=SEED,
                                                stopping_strategy="first_exhausted")

    # interleave stops when the first source runs out; our stage takes as many as it can without
    # running out either (about the same size), as shares of the stage's total
    size = min(int(tables[n].num_rows / p) for n, p in zip(names, shares))
    exact = [int(x) for x in np.floor(shares * size)]
    size = sum(exact)
    entries = [{"name": n, "kind": "share", "share": e / size} for n, e in zip(names, exact)]
    return (lambda rows=True: ours(pool, entries, "shares", samples=size, materialize=rows)), theirs


def scenario_random(pool, tables, datasets_mod, hf):
    names = list(tables)
    wanted = {n: tables[n].num_rows // 2 for n in names}
    entries = [{"name": n, "kind": "random", "count": wanted[n]} for n in names]
    total = sum(wanted.values())

    def theirs():
        picked = [hf[n].shuffle(seed=SEED).select(range(wanted[n])) for n in names]
        return datasets_mod.interleave_datasets(picked, probabilities=[wanted[n] / total for n in names], seed=SEED,
                                                stopping_strategy="all_exhausted")

    return (lambda rows=True: ours(pool, entries, "random", materialize=rows)), theirs


def scenario_parts(pool, tables, datasets_mod, hf):
    names = list(tables)
    total = pool.num_rows

    def build_ours(rows: bool = True):
        return [ours(pool, [{"name": "pool", "kind": "part", "part": (k, 3)}], f"s{k}", pools={"pool": tuple(names)},
                     materialize=rows) for k in (1, 2, 3)]

    def theirs():
        stages = []
        for k in (1, 2, 3):
            shards = [hf[n].shuffle(seed=SEED).shard(num_shards=3, index=k - 1, contiguous=True) for n in names]
            stages.append(datasets_mod.interleave_datasets(
                shards, probabilities=[tables[n].num_rows / total for n in names], seed=SEED,
                stopping_strategy="first_exhausted"))
        return stages

    return build_ours, theirs


SCENARIOS: dict[str, Callable] = {"shares": scenario_shares, "random": scenario_random, "parts": scenario_parts}


# ---- timing -------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def read_arrow(table: pa.Table) -> int:
    rows = 0
    for batch in table.to_batches(max_chunksize=BATCH):
        columns = [c.to_pylist() for c in batch.columns]
        rows += len(columns[0])
    return rows


def read_dataset(ds: Any) -> int:
    rows = 0
    for batch in ds.iter(batch_size=BATCH):
        rows += len(next(iter(batch.values())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (median)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--read-interleaved", action="store_true",
                        help="also time reading the interleave_datasets result (slow: ~10 us a row)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import datasets as datasets_mod

    datasets_mod.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)

    start = time.perf_counter()
    pool = make_pool(args.records, args.sources)
    tables = per_source(pool)
    hf = {n: datasets_mod.Dataset(t) for n, t in tables.items()}
    print(f"pool: {pool.num_rows:,} records in {len(tables)} sources, made in {time.perf_counter() - start:.1f} s "
          f"(not timed)", flush=True)

    results: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        build_ours, build_theirs = SCENARIOS[name](pool, tables, datasets_mod, hf)
        select_s, _ = timed(lambda: build_ours(False), args.repeat)
        ours_s, our_out = timed(build_ours, args.repeat)
        theirs_s, their_out = timed(build_theirs, args.repeat)
        our_tables = our_out if isinstance(our_out, list) else [our_out]
        their_sets = their_out if isinstance(their_out, list) else [their_out]
        rows = sum(t.num_rows for t in our_tables)
        plain = [pool.slice(0, t.num_rows) for t in our_tables]
        reads = max(3, args.repeat)  # cheap next to the builds: a steadier median
        read_ours_s, read_plain_s = [], []
        for _ in range(reads):  # alternate, so a busy moment of the machine hits both alike
            read_ours_s.append(timed(lambda: sum(read_arrow(t) for t in our_tables), 1)[0])
            read_plain_s.append(timed(lambda: sum(read_arrow(t) for t in plain), 1)[0])
        read_ours_s, read_plain_s = statistics.median(read_ours_s), statistics.median(read_plain_s)
        read_theirs_s = None
        if args.read_interleaved:
            read_theirs_s, _ = timed(lambda: sum(read_dataset(d) for d in their_sets), args.repeat)
        results[name] = {
            "rows_ours": rows, "rows_datasets": sum(len(d) for d in their_sets),
            "build_ours_s": round(ours_s, 4), "build_datasets_s": round(theirs_s, 4),
            "build_speedup": round(theirs_s / ours_s, 1),
            "select_ours_s": round(select_s, 4), "select_speedup": round(theirs_s / select_s, 1),
            "read_ours_s": round(read_ours_s, 4), "read_plain_s": round(read_plain_s, 4),
            "read_ratio_ours_vs_plain": round(read_ours_s / read_plain_s, 3),
            "read_datasets_s": None if read_theirs_s is None else round(read_theirs_s, 4),
        }
        print(f"  {name}: done", flush=True)
        del our_out, their_out, our_tables, their_sets
        gc.collect()

    header = ("scenario", "rows", "build ours", "build datasets", "speedup", "index ours", "speedup", "read ours",
              "read plain", "ours/plain", "read datasets")
    lines = [header]
    for name, r in results.items():
        lines.append((name, f"{r['rows_ours']:,}", f"{r['build_ours_s']:.3f} s", f"{r['build_datasets_s']:.2f} s",
                      f"{r['build_speedup']:.0f}x", f"{r['select_ours_s']:.3f} s", f"{r['select_speedup']:.0f}x",
                      f"{r['read_ours_s']:.2f} s", f"{r['read_plain_s']:.2f} s",
                      f"{r['read_ratio_ours_vs_plain']:.2f}",
                      "-" if r["read_datasets_s"] is None else f"{r['read_datasets_s']:.2f} s"))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    print()
    for i, row in enumerate(lines):
        print("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    figures = {"benchmark": "mix", "records": args.records, "sources": args.sources, "repeat": args.repeat,
               "datasets_version": datasets_mod.__version__, "pyarrow_version": pa.__version__,
               "numpy_version": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "scenarios": results}
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
