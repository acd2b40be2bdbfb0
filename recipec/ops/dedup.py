"""dedup_exact and dedup_phash: duplicate removal over the collected records.

Both judge only records whose source is in `on` (all when `on` is None); the others pass untouched.
"Input order" is collect order (the plan's source order, then record order), so which copy
survives never depends on sharding or workers. `prefer_sources` (both ops; default none) lists
sources whose copies are preferred, in that order, to those of the sources it does not list.

dedup_exact (params `by` ⊆ {image, text}, `prefer_sources`, `on`)
    Records with the same key are duplicates: `image` = the images' sha256s in order, `text` = the
    conversation (roles and text); the key is a sha256 of them, built column by column. Their
    content is the same, so only the source can tell them apart: the copy kept is the one from the
    most preferred source, then the first in input order; the others are rejected
    `exact_duplicate` with detail `same <by> as <kept id> (<why>)`.
    With `by = [image]` a text-only record has no key and passes; with `by = [text]` images are
    ignored.

dedup_phash (params `max_distance`, `keep`, `prefer_sources`, `on`, `roots`)
    The pHash (`recipec.ops.phash`, imagehash-compatible) of each record's first image; records
    whose hashes are within `max_distance` bits are near duplicates (`recipec.ops.hamming.radius_pairs`:
    multi-index hashing, not O(N^2)). Which copy is kept: records are ranked, and a record is kept
    unless a better-ranked record already kept is within the radius; then it is rejected
    `near_duplicate` with detail `kept <id> (distance d): <why>`, where <why> is the first rule
    below that tells the two apart (`larger: 640x480 against 320x240 pixels`). The ranking
    (`keep`, the recipe's `prefer`):

    best (default)  1. larger pixel area of the first image (a half-size copy loses);
                    2. less lossy: the estimated quality of the file, 100 for lossless formats
                       (PNG, BMP, TIFF, lossless WebP), the IJG quality a JPEG's quantisation tables
                       imply (1-100), 50 for lossy formats without an estimate (lossy WebP, GIF);
                       then more bytes per pixel (less compressed);
                    3. the source preferred by `prefer_sources`;
                    4. earlier in input order.
    largest         1, 3 and 4.
    first           3 and 4 (before the best-copy rule, the default: the first in input order).

    File metadata (size, JPEG tables) is read only for records that have a near duplicate. This
    greedy rule is the one imagededup uses to pick files to remove. It is not
    `hamming.duplicate_clusters` (one record kept per connected component) on purpose: with A~B and
    B~C but A and C far apart, components drop C for being near B, which was itself dropped; here C
    stays, and every dropped record is within `max_distance` of the record that replaced it.
    Text-only records pass. Records that show the very same image (the same file digest) are not
    near duplicates of each other (one image often carries several instructions; the same image
    and text is `dedup_exact`'s business): distinct images are compared, each represented by its
    first record, and a dropped image takes all its records with it.

    Records store image paths relative to their source's image root, so the op gets the roots:
    `roots` maps each dataset to its `images` folder relative to the recipe directory (added by the
    planner). An image that cannot be hashed any more (moved or changed since ingest) is rejected
    with the image reason (`image_missing`, `image_corrupt`, ...).

Each op is its per-record pass and its decision, two functions (`exact_keys` / `decide_exact`,
`image_hashes` / `decide_phash`); the op runs the pass over all its input, then the decision. The
Ray executor runs the pass per range of the input, in parallel, and the decision once over the
results, put together by `combine_exact` / `combine_hashes`: the same arrays as one pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from recipec import records
from recipec.ops import hamming
from recipec.ops import images as imaging
from recipec.ops import phash as phashing
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import Records, ids_at, judge, source_mask

REASONS = frozenset({"exact_duplicate", "near_duplicate", *imaging.REASONS})
KEEP_RULES = ("best", "largest", "first")


def source_preference(sources: Sequence[str | None], prefer: Sequence[str] | None) -> np.ndarray:
    """Per record, the rank of its source in `prefer` (0 first); sources not listed come after all."""
    order = {name: i for i, name in enumerate(prefer or ())}
    last = len(order)
    return np.fromiter((order.get(s, last) for s in sources), dtype=np.int64, count=len(sources))


def _preferred_why(winner_source: str, loser_source: str, prefer: Sequence[str] | None) -> str | None:
    ranks = source_preference([winner_source, loser_source], prefer)
    if ranks[0] < ranks[1]:
        return f"source `{winner_source}` is preferred to `{loser_source}` (prefer_sources)"
    return None


# ---- exact --------------------------------------------------------------------------------------


@dataclass
class ExactKeys:
    """dedup_exact's per-record pass: a 16-byte key per judged record that has one, and its source."""

    judged: np.ndarray  # bool per record
    rows: np.ndarray  # int64: the records with a key, in input order
    keys: np.ndarray  # (len(rows), 2) uint64: the first 16 bytes of each one's sha256 key
    codes: np.ndarray  # int32 per row: its source, an index into `names`
    names: list[str]  # sources in the order first seen

    @property
    def num_rows(self) -> int:
        return len(self.judged)


