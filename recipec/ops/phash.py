"""Fast 64-bit perceptual hashes, compatible with ``imagehash.phash`` (hash_size=8, highfreq_factor=4).

imagehash computes: grayscale ("L"), Pillow LANCZOS resize to 32x32 (uint8, with rounding after the
horizontal and after the vertical pass), 2-D DCT-II, top-left 8x8 block, bit = coefficient > median,
bits read row-major with the first one as the most significant bit. We reproduce that, faster:

* The resize is done by us as two small matrix products with Pillow's own fixed-point Lanczos
  coefficients and Pillow's rounding, so on an image we do not shrink first the 32x32 pixels are
  bit-identical to Pillow's, and so the hash is identical to imagehash's.
* Large images are first shrunk cheaply: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg
  (``Image.draft``: much less IDCT and no chroma work), other formats are box-reduced
  (``Image.reduce``). Both give (close to) block means, so instead of resampling those blocks with
  the Lanczos kernel as if they were pixels, we integrate the full-resolution kernel over each
  block: the result is then what the full-resolution resize would have given, up to the detail
  inside the blocks. On generated charts, text pages and photos (benchmarks/bench_phash.py) this
  keeps >= 99.5% of JPEG hashes within 2 bits of imagehash (~85% equal); PNGs up to 1024 px are
  not shrunk, so their hashes are equal.
* Only the 8 needed DCT coefficients per axis are computed, as ``D8 @ Y @ D8.T`` on a whole batch.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from multiprocessing import get_context
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "HASH_SIZE",
    "IMG_SIZE",
    "phash",
    "phash_batch",
    "phash_files",
    "phash_files_checked",
    "hash_to_hex",
    "hex_to_hash",
]

HASH_SIZE = 8
IMG_SIZE = HASH_SIZE * 4  # imagehash's highfreq_factor=4

# Shrinking before the resize: the shrunk side keeps at least this many pixels per output pixel.
# Measured on generated charts, text pages and photos: a JPEG draft down to 2 px/output keeps only
# 99.2% of hashes within 2 bits, 4 px/output 99.6% (and decodes at 1/4..1/8 scale for 512..1024 px
# images). Box reduce is only worth it on large images (PNG decode dominates anyway): at 16
# px/output (sides >= 1024) ~99% of hashes stay exactly equal, at 4 px/output only ~77%.
_JPEG_MIN_PER_OUT = 4
_REDUCE_MIN_PER_OUT = 16

# Pillow's resampling precision for 8-bit images (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22
_ONE = float(1 << _PRECISION_BITS)
_HALF = float(1 << (_PRECISION_BITS - 1))


def _dct_matrix(n_out: int = HASH_SIZE, n_in: int = IMG_SIZE) -> np.ndarray:
    """Rows 0..n_out-1 of the unnormalized DCT-II of size n_in (scipy.fftpack.dct's convention)."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))


_D8 = _dct_matrix()


def _sinc(x: np.ndarray) -> np.ndarray:
    # Pillow's sinc_filter, operation for operation (x * pi, then sin(x) / x), for identical taps.
    y = x * np.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sin(y) / y
    out[x == 0.0] = 1.0
    return out


def _lanczos(x: np.ndarray) -> np.ndarray:
    # Pillow's lanczos_filter: sinc(x) * sinc(x / 3) on [-3, 3), zero elsewhere.
    out = _sinc(x) * _sinc(x / 3.0)
    out[(x < -3.0) | (x >= 3.0)] = 0.0
    return out


@lru_cache(maxsize=4096)
def _resize_weights(full: int, block: int, reduced: int) -> np.ndarray:
    """(IMG_SIZE, reduced) fixed-point Lanczos weights, as float64 holding integers.

    ``full`` is the side of the original image, ``reduced`` the side we actually have, each of its
    pixels the mean of ``block`` original pixels. With block == 1 these are exactly Pillow's
    coefficients (precompute_coeffs + normalize_coeffs_8bpc), so the resize is bit-identical.
    """
    out = IMG_SIZE
    scale = full / out
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    centers = (np.arange(out) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int) truncates; >= 0 here
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), full)
    # Only the taps inside each output pixel's support (Pillow's bounds), as flat arrays.
    x = xmin[:, None] + np.arange(ksize)[None, :]
    row, tap = np.nonzero(x < xmax[:, None])
    x = x[row, tap]
    w = _lanczos((x - centers[row] + 0.5) * (1.0 / filterscale))
    w /= np.bincount(row, weights=w, minlength=out)[row]  # each output pixel's taps sum to 1
    if block == 1:
        dense = np.zeros((out, reduced))
        dense[row, x] = _fixed_point(w)
    else:
        # Integrate the kernel over each block (the last one may be partial), then round to fixed
        # point as Pillow does for its own taps.
        col = np.minimum(x // block, reduced - 1)
        summed = np.bincount(row * reduced + col, weights=w, minlength=out * reduced)
        dense = _fixed_point(summed.reshape(out, reduced))
    dense.setflags(write=False)
    return dense


def _fixed_point(w: np.ndarray) -> np.ndarray:
    """Pillow's normalize_coeffs_8bpc: scale by 2**22 and round half away from zero."""
    return np.where(w < 0, np.ceil(w * _ONE - 0.5), np.floor(w * _ONE + 0.5))


def _resize_32(gray: np.ndarray, full_w: int, full_h: int, block_x: int, block_y: int) -> np.ndarray:
    """Pillow's LANCZOS resize of a (full_w x full_h) L image to 32x32, from its block-reduced pixels.

    float64 holds the fixed-point sums exactly (each term < 2^30, a few thousand terms), so this
    matches Pillow's integer arithmetic bit for bit, passes in Pillow's order.
    """
    h, w = gray.shape
    x = gray.astype(np.float64, copy=False)
    wx = _resize_weights(full_w, block_x, w)
    wy = _resize_weights(full_h, block_y, h)
    do_x = full_w != IMG_SIZE or block_x != 1
    do_y = full_h != IMG_SIZE or block_y != 1
    # Recent Pillow runs the vertical pass first on tall images (found by testing against Pillow 13:
    # "vertical first iff h > 2 * max(w, 32) - 32"); the order matters for the rounding.
    if do_y and full_h > 2 * max(full_w, IMG_SIZE) - IMG_SIZE and _pillow_tall_vertical_first():
        x = np.clip(np.floor((wy @ x + _HALF) / _ONE), 0.0, 255.0)
        do_y = False
    if do_x:
        x = np.clip(np.floor((x @ wx.T + _HALF) / _ONE), 0.0, 255.0)
    if do_y:
        x = np.clip(np.floor((wy @ x + _HALF) / _ONE), 0.0, 255.0)
    return x


@lru_cache(maxsize=1)
def _pillow_tall_vertical_first() -> bool:
    """Does this Pillow resize tall images vertical pass first? Asked once, on a probe image."""
    probe = np.random.default_rng(5).integers(0, 256, (100, 16), dtype=np.uint8)
    got = np.asarray(Image.fromarray(probe).resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS))
    x = probe.astype(np.float64)
    wx, wy = _resize_weights(16, 1, 16), _resize_weights(100, 1, 100)
    v = np.clip(np.floor((wy @ x + _HALF) / _ONE), 0.0, 255.0)
    v = np.clip(np.floor((v @ wx.T + _HALF) / _ONE), 0.0, 255.0)
    return bool(np.array_equal(v, got))


