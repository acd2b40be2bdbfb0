#!/usr/bin/env python
"""Ingest of records with images against the cost of their images alone: how image-bound it is.

    python benchmarks/bench_ingest_images.py [--images 2000] [--reuse 0.2] [--workers 2] [--keep DIR]

A generated corpus of varied images (`_images.py`: charts, text pages and photo-like scenes,
256 to 1024 pixels a side, JPEG and PNG) and a LLaVA JSONL source of one record an image, plus a
share (`--reuse`) of records that use an image an earlier record uses. Timed in the same run on
the same files:

* `recipec run --only ingest.web --data-only --workers W` in a fresh store: the ingest step's own
  seconds (report.json), which parse, validate, name and store the records and decode and hash
  every distinct image once;
* the floor: each distinct image read, decoded by PIL and hashed with sha256 once, in a pool of W
  processes (spawned, as recipec's are), timed from the pool's start to the last result.

The ratio of the two is what ingest adds to the images' own cost (1.0x: image-bound).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _images import WORDS, generate  # noqa: E402
from bench_scale import RECIPE  # noqa: E402  (its ingest step alone runs here)

def make_source(folder: Path, names: list[str], reuse: float, seed: int) -> int:
    """One record an image, then a share `reuse` more that use earlier images; returns the records."""
    rng = random.Random(seed)
    lines = []
    for i, name in enumerate(names):
        lines.append((i, name))
        if rng.random() < reuse:
            lines.append((len(names) + i, rng.choice(names[:i + 1])))
    with open(folder / "web.jsonl", "w", encoding="utf-8") as f:
        for i, name in lines:
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
            f.write(json.dumps({"id": f"r{i}", "image": name, "loss": 1.0, "conversations": [
                {"from": "human", "value": f"<image>\n{question}?"}, {"from": "gpt", "value": f"{answer}."}]}) + "\n")
    return len(lines)


def _decode_and_hash(paths: list[str]) -> int:
    import hashlib
    import io

    from PIL import Image

    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        hashlib.sha256(data).digest()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    return len(paths)


def floor_seconds(paths: list[Path], workers: int) -> float:
    """Each image read, decoded and hashed once in `workers` spawned processes, pool start included."""
    pieces = [[str(p) for p in paths[i:i + 64]] for i in range(0, len(paths), 64)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        done = sum(pool.map(_decode_and_hash, pieces))
    assert done == len(paths)
    return time.perf_counter() - started


def ingest_seconds(project: Path, workers: int) -> tuple[float, int]:
    store, out = project / "store", project / "out"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "recipec", "run", str(project / "images.recipe"), "--only",
                           "ingest.web", "--data-only", "-q", "--store", str(store), "--out", str(out),
                           "--workers", str(workers)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"recipec run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    step = next(s for s in json.loads((out / "report.json").read_text())["steps"] if s["id"] == "ingest.web")
    return step["seconds"], step["records_out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--reuse", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs of each")
    parser.add_argument("--keep", type=Path, help="generate into and keep this folder (re-uses generated data)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="recipec-images-"))
    try:
        images = root / "data" / "images"
        if not images.exists() or len(list(images.iterdir())) < args.images:
            started = time.perf_counter()
            generate(images, args.images, seed=3)
            print(f"generated {args.images:,} images in {time.perf_counter() - started:.1f} s")
        paths = sorted(images.iterdir())[:args.images]
        records = make_source(root / "data", [p.name for p in paths], args.reuse, seed=5)
        (root / "images.recipe").write_text(RECIPE % {"n": records})
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{records:,} records, {len(paths):,} distinct images ({megabytes:.0f} MB), {args.workers} workers")
        _decode_and_hash([str(p) for p in paths])  # the files in the page cache for both
        ingest = min(ingest_seconds(root, args.workers) for _ in range(args.repeat))
        floor = min(floor_seconds(paths, args.workers) for _ in range(args.repeat))
        print(f"  recipec ingest (parse, validate, ids, store; each image decoded and hashed once) "
              f"{ingest[0]:7.2f} s  {ingest[1]:,} records")
        print(f"  the images alone (read, PIL decode, sha256 once each)                            "
              f"{floor:7.2f} s")
        print(f"  ingest / images alone: {ingest[0] / floor:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