def _exact_by(ctx: StepContext) -> tuple[str, ...]:
    by = tuple(ctx.params.get("by") or ("image", "text"))
    unknown = set(by) - {"image", "text"}
    if unknown:
        raise OperationError(f"dedup exact compares `image` and `text`, not {', '.join(sorted(unknown))}")
    return by


def exact_keys(ctx: StepContext, inputs: list[Any]) -> ExactKeys:
    """Pass 1, batch by batch: the key of each judged record; nothing else is kept."""
    recs = Records(inputs)
    by = _exact_by(ctx)
    on = ctx.params.get("on")
    n = recs.num_rows
    judged = np.zeros(n, dtype=bool)
    keys = np.zeros((n, 2), dtype=np.uint64)
    has_key = np.zeros(n, dtype=bool)
    source_codes = np.zeros(n, dtype=np.int32)
    source_names: dict[str, int] = {}
    columns = ["source", *(["images"] if "image" in by else []), *(["conversations"] if "text" in by else [])]
    start = 0
    for batch in recs.batches(columns):
        m = batch.num_rows
        mask = source_mask(batch, on)
        judged[start:start + m] = mask
        sources = batch.column("source").to_pylist()
        source_codes[start:start + m] = [source_names.setdefault(x, len(source_names)) for x in sources]
        payloads, comparable = _exact_payloads(batch, by)
        wanted = np.flatnonzero(mask & comparable)
        if len(wanted):
            digests = b"".join(hashlib.sha256(p).digest()[:16] for p in payloads.take(pa.array(wanted)).to_pylist())
            keys[start + wanted] = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
            has_key[start + wanted] = True
        start += m
    rows = np.flatnonzero(has_key)
    return ExactKeys(judged, rows, keys[rows], source_codes[rows], list(source_names))


