"""All pairs of 64-bit hashes within a Hamming radius, without comparing every pair.

Multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing", CVPR 2012), vectorized with numpy:

1. Identical hashes are grouped first (``np.unique``). Every pair inside a group is at distance 0
   and is emitted directly, so a million copies of one hash cost what their output costs, and the
   search below runs on distinct values only.
2. The 64 bit positions are split into ``k`` disjoint blocks, block ``b`` searched within a radius
   ``s_b`` with ``sum(s_b + 1) >= radius + 1``. Pigeonhole: if two hashes are within ``radius``,
   at least one block differs in at most ``s_b`` bits (otherwise the distance would be at least
   ``sum(s_b + 1) > radius``). The plain "radius + 1 blocks, exact match" scheme is the case
   ``s_b = 0``; it makes blocks of ~13 bits for radius 4, whose buckets hold ~100 of a million
   random hashes each, i.e. ~3e8 candidate pairs. Three blocks of ~21 bits with radii (1, 1, 0)
   give ~45 lookups per hash and ~1e7 candidates instead. A small cost model picks the plan.
3. For a block, a table indexed by the block value (counting sort, CSR offsets) answers "which
   hashes have block value v" in O(1); candidates are ``v ^ mask`` for every mask of at most
   ``s_b`` bits. Candidates are verified with a popcount at once, so memory stays bounded.
4. Pairs found through several blocks are deduplicated, expanded back from distinct values to
   records, and sorted.

Guards: exact copies never reach the index (step 1); when real hashes crowd some block values
(skewed bits), the candidate count is re-estimated from the actual buckets and the chunked brute
force is used if the index would not beat it; candidates are expanded in bounded chunks.

Everything is exact: ``radius_pairs`` returns the same array as ``brute_force_pairs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb
from typing import Any

import numpy as np

__all__ = [
    "popcount64",
    "radius_pairs",
    "brute_force_pairs",
    "pairs_involving",
    "duplicate_clusters",
    "connected_components",
]

_BITS = 64
# Blocks searched with radius >= 1 are indexed by a direct table of 2**bits entries.
_MAX_TABLE_BITS = 24
# Rough relative costs (seconds per item) for the planner, measured with numpy on one core.
_COST_PROBE = 12e-9  # one table lookup of one (hash, mask)
_COST_CANDIDATE = 25e-9  # expanding + verifying one candidate pair
_COST_BRUTE = 2e-9  # one xor + popcount + compare in the brute force
_EMPTY = np.zeros((0, 2), dtype=np.int64)

if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a hardware popcount

    def popcount64(x: np.ndarray | int) -> np.ndarray:
        """Number of set bits of each uint64 (as uint8)."""
        return np.bitwise_count(np.asarray(x, dtype=np.uint64))

else:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def popcount64(x: np.ndarray | int) -> np.ndarray:
        """Number of set bits of each uint64 (as uint8)."""
        a = np.ascontiguousarray(np.asarray(x, dtype=np.uint64))
        return _POP8[a.view(np.uint8).reshape(*a.shape, 8)].sum(axis=-1, dtype=np.uint8)


def _as_hashes(hashes: Any) -> np.ndarray:
    h = np.asarray(hashes)
    if h.dtype != np.uint64:
        if h.size and h.dtype.kind == "i" and h.min() < 0:
            h = h.astype(np.int64).view(np.uint64)  # two's complement, as stored by int64 columns
        else:
            h = h.astype(np.uint64)
    return np.ascontiguousarray(h.ravel())


def _check_radius(radius: int) -> int:
    r = int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return r


# --------------------------------------------------------------------------- brute force


def brute_force_pairs(hashes: Any, radius: int, *, chunk_elems: int = 1 << 20) -> np.ndarray:
    """Every pair (i, j), i < j, with popcount(h[i] ^ h[j]) <= radius, by comparing all pairs.

    O(N^2) time, O(chunk_elems) memory: a block of rows is compared with every later hash.
    """
    h = _as_hashes(hashes)
    r = _check_radius(radius)
    n = len(h)
    out: list[np.ndarray] = []
    # Reused buffers: fresh 10-100 MB temporaries per block would cost more in page faults.
    cap = max(chunk_elems, n)
    xbuf, pbuf, cbuf = np.empty(cap, np.uint64), np.empty(cap, np.uint8), np.empty(cap, bool)
    i = 0
    while i < n - 1:
        cols = n - i - 1
        rows = max(1, chunk_elems // cols)
        stop = min(n - 1, i + rows)
        shape = (stop - i, cols)
        xor = xbuf[: shape[0] * cols].reshape(shape)
        np.bitwise_xor(h[i:stop, None], h[None, i + 1 :], out=xor)  # row a = record i+a vs records > i
        pop = pbuf[: xor.size].reshape(shape)
        if hasattr(np, "bitwise_count"):
            np.bitwise_count(xor, out=pop)
        else:  # pragma: no cover - numpy 1.x
            pop[...] = popcount64(xor)
        close = np.less_equal(pop, r, out=cbuf[: xor.size].reshape(shape))
        if np.count_nonzero(close):  # nonzero() is slow on a mostly-False array: skip those
            a, c = np.nonzero(close)
            a, c = a + i, c + i + 1
            keep = c > a  # a row also sees the records of the block before it
            out.append(np.stack([a[keep], c[keep]], axis=1).astype(np.int64))
        i = stop
    if not out:
        return _EMPTY.copy()
    return np.concatenate(out)  # nonzero walks rows in order: already lexicographic


def pairs_involving(hashes: Any, rows: np.ndarray, radius: int) -> np.ndarray:
    """Brute-force pairs (i, j), i < j, within radius with i or j in ``rows``, sorted.

    Checks a sample of a large input exactly: radius_pairs restricted to those rows must equal it.
    """
    h = _as_hashes(hashes)
    r = _check_radius(radius)
    out: list[np.ndarray] = []
    for start in range(0, len(rows), 64):
        part = np.asarray(rows[start : start + 64], dtype=np.int64)
        a, j = np.nonzero(popcount64(h[part, None] ^ h[None, :]) <= r)
        i = part[a]
        keep = i != j
        i, j = i[keep], j[keep]
        out.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1))
    if not out:
        return _EMPTY.copy()
    key = np.unique(np.concatenate(out) @ np.array([len(h), 1], dtype=np.int64))
    return np.stack([key // len(h), key % len(h)], axis=1)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Block:
    positions: tuple[int, ...]  # bit positions (0 = least significant) making up this block
    radius: int  # search radius inside the block

    @property
    def bits(self) -> int:
        return len(self.positions)


def _variants(bits: int, radius: int) -> int:
    return sum(comb(bits, t) for t in range(min(radius, bits) + 1))


def _split_radii(k: int, radius: int, sizes: list[int]) -> list[int]:
    """Block radii s_b with sum(s_b + 1) == radius + 1, the larger radii on the larger blocks."""
    total = radius + 1 - k  # sum of s_b
    base, extra = divmod(total, k)
    order = sorted(range(k), key=lambda b: -sizes[b])
    radii = [base] * k
    for b in order[:extra]:
        radii[b] += 1
    return radii


def _plan(n: int, radius: int) -> tuple[list[_Block], float]:
    """Cheapest block layout for n distinct hashes, and its estimated cost in seconds."""
    best: tuple[list[_Block], float] = ([], float("inf"))
    pairs = n * (n - 1) / 2
    for k in range(1, min(radius + 1, _BITS) + 1):
        sizes = [_BITS // k + (1 if b < _BITS % k else 0) for b in range(k)]
        radii = _split_radii(k, radius, sizes)
        cost = 0.0
        for bits, s in zip(sizes, radii):
            if s >= bits:  # the block matches everything: no pruning at all
                cost = float("inf")
                break
            v = _variants(bits, s)
            if s > 0 and bits > _MAX_TABLE_BITS:
                cost = float("inf")  # would need a 2**bits table; covered by larger k
                break
            cost += n * v * _COST_PROBE + pairs * min(1.0, v / 2.0**bits) * _COST_CANDIDATE
        if cost < best[1]:
            # Strided positions: block b holds bits b, b+k, b+2k, ... so that each block mixes
            # low and high DCT frequencies (pHash bits are not independent of their neighbours).
            blocks = [_Block(tuple(range(b, _BITS, k)), s) for b, s in enumerate(radii)]
            best = (blocks, cost)
    return best


# --------------------------------------------------------------------------- the search


def _block_values(u: np.ndarray, positions: tuple[int, ...]) -> np.ndarray:
    """Gather the given bit positions of each hash into a compact integer."""
    out = np.zeros(len(u), dtype=np.uint64)
    one = np.uint64(1)
    for t, p in enumerate(positions):
        out |= ((u >> np.uint64(p)) & one) << np.uint64(t)
    return out


def _bucket_pairs(v: np.ndarray) -> float:
    """Pairs sharing a block value: sum over values of count^2 / 2."""
    _, counts = np.unique(v, return_counts=True)
    return float(np.dot(counts.astype(np.float64), counts)) / 2.0


def _masks(bits: int, radius: int) -> list[int]:
    """Non-zero masks of at most `radius` set bits among `bits`."""
    return [sum(1 << i for i in c) for t in range(1, radius + 1) for c in combinations(range(bits), t)]


def _expand(left: np.ndarray, lo: np.ndarray, cnt: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left[x], order[lo[x] + t]) for t < cnt[x], for every x."""
    total = int(cnt.sum())
    if total == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    starts = np.cumsum(cnt) - cnt
    within = np.arange(total, dtype=np.int64) - np.repeat(starts, cnt)
    return np.repeat(left, cnt), order[np.repeat(lo, cnt) + within]


