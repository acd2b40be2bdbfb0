#!/usr/bin/env python
"""Scale: the data steps of a recipe at 1M, 3M (and 10M) records: wall time, peak RSS, growth.

    python benchmarks/bench_scale.py [--sizes 1M,3M] [--image-share 0.01] [--workers 2] [--keep DIR]

Per size, a generated LLaVA JSONL source (text instructions with a `loss`, a share of them with a
small image of their own; some exact duplicates, some re-used images, some broken lines) goes
through `recipec run --data-only` of a recipe with exact and pHash dedup, a loss percentile, two
stages (`part(1, 2)` and `part(2, 2)`, shuffled) and their LLaVA JSON export, in a fresh store.
Printed per size: wall seconds and peak RSS of the `recipec` process (the largest process of the
run: `getrusage(RUSAGE_CHILDREN)`), records per second, the store's and the outputs' bytes per
record; then the growth exponent of time and of memory fitted over the sizes (1.0 is linear, 0.0
flat); then, on the largest size's file, the ingest step's own seconds (from report.json) against
`datasets.load_dataset("json")` and `pyarrow.json.read_json` on the same file in the same run.

Images are 64x64 PNGs, drawn once per distinct image (disk is the limit at 10M: 1% is 100K files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
recipe "scale" {
  seed = 7
}

model vlm {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
  projector = mlp2x_gelu
}

source web {
  format = llava_jsonl
  path = "data/web.jsonl"
  images = "data/images"
  category = comprehensive
  type = general
  expect = %(n)d
  scores = [loss]
}

filter processing {
  dedup exact {
    by = [image, text]
  }
  dedup phash {
    max_distance = 4
  }
}

filter quality {
  drop loss top 5%%
}

stage s1 {
  train = [projector]
  grid = 1x1
  lr = 1e-3
  batch = 512
  mix {
    web = part(1, 2)
  }
}

stage s2 {
  train = all
  grid = 2x2
  max_tiles = 4
  lr = 1e-5
  batch = 512
  mix {
    web = part(2, 2)
  }
}
"""