def _remap(parts_names: Sequence[list[str]], parts_codes: Sequence[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Source codes of consecutive passes as the codes one pass would give (first-seen order)."""
    names: dict[str, int] = {}
    out = []
    for part_names, part_codes in zip(parts_names, parts_codes):
        table = np.array([names.setdefault(x, len(names)) for x in part_names] or [0], dtype=np.int32)
        out.append(table[part_codes] if len(part_codes) else np.zeros(0, dtype=np.int32))
    return list(names), (np.concatenate(out) if out else np.zeros(0, dtype=np.int32))


def combine_exact(parts: Sequence[ExactKeys]) -> ExactKeys:
    """The passes over consecutive ranges of the input, as one pass over all of it."""
    offsets = np.cumsum([0, *(p.num_rows for p in parts)])
    names, codes = _remap([p.names for p in parts], [p.codes for p in parts])
    return ExactKeys(
        judged=np.concatenate([p.judged for p in parts]) if parts else np.zeros(0, dtype=bool),
        rows=np.concatenate([p.rows + o for p, o in zip(parts, offsets)]) if parts else np.zeros(0, dtype=np.int64),
        keys=np.concatenate([p.keys for p in parts]) if parts else np.zeros((0, 2), dtype=np.uint64),
        codes=codes, names=names)


def run_exact(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    """dedup_exact: its per-record pass (`exact_keys`) over all its input, then the grouping (`decide_exact`)."""
    yield from decide_exact(ctx, inputs, exact_keys(ctx, inputs))


def decide_exact(ctx: StepContext, inputs: list[Any], found: ExactKeys) -> Iterator[Chunk]:
    """dedup_exact's decision, over the keys of `exact_keys` (the inputs are read again only for the
    kept copies' ids, and to write the output)."""
    recs = Records(inputs)
    by = _exact_by(ctx)
    prefer = ctx.params.get("prefer_sources") or ()
    if found.num_rows != recs.num_rows:
        raise RuntimeError(f"dedup exact: a key pass over {found.num_rows} records for {recs.num_rows} inputs")
    judged, rows, names = found.judged, found.rows, found.names
    # Same key: the copy kept is the preferred source's, then the first in input order.
    rank = source_preference(names, prefer)[found.codes] if prefer else np.zeros(len(rows), dtype=np.int64)
    order = np.lexsort((rows, rank, found.keys[:, 1], found.keys[:, 0]))
    sorted_rows = rows[order]
    sorted_keys = found.keys[order]
    first = np.ones(len(sorted_rows), dtype=bool)
    if len(sorted_rows) > 1:
        first[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    del sorted_keys
    group_first = np.maximum.accumulate(np.where(first, np.arange(len(sorted_rows)), 0))
    winner = sorted_rows[group_first]
    losers = np.flatnonzero(~first)
    ids = ids_at(recs, np.unique(winner[losers]))
    what = " and ".join(by)
    dropped: dict[int, tuple[str, str]] = {}
    codes = found.codes[order]  # the source of each sorted row
    winner_codes = codes[group_first]
    for k in losers.tolist():
        row, kept = int(sorted_rows[k]), int(winner[k])
        why = _preferred_why(names[winner_codes[k]], names[codes[k]], prefer) or "earlier in input order"
        dropped[row] = ("exact_duplicate", f"same {what} as {ids[kept]} ({why})")
    yield from judge(ctx, recs, judged, dropped)


run_exact.streams = True  # type: ignore[attr-defined]
# the split the Ray executor runs: the per-record pass per input partition, the decision once
run_exact.per_record = exact_keys  # type: ignore[attr-defined]
run_exact.combine = combine_exact  # type: ignore[attr-defined]
run_exact.decide = decide_exact  # type: ignore[attr-defined]


def _exact_payloads(batch: pa.Table, by: tuple[str, ...]) -> tuple[pa.Array, np.ndarray]:
    """What each record's key hashes (`I` and its images' sha256s, `T` and its turns' roles and
    texts, each string as `<bytes>:<string>` so that no two contents read alike), built column-wise;
    and whether the record has anything to compare (with `by = [image]`, a record without images
    has not)."""
    n = batch.num_rows
    parts: list[pa.Array | str] = []
    comparable = np.ones(n, dtype=bool)
    if "image" in by:
        images = batch.column("images").combine_chunks()
        sha256s = images.flatten().flatten()[records.IMAGE.get_field_index("sha256")]
        parts += ["I", _joined(images, _netstrings(sha256s))]
        if "text" not in by:
            comparable = np.asarray(pc.list_value_length(images).fill_null(0), dtype=np.int64) > 0
    if "text" in by:
        conversations = batch.column("conversations").combine_chunks()
        who, said = conversations.flatten().flatten()
        parts += ["T", _joined(conversations, pc.binary_join_element_wise(_netstrings(who), _netstrings(said), ""))]
    return pc.binary_join_element_wise(*parts, "").cast(pa.binary()), comparable


def _netstrings(strings: pa.Array) -> pa.Array:
    """Each string as `<its length in bytes>:<it>`: put together in any number, they read back one way."""
    return pc.binary_join_element_wise(pc.binary_length(strings).cast(pa.string()), strings, ":")


def _joined(lists: pa.ListArray, pieces: pa.Array) -> pa.Array:
    """Per list of `lists`, its elements' `pieces` (one per element, in order) put together."""
    offsets = np.asarray(lists.offsets, dtype=np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), pieces), "").fill_null("")


# ---- pHash --------------------------------------------------------------------------------------


@dataclass
class ImageHashes:
    """dedup_phash's per-record pass: per judged record with a first image, its row, pHash, size,
    source and file digest; and the records already rejected for their image (rows from 0)."""

    judged: np.ndarray  # bool per record
    dropped: dict[int, tuple[str, str]]  # row -> (reason, detail): images that cannot be resolved or hashed
    rows: np.ndarray  # int64, in input order
    hashes: np.ndarray  # uint64 per row
    sizes: np.ndarray  # (len(rows), 2) int64: width, height
    codes: np.ndarray  # int32 per row: its source, an index into `names`
    digests: np.ndarray  # uint64 per row: the image file's sha256, first 8 bytes
    names: list[str]  # sources in the order first seen

    @property
    def num_rows(self) -> int:
        return len(self.judged)


def _phash_params(ctx: StepContext) -> tuple[int, str]:
    keep = ctx.params.get("keep", "best")
    if keep not in KEEP_RULES:
        raise OperationError(f"dedup phash keeps the `best`, `largest` or `first` copy, not {keep!r}")
    return int(ctx.params.get("max_distance", 4)), keep


def image_hashes(ctx: StepContext, inputs: list[Any]) -> ImageHashes:
    """Pass 1, batch by batch: the first image of each judged record, hashed (the expensive part,
    `ctx.workers` processes); kept per record are only its row, hash, size and source."""
    recs = Records(inputs)
    _phash_params(ctx)
    roots: dict[str, str | None] = ctx.params.get("roots") or {}
    on = ctx.params.get("on")
    workers = max(1, ctx.workers)
    n = recs.num_rows
    judged = np.zeros(n, dtype=bool)
    dropped: dict[int, tuple[str, str]] = {}
    rows_parts, hash_parts, size_parts, source_parts, digest_parts = [], [], [], [], []
    source_names: dict[str, int] = {}
    start = 0
    with contextlib.ExitStack() as stack:
        pool = None
        for batch in recs.batches(["source", "images"]):
            m = batch.num_rows
            mask = source_mask(batch, on)
            judged[start:start + m] = mask
            batch_rows, paths, sizes, codes, digests = _first_images(batch, mask, roots, Path(ctx.recipe_dir), start,
                                                                     dropped, source_names)
            if workers > 1 and len(paths) > 256 and pool is None:
                pool = stack.enter_context(phashing.hashing_pool(workers))
            hashes, errors = phashing.phash_files_checked(paths, workers=workers, pool=pool)
            ok = np.array([e is None for e in errors], dtype=bool)
            for row, path, error in zip(batch_rows, paths, errors):
                if error is not None:
                    reason = "image_missing" if not Path(path).exists() else "image_corrupt"
                    dropped[row] = (reason, f"cannot hash {path!r} any more: {error}")
            rows_parts.append(np.asarray(batch_rows, dtype=np.int64)[ok])
            hash_parts.append(np.asarray(hashes, dtype=np.uint64)[ok])
            size_parts.append(np.asarray(sizes, dtype=np.int64).reshape(-1, 2)[ok])
            source_parts.append(np.asarray(codes, dtype=np.int32)[ok])
            digest_parts.append(np.asarray(digests, dtype=np.uint64)[ok])
            start += m
    return ImageHashes(
        judged=judged, dropped=dropped,
        rows=np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64),
        hashes=np.concatenate(hash_parts) if hash_parts else np.zeros(0, dtype=np.uint64),
        sizes=np.concatenate(size_parts) if size_parts else np.zeros((0, 2), dtype=np.int64),
        codes=np.concatenate(source_parts) if source_parts else np.zeros(0, dtype=np.int32),
        digests=np.concatenate(digest_parts) if digest_parts else np.zeros(0, dtype=np.uint64),
        names=list(source_names))