def _reduce_factor(side: int) -> int:
    return max(1, side // (IMG_SIZE * _REDUCE_MIN_PER_OUT))


def _pixels_from_image(image: Image.Image) -> np.ndarray:
    """32x32 float pixels of an in-memory image (never mutates the caller's image)."""
    full_w, full_h = image.size
    gray = image if image.mode == "L" else image.convert("L")
    fx, fy = _reduce_factor(full_w), _reduce_factor(full_h)
    if fx > 1 or fy > 1:
        gray = gray.reduce((fx, fy))  # box means: cheap, and what _resize_weights integrates over
    return _resize_32(np.asarray(gray), full_w, full_h, fx, fy)


def _pixels_from_file(path: str | os.PathLike[str]) -> np.ndarray:
    """32x32 float pixels of an image file, using libjpeg's scaled decoding for JPEGs."""
    with Image.open(path) as im:
        full_w, full_h = im.size
        target = IMG_SIZE * _JPEG_MIN_PER_OUT
        if im.format == "JPEG" and min(full_w // target, full_h // target) >= 2:
            # Decode at 1/2, 1/4 or 1/8 scale (luma only): libjpeg's scaled IDCT gives ~block means.
            # Not at full scale: there its luma differs from Pillow's RGB->L by rounding.
            im.draft("L", (target, target))
            if im.size != (full_w, full_h):
                gray = im if im.mode == "L" else im.convert("L")
                # libjpeg rounds the scaled size up, so the block is full/reduced rounded.
                bx = round(full_w / im.size[0])
                by = round(full_h / im.size[1])
                return _resize_32(np.asarray(gray), full_w, full_h, bx, by)
        return _pixels_from_image(im)


def _hash_pixels(pixels: np.ndarray) -> np.ndarray:
    """(B, 32, 32) float pixels -> (B,) uint64 hashes, imagehash's bit order."""
    if pixels.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    coeffs = _D8 @ pixels @ _D8.T  # (B, 8, 8): only the low-frequency block imagehash keeps
    flat = coeffs.reshape(len(pixels), HASH_SIZE * HASH_SIZE)
    # Coefficients that are zero by symmetry come out as +-1e-13 here; imagehash's FFT gives 0.
    # Snap them, so flat and symmetric images hash the same as with imagehash.
    scale = np.abs(flat).max(axis=1, keepdims=True) + 1.0
    flat = np.where(np.abs(flat) < 1e-9 * scale, 0.0, flat)
    med = np.median(flat, axis=1, keepdims=True)
    bits = flat > med
    # First coefficient = most significant bit: packbits is big-endian within each byte, and the
    # 8 bytes are read as one big-endian word.
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def phash(image: Image.Image) -> int:
    """64-bit pHash of one image; equals ``int(str(imagehash.phash(image)), 16)`` (almost always)."""
    return int(phash_batch([image])[0])


def phash_batch(images: Sequence[Image.Image]) -> np.ndarray:
    """pHashes of in-memory images as a uint64 array (one DCT for the whole batch)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.uint64)
    with _single_thread_blas():
        return _hash_pixels(np.stack([_pixels_from_image(im) for im in images]))


def hash_to_hex(h: int | np.integer) -> str:
    """The 16-hex-digit form imagehash prints."""
    return f"{int(h):016x}"


def hex_to_hash(s: str) -> int:
    return int(s, 16)


_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _single_thread_blas() -> contextlib.AbstractContextManager[object]:
    """Keep BLAS on one thread while we hash.

    Our matrix products are many and small-to-medium; a multi-threaded OpenBLAS spends more on
    waking its threads than it saves (10x slower on a 2-core machine), and one thread per worker
    is what makes ``workers`` mean cores. threadpoolctl is optional; without it, nothing changes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def _workers_env() -> Iterator[None]:
    """Spawned workers inherit the environment: one BLAS thread each, set before numpy loads."""
    saved = {k: os.environ.get(k) for k in _BLAS_ENV}
    os.environ.update({k: "1" for k in _BLAS_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hash_chunk(paths: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
    """Worker: hash a chunk of files; a file that fails gets hash 0 and its error message."""
    pixels = np.zeros((len(paths), IMG_SIZE, IMG_SIZE))
    errors: list[str | None] = [None] * len(paths)
    with _single_thread_blas():
        for i, p in enumerate(paths):
            try:
                pixels[i] = _pixels_from_file(p)
            except Exception as e:  # noqa: BLE001 - corrupt/hostile files are reported, not fatal
                errors[i] = f"{type(e).__name__}: {e}"
    hashes = _hash_pixels(pixels)
    hashes[[e is not None for e in errors]] = 0
    return hashes, errors


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def phash_files_checked(
    paths: Sequence[str | os.PathLike[str]], *, workers: int = 1, chunk_size: int = 256,
    pool: "ProcessPoolExecutor | None" = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Hashes of image files plus, per file, None or the reason it could not be hashed.

    With workers > 1 the files are hashed in a spawn-based process pool (safe whatever the parent
    process holds: threads, CUDA, ...), in chunks so that each task amortises its IPC. Results come
    back in input order.
    """
    items = [os.fspath(p) for p in paths]
    if not items:
        return np.zeros(0, dtype=np.uint64), []
    # Small chunks with several workers so that the load evens out; a chunk per few hundred files.
    chunk = max(1, min(chunk_size, -(-len(items) // (4 * max(workers, 1)))))
    if workers <= 1 or len(items) <= chunk:
        return _hash_chunk(items)
    if pool is not None:  # the caller's pool, kept across calls (a step hashing batch after batch)
        parts = list(pool.map(_hash_chunk, _chunks(items, chunk)))
    else:
        with hashing_pool(workers) as own:
            parts = list(own.map(_hash_chunk, _chunks(items, chunk)))
    hashes = np.concatenate([h for h, _ in parts])
    errors = [e for _, errs in parts for e in errs]
    return hashes, errors


@contextlib.contextmanager
def hashing_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn-based process pool for `phash_files_checked(pool=...)`, one BLAS thread per worker."""
    with _workers_env():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def phash_files(paths: Sequence[str | os.PathLike[str]], *, workers: int = 1) -> np.ndarray:
    """uint64 pHashes of image files; raises ValueError naming the first file that failed."""
    hashes, errors = phash_files_checked(paths, workers=workers)
    for p, e in zip(paths, errors):
        if e is not None:
            raise ValueError(f"{os.fspath(p)}: cannot hash image: {e}")
    return hashes