WORDS = ("data model image caption vision token chart table answer question reason detail scene object action "
         "figure value total growth rate sample stage mixture loss score tag").split()


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def make_images(folder: Path, count: int, seed: int) -> None:
    """`count` distinct 64x64 PNGs (blocky random patterns, far apart in pHash)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((64, 64), Image.NEAREST).save(path, optimize=False, compress_level=1)


def make_source(folder: Path, n: int, image_share: float, seed: int) -> dict[str, int]:
    """The JSONL file: n lines; 2% exact copies of an earlier line, 0.05% broken lines, `image_share`
    of the records with an image (10% of those re-use the previous image record's image)."""
    rng = random.Random(seed)
    images = 0
    planted = {"copies": 0, "broken": 0, "image_records": 0}
    recent: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "web.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if r < 0.0005:
                f.write('{"id": "w%d", "conversations": [\n' % i)
                planted["broken"] += 1
                continue
            if r < 0.0205 and recent:
                line = rng.choice(recent)
                f.write(line.replace('"id": "', '"id": "c%d-' % i, 1))
                planted["copies"] += 1
                continue
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            loss = round(rng.uniform(0.2, 4.0), 4)
            if rng.random() < image_share:
                index = images - 1 if images and rng.random() < 0.1 else images
                images = max(images, index + 1)
                planted["image_records"] += 1
                line = ('{"id": "w%d", "image": "%04d/%07d.png", "loss": %s, "conversations": [{"from": "human", '
                        '"value": "<image>\\n%s?"}, {"from": "gpt", "value": "%s."}]}\n'
                        % (i, index // 1000, index, loss, words, answer))
            else:
                line = ('{"id": "w%d", "loss": %s, "conversations": [{"from": "human", "value": "%s?"}, '
                        '{"from": "gpt", "value": "%s."}]}\n' % (i, loss, words, answer))
            f.write(line)
            if len(recent) < 1000:
                recent.append(line)
            elif rng.random() < 0.01:
                recent[rng.randrange(1000)] = line
    planted["images"] = images
    return planted


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_recipe(project: Path, workers: int) -> tuple[float, float, dict]:
    store, out = project / "store", project / "out"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recipec", "run", str(project / "scale.recipe"), "--data-only", "-q",
                           "--store", str(store), "--out", str(out), "--workers", str(workers)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"recipec run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print(f"  (peak RSS not above an earlier child's {before / 1e6:.2f} GB: it is at most that)")
    report = json.loads((out / "report.json").read_text())
    return wall, peak_kb * 1024 / 1e9, report


def fit(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def peers(path: Path) -> dict[str, float]:
    """Seconds to load `path` with `datasets.load_dataset("json")` and `pyarrow.json.read_json`."""
    result = {}
    code = ("import sys, time, tempfile; import datasets; t = time.perf_counter(); "
            "d = datasets.load_dataset('json', data_files=sys.argv[1], split='train', cache_dir=tempfile.mkdtemp()); "
            "print(len(d), time.perf_counter() - t)")
    seconds = _timed(code, path)
    if seconds is not None:
        result["datasets.load_dataset"] = seconds
    else:  # the broken lines stop datasets: time it on the valid lines only
        clean = path.with_name("valid.jsonl")
        with open(path) as src, open(clean, "w") as dst:
            for line in src:
                if line.rstrip().endswith("}"):
                    dst.write(line)
        seconds = _timed(code, clean)
        if seconds is not None:
            result["datasets.load_dataset (valid lines only)"] = seconds
        clean.unlink()
    code = ("import sys, time; import pyarrow.json as j; t = time.perf_counter(); "
            "tb = j.read_json(sys.argv[1], parse_options=j.ParseOptions(newlines_in_values=False)); "
            "print(tb.num_rows, time.perf_counter() - t)")
    seconds = _timed(code, path)
    if seconds is not None:
        result["pyarrow.json.read_json"] = seconds
    return result


def _timed(code: str, path: Path) -> float | None:
    """The seconds `code` prints last, run in a fresh interpreter on `path`; None when it fails."""
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return float(done.stdout.split()[-1]) if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,3M")
    parser.add_argument("--image-share", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="generate into and keep this folder (re-uses generated data)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="recipec-scale-"))
    rows = []
    try:
        images = root / "images"
        make_images(images, max(1, int(max(sizes) * args.image_share * 1.05)), seed=1)
        for n in sizes:
            project = root / f"n{n}"
            data = project / "data"
            if not (data / "web.jsonl").exists():
                started = time.perf_counter()
                planted = make_source(data, n, args.image_share, seed=n)
                (data / "planted.json").write_text(json.dumps(planted))
                print(f"generated {n:,} records in {time.perf_counter() - started:.1f} s: {planted}")
            if not (data / "images").exists():
                (data / "images").symlink_to(images, target_is_directory=True)
            (project / "scale.recipe").write_text(RECIPE % {"n": n})
            wall, peak, report = run_recipe(project, args.workers)
            steps = {s["id"]: s for s in report["steps"]}
            ingest = next(s for s in report["steps"] if s["op"] == "ingest")
            row = {"n": n, "wall": wall, "peak_gb": peak, "ingest_s": ingest["seconds"],
                   "store_b": folder_bytes(project / "store" / "steps") / n,
                   "out_b": folder_bytes(project / "out") / n,
                   "steps": {k: (v["seconds"], v["records_out"]) for k, v in steps.items()}}
            rows.append(row)
            print(f"{n:>11,} records: {wall:7.1f} s wall, {n / wall:9,.0f} records/s, peak RSS {peak:5.2f} GB, "
                  f"ingest {ingest['seconds']:.1f} s, store {row['store_b']:.0f} B/record, out {row['out_b']:.0f} B/record")
            for k, (sec, out) in row["steps"].items():
                print(f"    {k:<28} {sec:8.2f} s  {out:>11,} out")
        if len(rows) > 1:
            print(f"growth exponent: time {fit([r['n'] for r in rows], [r['wall'] for r in rows]):.2f}, "
                  f"peak RSS {fit([r['n'] for r in rows], [r['peak_gb'] for r in rows]):.2f}")
        if not args.no_peers:
            largest = root / f"n{sizes[-1]}" / "data" / "web.jsonl"
            found = peers(largest)
            print(f"ingest of {sizes[-1]:,} lines: recipec {rows[-1]['ingest_s']:.1f} s (validation, ids, images)")
            for name, sec in found.items():
                print(f"    {name:<44} {sec:6.1f} s   recipec / it: {rows[-1]['ingest_s'] / sec:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
