"""dedup_exact and dedup_phash: duplicate removal over the collected records.

Both judge only records whose source is in `on` (all when `on` is None); the others pass untouched.
"First" always means first in the input order, which is collect order (the plan's source order,
then record order), so which copy survives never depends on sharding or workers.

dedup_exact (params `by` ⊆ {image, text}, `on`)
    Records with the same key are duplicates: `image` = the images' sha256s in order, `text` = the
    conversation (roles and text). The first is kept; the others are rejected `exact_duplicate`
    with detail `same <by> as <kept id>`. With `by = [image]` a text-only record has no key and
    passes; with `by = [text]` images are ignored.

dedup_phash (params `max_distance`, `keep`, `on`, `roots`)
    The pHash (`recipec.ops.phash`, imagehash-compatible) of each record's first image; records
    whose hashes are within `max_distance` bits are near duplicates (`recipec.ops.hamming.radius_pairs`:
    multi-index hashing, not O(N^2)). Which copy is kept: records are taken in priority order
    (`keep = first`: input order; `largest`: larger first-image pixel area first, then input
    order); a record is kept unless a record already kept is within the radius, and then it is
    rejected `near_duplicate` with detail `kept <id> (distance d)`. This is the rule imagededup uses
    to pick files to remove. It is not `hamming.duplicate_clusters` (one record kept per connected
    component) on purpose: with A~B and B~C but A and C far apart, components drop C for being near
    B, which was itself dropped; here C stays, and every dropped record is within `max_distance` of
    the record that replaced it. Text-only records pass.

    Records store image paths relative to their source's image root, so the op gets the roots:
    `roots` maps each dataset to its `images` folder relative to the recipe directory (added by the
    planner). An image that cannot be hashed any more (moved or changed since ingest) is rejected
    with the image reason (`image_missing`, `image_corrupt`, ...).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipec.ops import hamming
from recipec.ops import images as imaging
from recipec.ops import phash as phashing
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import concat, judge, source_mask

REASONS = frozenset({"exact_duplicate", "near_duplicate", *imaging.REASONS})


# ---- exact --------------------------------------------------------------------------------------


def run_exact(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    table = concat(inputs)
    by = tuple(ctx.params.get("by") or ("image", "text"))
    unknown = set(by) - {"image", "text"}
    if unknown:
        raise OperationError(f"dedup exact compares `image` and `text`, not {', '.join(sorted(unknown))}")
    judged = source_mask(table, ctx.params.get("on"))
    rows = np.flatnonzero(judged)
    ids = table.column("id").to_pylist()
    images = table.column("images").to_pylist() if "image" in by else None
    turns = table.column("conversations").to_pylist() if "text" in by else None
    kept: dict[bytes, str] = {}
    dropped: dict[int, tuple[str, str]] = {}
    what = " and ".join(by)
    for row in rows.tolist():
        key = _exact_key(images[row] if images is not None else None, turns[row] if turns is not None else None)
        if key is None:
            continue
        first = kept.setdefault(key, ids[row])
        if first != ids[row]:
            dropped[row] = ("exact_duplicate", f"same {what} as {first}")
    yield from judge(ctx, table, judged, dropped)


def _exact_key(images: list[dict[str, Any]] | None, turns: list[dict[str, str]] | None) -> bytes | None:
    h = hashlib.sha256()
    if images is not None:
        if not images and turns is None:
            return None  # nothing to compare
        h.update(b"I")
        for image in images:
            h.update(image["sha256"].encode("ascii") + b"\x00")
    if turns is not None:
        h.update(b"T")
        for turn in turns:
            h.update(turn["from"].encode("utf-8") + b"\x00" + turn["value"].encode("utf-8") + b"\x01")
    return h.digest()


# ---- pHash --------------------------------------------------------------------------------------


def run_phash(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    table = concat(inputs)
    params = ctx.params
    max_distance = int(params.get("max_distance", 4))
    keep = params.get("keep", "first")
    if keep not in ("first", "largest"):
        raise OperationError(f"dedup phash keeps `first` or `largest`, not {keep!r}")
    roots: dict[str, str | None] = params.get("roots") or {}
    judged = source_mask(table, params.get("on"))
    n_images = pc.list_value_length(table.column("images")).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(judged & (np.nan_to_num(n_images.astype(float)) > 0))

    sources = table.column("source").to_pylist()
    firsts = pc.list_element(table.column("images").take(pa.array(rows, pa.int64())), 0).to_pylist() if len(rows) else []
    dropped: dict[int, tuple[str, str]] = {}
    paths: list[str] = []
    hashed_rows: list[int] = []
    areas: list[int] = []
    for row, image in zip(rows.tolist(), firsts):
        source = sources[row]
        if source not in roots or roots[source] is None:
            raise OperationError(f"dedup phash: no image folder is known for source `{source}` "
                                 "(the plan must give `roots` for every source with images)")
        root = Path(roots[source])
        root = root if root.is_absolute() else Path(ctx.recipe_dir) / root
        try:
            path = imaging.resolve_inside(root, image["path"])
        except imaging.ImageReject as e:
            dropped[row] = (e.reason, e.detail)
            continue
        paths.append(str(path))
        hashed_rows.append(row)
        areas.append(int(image["width"]) * int(image["height"]))

    hashes, errors = phashing.phash_files_checked(paths, workers=max(1, ctx.workers))
    ok = np.array([e is None for e in errors], dtype=bool)
    for row, path, error in zip(hashed_rows, paths, errors):
        if error is not None:
            reason = "image_missing" if not Path(path).exists() else "image_corrupt"
            dropped[row] = (reason, f"cannot hash {path!r} any more: {error}")
    candidates = np.asarray(hashed_rows, dtype=np.int64)[ok]
    hashes = np.asarray(hashes, dtype=np.uint64)[ok]
    areas_ok = np.asarray(areas, dtype=np.int64)[ok]

    ids = table.column("id")
    for loser, winner, distance in near_duplicates(hashes, max_distance, areas_ok if keep == "largest" else None):
        row = int(candidates[loser])
        dropped[row] = ("near_duplicate", f"kept {ids[int(candidates[winner])].as_py()} (distance {distance})")
    yield from judge(ctx, table, judged, dropped)


def near_duplicates(hashes: np.ndarray, max_distance: int,
                    areas: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """(dropped, kept, distance) for each near duplicate among `hashes` (indices into it).

    Priority is index order, or larger `areas` first (then index) when given. A record is kept
    unless a higher-priority kept record lies within `max_distance`; the kept one named is the
    highest-priority kept neighbour.
    """
    n = len(hashes)
    if n < 2:
        return []
    pairs = hamming.radius_pairs(hashes, max_distance)  # (P, 2), i < j
    if len(pairs) == 0:
        return []
    left, right = pairs[:, 0], pairs[:, 1]
    if areas is None:
        rank = np.arange(n)
    else:
        order = np.lexsort((np.arange(n), -np.asarray(areas, dtype=np.int64)))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
    # Orient every pair from the higher-priority record to the lower-priority one.
    swap = rank[left] > rank[right]
    hi = np.where(swap, right, left)
    lo = np.where(swap, left, right)
    distance = hamming.popcount64(hashes[hi] ^ hashes[lo]).astype(np.int64)
    # For each record, its higher-priority neighbours in priority order (CSR by lo).
    by = np.lexsort((rank[hi], rank[lo]))
    hi, lo, distance = hi[by], lo[by], distance[by]
    starts = np.searchsorted(rank[lo], np.arange(n), side="left")  # lo sorted by rank: index by rank
    ends = np.searchsorted(rank[lo], np.arange(n), side="right")
    order = np.argsort(rank)  # record at each priority
    kept = np.ones(n, dtype=bool)
    result: list[tuple[int, int, int]] = []
    for r in np.flatnonzero(ends > starts).tolist():  # only records with a higher-priority neighbour
        record = int(order[r])
        for k in range(starts[r], ends[r]):
            winner = int(hi[k])
            if kept[winner]:
                kept[record] = False
                result.append((record, winner, int(distance[k])))
                break
    return result
