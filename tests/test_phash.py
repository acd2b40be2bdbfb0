"""recipec.ops.phash agrees with imagehash.phash, on files and in memory."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from recipec.ops.hamming import popcount64
from recipec.ops.phash import (
    hash_to_hex,
    hex_to_hash,
    phash,
    phash_batch,
    phash_files,
    phash_files_checked,
)

imagehash = pytest.importorskip("imagehash")


def reference(im: Image.Image) -> int:
    return int(str(imagehash.phash(im)), 16)


def _scene(rng: random.Random) -> Image.Image:
    """A small varied image: a chart-like drawing, a text-like page or a smooth noisy scene."""
    w, h = rng.randint(40, 700), rng.randint(40, 700)
    kind = rng.choice(["chart", "text", "photo"])
    if kind == "photo":
        nrng = np.random.default_rng(rng.getrandbits(32))
        low = nrng.integers(0, 256, (max(2, h // 50), max(2, w // 50), 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(5, max(6, w // 4))
            d.ellipse([x - r, y - r, x + r, y + r], fill=(rng.randint(0, 255), rng.randint(0, 255), 90))
        im = im.filter(ImageFilter.GaussianBlur(2))
        grain = nrng.normal(0, 6, (h, w, 3))
        return Image.fromarray(np.clip(np.asarray(im, dtype=float) + grain, 0, 255).astype(np.uint8))
    im = Image.new("RGB", (w, h), (rng.randint(200, 255),) * 3)
    d = ImageDraw.Draw(im)
    if kind == "chart":
        n = rng.randint(2, 8)
        for i in range(n):
            v = rng.random()
            d.rectangle([i * w / n + 2, h - v * h, (i + 1) * w / n - 2, h], fill=(rng.randint(0, 200), 80, 160))
    else:
        y = 5
        while y < h - 10:
            d.text((rng.randint(2, 20), y), "lorem ipsum data " * rng.randint(1, 4), fill=(0, 0, 0))
            y += rng.randint(12, 24)
    return im


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("phash")
    rng = random.Random(1234)
    paths = []
    for i in range(120):
        im = _scene(rng)
        if rng.random() < 0.5:
            p = root / f"{i:03d}.jpg"
            im.save(p, "JPEG", quality=rng.randint(60, 95))
        else:
            p = root / f"{i:03d}.png"
            im.save(p, "PNG")
        paths.append(p)
    return paths


def test_files_agree_with_imagehash(image_files: list[Path]) -> None:
    ours = phash_files(image_files)
    ref = np.array([reference(Image.open(p)) for p in image_files], dtype=np.uint64)
    d = popcount64(ours ^ ref)
    assert np.mean(d <= 2) >= 0.99, np.sort(d)[-10:]
    assert np.mean(d == 0) >= 0.8
    png = np.array([p.suffix == ".png" for p in image_files])
    # No JPEG draft on PNGs and no shrinking below 512 px: the same pixels, the same hash.
    assert np.all(d[png] == 0)


def test_in_memory_images_are_exact() -> None:
    rng = random.Random(7)
    images = [_scene(rng) for _ in range(40)]
    nrng = np.random.default_rng(0)
    images += [Image.fromarray(nrng.integers(0, 256, (int(nrng.integers(1, 300)), int(nrng.integers(1, 300))), dtype=np.uint8)) for _ in range(30)]
    ours = phash_batch(images)
    assert [int(h) for h in ours] == [reference(im) for im in images]


@pytest.mark.parametrize(
    "im",
    [
        Image.new("L", (100, 100), 0),
        Image.new("L", (100, 100), 200),
        Image.new("RGB", (33, 47), (10, 200, 30)),
        Image.new("RGBA", (64, 64), (1, 2, 3, 4)),
        Image.new("1", (40, 40), 1),
        Image.new("L", (1, 1), 5),
        Image.new("L", (3000, 20), 9),
        Image.new("I;16", (50, 50), 300),
        Image.new("F", (50, 50), 3.5),
        Image.new("P", (70, 30), 3),
    ],
    ids=lambda im: f"{im.mode}-{im.size[0]}x{im.size[1]}",
)
def test_degenerate_images_match(im: Image.Image) -> None:
    assert phash(im) == reference(im)


def test_half_split_image_matches() -> None:
    im = Image.new("L", (101, 100), 255)
    im.paste(0, (0, 0, 50, 100))
    assert phash(im) == reference(im)


def test_batch_equals_single() -> None:
    rng = random.Random(3)
    images = [_scene(rng) for _ in range(12)]
    assert [int(h) for h in phash_batch(images)] == [phash(im) for im in images]
    assert phash_batch([]).dtype == np.uint64 and len(phash_batch([])) == 0


def test_bit_order_and_hex() -> None:
    im = Image.new("L", (64, 64), 255)
    im.paste(0, (0, 0, 32, 64))
    h = phash(im)
    assert hash_to_hex(h) == str(imagehash.phash(im))
    assert hex_to_hash(hash_to_hex(h)) == h


def test_workers_equal_serial(image_files: list[Path]) -> None:
    some = image_files[:30]
    assert np.array_equal(phash_files(some, workers=2), phash_files(some))


def test_bad_files_are_reported_not_fatal(tmp_path: Path, image_files: list[Path]) -> None:
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(image_files[0].read_bytes()[:10] if image_files[0].suffix == ".jpg" else b"\xff\xd8\xff")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    hashes, errors = phash_files_checked([image_files[1], bad, text])
    assert errors[0] is None and errors[1] and errors[2]
    assert hashes[1] == 0 and hashes[2] == 0
    with pytest.raises(ValueError, match="truncated.jpg"):
        phash_files([bad])