def _verified(u: np.ndarray, a: np.ndarray, b: np.ndarray, r: int) -> np.ndarray:
    keep = popcount64(u[a] ^ u[b]) <= r
    a, b = a[keep], b[keep]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def _search_block(u: np.ndarray, v: np.ndarray, block: _Block, r: int, max_candidates: int) -> list[np.ndarray]:
    """Verified pairs of distinct values whose block parts (v) are within the block's radius."""
    m = len(u)
    found: list[np.ndarray] = []
    if block.radius == 0:
        # Exact match on the block: sort, then every pair inside each run of equal values.
        order = np.argsort(v, kind="stable")
        sv = v[order]
        run_start = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
        run_len = np.diff(np.r_[run_start, m])
        pos_start = np.repeat(run_start, run_len)
        after = pos_start + np.repeat(run_len, run_len) - np.arange(m) - 1  # later members in run
        pos = np.arange(m, dtype=np.int64)
        _emit(found, u, pos, pos + 1, after, order, r, max_candidates, left_sorted=True)
        return found
    # Direct table: counting sort of the block values, CSR offsets per value.
    assert block.bits <= _MAX_TABLE_BITS, "the planner keeps searched blocks small"
    size = 1 << block.bits
    vi = v.astype(np.int64)
    counts = np.bincount(vi, minlength=size)
    offsets = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    order = np.argsort(vi, kind="stable")
    # Exact matches inside the block (mask 0): pairs within each bucket, once each.
    sorted_pos = np.arange(m, dtype=np.int64)
    bucket_end = offsets[vi[order] + 1]
    _emit(found, u, sorted_pos, sorted_pos + 1, bucket_end - sorted_pos - 1, order, r, max_candidates, left_sorted=True)
    idx = np.arange(m, dtype=np.int64)
    for mask in _masks(block.bits, block.radius):
        # Look up v ^ mask only from the side where the mask's top bit is 0: each pair once.
        top = 1 << (mask.bit_length() - 1)
        sel = idx[(vi & top) == 0]
        target = vi[sel] ^ mask
        lo = offsets[target]
        cnt = offsets[target + 1] - lo
        hit = cnt > 0
        _emit(found, u, sel[hit], lo[hit], cnt[hit], order, r, max_candidates)
    return found