def combine_hashes(parts: Sequence[ImageHashes]) -> ImageHashes:
    """The passes over consecutive ranges of the input, as one pass over all of it."""
    offsets = np.cumsum([0, *(p.num_rows for p in parts)]).tolist()
    names, codes = _remap([p.names for p in parts], [p.codes for p in parts])
    dropped = {row + offset: why for p, offset in zip(parts, offsets) for row, why in p.dropped.items()}

    def cat(name: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts]) if parts else empty

    return ImageHashes(
        judged=cat("judged", np.zeros(0, dtype=bool)), dropped=dropped,
        rows=np.concatenate([p.rows + o for p, o in zip(parts, offsets)]) if parts else np.zeros(0, dtype=np.int64),
        hashes=cat("hashes", np.zeros(0, dtype=np.uint64)), sizes=cat("sizes", np.zeros((0, 2), dtype=np.int64)),
        codes=codes, digests=cat("digests", np.zeros(0, dtype=np.uint64)), names=names)


def run_phash(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    """dedup_phash: its per-record pass (`image_hashes`) over all its input, then the pairing and
    best-copy decision (`decide_phash`)."""
    yield from decide_phash(ctx, inputs, image_hashes(ctx, inputs))


def decide_phash(ctx: StepContext, inputs: list[Any], found: ImageHashes) -> Iterator[Chunk]:
    """dedup_phash's decision, over the compact arrays of `image_hashes` (the inputs are read again
    only for the paths and ids of records that have a near duplicate, and to write the output)."""
    recs = Records(inputs)
    max_distance, keep = _phash_params(ctx)
    prefer = ctx.params.get("prefer_sources") or ()
    roots: dict[str, str | None] = ctx.params.get("roots") or {}
    workers = max(1, ctx.workers)
    if found.num_rows != recs.num_rows:
        raise RuntimeError(f"dedup phash: a hash pass over {found.num_rows} records for {recs.num_rows} inputs")
    judged, dropped = found.judged, dict(found.dropped)
    candidates, hashes, sizes, codes, digests = found.rows, found.hashes, found.sizes, found.codes, found.digests
    names = found.names
    # Records that show the very same image (same file digest) are not near duplicates of each
    # other: one image often carries several instructions. Distinct images are compared, each
    # represented by its first record; a dropped image takes all its records with it.
    _, first, image_of = np.unique(digests, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct images in input order
    first = first[order]
    image_of = np.argsort(order)[image_of.reshape(-1)] if len(digests) else image_of
    members = np.argsort(image_of, kind="stable")
    bounds = np.searchsorted(image_of[members], np.arange(len(first) + 1)) if len(first) else np.zeros(1, dtype=np.int64)
    record_rows = candidates
    candidates, hashes, sizes, codes = candidates[first], hashes[first], sizes[first], codes[first]
    pairs = hamming.radius_pairs(hashes, max_distance) if len(hashes) > 1 else np.zeros((0, 2), dtype=np.int64)
    if len(pairs):
        involved = np.unique(pairs)  # only these need ranking (and their files' metadata)
        paths = _paths_at(recs, candidates[involved], roots, Path(ctx.recipe_dir)) if keep == "best" else {}
        copies = [Copy.of((int(sizes[i, 0]), int(sizes[i, 1])), paths.get(int(candidates[i])),
                          names[codes[i]], int(candidates[i])) for i in involved.tolist()]
        if keep == "best":
            _read_fidelity(copies, workers=workers)
        rank = np.full(len(hashes), len(hashes), dtype=np.int64)  # not involved: never compared
        rank[involved] = ranking(copies, keep, prefer)
        by_index = dict(zip(involved.tolist(), copies))
        near = near_duplicates(hashes, max_distance, rank=rank, pairs=pairs)
        ids = ids_at(recs, np.unique(np.array([candidates[w] for _, w, _ in near], dtype=np.int64)))
        for loser, winner, distance in near:
            why = by_index[winner].why(by_index[loser], keep, prefer)
            for member in members[bounds[loser]:bounds[loser + 1]].tolist():
                dropped[int(record_rows[member])] = (
                    "near_duplicate", f"kept {ids[int(candidates[winner])]} (distance {distance}): {why}")
    yield from judge(ctx, recs, judged, dropped)


run_phash.streams = True  # type: ignore[attr-defined]
run_phash.per_record = image_hashes  # type: ignore[attr-defined]
run_phash.combine = combine_hashes  # type: ignore[attr-defined]
run_phash.decide = decide_phash  # type: ignore[attr-defined]


def _root_of(source: str, roots: dict[str, str | None], recipe_dir: Path) -> Path:
    if source not in roots or roots[source] is None:
        raise OperationError(f"dedup phash: no image folder is known for source `{source}` "
                             "(the plan must give `roots` for every source with images)")
    root = Path(roots[source])
    return root if root.is_absolute() else recipe_dir / root


def _first_images(batch: pa.Table, mask: np.ndarray, roots: dict[str, str | None], recipe_dir: Path, start: int,
                  dropped: dict[int, tuple[str, str]], source_names: dict[str, int]):
    """Rows (numbered from `start`), resolved paths, sizes and source codes of the batch's first images."""
    n_images = pc.list_value_length(batch.column("images")).to_numpy(zero_copy_only=False)
    local = np.flatnonzero(mask & (np.nan_to_num(n_images.astype(float)) > 0))
    rows, paths, sizes, codes, digests = [], [], [], [], []
    if not len(local):
        return rows, paths, sizes, codes, digests
    sources = batch.column("source").take(pa.array(local, pa.int64())).to_pylist()
    firsts = pc.list_element(batch.column("images").take(pa.array(local, pa.int64())), 0).to_pylist()
    folders: dict[str, Path | imaging.ResolvedRoot] = {}  # each source's root resolved once a batch
    for i, source, image in zip(local.tolist(), sources, firsts):
        root = folders.get(source)
        if root is None:
            root = folders[source] = imaging.resolved_root(_root_of(source, roots, recipe_dir))
        try:
            path = imaging.resolve_inside(root, image["path"])
        except imaging.ImageReject as e:
            dropped[start + i] = (e.reason, e.detail)
            continue
        rows.append(start + i)
        paths.append(str(path))
        sizes.append((int(image["width"]), int(image["height"])))
        codes.append(source_names.setdefault(source, len(source_names)))
        digests.append(int(image["sha256"][:16], 16))
    return rows, paths, sizes, codes, digests


def _paths_at(recs: Records, rows: np.ndarray, roots: dict[str, str | None], recipe_dir: Path) -> dict[int, str]:
    """The resolved first-image paths of some rows (sorted), read again from the inputs."""
    rows = np.sort(rows)
    found: dict[int, str] = {}
    start = 0
    for batch in recs.batches(["source", "images"]):
        m = batch.num_rows
        lo, hi = np.searchsorted(rows, [start, start + m])
        if hi > lo:
            local = pa.array(rows[lo:hi] - start)
            sources = batch.column("source").take(local).to_pylist()
            firsts = pc.list_element(batch.column("images").take(local), 0).to_pylist()
            for row, source, image in zip(rows[lo:hi].tolist(), sources, firsts):
                found[row] = str(imaging.resolve_inside(_root_of(source, roots, recipe_dir), image["path"]))
        start += m
    return found


# ---- which copy is the best ---------------------------------------------------------------------

_LOSSLESS = {"PNG", "BMP", "TIFF"}
# The IJG (libjpeg) luminance table at quality 50; a JPEG's tables are this one scaled.
_IJG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
UNKNOWN_QUALITY = 50.0


def jpeg_quality(luma_table: Sequence[int]) -> float:
    """The IJG quality (1-100) whose scaling of the standard table gives `luma_table` (natural order).

    IJG makes entry i `(std[i] * scale + 50) // 100`, clipped to 1..255, with scale 5000/q below
    quality 50 and 200 - 2q above; the median of the unclipped entries' scales inverts it.
    """
    table = np.asarray(list(luma_table)[:64], dtype=np.float64)
    std = np.asarray(_IJG_LUMA, dtype=np.float64)[:len(table)]
    free = (table > 1) & (table < 255)
    if free.any():
        scale = float(np.median((100.0 * table[free]) / std[free]))
    else:
        scale = 100.0 * float(table.sum()) / float(std.sum())
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return round(min(100.0, max(1.0, quality)), 1)


def file_fidelity(path: str | os.PathLike) -> tuple[str, float, int]:
    """(format, estimated quality, file size) of an image file, from its header only."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":  # VP8L is WebP's lossless bitstream
        return "WEBP", 100.0 if head[12:16] == b"VP8L" else UNKNOWN_QUALITY, size
    with Image.open(path) as image:
        fmt = image.format or "?"
        if fmt == "JPEG":
            tables = getattr(image, "quantization", None) or {}
            return fmt, jpeg_quality(tables[0]) if 0 in tables else UNKNOWN_QUALITY, size
    return fmt, 100.0 if fmt in _LOSSLESS else UNKNOWN_QUALITY, size


@dataclass
class Copy:
    """What the ranking knows of one record's first image."""

    width: int
    height: int
    source: str
    row: int  # input order
    path: str | None = None
    format: str = "?"
    quality: float = 0.0
    bytes: int = 0

    @classmethod
    def of(cls, size: tuple[int, int], path: str | None, source: str, row: int) -> "Copy":
        return cls(width=size[0], height=size[1], source=source, row=row, path=path)

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def bytes_per_pixel(self) -> float:
        return round(self.bytes / self.area, 4) if self.area else 0.0

    def lossiness(self) -> str:
        if self.quality >= 100.0:
            return f"{self.format} (lossless)"
        if self.format == "JPEG" and self.quality != UNKNOWN_QUALITY:
            return f"JPEG quality ~{self.quality:g}"
        return f"{self.format} (lossy, quality unknown)"

    def why(self, loser: "Copy", keep: str, prefer: Sequence[str] | None) -> str:
        """Why this copy was kept rather than `loser` (the first ranking rule that tells them apart)."""
        if keep in ("best", "largest") and self.area != loser.area:
            return f"larger: {self.width}x{self.height} against {loser.width}x{loser.height} pixels"
        if keep == "best" and self.quality != loser.quality:
            return f"less lossy: {self.lossiness()} against {loser.lossiness()}"
        if keep == "best" and self.bytes_per_pixel != loser.bytes_per_pixel:
            return (f"less compressed: {self.bytes_per_pixel:g} against {loser.bytes_per_pixel:g} bytes per pixel "
                    f"({self.lossiness()})")
        return _preferred_why(self.source, loser.source, prefer) or "earlier in input order"


def _read_fidelity(copies: list[Copy], workers: int) -> None:
    def read(copy: Copy) -> tuple[str, float, int]:
        try:
            return file_fidelity(copy.path)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return "?", 0.0, 0  # hashed a moment ago; if it cannot be read now it ranks last

    with ThreadPoolExecutor(max_workers=min(workers, 16)) as pool:  # ordered map: same result for any N
        for copy, (fmt, quality, size) in zip(copies, pool.map(read, copies)):
            copy.format, copy.quality, copy.bytes = fmt, quality, size


def ranking(copies: Sequence[Copy], keep: str, prefer: Sequence[str] | None) -> np.ndarray:
    """Rank of each copy (0 is the best) under the rule `keep`; ties impossible (input order last)."""
    n = len(copies)
    order_keys = [np.array([c.row for c in copies], dtype=np.int64),
                  source_preference([c.source for c in copies], prefer)]
    if keep == "best":
        order_keys.append(-np.array([c.bytes_per_pixel for c in copies], dtype=np.float64))
        order_keys.append(-np.array([c.quality for c in copies], dtype=np.float64))
    if keep in ("best", "largest"):
        order_keys.append(-np.array([c.area for c in copies], dtype=np.int64))
    order = np.lexsort(order_keys)  # the last key is the primary one
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def near_duplicates(hashes: np.ndarray, max_distance: int, areas: np.ndarray | None = None, *,
                    rank: np.ndarray | None = None, pairs: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """(dropped, kept, distance) for each near duplicate among `hashes` (indices into it).

    Priority is `rank` (lower first; distinct for every index that is in a pair) when given, else
    larger `areas` first (then index), else index order. A record is kept unless a higher-priority
    kept record lies within `max_distance`; the kept one named is the highest-priority kept
    neighbour. `pairs` (from `hamming.radius_pairs`) saves searching again.
    """
    n = len(hashes)
    if n < 2:
        return []
    if pairs is None:
        pairs = hamming.radius_pairs(hashes, max_distance)  # (P, 2), i < j
    if len(pairs) == 0:
        return []
    left, right = pairs[:, 0], pairs[:, 1]
    if rank is not None:
        rank = _dense_rank(np.asarray(rank, dtype=np.int64))
    elif areas is None:
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


def _dense_rank(rank: np.ndarray) -> np.ndarray:
    """`rank` as a permutation of 0..n-1 (ties broken by index), which the search below indexes by."""
    order = np.lexsort((np.arange(len(rank)), rank))
    dense = np.empty(len(rank), dtype=np.int64)
    dense[order] = np.arange(len(rank))
    return dense
