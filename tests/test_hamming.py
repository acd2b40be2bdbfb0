"""radius_pairs equals brute force; duplicate_clusters keeps the same records whatever the order."""

from __future__ import annotations

import numpy as np
import pytest

from recipec.ops.hamming import (
    brute_force_pairs,
    connected_components,
    duplicate_clusters,
    pairs_involving,
    popcount64,
    radius_pairs,
)


def planted(n: int, radius: int, seed: int, near: float = 0.05, copies: float = 0.01) -> np.ndarray:
    """Random hashes, some replaced by near-copies (0..radius bits flipped) and exact copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    for _ in range(int(n * near)):
        src, dst = rng.integers(0, n, 2)
        bits = rng.choice(64, int(rng.integers(0, radius + 1)), replace=False)
        h[dst] = h[src] ^ np.uint64(sum(1 << int(b) for b in bits))
    k = int(n * copies)
    h[rng.integers(0, n, k)] = h[rng.integers(0, n, k)]
    return h


def test_popcount64() -> None:
    x = np.array([0, 1, 3, 2**63, 2**64 - 1, 0x0F0F], dtype=np.uint64)
    assert popcount64(x).tolist() == [0, 1, 2, 1, 64, 8]


@pytest.mark.parametrize("radius", range(0, 9))
@pytest.mark.parametrize("n", [2, 40, 600, 2500])
def test_radius_pairs_equals_brute_force(n: int, radius: int) -> None:
    h = planted(n, radius, seed=n * 100 + radius)
    got = radius_pairs(h, radius)
    want = brute_force_pairs(h, radius)
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert np.array_equal(got, want)


def test_brute_force_is_correct_and_sorted() -> None:
    h = planted(300, 6, seed=5)
    pairs = brute_force_pairs(h, 6)
    want = [(i, j) for i in range(300) for j in range(i + 1, 300) if bin(int(h[i]) ^ int(h[j])).count("1") <= 6]
    assert [tuple(p) for p in pairs.tolist()] == want


def test_large_input_takes_the_indexed_path() -> None:
    # 20k distinct hashes: brute force is not the planner's choice here, the blocks are.
    h = planted(20_000, 4, seed=11, near=0.02)
    got = radius_pairs(h, 4)
    rows = np.arange(0, 20_000, 7)
    touch = np.isin(got[:, 0], rows) | np.isin(got[:, 1], rows)
    assert np.array_equal(got[touch], pairs_involving(h, rows, 4))
    assert np.all(popcount64(h[got[:, 0]] ^ h[got[:, 1]]) <= 4)


@pytest.mark.parametrize("radius", [0, 1, 4, 63, 64, 100])
def test_degenerate_inputs(radius: int) -> None:
    empty = np.zeros(0, dtype=np.uint64)
    assert radius_pairs(empty, radius).shape == (0, 2)
    assert radius_pairs(np.array([5], dtype=np.uint64), radius).shape == (0, 2)
    same = np.full(1500, 0xDEADBEEF, dtype=np.uint64)
    pairs = radius_pairs(same, radius)
    assert len(pairs) == 1500 * 1499 // 2
    assert np.array_equal(pairs[:3], [[0, 1], [0, 2], [0, 3]])
    few = np.random.default_rng(radius).integers(0, 2**64, 30, dtype=np.uint64)
    assert np.array_equal(radius_pairs(few, radius), brute_force_pairs(few, radius))


def test_many_copies_of_few_values() -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 2**64, 25, dtype=np.uint64)
    values[1] = values[0] ^ np.uint64(0b101)  # two groups within radius of each other
    h = values[rng.integers(0, 25, 3000)]
    for radius in (0, 2, 5):
        assert np.array_equal(radius_pairs(h, radius), brute_force_pairs(h, radius))


def test_radius_64_is_all_pairs_and_negative_is_an_error() -> None:
    h = np.random.default_rng(0).integers(0, 2**64, 50, dtype=np.uint64)
    assert len(radius_pairs(h, 64)) == 50 * 49 // 2
    with pytest.raises(ValueError):
        radius_pairs(h, -1)


def test_signed_input_is_read_as_bits() -> None:
    h = np.array([-1, -2, 5], dtype=np.int64)  # 0xFFFF...FF and 0xFFFF...FE: distance 1
    assert radius_pairs(h, 1).tolist() == [[0, 1]]


def test_connected_components_chain() -> None:
    pairs = np.array([[3, 4], [0, 1], [1, 2], [5, 6], [2, 3]], dtype=np.int64)
    assert connected_components(8, pairs).tolist() == [0, 0, 0, 0, 0, 5, 5, 7]


def test_duplicate_clusters_keep_smallest_key_independent_of_order() -> None:
    n = 400
    h = planted(n, 3, seed=9, near=0.3, copies=0.05)
    keys = np.array([f"rec-{v:05d}" for v in np.random.default_rng(1).permutation(n)])
    kept = duplicate_clusters(h, 3, keys)
    # The kept record of a cluster has the smallest key in it and keeps itself.
    assert np.all(kept[kept] == kept)
    comp = connected_components(n, radius_pairs(h, 3))
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        assert keys[kept[members[0]]] == min(keys[members])
    kept_keys = {keys[i]: keys[kept[i]] for i in range(n)}
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        kept_p = duplicate_clusters(h[perm], 3, keys[perm])
        assert {keys[perm][i]: keys[perm][kept_p[i]] for i in range(n)} == kept_keys


def test_duplicate_clusters_accepts_pairs_and_checks_keys() -> None:
    h = np.array([0, 1, 0xFF00, 0xFF01, 0xF0F0F0F000000000], dtype=np.uint64)
    pairs = radius_pairs(h, 1)
    kept = duplicate_clusters(h, 1, np.array([5, 4, 3, 9, 1]), pairs=pairs)
    assert kept.tolist() == [1, 1, 2, 2, 4]
    with pytest.raises(ValueError):
        duplicate_clusters(h, 1, [1, 2])