def _emit(
    found: list[np.ndarray],
    u: np.ndarray,
    left: np.ndarray,
    lo: np.ndarray,
    cnt: np.ndarray,
    order: np.ndarray,
    r: int,
    max_candidates: int,
    *,
    left_sorted: bool = False,
) -> None:
    """Expand (left, order[lo : lo + cnt]) candidates in bounded chunks and keep the true pairs."""
    keep = cnt > 0
    left, lo, cnt = left[keep], lo[keep], cnt[keep]
    if len(left) == 0:
        return
    cum = np.cumsum(cnt)
    start = 0
    while start < len(left):
        # Largest stop with at most max_candidates candidates (at least one left element).
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + max_candidates, side="right")))
        a, b = _expand(left[start:stop], lo[start:stop], cnt[start:stop], order)
        if left_sorted:
            a = order[a]
        pairs = _verified(u, a, b, r)
        if len(pairs):
            found.append(pairs)
        start = stop


def _pairs_of_distinct(u: np.ndarray, r: int, max_candidates: int) -> np.ndarray:
    """Pairs (a, b), a < b, of indices into the distinct sorted values u, within radius r."""
    m = len(u)
    if m < 2 or r == 0:  # distinct values are never at distance 0
        return _EMPTY.copy()
    blocks, cost = _plan(m, r)
    brute_cost = m * (m - 1) / 2 * _COST_BRUTE
    if not blocks or brute_cost <= cost:
        return brute_force_pairs(u, r)
    values = [_block_values(u, b.positions) for b in blocks]
    # The plan assumed uniform bits. Real hashes can crowd a few block values (e.g. many images
    # sharing their low frequencies): re-estimate the candidates from the actual bucket sizes and
    # take the (chunked, bounded-memory) brute force when the index would not beat it.
    crowd = sum(_bucket_pairs(v) * _variants(b.bits, b.radius) for v, b in zip(values, blocks))
    if crowd * _COST_CANDIDATE > brute_cost:
        return brute_force_pairs(u, r)
    found: list[np.ndarray] = []
    for block, v in zip(blocks, values):
        found.extend(_search_block(u, v, block, r, max_candidates))
    if not found:
        return _EMPTY.copy()
    pairs = np.concatenate(found)
    # A pair can be found through several blocks (and masks): deduplicate via one int64 key.
    key = np.unique(pairs[:, 0] * np.int64(m) + pairs[:, 1])
    return np.stack([key // m, key % m], axis=1)


def _group_pairs(members: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """All (x, y), x < y, of records inside each group (members sorted within each group)."""
    big = sizes >= 2
    if not big.any():
        return _EMPTY.copy()
    g_start, g_size = starts[big], sizes[big]
    # Pair each member with every later member of its group.
    pos = _ranges(g_start, g_size)
    later = np.repeat(g_start + g_size, g_size) - pos - 1
    a, b = _expand(pos, pos + 1, later, np.arange(len(members), dtype=np.int64))
    return np.stack([members[a], members[b]], axis=1)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), vectorized."""
    total = int(sizes.sum())
    offs = np.cumsum(sizes) - sizes
    return np.repeat(starts - offs, sizes) + np.arange(total, dtype=np.int64)


def _cross_pairs(
    upairs: np.ndarray, members: np.ndarray, starts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Record pairs for pairs of distinct values: every member of one times every member of the other."""
    if len(upairs) == 0:
        return _EMPTY.copy()
    a, b = upairs[:, 0], upairs[:, 1]
    na, nb = sizes[a], sizes[b]
    per = na * nb
    total = int(per.sum())
    k = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    nb_r = np.repeat(nb, per)
    x = members[np.repeat(starts[a], per) + k // nb_r]
    y = members[np.repeat(starts[b], per) + k % nb_r]
    return np.stack([np.minimum(x, y), np.maximum(x, y)], axis=1)


def radius_pairs(hashes: Any, radius: int, *, max_candidates: int = 1 << 22) -> np.ndarray:
    """Every pair (i, j), i < j, with popcount(h[i] ^ h[j]) <= radius; shape (P, 2), int64.

    Sorted lexicographically and identical to ``brute_force_pairs(hashes, radius)``.
    ``max_candidates`` bounds the candidate pairs held in memory at once.
    """
    h = _as_hashes(hashes)
    r = _check_radius(radius)
    n = len(h)
    if n < 2:
        return _EMPTY.copy()
    if r >= _BITS:  # everything is within 64 bits of everything
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1).astype(np.int64)
    u, inverse, sizes = np.unique(h, return_inverse=True, return_counts=True)
    members = np.argsort(inverse, kind="stable").astype(np.int64)  # records grouped by value, ascending
    starts = np.cumsum(sizes) - sizes
    parts = [_group_pairs(members, starts, sizes)]
    if len(u) >= 2:
        parts.append(_cross_pairs(_pairs_of_distinct(u, r, max_candidates), members, starts, sizes))
    pairs = np.concatenate(parts)
    if len(pairs) == 0:
        return _EMPTY.copy()
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return np.ascontiguousarray(pairs[order])


# --------------------------------------------------------------------------- clusters


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes (the smallest node index in its component).

    Vectorized union-find: hook each edge's larger root under its smaller one, then compress
    paths by pointer jumping; repeat until no edge joins two roots. parent[x] <= x throughout,
    so labels only decrease and the loop ends.
    """
    parent = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return parent
    a = np.asarray(pairs[:, 0], dtype=np.int64)
    b = np.asarray(pairs[:, 1], dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        diff = lo != hi
        if not diff.any():
            return parent
        np.minimum.at(parent, hi[diff], lo[diff])
        while True:  # pointer jumping until every node points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def duplicate_clusters(
    hashes: Any, radius: int, keys: Any, *, pairs: np.ndarray | None = None
) -> np.ndarray:
    """For each record, the index of the record kept for its near-duplicate cluster.

    Clusters are the connected components of the "within ``radius``" graph (pass ``pairs`` from
    ``radius_pairs`` to reuse them). In each, the record with the smallest ``keys`` value is kept:
    a rule on the records themselves, so the same records are kept whatever their input order
    (with unique keys; equal keys fall back to input order). ``kept[i] == i`` means i is kept.
    """
    h = _as_hashes(hashes)
    n = len(h)
    k = np.asarray(keys)
    if len(k) != n:
        raise ValueError(f"keys has {len(k)} entries for {n} hashes")
    if pairs is None:
        pairs = radius_pairs(h, radius)
    comp = connected_components(n, pairs)
    order = np.argsort(k, kind="stable")  # order[rank] = record
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, comp, rank)  # best rank per component label
    return order[best[comp]]
