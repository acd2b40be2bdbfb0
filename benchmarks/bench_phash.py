"""pHash near-duplicate removal: recipec against imagehash, imagededup and Data-Juicer.

    python benchmarks/bench_phash.py [--images N] [--radius R] [--out FILE]

1. Writes N varied images (charts, text pages, photo-like scenes; 256..1024 px; JPEG and PNG) with
   planted near-duplicates (resized, recompressed, slightly cropped, brightness-shifted) to a
   temporary directory.
2. Hashes them end to end from the files with each tool (best of --repeat runs, the tools
   interleaved so that a noisy machine hurts them alike).
3. Finds the pairs within --radius with each tool's own search and compares them with the brute
   force over imagehash's hashes (the ground truth), and with the planted pairs.
4. Times recipec.ops.hamming.radius_pairs on --hashes random hashes with 1% planted near-duplicates
   against the brute force on a subset; checks it exactly (a subset in full, a sample of rows on
   the whole set).
5. Prints a table of ratios against imagehash and writes the figures as JSON.

Peers are imported lazily; one that is missing or fails is reported as "unavailable: <reason>".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _images import generate  # noqa: E402

from recipec.ops.hamming import (  # noqa: E402
    brute_force_pairs,
    pairs_involving,
    popcount64,
    radius_pairs,
)
from recipec.ops.phash import phash_files  # noqa: E402

Pairs = set[tuple[int, int]]


class Unavailable(Exception):
    pass


def _pairs_set(pairs: np.ndarray) -> Pairs:
    return {(int(a), int(b)) for a, b in pairs}


def _score(found: Pairs, truth: Pairs) -> dict[str, Any]:
    tp = len(found & truth)
    return {
        "found": len(found),
        "true": len(truth),
        "tp": tp,
        "precision": tp / len(found) if found else 1.0,
        "recall": tp / len(truth) if truth else 1.0,
        "equal": found == truth,
    }


# ----------------------------------------------------------------------------- hashers
# Each returns (uint64 hashes aligned with `paths`, extra info); raises Unavailable.


def hash_recipec(paths: list[Path], image_dir: Path, workers: int) -> np.ndarray:
    return phash_files(paths, workers=workers)


def hash_imagehash(paths: list[Path], image_dir: Path) -> np.ndarray:
    try:
        import imagehash
        from PIL import Image
    except ImportError as e:
        raise Unavailable(f"imagehash not installed ({e})") from e
    out = np.empty(len(paths), dtype=np.uint64)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = int(str(imagehash.phash(im)), 16)
    return out


def _imagededup() -> Any:
    try:
        import logging

        from imagededup.methods import PHash
    except Exception as e:  # noqa: BLE001 - any import failure makes the row unavailable
        raise Unavailable(f"imagededup: {type(e).__name__}: {e}") from e
    logging.getLogger("imagededup").setLevel(logging.ERROR)
    return PHash


def hash_imagededup(paths: list[Path], image_dir: Path, workers: int) -> tuple[np.ndarray, dict[str, str]]:
    PHash = _imagededup()
    # num_enc_workers=0 is its "no multiprocessing"; otherwise a pool of that many processes.
    enc = PHash(verbose=False).encode_images(image_dir=str(image_dir), num_enc_workers=0 if workers <= 1 else workers)
    return np.array([int(enc[p.name], 16) if p.name in enc else 0 for p in paths], dtype=np.uint64), enc


def hash_datajuicer(paths: list[Path], image_dir: Path) -> tuple[np.ndarray, Any]:
    try:
        import logging

        import datasets
        from data_juicer.ops.deduplicator.image_deduplicator import ImageDeduplicator
        from data_juicer.utils.constant import HashKeys

        logging.getLogger("datasets").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        from loguru import logger

        logger.remove()
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"data_juicer: {type(e).__name__}: {e}") from e
    op = ImageDeduplicator(method="phash")
    ds = datasets.Dataset.from_dict({"text": [""] * len(paths), "images": [[str(p)] for p in paths]})
    ds = ds.map(op.compute_hash, num_proc=1, load_from_cache_file=False)
    hexes = ds[HashKeys.imagehash]
    hashes = np.array([int(h, 16) if h else 0 for h in hexes], dtype=np.uint64)
    return hashes, (op, ds)


# ----------------------------------------------------------------------------- searches


def search_imagededup(enc: dict[str, str], index: dict[str, int], radius: int) -> Pairs:
    PHash = _imagededup()
    dups = PHash(verbose=False).find_duplicates(encoding_map=enc, max_distance_threshold=radius)
    found: Pairs = set()
    for name, others in dups.items():
        for o in others:
            a, b = index[name], index[o]
            found.add((min(a, b), max(a, b)))
    return found


def search_datajuicer(state: Any) -> tuple[Pairs, int]:
    """Data-Juicer removes exact hash matches only: its pairs are the pairs of equal hashes."""
    from data_juicer.utils.constant import HashKeys

    op, ds = state
    kept, _ = op.process(ds)
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(ds[HashKeys.imagehash]):
        if h:
            groups.setdefault(h, []).append(i)
    found = {(a, b) for g in groups.values() for k, a in enumerate(g) for b in g[k + 1 :]}
    return found, len(ds) - len(kept)


# ----------------------------------------------------------------------------- hamming at scale


def planted_hashes(n: int, radius: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random hashes; a fraction of them replaced by copies of others with 0..radius bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = int(n * frac)
    src = rng.choice(n, k, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), k, replace=False)
    flips = rng.integers(0, radius + 1, k)
    masks = np.array(
        [sum(1 << int(b) for b in rng.choice(64, f, replace=False)) for f in flips], dtype=np.uint64
    )
    h[dst] = h[src] ^ masks
    return h, np.stack([np.minimum(src, dst), np.maximum(src, dst)], axis=1)


def bench_hamming(n: int, radius: int, brute_n: int, sample_rows: int, seed: int) -> dict[str, Any]:
    h, planted = planted_hashes(n, radius, 0.01, seed)
    t0 = time.perf_counter()
    pairs = radius_pairs(h, radius)
    t_fast = time.perf_counter() - t0
    found = _pairs_set(pairs)
    dist_ok = bool(np.all(popcount64(h[pairs[:, 0]] ^ h[pairs[:, 1]]) <= radius)) if len(pairs) else True
    planted_found = sum((int(a), int(b)) in found for a, b in planted)
    # Exact check on the whole set for a sample of rows: every pair touching them, by brute force.
    rng = np.random.default_rng(seed + 1)
    rows = np.union1d(rng.choice(n, sample_rows, replace=False), planted[: sample_rows // 2].ravel())
    t0 = time.perf_counter()
    sample_truth = pairs_involving(h, rows, radius)
    t_sample = time.perf_counter() - t0
    touch = np.isin(pairs[:, 0], rows) | np.isin(pairs[:, 1], rows)
    sample_equal = bool(np.array_equal(pairs[touch], sample_truth))
    # Full brute force on a subset.
    sub = h[:brute_n]
    t0 = time.perf_counter()
    sub_fast = radius_pairs(sub, radius)
    t_sub_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub_brute = brute_force_pairs(sub, radius)
    t_sub_brute = time.perf_counter() - t0
    per_pair = t_sub_brute / (brute_n * (brute_n - 1) / 2)
    return {
        "n": n,
        "radius": radius,
        "planted": len(planted),
        "pairs": len(pairs),
        "seconds": t_fast,
        "planted_found": planted_found,
        "all_within_radius": dist_ok,
        "sample_rows": len(rows),
        "sample_pairs": len(sample_truth),
        "sample_equal_brute_force": sample_equal,
        "sample_brute_seconds": t_sample,
        "subset_n": brute_n,
        "subset_seconds": t_sub_fast,
        "subset_brute_seconds": t_sub_brute,
        "subset_equal_brute_force": bool(np.array_equal(sub_fast, sub_brute)),
        "subset_pairs": len(sub_brute),
        "brute_seconds_estimated_full": per_pair * n * (n - 1) / 2,
    }


# ----------------------------------------------------------------------------- main


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images to generate (default 2000)")
    ap.add_argument("--radius", type=int, default=4, help="Hamming radius for duplicates (default 4)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--repeat", type=int, default=2, help="hashing runs per tool; the best counts")
    ap.add_argument("--hashes", type=int, default=1_000_000, help="hashes for the radius search")
    ap.add_argument("--brute", type=int, default=100_000, help="subset checked by full brute force")
    ap.add_argument("--sample-rows", type=int, default=2000, help="rows of the full set checked exactly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="generate the images here and keep them")
    args = ap.parse_args(argv)
    # The peers log every step at INFO and warn about unused arguments: keep the table readable.
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="imagededup")

    tmp = Path(tempfile.mkdtemp(prefix="bench_phash_")) if args.keep is None else args.keep
    image_dir = tmp / "images" if args.keep is None else args.keep
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    try:
        t_gen, corpus = timed(lambda: generate(image_dir, args.images, seed=args.seed))
        paths = corpus.paths
        index = {p.name: i for i, p in enumerate(paths)}
        planted = {(min(a, b), max(a, b)) for a, b, _ in corpus.planted}
        n_jpeg = sum(p.suffix == ".jpg" for p in paths)
        print(f"generated {len(paths)} images ({n_jpeg} JPEG, {len(paths) - n_jpeg} PNG, "
              f"{len(planted)} planted near-duplicates) in {t_gen:.1f}s under {image_dir}")
        results["corpus"] = {"images": len(paths), "jpeg": n_jpeg, "planted": len(planted),
                             "bytes": sum(p.stat().st_size for p in paths)}

        tools: dict[str, Callable[[], Any]] = {
            "recipec (workers=1)": lambda: hash_recipec(paths, image_dir, 1),
            "recipec (workers=2)": lambda: hash_recipec(paths, image_dir, 2),
            "imagehash.phash": lambda: hash_imagehash(paths, image_dir),
            "imagededup PHash (workers=1)": lambda: hash_imagededup(paths, image_dir, 1),
            "imagededup PHash (workers=2)": lambda: hash_imagededup(paths, image_dir, 2),
            "Data-Juicer ImageDeduplicator": lambda: hash_datajuicer(paths, image_dir),
        }
        best: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for rep in range(args.repeat):
            for name, fn in tools.items():
                if name in errors:
                    continue
                try:
                    dt, out = timed(fn)
                except Unavailable as e:
                    errors[name] = str(e)
                    continue
                except Exception as e:  # noqa: BLE001 - a peer that crashes is reported, not fatal
                    errors[name] = f"{type(e).__name__}: {e}"
                    continue
                best[name] = min(best.get(name, float("inf")), dt)
                outputs[name] = out
                print(f"  run {rep + 1}: {name:32s} {dt:7.2f}s", flush=True)

        if "imagehash.phash" not in outputs:
            print("imagehash is required for the ground truth:", errors.get("imagehash.phash"))
            return 1
        ref = outputs["imagehash.phash"]
        truth = _pairs_set(brute_force_pairs(ref, args.radius))
        ours = outputs["recipec (workers=1)"]
        d = popcount64(ours ^ ref).astype(int)
        is_jpeg = np.array([p.suffix == ".jpg" for p in paths])
        agreement = {
            "exact": float(np.mean(d == 0)),
            "within_2": float(np.mean(d <= 2)),
            "max": int(d.max()),
            "jpeg_exact": float(np.mean(d[is_jpeg] == 0)) if is_jpeg.any() else None,
            "jpeg_within_2": float(np.mean(d[is_jpeg] <= 2)) if is_jpeg.any() else None,
            "png_exact": float(np.mean(d[~is_jpeg] == 0)) if (~is_jpeg).any() else None,
            "png_within_2": float(np.mean(d[~is_jpeg] <= 2)) if (~is_jpeg).any() else None,
        }
        assert np.array_equal(outputs["recipec (workers=2)"], ours), "workers=2 must equal workers=1"
        results["agreement_with_imagehash"] = agreement

        # Each tool's own search at the radius.
        rows: dict[str, dict[str, Any]] = {}
        t_ref = best["imagehash.phash"]
        for name in tools:
            row: dict[str, Any] = {}
            if name in errors:
                row["unavailable"] = errors[name]
                rows[name] = row
                continue
            row["hash_seconds"] = best[name]
            row["images_per_s"] = len(paths) / best[name]
            row["ratio_vs_imagehash"] = t_ref / best[name]
            rows[name] = row
        search: dict[str, tuple[float, Pairs, dict[str, Any]]] = {}
        t, p = timed(lambda: _pairs_set(radius_pairs(ours, args.radius)))
        search["recipec"] = (t, p, {})
        t, p = timed(lambda: _pairs_set(brute_force_pairs(ref, args.radius)))
        search["imagehash"] = (t, p, {"search": "brute force (recipec.ops.hamming)"})
        if "imagededup PHash (workers=1)" in outputs:
            enc = outputs["imagededup PHash (workers=1)"][1]
            try:
                t, p = timed(lambda: search_imagededup(enc, index, args.radius))
                search["imagededup"] = (t, p, {})
            except Exception as e:  # noqa: BLE001
                search["imagededup"] = (float("nan"), set(), {"unavailable": f"{type(e).__name__}: {e}"})
        if "Data-Juicer ImageDeduplicator" in outputs:
            try:
                t, (p, removed) = timed(lambda: search_datajuicer(outputs["Data-Juicer ImageDeduplicator"][1]))
                search["data-juicer"] = (t, p, {"removed": removed, "search": "exact hash match only"})
            except Exception as e:  # noqa: BLE001
                search["data-juicer"] = (float("nan"), set(), {"unavailable": f"{type(e).__name__}: {e}"})
        pair_rows: dict[str, Any] = {}
        for name, (t, p, extra) in search.items():
            pair_rows[name] = {"search_seconds": t, "vs_truth": _score(p, truth), "vs_planted": _score(p, planted), **extra}
        results["hashing"] = rows
        results["pairs"] = {"radius": args.radius, "truth_pairs": len(truth), "tools": pair_rows}

        print()
        print(f"hashing {len(paths)} images end to end (decode included), best of {args.repeat}:")
        print(f"  {'tool':32s} {'seconds':>8s} {'images/s':>9s} {'x imagehash':>12s}")
        for name, row in rows.items():
            if "unavailable" in row:
                print(f"  {name:32s} unavailable: {row['unavailable']}")
            else:
                print(f"  {name:32s} {row['hash_seconds']:8.2f} {row['images_per_s']:9.1f} {row['ratio_vs_imagehash']:11.2f}x")
        a = agreement
        print(f"recipec vs imagehash hashes: {a['exact']:.1%} equal, {a['within_2']:.2%} within 2 bits, max {a['max']} "
              f"(JPEG {a['jpeg_exact']:.1%} / {a['jpeg_within_2']:.2%}; PNG {a['png_exact']:.1%} / {a['png_within_2']:.2%})")
        print()
        print(f"pairs within radius {args.radius} (truth: brute force over imagehash hashes, {len(truth)} pairs; "
              f"{len(planted)} planted):")
        print(f"  {'tool':12s} {'search s':>9s} {'pairs':>6s} {'P(truth)':>9s} {'R(truth)':>9s} {'P(plant)':>9s} {'R(plant)':>9s}  note")
        for name, r in pair_rows.items():
            if "unavailable" in r:
                print(f"  {name:12s} unavailable: {r['unavailable']}")
                continue
            vt, vp = r["vs_truth"], r["vs_planted"]
            note = r.get("search", "") + (f", removed {r['removed']}" if "removed" in r else "")
            print(f"  {name:12s} {r['search_seconds']:9.3f} {vt['found']:6d} {vt['precision']:9.3f} {vt['recall']:9.3f} "
                  f"{vp['precision']:9.3f} {vp['recall']:9.3f}  {note}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.hashes > 0:
        print()
        hm = bench_hamming(args.hashes, args.radius, min(args.brute, args.hashes), args.sample_rows, args.seed)
        results["radius_pairs"] = hm
        print(f"radius_pairs on {hm['n']:,} hashes (1% planted near-duplicates), radius {hm['radius']}: "
              f"{hm['seconds']:.2f}s, {hm['pairs']} pairs, planted found {hm['planted_found']}/{hm['planted']}, "
              f"all within radius: {hm['all_within_radius']}")
        print(f"  exact on {hm['sample_rows']} sampled rows of the full set vs brute force: {hm['sample_equal_brute_force']} "
              f"({hm['sample_pairs']} pairs)")
        print(f"  subset of {hm['subset_n']:,}: radius_pairs {hm['subset_seconds']:.2f}s, brute force "
              f"{hm['subset_brute_seconds']:.1f}s, equal: {hm['subset_equal_brute_force']} ({hm['subset_pairs']} pairs)")
        print(f"  brute force on all {hm['n']:,} (extrapolated): {hm['brute_seconds_estimated_full']:.0f}s "
              f"= {hm['brute_seconds_estimated_full'] / hm['seconds']:.0f}x radius_pairs")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
