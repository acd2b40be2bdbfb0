"""Deterministic generator of varied benchmark images with planted near-duplicates.

Three families, roughly the content of a VLM corpus: charts drawn with PIL, rendered text pages,
and "photo-like" scenes (gradients, blurred shapes, low- and high-frequency noise). Sizes 256..1024,
saved as JPEG or PNG. A share of the images gets a near-duplicate: resized, recompressed at another
JPEG quality, slightly cropped or brightness-shifted. Everything follows from one seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

WORDS = (
    "data model image caption vision token chart table answer question reason detail scene "
    "object action figure value total growth rate sample stage mixture loss score tag"
).split()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow >= 10.1 scales its bundled font when FreeType is there
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def _size(rng: random.Random) -> tuple[int, int]:
    w = rng.randint(256, 1024)
    h = int(w * rng.choice([0.5625, 0.75, 1.0, 1.333, 1.5]))
    return w, max(256, min(1024, h))


def _color(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def chart(rng: random.Random) -> Image.Image:
    w, h = _size(rng)
    im = Image.new("RGB", (w, h), _color(rng, 225, 255))
    d = ImageDraw.Draw(im)
    font = _font(max(10, h // 30))
    m = max(30, w // 10)
    d.line([(m, h - m), (w - m // 2, h - m)], fill=(0, 0, 0), width=2)
    d.line([(m, m // 2), (m, h - m)], fill=(0, 0, 0), width=2)
    d.text((m, 4), " ".join(rng.sample(WORDS, 3)).title(), fill=(0, 0, 0), font=font)
    kind = rng.choice(["bar", "line", "pie", "scatter"])
    n = rng.randint(3, 12)
    vals = [rng.random() for _ in range(n)]
    x0, x1, y0, y1 = m + 4, w - m // 2, m // 2 + 10, h - m - 2
    if kind == "bar":
        bw = (x1 - x0) / n
        for i, v in enumerate(vals):
            d.rectangle([x0 + i * bw + 2, y1 - v * (y1 - y0), x0 + (i + 1) * bw - 2, y1],
                        fill=_color(rng, 0, 200))
            d.text((x0 + i * bw + 2, h - m + 4), str(i), fill=(0, 0, 0), font=font)
    elif kind == "line":
        for _ in range(rng.randint(1, 3)):
            pts = [(x0 + i * (x1 - x0) / (n - 1), y1 - rng.random() * (y1 - y0)) for i in range(n)]
            d.line(pts, fill=_color(rng, 0, 200), width=rng.randint(1, 4))
    elif kind == "pie":
        box = [x0, y0, x0 + min(x1 - x0, y1 - y0), y0 + min(x1 - x0, y1 - y0)]
        start, total = 0.0, sum(vals)
        for v in vals:
            end = start + 360 * v / total
            d.pieslice(box, start, end, fill=_color(rng, 0, 230), outline=(255, 255, 255))
            start = end
    else:
        for _ in range(rng.randint(20, 200)):
            x, y, r = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.randint(2, 6)
            d.ellipse([x - r, y - r, x + r, y + r], fill=_color(rng, 0, 200))
    return im


def text_page(rng: random.Random) -> Image.Image:
    w, h = _size(rng)
    im = Image.new("RGB", (w, h), _color(rng, 235, 255))
    d = ImageDraw.Draw(im)
    size = rng.randint(12, 28)
    font = _font(size)
    y = rng.randint(5, 40)
    ink = _color(rng, 0, 80)
    while y < h - size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 14))]
        d.text((rng.randint(5, 40), y), " ".join(words), fill=ink, font=font)
        y += int(size * rng.uniform(1.2, 2.2))
    return im


def photo(rng: random.Random) -> Image.Image:
    w, h = _size(rng)
    nrng = np.random.default_rng(rng.getrandbits(32))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = nrng.uniform(-1, 1, 2)
    grad = (a * xx / w + b * yy / h)[..., None] * nrng.uniform(40, 120, 3)
    low = nrng.normal(0, 1, (max(2, h // 64), max(2, w // 64), 3)).astype(np.float32)
    low_im = Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8))
    low_up = np.asarray(low_im.resize((w, h), Image.BICUBIC), dtype=np.float32) - 128
    base = 128 + grad + low_up * nrng.uniform(0.3, 0.9)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 10)):  # blurred "objects"
        x, y = rng.randint(0, w), rng.randint(0, h)
        r = rng.randint(w // 20, w // 4)
        d.ellipse([x - r, y - r, x + r, y + r] if rng.random() < 0.5 else [x - r, y - r // 2, x + r, y + r // 2],
                  fill=_color(rng))
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(1, 6)))
    grain = nrng.normal(0, rng.uniform(2, 12), (h, w, 3))  # sensor-like fine noise
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def variant(im: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """A near-duplicate of `im` and the name of the change applied."""
    kind = rng.choice(["resize", "recompress", "crop", "brightness"])
    if kind == "resize":
        s = rng.uniform(0.4, 0.9)
        return im.resize((max(64, int(im.width * s)), max(64, int(im.height * s))), Image.BICUBIC), kind
    if kind == "crop":
        fx, fy = rng.uniform(0.0, 0.03), rng.uniform(0.0, 0.03)
        dx, dy = int(im.width * fx), int(im.height * fy)
        return im.crop((dx, dy, im.width - int(im.width * rng.uniform(0, 0.03)), im.height - dy)), kind
    if kind == "brightness":
        return ImageEnhance.Brightness(im).enhance(rng.uniform(0.88, 1.12)), kind
    return im, kind  # recompress: same pixels, saved as JPEG at another quality by the caller


@dataclass
class Corpus:
    root: Path
    paths: list[Path] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    planted: list[tuple[int, int, str]] = field(default_factory=list)  # (original, duplicate, change)

    def manifest(self) -> dict:
        return {"paths": [str(p) for p in self.paths], "families": self.families, "planted": self.planted}


def generate(root: str | Path, n: int, *, seed: int = 0, dup_fraction: float = 0.15) -> Corpus:
    """Write `n` images under `root` (a fraction of them near-duplicates of others)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = Corpus(root)
    n_dup = int(n * dup_fraction)
    makers = {"chart": chart, "text": text_page, "photo": photo}
    originals: list[tuple[int, Image.Image, str]] = []

    def save(im: Image.Image, fmt: str, family: str, quality: int = 85) -> int:
        idx = len(corpus.paths)
        path = root / f"{idx:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if fmt == "JPEG":
            im.convert("RGB").save(path, "JPEG", quality=quality)
        else:
            im.save(path, "PNG")
        corpus.paths.append(path)
        corpus.families.append(family)
        return idx

    for _ in range(n - n_dup):
        family = rng.choice(list(makers))
        im = makers[family](rng)
        # Photos are mostly JPEG, drawings mostly PNG, as in real corpora.
        jpeg = rng.random() < (0.85 if family == "photo" else 0.3)
        q = rng.randint(70, 95)
        idx = save(im, "JPEG" if jpeg else "PNG", family, q)
        originals.append((idx, im, "JPEG" if jpeg else "PNG"))
    for orig_idx, im, fmt in rng.sample(originals, n_dup):
        dup, kind = variant(im, rng)
        out_fmt = "JPEG" if kind == "recompress" or fmt == "JPEG" else "PNG"
        dup_idx = save(dup, out_fmt, corpus.families[orig_idx], rng.randint(60, 95))
        corpus.planted.append((orig_idx, dup_idx, kind))
    return corpus
