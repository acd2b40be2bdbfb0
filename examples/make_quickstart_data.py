#!/usr/bin/env python
"""Generate the quickstart dataset under ``examples/quickstart/`` (a small Infinity-MM-like world).

    python examples/make_quickstart_data.py                      # regenerate the committed files
    python examples/make_quickstart_data.py --out /tmp/qs --scale 0.2

Everything follows from ``SEED``: every image and record gets its own random generator, derived
from (seed, stage, source, position), so the output is byte-identical from run to run (with the
same Pillow, zlib, libjpeg and pyarrow; image codecs may differ across library versions).

Six sources, each a folder with ``images/`` and its data file(s):

* ``captions/captions.jsonl``  LLaVA JSONL, one caption per image (stage-1 style data)
* ``general/general.json``     LLaVA JSON array (one record per line), general VQA, ``loss``
* ``ocr_docs/ocr_docs.jsonl``  OCR and doc/chart/screen QA, ``data_type`` and ``loss``
* ``math/math.parquet``        id, image, conversations, data_type, loss
* ``text/text.jsonl``          text-only instructions (no images)
* ``seed/seed.jsonl``          GPT-4-style detailed QA with a 1-10 ``score`` (synthesis seeds)

Questions and answers are templated from what was drawn, so they are true of their image.
Planted near/exact duplicates are listed in ``planted_duplicates.json``, planted broken inputs
with the reason ingest must give in ``planted_rejects.json``. Uses only numpy and Pillow (and
pyarrow for the Parquet file).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SEED = 20241111
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "quickstart"

Rng = np.random.Generator
Facts = dict[str, Any]
Color = tuple[int, int, int]


# ============================================================================================
# small helpers


def rng_for(*key: int | str) -> Rng:
    """An independent generator per item, so adding one item never reshuffles the others."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in key]
    return np.random.default_rng([SEED, *ints])


def pick(rng: Rng, seq: list | tuple) -> Any:
    return seq[int(rng.integers(len(seq)))]


def sample(rng: Rng, seq: list | tuple, k: int) -> list:
    return [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]


def uniform(rng: Rng, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def randint(rng: Rng, lo: int, hi: int) -> int:
    """Inclusive on both ends, like random.randint."""
    return int(rng.integers(lo, hi + 1))


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font (needs FreeType): the same glyphs on every machine, no system fonts.
    return ImageFont.load_default(size=size)


def jitter(rng: Rng, c: Color, amount: int = 18) -> Color:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


def light(rng: Rng) -> Color:
    return tuple(int(v) for v in rng.integers(215, 256, 3))  # type: ignore[return-value]


def mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


NAMED: dict[str, Color] = {
    "red": (214, 39, 40), "blue": (31, 100, 190), "green": (44, 150, 44), "orange": (250, 127, 14),
    "purple": (130, 80, 180), "brown": (130, 80, 50), "pink": (230, 120, 190), "gray": (128, 128, 128),
    "yellow": (235, 200, 30), "teal": (20, 160, 170), "black": (25, 25, 25), "white": (245, 245, 245),
}
BRIGHT = ["red", "blue", "green", "orange", "purple", "pink", "yellow", "teal"]


def gradient(w: int, h: int, top: Color, bottom: Color) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    col = np.array(top, float) * (1 - t) + np.array(bottom, float) * t
    return np.repeat(col, w, axis=1)


def photo_finish(rng: Rng, img: Image.Image) -> Image.Image:
    """Blur and sensor-like noise, so scenes look like (bad) photos rather than vector art."""
    img = img.filter(ImageFilter.GaussianBlur(uniform(rng, 0.5, 1.1)))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, uniform(rng, 3.0, 8.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def text_w(d: ImageDraw.ImageDraw, text: str, f: ImageFont.FreeTypeFont) -> float:
    return d.textlength(text, font=f)


def size_between(rng: Rng, wr: tuple[int, int], hr: tuple[int, int]) -> tuple[int, int]:
    return randint(rng, *wr), randint(rng, *hr)


WORDS = (
    "account active address agenda analysis annual approval budget client contract cost customer "
    "data deadline delivery design draft energy estimate field goal growth health income invoice "
    "item labor market meeting method model notice order output payment plan policy price project "
    "quality rate record report review safety sample schedule service staff storage summary supply "
    "survey target team total travel update value vendor volume water weekly window yield zone"
).split()


def sentence(rng: Rng, lo: int, hi: int) -> str:
    return " ".join(sample(rng, WORDS, randint(rng, lo, hi))).capitalize()


# ============================================================================================
# renderers: each draws one kind of image and returns it with the facts its text is made from

Rendered = tuple[Image.Image, Facts]


def draw_bar(rng: Rng) -> Rendered:
    topics = [  # (title, category, labels, unit, labels have a natural order)
        ("Sales by region", "region", ["North", "South", "East", "West", "Central", "Coast"], "units", False),
        ("Rainfall by month", "month", ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul"], "mm", True),
        ("Votes per candidate", "candidate", ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay"], "votes", False),
        ("Downloads per app", "app", ["Notes", "Maps", "Chat", "Music", "Photos", "Mail"], "thousand", False),
        ("Visitors by weekday", "day", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "visitors", True),
        ("Fruit sold today", "fruit", ["Apples", "Pears", "Plums", "Kiwis", "Limes", "Figs"], "kg", False),
    ]
    title, category, labels_all, unit, ordered = pick(rng, topics)
    n = randint(rng, 3, min(7, len(labels_all)))
    if ordered:
        first = randint(rng, 0, len(labels_all) - n)
        labels = labels_all[first : first + n]
    else:
        labels = sample(rng, labels_all, n)
    values = [int(v) for v in rng.choice(np.arange(5, 100), size=n, replace=False)]  # distinct: one max
    horizontal = rng.random() < 0.35
    w, h = size_between(rng, (180, 320), (150, 280))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    f, ft = font(10), font(randint(rng, 12, 15))
    d.text((8, 5), title, fill=(20, 20, 20), font=ft)
    per_bar = rng.random() < 0.5
    base = NAMED[pick(rng, BRIGHT)]
    x0, y0, x1, y1 = 40 if horizontal else 30, 30, w - 12, h - 22
    if rng.random() < 0.6:  # gridlines
        for k in range(1, 5):
            if horizontal:
                gx = x0 + (x1 - x0) * k / 4
                d.line([(gx, y0), (gx, y1)], fill=(205, 205, 205))
            else:
                gy = y1 - (y1 - y0) * k / 4
                d.line([(x0, gy), (x1, gy)], fill=(205, 205, 205))
    show_values = rng.random() < 0.6
    for i, (lab, v) in enumerate(zip(labels, values)):
        col = NAMED[BRIGHT[(i + randint(rng, 0, 7)) % len(BRIGHT)]] if per_bar else jitter(rng, base, 10)
        if horizontal:
            bh = (y1 - y0) / n
            ya, yb = y0 + i * bh + 2, y0 + (i + 1) * bh - 2
            xe = x0 + (x1 - x0 - 20) * v / 100
            d.rectangle([x0, ya, xe, yb], fill=col)
            d.text((4, (ya + yb) / 2 - 5), lab[:6], fill=(0, 0, 0), font=f)
            if show_values:
                d.text((xe + 2, (ya + yb) / 2 - 5), str(v), fill=(0, 0, 0), font=f)
        else:
            bw = (x1 - x0) / n
            xa, xb = x0 + i * bw + 3, x0 + (i + 1) * bw - 3
            ye = y1 - (y1 - y0 - 12) * v / 100
            d.rectangle([xa, ye, xb, y1], fill=col)
            short = lab
            while len(short) > 3 and text_w(d, short, f) > bw - 2:
                short = short[:-1]
            d.text((xa, y1 + 4), short, fill=(0, 0, 0), font=f)
            if show_values:
                d.text((xa, ye - 11), str(v), fill=(0, 0, 0), font=f)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0), width=1)
    order = sorted(range(n), key=lambda i: values[i])
    facts = {
        "title": title, "category": category, "labels": labels, "values": values, "unit": unit,
        "n": n, "max": labels[order[-1]], "min": labels[order[0]], "horizontal": horizontal,
    }
    return img, facts


def draw_line(rng: Rng) -> Rendered:
    things = [("Average temperature", "°C", 5, 30), ("Bike sales", "units", 20, 90),
              ("Website traffic", "k visits", 10, 80), ("Coffee price", "$/kg", 2, 9),
              ("River level", "m", 1, 8), ("Members", "people", 30, 95)]
    thing, unit, lo, hi = pick(rng, things)
    n = randint(rng, 5, 9)
    start = randint(rng, 2000, 2015)
    years = list(range(start, start + n))
    while True:  # a random walk scaled into lo..hi, redrawn until its peak and low are unique
        walk = np.cumsum(rng.normal(0, 1, n))
        walk = (walk - walk.min()) / max(1e-9, walk.max() - walk.min())
        span = uniform(rng, 0.4, 1.0) * (hi - lo)
        base = uniform(rng, lo, hi - span)
        values = [int(round(base + span * v)) for v in walk]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    w, h = size_between(rng, (200, 320), (150, 240))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    f = font(10)
    d.text((8, 5), f"{thing} ({unit})", fill=(20, 20, 20), font=font(12))
    x0, y0, x1, y1 = 30, 26, w - 22, h - 22
    vmin, vmax = min(values) - 1, max(values) + 1
    pts = [(x0 + (x1 - x0) * i / (n - 1), y1 - (y1 - y0) * (v - vmin) / (vmax - vmin)) for i, v in enumerate(values)]
    if rng.random() < 0.4:  # area chart
        d.polygon([(x0, y1), *pts, (x1, y1)], fill=jitter(rng, (190, 210, 235), 25))
    for k in range(5):
        gy = y1 - (y1 - y0) * k / 4
        d.line([(x0, gy), (x1, gy)], fill=(210, 210, 210))
        d.text((2, gy - 5), str(int(vmin + (vmax - vmin) * k / 4)), fill=(60, 60, 60), font=f)
    col = NAMED[pick(rng, BRIGHT)]
    d.line(pts, fill=col, width=randint(rng, 2, 3))
    for (px, py), yr in zip(pts, years):
        if rng.random() < 0.7:
            d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=col)
        if n <= 6 or (yr - start) % 2 == 0:
            d.text((px - 12, y1 + 5), str(yr), fill=(0, 0, 0), font=f)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0))
    facts = {
        "thing": thing, "unit": unit, "years": years, "values": values,
        "peak_year": years[values.index(max(values))], "low_year": years[values.index(min(values))],
        "first": values[0], "last": values[-1],
    }
    return img, facts


def draw_pie(rng: Rng) -> Rendered:
    topics = [("Household budget", ["Rent", "Food", "Travel", "Savings", "Fun", "Other"]),
              ("Energy mix", ["Solar", "Wind", "Hydro", "Gas", "Coal", "Nuclear"]),
              ("Favourite pets", ["Dogs", "Cats", "Fish", "Birds", "Rabbits"]),
              ("Time spent", ["Work", "Sleep", "Study", "Sport", "Family"]),
              ("Browser share", ["Alpha", "Beta", "Gamma", "Delta", "Other"])]
    title, labels_all = pick(rng, topics)
    n = randint(rng, 3, min(6, len(labels_all)))
    labels = sample(rng, labels_all, n)
    while True:  # integer percentages summing to 100 with a unique largest slice
        cuts = np.sort(rng.choice(np.arange(4, 97), size=n - 1, replace=False))
        shares = [int(x) for x in np.diff(np.concatenate([[0], cuts, [100]]))]
        if min(shares) >= 4 and shares.count(max(shares)) == 1:
            break
    w, h = size_between(rng, (180, 320), (140, 260))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    d.text((8, 5), title, fill=(20, 20, 20), font=font(randint(rng, 12, 14)))
    r = min(w * 0.55, h - 30) / 2 - 4
    pie_left = rng.random() < 0.6  # legend on the other side
    cx = 10 + r if pie_left else w - 10 - r
    cy = 24 + (h - 24) / 2
    donut = rng.random() < 0.35
    colors = [NAMED[c] for c in sample(rng, BRIGHT, n)]
    angle = uniform(rng, 0, 360)
    for share, col in zip(shares, colors):
        end = angle + 3.6 * share
        d.pieslice([cx - r, cy - r, cx + r, cy + r], angle, end, fill=col, outline=(255, 255, 255))
        angle = end
    if donut:
        d.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=img.getpixel((2, h - 2)))
    lx = int(cx + r + 12) if pie_left else 8
    for i, (lab, share, col) in enumerate(zip(labels, shares, colors)):
        y = 30 + i * 16
        d.rectangle([lx, y, lx + 9, y + 9], fill=col)
        d.text((lx + 13, y - 1), f"{lab} {share}%", fill=(0, 0, 0), font=font(10))
    facts = {"title": title, "labels": labels, "shares": shares, "n": n,
             "max": labels[shares.index(max(shares))], "min": labels[shares.index(min(shares))], "donut": donut}
    return img, facts


DOC_TITLES = ["Annual Report", "Meeting Notes", "Project Proposal", "Lab Safety Rules", "Quarterly Budget",
              "Travel Policy", "Product Brief", "Field Survey", "Service Agreement", "Shipping Notice",
              "Course Syllabus", "Press Release", "Maintenance Log", "Grant Summary"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def draw_document(rng: Rng) -> Rendered:
    w, h = size_between(rng, (180, 300), (220, 320))
    paper = jitter(rng, (246, 244, 236), 10)
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    title = f"{pick(rng, DOC_TITLES)} {randint(rng, 2015, 2024)}" if rng.random() < 0.5 else pick(rng, DOC_TITLES)
    date = f"{pick(rng, MONTHS)} {randint(rng, 1, 28)}, {randint(rng, 2015, 2024)}"
    m = randint(rng, 10, 20)
    y = m
    header = rng.random() < 0.5
    if header:  # coloured band with the title inside
        band = NAMED[pick(rng, ["blue", "teal", "purple", "green", "red", "gray"])]
        bh = randint(rng, 28, 42)
        d.rectangle([0, 0, w, bh], fill=band)
        d.text((m, bh / 2 - 8), title, fill=(255, 255, 255), font=font(15))
        y = bh + 6
    else:
        d.text((m, y), title, fill=(15, 15, 15), font=font(randint(rng, 15, 18)))
        y += 24
        d.line([(m, y - 3), (w - m, y - 3)], fill=(80, 80, 80))
    d.text((m, y), date, fill=(90, 90, 90), font=font(9))
    y += 14
    fsize = randint(rng, 9, 11)
    two_cols = w > 230 and rng.random() < 0.4
    col_w = (w - 2 * m - 10) / 2 if two_cols else w - 2 * m
    figure = rng.random() < 0.5
    lines: list[str] = []
    fig_box = None
    if figure:  # a grey "figure" block on one side, text flows around it
        fw, fh = int(col_w * uniform(rng, 0.35, 0.55)), randint(rng, 40, 70)
        fx = m if rng.random() < 0.5 else int(m + col_w - fw)
        fy = y + randint(rng, 0, 40)
        fig_box = (fx, fy, fx + fw, fy + fh)
        d.rectangle(fig_box, fill=jitter(rng, (200, 200, 205), 20), outline=(120, 120, 120))
        d.line([fig_box[:2], fig_box[2:]], fill=(150, 150, 150))
        d.line([(fig_box[0], fig_box[3]), (fig_box[2], fig_box[1])], fill=(150, 150, 150))
    f = font(fsize)
    cols = [m, m + col_w + 10] if two_cols else [m]
    for cx in cols:
        yy = y
        while yy < h - 28:
            x_start, avail = cx, col_w
            if fig_box and fig_box[1] - fsize <= yy <= fig_box[3] and cx <= fig_box[0] < cx + col_w:
                if fig_box[0] <= cx + 2:  # figure on the left of this column
                    x_start, avail = fig_box[2] + 6, cx + col_w - fig_box[2] - 6
                else:
                    avail = fig_box[0] - cx - 6
            text = sentence(rng, 2, 7)
            while text and text_w(d, text, f) > avail:
                text = text.rsplit(" ", 1)[0] if " " in text else ""
            if text:
                d.text((x_start, yy), text, fill=(30, 30, 30), font=f)
                lines.append(text)
            yy += fsize + randint(rng, 3, 6)
    page = randint(rng, 1, 40)
    d.text((w / 2 - 14, h - 16), f"Page {page}", fill=(90, 90, 90), font=font(9))
    facts = {"title": title, "date": date, "first_line": lines[0] if lines else "", "page": page,
             "n_lines": len(lines), "header": header, "two_cols": two_cols, "figure": figure}
    return img, facts


STORES = ["Green Grocer", "Corner Cafe", "Book Nook", "Hardware Hub", "Pet Palace", "Sunny Bakery",
          "Quick Mart", "Fresh Market", "Tool Shed", "Tea House", "Noodle Bar", "Flower Stall"]
ITEMS = ["Milk", "Bread", "Eggs", "Coffee", "Apples", "Cheese", "Rice", "Tea", "Soap", "Pasta",
         "Butter", "Honey", "Nails", "Tape", "Juice", "Salad", "Muffin", "Soup", "Jam", "Candles"]


def draw_receipt(rng: Rng) -> Rendered:
    n = randint(rng, 3, 7)
    pw, ph = randint(rng, 105, 150), randint(rng, 215, 290)
    paper = Image.new("RGB", (pw, ph), jitter(rng, (238, 234, 222), 15))
    d = ImageDraw.Draw(paper)
    store = pick(rng, STORES)
    items = sample(rng, ITEMS, n)
    prices = [int(p) for p in rng.integers(50, 1500, n)]  # cents
    total = sum(prices)
    date = f"{randint(rng, 1, 28):02d}/{randint(rng, 1, 12):02d}/{randint(rng, 2018, 2024)}"
    f, fb, ft = font(9), font(12), font(11)
    x0, x1 = 6, pw - 6
    y = randint(rng, 6, 30)
    d.text(((pw - text_w(d, store, fb)) / 2, y), store, fill=(10, 10, 10), font=fb)
    y += 17
    d.text((x0, y), date, fill=(60, 60, 60), font=f)
    y += 13
    d.line([(x0, y + 5), (x1, y + 5)], fill=(120, 120, 120))
    y += 11
    for it, p in zip(items, prices):
        amount = f"{p / 100:.2f}"
        d.text((x0, y), it, fill=(20, 20, 20), font=f)
        d.text((x1 - text_w(d, amount, f), y), amount, fill=(20, 20, 20), font=f)
        y += 13
    d.line([(x0, y + 5), (x1, y + 5)], fill=(120, 120, 120))
    y += 12
    amount = f"{total / 100:.2f}"
    d.text((x0, y), "TOTAL", fill=(0, 0, 0), font=ft)
    d.text((x1 - text_w(d, amount, ft), y), amount, fill=(0, 0, 0), font=ft)
    y += 18
    if rng.random() < 0.6:  # a barcode
        for k in range(int((x1 - x0 - 10) / 3)):
            if rng.random() < 0.6:
                d.line([(x0 + 5 + 3 * k, y), (x0 + 5 + 3 * k, y + 20)], fill=(0, 0, 0), width=randint(rng, 1, 2))
        y += 26
    d.text((x0, y), "Thank you!", fill=(60, 60, 60), font=f)
    # The paper lies on a table, slightly turned: receipts are photographed, not scanned.
    table = jitter(rng, pick(rng, [(70, 70, 80), (120, 85, 60), (40, 60, 50), (150, 150, 155)]), 25)
    turned = paper.rotate(uniform(rng, -8, 8), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=table)
    w = min(320, turned.width + randint(rng, 8, 70))
    h = min(320, turned.height + randint(rng, 4, 30))
    img = Image.fromarray(gradient(w, h, table, mix(table, (0, 0, 0), uniform(rng, 0.1, 0.4))).astype(np.uint8))
    img.paste(turned, (randint(rng, 0, max(0, w - turned.width)), randint(rng, 0, max(0, h - turned.height))))
    facts = {"store": store, "items": items, "prices": [p / 100 for p in prices], "total": total / 100,
             "date": date, "n": n, "max_item": items[prices.index(max(prices))]}
    return img, facts


APPS = ["PhotoBox", "TaskFlow", "MailDesk", "NoteCraft", "BudgetPal", "TripPlan", "CodePad", "FitTrack"]
MENUS = ["Home", "Inbox", "Files", "Settings", "Reports", "Profile", "Help", "Calendar", "Search"]
BUTTONS = ["Save", "Cancel", "Send", "Upload", "Delete", "Next", "Login", "Share", "Export"]


def draw_screen(rng: Rng) -> Rendered:
    w, h = size_between(rng, (220, 320), (160, 240))
    img = Image.new("RGB", (w, h), jitter(rng, (235, 238, 242), 15))
    d = ImageDraw.Draw(img)
    app = pick(rng, APPS)
    bar_col = NAMED[pick(rng, ["blue", "teal", "purple", "black", "green", "gray"])]
    d.rectangle([0, 0, w, 22], fill=bar_col)
    d.text((8, 5), app, fill=(255, 255, 255), font=font(12))
    for k in range(3):  # window buttons
        d.ellipse([w - 14 - 12 * k, 7, w - 6 - 12 * k, 15], fill=NAMED[["red", "yellow", "green"][k]])
    menu = sample(rng, MENUS, randint(rng, 3, 6))
    active = randint(rng, 0, len(menu) - 1)
    sw = randint(rng, 60, 80)
    sidebar_left = rng.random() < 0.75
    sx = 0 if sidebar_left else w - sw
    d.rectangle([sx, 22, sx + sw, h], fill=jitter(rng, (210, 214, 222), 20))
    for i, item in enumerate(menu):
        y = 30 + i * 20
        if i == active:
            d.rectangle([sx + 2, y - 2, sx + sw - 2, y + 14], fill=jitter(rng, bar_col, 30))
        d.text((sx + 8, y), item, fill=(255, 255, 255) if i == active else (30, 30, 30), font=font(10))
    mx = sw + 12 if sidebar_left else 12
    heading = menu[active]
    d.text((mx, 30), heading, fill=(20, 20, 20), font=font(15))
    y = 54
    for _ in range(randint(rng, 1, 3)):
        d.text((mx, y), sentence(rng, 2, 4), fill=(70, 70, 70), font=font(9))
        y += 14
    d.rectangle([mx, y + 4, mx + randint(rng, 90, 140), y + 22], fill=(255, 255, 255), outline=(150, 150, 150))
    y += 34
    labels = sample(rng, BUTTONS, randint(rng, 1, 3))
    colors = sample(rng, ["blue", "green", "red", "orange", "purple", "teal"], len(labels))
    bx = mx
    for lab, cname in zip(labels, colors):
        bw = int(text_w(d, lab, font(10))) + 16
        d.rounded_rectangle([bx, y, bx + bw, y + 20], radius=4, fill=NAMED[cname])
        d.text((bx + 8, y + 5), lab, fill=(255, 255, 255), font=font(10))
        bx += bw + 8
    facts = {"app": app, "menu": menu, "active": menu[active], "buttons": labels, "button_colors": colors}
    return img, facts


SHAPES = ["triangle", "circle", "square"]


def _shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, col: Color) -> None:
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col, outline=(0, 0, 0))
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col, outline=(0, 0, 0))
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col, outline=(0, 0, 0))


def draw_equation(rng: Rng) -> Rendered:
    x = randint(rng, 1, 12)
    a = randint(rng, 2, 9)
    b = randint(rng, 1, 20)
    op = pick(rng, ["+", "-"])
    c = a * x + b if op == "+" else a * x - b
    eq = f"{a}x {op} {b} = {c}"
    w, h = size_between(rng, (180, 320), (140, 260))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    fs = randint(rng, 18, 26)
    ex = randint(rng, 8, max(9, int(w - text_w(d, eq, font(fs)) - 8)))
    top = rng.random() < 0.5
    ey = 10 if top else h - fs - 14
    d.text((ex, ey), eq, fill=(10, 10, 10), font=font(fs))
    d.text((8, ey + fs + 4) if top else (8, ey - 14), "Solve for x.", fill=(90, 90, 90), font=font(10))
    kind = pick(rng, SHAPES)
    count = randint(rng, 2, 9)
    col = NAMED[pick(rng, BRIGHT)]
    area_top, area_bot = (ey + fs + 24, h - 8) if top else (8, ey - 20)
    cols = min(count, randint(rng, 3, 5))
    rows = math.ceil(count / cols)
    cell_w, cell_h = (w - 16) / cols, max(10.0, (area_bot - area_top) / rows)
    r = max(5.0, min(cell_w, cell_h) * 0.32)
    for i in range(count):
        cx = 8 + cell_w * (i % cols + 0.5)
        cy = area_top + cell_h * (i // cols + 0.5)
        _shape(d, kind, cx, cy, r, col)
    facts = {"eq": eq, "a": a, "b": b, "op": op, "c": c, "x": x, "shape": kind, "count": count}
    return img, facts


TRIPLES = [(3, 4, 5), (5, 12, 13), (6, 8, 10), (8, 15, 17), (9, 12, 15), (7, 24, 25), (12, 16, 20), (20, 21, 29)]


def draw_triangle(rng: Rng) -> Rendered:
    a, b, c = pick(rng, TRIPLES)
    unit = pick(rng, ["cm", "m", "in"])
    w, h = size_between(rng, (160, 300), (140, 260))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # squared paper
        step = randint(rng, 10, 18)
        grid = jitter(rng, (200, 215, 230), 15)
        for gx in range(0, w, step):
            d.line([(gx, 0), (gx, h)], fill=grid)
        for gy in range(0, h, step):
            d.line([(0, gy), (w, gy)], fill=grid)
    # Legs: b horizontal, a vertical; size and place vary so triangles do not all look alike.
    s = min((w - 60) / b, (h - 60) / a) * uniform(rng, 0.55, 1.0)
    ox = 30 + uniform(rng, 0, w - 60 - b * s)
    oy = 28 + uniform(rng, 0, h - 58 - a * s)
    left, bottom = rng.random() < 0.5, rng.random() < 0.5  # the corner with the right angle
    rx, ry = (ox if left else ox + b * s), (oy + a * s if bottom else oy)
    bx, ty = (ox + b * s if left else ox), (oy if bottom else oy + a * s)
    fill = jitter(rng, NAMED[pick(rng, BRIGHT)], 20)
    d.polygon([(rx, ry), (bx, ry), (rx, ty)], fill=mix(fill, (255, 255, 255), uniform(rng, 0.2, 0.6)))
    d.line([(rx, ry), (bx, ry), (rx, ty), (rx, ry)], fill=(0, 0, 0), width=2)
    q, sx, sy = 9, (1 if left else -1), (-1 if bottom else 1)
    d.rectangle(sorted_box(rx, ry, rx + sx * q, ry + sy * q), outline=(0, 0, 0))
    f = font(12)
    d.text(((rx + bx) / 2 - 12, ry + 4 if bottom else ry - 17), f"{b} {unit}", fill=(0, 0, 0), font=f)
    d.text((rx - 22 if left else rx + 5, (ry + ty) / 2 - 6), f"{a}", fill=(0, 0, 0), font=f)
    d.text(((rx + bx) / 2 + 6 * sx - 4, (ry + ty) / 2 + 6 * sy - 8), "?", fill=(200, 0, 0), font=font(16))
    d.text((8, 6), "Find the hypotenuse.", fill=(40, 40, 40), font=font(11))
    facts = {"a": a, "b": b, "c": c, "unit": unit, "area": a * b / 2}
    return img, facts


def sorted_box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def draw_plot(rng: Rng) -> Rendered:
    w, h = size_between(rng, (160, 300), (160, 300))
    img = Image.new("RGB", (w, h), light(rng))
    d = ImageDraw.Draw(img)
    m = pick(rng, [-3, -2, -1, 1, 2, 3])
    while True:  # place the axes so that both marked points fall inside the picture
        span = randint(rng, 5, 8)  # one grid step is 1/(2*span) of the picture
        ox, oy = w * uniform(rng, 0.3, 0.7), h * uniform(rng, 0.3, 0.7)
        sx, sy = (w - 20) / (2 * span), (h - 20) / (2 * span)
        qs = [q for q in range(-4, 5) if 28 <= oy - q * sy <= h - 28]
        if not qs:
            continue
        q = pick(rng, qs)
        pxs = [x for x in range(-3, 4) if x != 0 and 8 <= ox + x * sx <= w - 8 and 28 <= oy - (m * x + q) * sy <= h - 28]
        if pxs:
            px = pick(rng, pxs)
            break
    col = NAMED[pick(rng, ["blue", "red", "green", "purple", "orange"])]
    ends = [(ox + x * sx, oy - (m * x + q) * sy) for x in (-3 * span, 3 * span)]
    if rng.random() < 0.6:  # shade one side of the line, as in an inequality exercise
        corner_y = -10 * h if rng.random() < 0.5 else 10 * h
        d.polygon([ends[0], ends[1], (ends[1][0], corner_y), (ends[0][0], corner_y)], fill=mix(col, (255, 255, 255), 0.75))
    for k in range(-3 * span, 3 * span + 1):
        d.line([(ox + k * sx, 0), (ox + k * sx, h)], fill=(215, 215, 215))
        d.line([(0, oy - k * sy), (w, oy - k * sy)], fill=(215, 215, 215))
    d.line([(0, oy), (w, oy)], fill=(0, 0, 0))
    d.line([(ox, 0), (ox, h)], fill=(0, 0, 0))
    d.line(ends, fill=col, width=2)
    for x in (0, px):
        y = m * x + q
        d.ellipse([ox + x * sx - 3, oy - y * sy - 3, ox + x * sx + 3, oy - y * sy + 3], fill=(0, 0, 0))
    label = f"y = {m}x {'+' if q >= 0 else '-'} {abs(q)}" if q else f"y = {m}x"
    label = label.replace("y = 1x", "y = x").replace("y = -1x", "y = -x")
    lx, ly = (6, 6) if rng.random() < 0.5 else (w - text_w(d, label, font(12)) - 14, h - 24)
    d.rectangle([lx, ly, lx + 8 + text_w(d, label, font(12)), ly + 16], fill=(255, 255, 255))
    d.text((lx + 4, ly + 2), label, fill=col, font=font(12))
    facts = {"m": m, "q": q, "label": label, "px": px, "py": m * px + q}
    return img, facts


SKIES = {"day": ((70, 130, 210), (180, 215, 245)), "sunset": ((90, 60, 140), (250, 150, 70)),
         "night": ((8, 12, 40), (40, 50, 90)), "overcast": ((140, 145, 155), (200, 200, 205))}
GROUNDS = {"grass": ((70, 140, 60), (40, 100, 35)), "sand": ((225, 200, 140), (190, 160, 100)),
           "snow": ((235, 240, 248), (200, 210, 225)), "field": ((200, 170, 60), (150, 120, 40))}


def draw_landscape(rng: Rng) -> Rendered:
    w, h = size_between(rng, (200, 320), (150, 260))
    time = pick(rng, list(SKIES))
    ground = pick(rng, list(GROUNDS))
    hy = int(h * uniform(rng, 0.35, 0.7))
    top, bot = (jitter(rng, c, 20) for c in SKIES[time])
    arr = np.zeros((h, w, 3))
    arr[:hy] = gradient(w, hy, top, bot)
    g0, g1 = (jitter(rng, c, 20) for c in GROUNDS[ground])
    arr[hy:] = gradient(w, h - hy, g0, g1)
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    if time == "night":
        for _ in range(randint(rng, 15, 50)):
            sx, sy = randint(rng, 0, w - 1), randint(rng, 0, hy - 1)
            d.point((sx, sy), fill=(255, 255, 230))
    mountains = randint(rng, 0, 2)
    for _ in range(mountains):
        mx, mw, mh = randint(rng, 0, w), randint(rng, w // 4, w // 2), randint(rng, hy // 4, hy * 2 // 3)
        d.polygon([(mx - mw, hy), (mx, hy - mh), (mx + mw, hy)], fill=mix(top, (60, 60, 70), 0.6))
    sun = {"day": "sun", "sunset": "sun", "night": "moon", "overcast": None}[time]
    if sun:
        r = randint(rng, 8, 18) if time != "sunset" else randint(rng, 16, 26)
        cx = randint(rng, r, w - r)
        cy = randint(rng, r, max(r + 1, hy // 2)) if time != "sunset" else hy - r // 2
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill={"day": (255, 235, 120), "sunset": (255, 120, 40), "night": (235, 235, 210)}[time])
    if time in ("day", "overcast"):
        for _ in range(randint(rng, 0, 3)):
            cx, cy = randint(rng, 0, w), randint(rng, 5, max(6, hy - 20))
            for k in range(3):
                d.ellipse([cx + 12 * k - 14, cy - 8, cx + 12 * k + 14, cy + 8], fill=(245, 245, 250) if time == "day" else (180, 180, 190))
    lake = rng.random() < 0.4
    if lake:
        lx, lw = randint(rng, 0, w), randint(rng, w // 5, w // 3)
        ly = randint(rng, hy + 8, max(hy + 9, h - 20))
        d.ellipse([lx - lw, ly - lw // 4, lx + lw, ly + lw // 4], fill=jitter(rng, (60, 110, 170), 20))
    n_houses = randint(rng, 0, 4)
    n_trees = randint(rng, 0 if n_houses else 1, 5)
    slots = sorted(rng.uniform(0.05, 0.95, n_houses + n_trees) * w)
    kinds = ["house"] * n_houses + ["tree"] * n_trees
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    house_colors: list[str] = []
    for x, kind in zip(slots, kinds):
        base = hy + randint(rng, 4, max(5, (h - hy) // 2))
        s = uniform(rng, 0.7, 1.3) * h / 200
        if kind == "house":
            cname = pick(rng, ["red", "blue", "yellow", "white", "brown", "pink", "teal", "orange"])
            bw, bh = 34 * s, 24 * s
            d.rectangle([x - bw / 2, base - bh, x + bw / 2, base], fill=jitter(rng, NAMED[cname], 12))
            d.polygon([(x - bw / 2 - 4 * s, base - bh), (x, base - bh - 18 * s), (x + bw / 2 + 4 * s, base - bh)],
                      fill=jitter(rng, (120, 40, 30), 25))
            d.rectangle([x - 4 * s, base - 12 * s, x + 4 * s, base], fill=(60, 40, 30))
            house_colors.append(cname)
        else:
            d.rectangle([x - 2.5 * s, base - 14 * s, x + 2.5 * s, base], fill=(90, 60, 35))
            crown = jitter(rng, (30, 110, 40), 25)
            if rng.random() < 0.5:
                d.polygon([(x - 13 * s, base - 12 * s), (x, base - 45 * s), (x + 13 * s, base - 12 * s)], fill=crown)
            else:
                d.ellipse([x - 13 * s, base - 40 * s, x + 13 * s, base - 12 * s], fill=crown)
    img = photo_finish(rng, img)
    facts = {"time": time, "ground": ground, "houses": n_houses, "trees": n_trees, "lake": lake,
             "house_colors": house_colors, "mountains": mountains, "sun": sun}
    return img, facts


OBJECTS = ["ball", "box", "cup", "book"]


def draw_tabletop(rng: Rng) -> Rendered:
    w, h = size_between(rng, (180, 320), (150, 260))
    wall_h = int(h * uniform(rng, 0.15, 0.45))
    wall = jitter(rng, pick(rng, [(225, 215, 200), (190, 205, 220), (215, 225, 200), (235, 235, 235)]), 20)
    table = jitter(rng, pick(rng, [(150, 100, 60), (190, 150, 100), (110, 80, 60), (200, 200, 195), (90, 110, 130)]), 20)
    arr = np.zeros((h, w, 3))
    arr[:wall_h] = gradient(w, wall_h, wall, mix(wall, (0, 0, 0), 0.15))
    arr[wall_h:] = gradient(w, h - wall_h, mix(table, (255, 255, 255), 0.1), mix(table, (0, 0, 0), 0.25))
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    n = randint(rng, 2, 6)
    objs: list[tuple[str, str, float]] = []
    xs = sorted(rng.uniform(0.1, 0.9, n) * w)
    for x in xs:
        kind, cname = pick(rng, OBJECTS), pick(rng, BRIGHT + ["white", "black"])
        col = jitter(rng, NAMED[cname], 12)
        y = randint(rng, wall_h + 20, h - 10)
        s = uniform(rng, 0.6, 1.2) * (0.6 + 0.6 * (y - wall_h) / (h - wall_h))
        d.ellipse([x - 18 * s, y - 4 * s, x + 22 * s, y + 5 * s], fill=mix(table, (0, 0, 0), 0.45))  # shadow
        if kind == "ball":
            d.ellipse([x - 14 * s, y - 28 * s, x + 14 * s, y], fill=col)
            d.ellipse([x - 7 * s, y - 23 * s, x - 2 * s, y - 18 * s], fill=mix(col, (255, 255, 255), 0.6))
            size = 28 * 28 * s * s
        elif kind == "box":
            d.rectangle([x - 15 * s, y - 24 * s, x + 15 * s, y], fill=col)
            d.polygon([(x - 15 * s, y - 24 * s), (x - 7 * s, y - 31 * s), (x + 23 * s, y - 31 * s), (x + 15 * s, y - 24 * s)],
                      fill=mix(col, (255, 255, 255), 0.3))
            d.polygon([(x + 15 * s, y - 24 * s), (x + 23 * s, y - 31 * s), (x + 23 * s, y - 7 * s), (x + 15 * s, y)],
                      fill=mix(col, (0, 0, 0), 0.3))
            size = 38 * 31 * s * s
        elif kind == "cup":
            d.polygon([(x - 11 * s, y - 24 * s), (x + 11 * s, y - 24 * s), (x + 8 * s, y), (x - 8 * s, y)], fill=col)
            d.arc([x + 6 * s, y - 20 * s, x + 18 * s, y - 8 * s], -90, 90, fill=col, width=max(1, int(3 * s)))
            size = 22 * 24 * s * s
        else:
            d.rectangle([x - 20 * s, y - 8 * s, x + 20 * s, y], fill=col)
            d.line([(x - 18 * s, y - 4 * s), (x + 18 * s, y - 4 * s)], fill=(250, 250, 240))
            size = 40 * 8 * s * s
        objs.append((kind, cname, size))
    img = photo_finish(rng, img)
    counts = {k: sum(1 for o in objs if o[0] == k) for k in OBJECTS}
    biggest = max(objs, key=lambda o: o[2])
    facts = {"objects": [[k, c] for k, c, _ in objs], "counts": counts, "n": n,
             "biggest": [biggest[0], biggest[1]], "left": [objs[0][0], objs[0][1]]}
    return img, facts


RENDERERS: dict[str, Callable[[Rng], Rendered]] = {
    "bar": draw_bar, "line": draw_line, "pie": draw_pie, "document": draw_document,
    "receipt": draw_receipt, "screen": draw_screen, "equation": draw_equation,
    "triangle": draw_triangle, "plot": draw_plot, "landscape": draw_landscape, "tabletop": draw_tabletop,
}
CHARTS = ("bar", "line", "pie")
DOCS = ("document", "receipt", "screen")
MATHS = ("equation", "triangle", "plot")
SCENES = ("landscape", "tabletop")


def default_format(rng: Rng, kind: str) -> str:
    """Photos as JPEG; drawings mostly PNG, sometimes JPEG (as they come in real corpora)."""
    if kind in SCENES:
        return "JPEG"
    p_jpeg = {"bar": 0.3, "line": 0.3, "pie": 0.3, "document": 0.4, "receipt": 0.5, "screen": 0.3}.get(kind, 0.15)
    return "JPEG" if rng.random() < p_jpeg else "PNG"


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


# ============================================================================================
# text: captions and question/answer pairs, true of the facts

QA = tuple[str, str, str]  # question, short answer, detailed answer (GPT-4 style)


def plural(n: int, word: str) -> str:
    many = word + ("es" if word.endswith("x") else "s")
    return "no " + many if n == 0 else f"1 {word}" if n == 1 else f"{n} {many}"


def listing(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def caption(kind: str, f: Facts) -> str:
    if kind == "bar":
        way = "horizontal" if f["horizontal"] else "vertical"
        return (f'A {way} bar chart titled "{f["title"]}" comparing {f["n"]} {f["category"]}s; '
                f'{f["max"]} has the highest value and {f["min"]} the lowest.')
    if kind == "line":
        trend = "rises" if f["last"] > f["first"] else "falls" if f["last"] < f["first"] else "ends where it started"
        return (f'A line chart of {f["thing"].lower()} from {f["years"][0]} to {f["years"][-1]}; '
                f'it peaks in {f["peak_year"]} and overall {trend}.')
    if kind == "pie":
        shape = "donut" if f["donut"] else "pie"
        return f'A {shape} chart titled "{f["title"]}" with {f["n"]} slices; {f["max"]} is the largest share.'
    if kind == "document":
        return f'A printed page titled "{f["title"]}", dated {f["date"]}, with {f["n_lines"]} lines of text; page {f["page"]}.'
    if kind == "receipt":
        return f'A paper receipt from {f["store"]} listing {plural(f["n"], "item")} with a total of {f["total"]:.2f}.'
    if kind == "screen":
        return f'A screenshot of the {f["app"]} app with the {f["active"]} page open and {plural(len(f["buttons"]), "button")}.'
    if kind == "equation":
        return f'A worksheet with the equation {f["eq"]} and {plural(f["count"], f["shape"])} drawn below or above it.'
    if kind == "triangle":
        return f'A right triangle with legs {f["a"]} and {f["b"]} {f["unit"]} and an unknown hypotenuse.'
    if kind == "plot":
        return f'A coordinate grid with the straight line {f["label"]} and two marked points.'
    if kind == "landscape":
        things = []
        if f["houses"]:
            things.append(plural(f["houses"], "house"))
        if f["trees"]:
            things.append(plural(f["trees"], "tree"))
        if f["lake"]:
            things.append("a lake")
        when = {"day": "on a clear day", "sunset": "at sunset", "night": "at night", "overcast": "under an overcast sky"}[f["time"]]
        return f'A {f["ground"]} landscape {when} with {listing(things)}.'
    if kind == "tabletop":
        objs = [f"a {c} {k}" for k, c in f["objects"]]
        return f"A table with {plural(f['n'], 'object')} on it: {listing(objs)}."
    raise ValueError(kind)


def qa_pairs(kind: str, f: Facts) -> list[QA]:
    """Every question the drawn facts can answer, as (question, short, detailed)."""
    out: list[QA] = []
    if kind == "bar":
        vals = dict(zip(f["labels"], f["values"]))
        hi, lo = f["max"], f["min"]
        out.append((f"Which {f['category']} has the highest value in the chart?", hi,
                    f"The tallest bar belongs to {hi}, at {vals[hi]} {f['unit']}, so {hi} has the highest value."))
        out.append((f"Which {f['category']} has the lowest value?", lo,
                    f"{lo} has the shortest bar, at {vals[lo]} {f['unit']}, the lowest in the chart."))
        out.append(("How many bars are shown?", str(f["n"]),
                    f"The chart shows {f['n']} bars, one each for {listing(f['labels'])}."))
        out.append(("What is the difference between the highest and the lowest value?", str(vals[hi] - vals[lo]),
                    f"The highest value is {vals[hi]} ({hi}) and the lowest is {vals[lo]} ({lo}); {vals[hi]} - {vals[lo]} = {vals[hi] - vals[lo]}."))
        out.append(("What is the title of the chart?", f["title"], f'The chart is titled "{f["title"]}".'))
    elif kind == "line":
        out.append(("In which year does the line reach its highest value?", str(f["peak_year"]),
                    f"The line peaks in {f['peak_year']} at {max(f['values'])} {f['unit']}."))
        out.append(("In which year is the value lowest?", str(f["low_year"]),
                    f"The lowest point is in {f['low_year']}, at {min(f['values'])} {f['unit']}."))
        d = f["last"] - f["first"]
        trend = "It increased." if d > 0 else "It decreased." if d < 0 else "It stayed the same."
        out.append((f"Did the value go up or down between {f['years'][0]} and {f['years'][-1]}?", trend,
                    f"It started at {f['first']} in {f['years'][0]} and ended at {f['last']} in {f['years'][-1]}, "
                    f"a change of {d:+d} {f['unit']}. {trend}"))
        out.append(("How many years does the chart cover?", str(len(f["years"])),
                    f"The x-axis runs from {f['years'][0]} to {f['years'][-1]}, which is {len(f['years'])} years."))
    elif kind == "pie":
        shares = dict(zip(f["labels"], f["shares"]))
        lab = f["labels"][0]
        out.append(("Which slice is the largest?", f["max"],
                    f"{f['max']} has the largest slice with {shares[f['max']]}% of the total."))
        out.append((f"What percentage does {lab} account for?", f"{shares[lab]}%",
                    f"According to the legend, {lab} accounts for {shares[lab]}% of the chart."))
        out.append(("How many categories are in the chart?", str(f["n"]),
                    f"There are {f['n']} slices: {listing(f['labels'])}."))
        out.append(("Which slice is the smallest?", f["min"],
                    f"{f['min']} is the smallest slice at {shares[f['min']]}%."))
    elif kind == "document":
        out.append(("What is the title of the document?", f["title"], f'The heading at the top reads "{f["title"]}".'))
        out.append(("What date is written on the document?", f["date"], f"The date under the title is {f['date']}."))
        out.append(("What page number is shown at the bottom?", str(f["page"]),
                    f'The footer reads "Page {f["page"]}", so this is page {f["page"]}.'))
        if f["first_line"]:
            out.append(("What does the first line of the body text say?", f["first_line"],
                        f'The first line of the body reads: "{f["first_line"]}".'))
    elif kind == "receipt":
        prices = dict(zip(f["items"], f["prices"]))
        it = f["items"][0]
        out.append(("What is the total amount on the receipt?", f"{f['total']:.2f}",
                    f"The TOTAL line at the bottom shows {f['total']:.2f}, the sum of the {f['n']} item prices."))
        out.append(("What is the name of the store?", f["store"], f"The store name printed at the top is {f['store']}."))
        out.append(("How many items were bought?", str(f["n"]),
                    f"The receipt lists {plural(f['n'], 'item')}: {listing(f['items'])}."))
        out.append((f"How much did the {it.lower()} cost?", f"{prices[it]:.2f}", f"The line for {it} shows a price of {prices[it]:.2f}."))
        out.append(("Which item was the most expensive?", f["max_item"],
                    f"{f['max_item']} costs {prices[f['max_item']]:.2f}, more than any other item."))
        out.append(("What date is printed on the receipt?", f["date"], f"The date under the store name is {f['date']}."))
    elif kind == "screen":
        out.append(("What is the name of the application?", f["app"], f"The title bar shows the app name, {f['app']}."))
        out.append(("Which menu item is selected?", f["active"],
                    f"The highlighted entry in the sidebar is {f['active']}, which is also the page heading."))
        b, c = f["buttons"][0], f["button_colors"][0]
        out.append((f"What does the {c} button say?", b, f"The {c} button is labelled {b}."))
        out.append(("How many items are in the sidebar menu?", str(len(f["menu"])),
                    f"The sidebar lists {len(f['menu'])} entries: {listing(f['menu'])}."))
    elif kind == "equation":
        a, b, c, x = f["a"], f["b"], f["c"], f["x"]
        rhs = c - b if f["op"] == "+" else c + b
        move = f"Subtract {b} from both sides" if f["op"] == "+" else f"Add {b} to both sides"
        out.append(("Solve the equation shown in the image.", f"x = {x}",
                    f"{move}: {a}x = {rhs}. Divide both sides by {a}: x = {rhs} / {a} = {x}."))
        out.append((f"How many {f['shape']}s are drawn?", str(f["count"]), f"Counting the shapes one by one gives {plural(f['count'], f['shape'])}."))
        out.append(("What is the value of x multiplied by the number of shapes?", str(x * f["count"]),
                    f"From {f['eq']}, x = {x}; there are {f['count']} {f['shape']}s, and {x} * {f['count']} = {x * f['count']}."))
    elif kind == "triangle":
        a, b, c = f["a"], f["b"], f["c"]
        out.append(("What is the length of the hypotenuse?", f"{c} {f['unit']}",
                    f"By the Pythagorean theorem, c = sqrt({a}^2 + {b}^2) = sqrt({a * a + b * b}) = {c} {f['unit']}."))
        area = f"{f['area']:g} {f['unit']}\u00b2"  # e.g. 54 cm²
        out.append(("What is the area of the triangle?", area,
                    f"The legs are perpendicular, so the area is {a} * {b} / 2 = {area}."))
        out.append(("What is the perimeter of the triangle?", f"{a + b + c} {f['unit']}",
                    f"The hypotenuse is {c}, so the perimeter is {a} + {b} + {c} = {a + b + c} {f['unit']}."))
    elif kind == "plot":
        m, q = f["m"], f["q"]
        out.append(("What is the slope of the line?", str(m),
                    f"The line is {f['label']}; in y = mx + q form its slope m is {m}."))
        out.append(("Where does the line cross the y-axis?", f"(0, {q})",
                    f"Setting x = 0 in {f['label']} gives y = {q}, so it crosses at (0, {q})."))
        out.append((f"What is y when x = {f['px']}?", str(f["py"]),
                    f"Substituting x = {f['px']}: y = {m} * {f['px']} {'+' if q >= 0 else '-'} {abs(q)} = {f['py']}."))
    elif kind == "landscape":
        out.append(("How many houses are in the picture?", str(f["houses"]),
                    f"Looking along the ground I count {plural(f['houses'], 'house')}."))
        out.append(("How many trees can you see?", str(f["trees"]), f"There are {plural(f['trees'], 'tree')} in the scene."))
        when = {"day": "Daytime", "sunset": "Sunset", "night": "Night", "overcast": "Daytime, on a cloudy day"}[f["time"]]
        why = {"day": "the sky is bright blue with the sun high up", "sunset": "the sky glows orange and the sun sits low on the horizon",
               "night": "the sky is dark with stars and the moon", "overcast": "the sky is a flat grey with no sun visible"}[f["time"]]
        out.append(("What time of day does the scene show?", when, f"{when}: {why}."))
        out.append(("Is there any water in the scene?", "Yes" if f["lake"] else "No",
                    "Yes, there is a small lake on the ground." if f["lake"] else "No, there is no lake or river, only land and sky."))
        if f["house_colors"]:
            out.append(("What color is the leftmost house?", f["house_colors"][0],
                        f"The house furthest to the left has {f['house_colors'][0]} walls."))
    elif kind == "tabletop":
        k, c = f["biggest"]
        out.append(("How many objects are on the table?", str(f["n"]), f"There are {plural(f['n'], 'object')}: "
                    + listing([f"a {cc} {kk}" for kk, cc in f["objects"]]) + "."))
        kind_ = max(OBJECTS, key=lambda o: f["counts"][o])  # the most common kind (first on ties)
        out.append((f"How many {kind_}s are there?", str(f["counts"][kind_]),
                    f"Counting the {kind_}s on the table gives {f['counts'][kind_]}."))
        out.append(("What is the largest object on the table?", f"The {c} {k}", f"The {c} {k} is the largest object on the table."))
        lk, lc = f["left"]
        out.append(("What color is the leftmost object?", lc, f"The leftmost object is a {lc} {lk}."))
    return out


CAPTION_PROMPTS = ["Describe the image.", "Describe the image.", "Write a short caption for this picture.",
                   "What is shown in this image?", "Give a brief description of the image."]


def conversation(turns: list[tuple[str, str]], images: int = 1) -> list[dict[str, str]]:
    """LLaVA turns; the image tokens go at the start of the first human turn."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" * images + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def choose_turns(rng: Rng, pairs: list[QA], style: str) -> list[tuple[str, str]]:
    """1-3 QA pairs of one image; ``style``: short, brief (short + first clause of reason), detailed."""
    n = min(len(pairs), int(rng.choice([1, 1, 1, 2, 2, 3])))
    chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), n, replace=False))]
    turns = []
    for q, short, detailed in chosen:
        if style == "short":
            turns.append((q + pick(rng, ["", "", "\nAnswer with a single word or phrase."]), short))
        elif style == "detailed":
            turns.append((q, detailed))
        else:
            turns.append((q, pick(rng, [short, detailed])))
    return turns


def text_task(rng: Rng) -> list[tuple[str, str]]:
    """A text-only instruction (sometimes two turns), with a correct answer."""
    kind = pick(rng, ["add", "mul", "sort", "reverse", "convert", "capital", "opposite", "vowels"])
    if kind == "add":
        a, b = randint(rng, 10, 999), randint(rng, 10, 999)
        turns = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")]
        if rng.random() < 0.5:
            turns.append(("Now multiply the result by 2.", f"{a + b} * 2 = {2 * (a + b)}."))
        return turns
    if kind == "mul":
        per, boxes = randint(rng, 3, 24), randint(rng, 2, 12)
        thing = pick(rng, ["pencils", "eggs", "apples", "marbles", "cards"])
        return [(f"A box holds {per} {thing}. How many {thing} are in {boxes} boxes?",
                 f"{boxes} boxes * {per} {thing} per box = {boxes * per} {thing}.")]
    if kind == "sort":
        xs = [int(v) for v in rng.choice(100, randint(rng, 4, 7), replace=False)]
        turns = [(f"Sort these numbers in ascending order: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs))))]
        if rng.random() < 0.5:
            turns.append(("And in descending order?", ", ".join(map(str, sorted(xs, reverse=True)))))
        return turns
    if kind == "reverse":
        word = pick(rng, ["planet", "garden", "window", "silver", "rocket", "forest", "bridge", "candle"])
        return [(f"Write the word '{word}' backwards.", word[::-1])]
    if kind == "convert":
        n = randint(rng, 2, 40)
        unit, factor, target = pick(rng, [("kilometers", 1000, "meters"), ("hours", 60, "minutes"),
                                          ("kilograms", 1000, "grams"), ("minutes", 60, "seconds")])
        return [(f"Convert {n} {unit} to {target}.", f"{n} {unit} is {n * factor} {target}.")]
    if kind == "capital":
        country, city = pick(rng, [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
                                   ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Peru", "Lima")])
        return [(f"What is the capital of {country}?", f"The capital of {country} is {city}.")]
    if kind == "opposite":
        w, o = pick(rng, [("ancient", "modern"), ("generous", "stingy"), ("shallow", "deep"), ("rapid", "slow"),
                          ("victory", "defeat"), ("expand", "shrink")])
        return [(f"Give the opposite of '{w}'.", o)]
    word = pick(rng, ["education", "rhythm", "banana", "sequoia", "strength", "audio"])
    count = sum(ch in "aeiou" for ch in word)
    return [(f"How many vowels (a, e, i, o, u) are in the word '{word}'?", f"'{word}' has {count} vowels.")]


# ============================================================================================
# the plan: which record is what


@dataclass
class Source:
    name: str
    prefix: str  # of ids and file names
    valid: int  # records that must be accepted, at scale 1
    kinds: dict[str, float]  # image kinds drawn here, with weights
    style: str  # answer style
    data_file: str


SOURCES = [
    Source("captions", "cap", 94, {"landscape": 3, "tabletop": 1.5, "bar": 0.7, "line": 0.6, "pie": 0.6,
                                   "document": 0.6, "receipt": 0.4, "screen": 0.4, "equation": 0.5,
                                   "triangle": 0.3, "plot": 0.3}, "caption", "captions.jsonl"),
    Source("general", "gen", 56, {"landscape": 5, "tabletop": 3.5, "bar": 0.7, "pie": 0.6}, "brief", "general.json"),
    Source("ocr_docs", "ocr", 57, {"document": 3, "receipt": 2.5, "screen": 1.5, "bar": 1.2, "line": 1, "pie": 0.8},
           "short", "ocr_docs.jsonl"),
    Source("math", "math", 39, {"equation": 4, "triangle": 3, "plot": 3}, "brief", "math.parquet"),
    Source("text", "txt", 38, {}, "brief", "text.jsonl"),
    Source("seed", "seed", 38, {k: 1.0 for k in RENDERERS}, "detailed", "seed.jsonl"),
]
BY_NAME = {s.name: s for s in SOURCES}

# Which kinds may be copied into a source (a duplicate must fit its new home's type).
ACCEPTS = {
    "captions": tuple(RENDERERS), "seed": tuple(RENDERERS), "general": SCENES + ("bar", "pie"),
    "ocr_docs": DOCS + CHARTS, "math": MATHS, "text": (),
}

# Planted broken records: (source, fault, expected reason). Always all of them, at any --scale.
FAULTS = [
    ("captions", "truncated", "image_truncated"),
    ("captions", "random_bytes", "image_corrupt"),
    ("captions", "missing", "image_missing"),
    ("captions", "malformed_json", "json_malformed"),
    ("captions", "token_mismatch", "image_token_mismatch"),
    ("captions", "invalid_utf8", "utf8_invalid"),
    ("general", "truncated", "image_truncated"),
    ("general", "bomb", "image_too_large"),
    ("general", "not_alternating", "conversation_not_alternating"),
    ("general", "token_mismatch", "image_token_mismatch"),
    ("ocr_docs", "truncated", "image_truncated"),
    ("ocr_docs", "escape", "image_path_escapes_root"),
    ("ocr_docs", "malformed_json", "json_malformed"),
    ("math", "missing", "image_missing"),
    ("text", "malformed_json", "json_malformed"),
    ("text", "not_alternating", "conversation_not_alternating"),
    ("seed", "random_bytes", "image_corrupt"),
    ("seed", "empty_conversation", "conversation_empty"),
]

# Planted duplicates at scale 1: how many copies of each kind.
DUPLICATES = {"resize": 20, "recompress": 10, "crop": 10, "exact": 10}
MULTI_IMAGE = 2  # general: records with two images (and two <image> tokens)


@dataclass
class Slot:
    """One record of one source, before rendering."""

    source: str
    pos: int  # 0-based position in the data file
    kind: str | None = None  # image kind, None for text-only
    fmt: str = "PNG"
    quality: int = 90
    fault: str | None = None
    reason: str | None = None
    copy_of: tuple[str, int] | None = None  # (source, pos) of the original
    copy_how: str | None = None
    multi: bool = False  # two images
    images: list[str] = field(default_factory=list)  # file names under the source's images/
    facts: list[Facts] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{BY_NAME[self.source].prefix}-{self.pos + 1:04d}"

    def image_name(self, k: int | None = None) -> str:
        ext = "jpg" if self.fmt == "JPEG" else "png"
        stem = f"{BY_NAME[self.source].prefix}_{self.pos + 1:04d}"
        return f"{stem}_{k}.{ext}" if k is not None else f"{stem}.{ext}"


def plan(scale: float) -> dict[str, list[Slot]]:
    """Decide every record: kind, format, planted fault, duplicate relation. No drawing yet."""
    slots: dict[str, list[Slot]] = {}
    for src in SOURCES:
        rng = rng_for("plan", src.name)
        faults = [(f, r) for s, f, r in FAULTS if s == src.name]
        n = max(6, round(src.valid * scale)) + len(faults)
        fault_pos = sorted(int(p) for p in rng.choice(np.arange(1, n), len(faults), replace=False))
        order = rng.permutation(len(faults))
        kinds, weights = list(src.kinds), np.array(list(src.kinds.values()), float)
        row = []
        for pos in range(n):
            slot = Slot(src.name, pos)
            if kinds:
                slot.kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
                slot.fmt = default_format(rng, slot.kind)
                slot.quality = randint(rng, 82, 94)
            if pos in fault_pos:
                slot.fault, slot.reason = faults[int(order[fault_pos.index(pos)])]
            row.append(slot)
        slots[src.name] = row

    # Fault-specific shapes: a truncated PNG in ocr_docs, JPEG elsewhere; bomb and seed noise are PNG.
    for row in slots.values():
        for s in row:
            if s.fault == "truncated":
                s.fmt = "PNG" if s.source == "ocr_docs" else "JPEG"
                if s.source == "ocr_docs":
                    s.kind = "document"
            elif s.fault == "bomb":
                s.fmt = "PNG"
            elif s.fault == "random_bytes":
                s.fmt = "PNG" if s.source == "seed" else "JPEG"
            elif s.fault == "token_mismatch" and s.source == "general":
                s.multi = True
                s.kind = "landscape"
                s.fmt = "JPEG"

    # Multi-image records in general: two scenes side by side in one question.
    rng = rng_for("plan", "multi")
    free = [s for s in slots["general"] if s.fault is None]
    for s in sample(rng, free, min(MULTI_IMAGE, len(free) // 4)):
        s.multi, s.kind, s.fmt = True, "landscape", "JPEG"

    # Duplicates: copy an unused original into a free slot, within the source or across sources.
    rng = rng_for("plan", "duplicates")
    used: set[tuple[str, int]] = set()
    image_sources = [s.name for s in SOURCES if s.kinds]
    for how, count in DUPLICATES.items():
        for _ in range(max(1, round(count * scale))):
            for _attempt in range(100):
                dst_name = pick(rng, image_sources)
                src_name = dst_name if rng.random() < 0.5 else pick(rng, [n for n in image_sources if n != dst_name])
                originals = [s for s in slots[src_name] if s.fault is None and not s.multi and s.copy_of is None
                             and (s.source, s.pos) not in used and s.kind in ACCEPTS[dst_name]
                             and (how != "recompress" or s.fmt == "JPEG")]
                if not originals:
                    continue
                orig = pick(rng, originals)
                dst_free = [s for s in slots[dst_name] if s.fault is None and not s.multi and s.copy_of is None
                            and (s.source, s.pos) not in used and s is not orig]
                if dst_free:
                    break
            else:
                raise RuntimeError(f"cannot place a {how} duplicate; raise --scale")
            dst = pick(rng, dst_free)
            dst.copy_of, dst.copy_how = (orig.source, orig.pos), how
            dst.kind, dst.fmt = orig.kind, orig.fmt
            used.add((orig.source, orig.pos))
            used.add((dst.source, dst.pos))
    return slots


# ============================================================================================
# writing


def png_bomb(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose IHDR (correct CRC) claims a huge size: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 32)) + chunk(b"IEND", b"")


# pHash gap the dataset guarantees: planted near-duplicates are within MAX_NEAR bits of their
# original, every other pair of images on disk is at least MIN_APART bits apart. So a pHash dedup
# with any max_distance in MAX_NEAR..MIN_APART-1 finds exactly the planted pairs.
MAX_NEAR = 4
MIN_APART = 10
TRIES = 40

_DCT = 2 * np.cos(np.pi * np.outer(np.arange(32), 2 * np.arange(32) + 1) / 64)  # DCT-II, as scipy.fftpack


def phash(img: Image.Image) -> np.ndarray:
    """64-bit perceptual hash, bit for bit imagehash.phash: grey, 32x32 Lanczos, DCT, 8x8 > median."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ a @ _DCT.T)[:8, :8]
    return (low > np.median(low)).ravel()


def phash_bytes(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:  # hash what is stored, after the codec
        return phash(img)


class HashIndex:
    """The pHashes of the images written so far, to keep distinct images apart."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.bits = np.zeros((0, 64), dtype=bool)

    def nearest(self, h: np.ndarray, but: str | None = None) -> int:
        dist = (self.bits != h).sum(axis=1)
        if but is not None and but in self.names:
            dist[self.names.index(but)] = 64
        return int(dist.min()) if len(dist) else 64

    def add(self, name: str, h: np.ndarray) -> None:
        self.names.append(name)
        self.bits = np.vstack([self.bits, h[None, :]])


def resized(rng: Rng, img: Image.Image) -> Image.Image:
    """Another size with the same aspect ratio, every side kept within 96..320 px."""
    w, h = img.size
    lo, hi = 96 / min(w, h), 320 / max(w, h)
    options = [s for s in np.linspace(lo, hi, 41) if abs(s - 1) >= 0.15]
    s = float(pick(rng, options)) if options else (lo if abs(lo - 1) > abs(hi - 1) else hi)
    return img.resize((max(96, round(w * s)), max(96, round(h * s))), Image.Resampling.LANCZOS)


def cropped(rng: Rng, img: Image.Image) -> Image.Image:
    """Remove 2-4% of width and height, split unevenly between the two sides."""
    w, h = img.size
    cw, ch = round(w * uniform(rng, 0.02, 0.04)), round(h * uniform(rng, 0.02, 0.04))
    left, top = randint(rng, 0, cw), randint(rng, 0, ch)
    return img.crop((left, top, w - (cw - left), h - (ch - top)))


def near_copy(rng: Rng, how: str, img: Image.Image, data: bytes, s: "Slot", quality: int) -> bytes:
    """One candidate near-duplicate of an original (``img`` as drawn, ``data`` as stored)."""
    if how == "recompress":  # from the stored bytes, as happens in the wild
        with Image.open(io.BytesIO(data)) as stored:
            decoded = stored.convert("RGB")
        q = quality - randint(rng, 20, 35) if rng.random() < 0.7 else min(98, quality + 6)
        return encode(decoded, "JPEG", q)
    if how == "resize":
        return encode(resized(rng, img), s.fmt, s.quality)
    return encode(cropped(rng, img), s.fmt, s.quality)


@dataclass
class Output:
    """Everything written, relative to the output root."""

    files: dict[str, bytes] = field(default_factory=dict)
    exact: list[list[str]] = field(default_factory=list)
    near: list[list[str]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def put(self, rel: str, data: bytes) -> None:
        assert rel not in self.files, rel
        self.files[rel] = data


def render_distinct(name: str, s: "Slot", k: int | None, index: HashIndex) -> tuple[Image.Image, Facts, bytes]:
    """Draw an image that no earlier image is a near-duplicate of (redrawing if one is)."""
    for attempt in range(TRIES):
        rng = rng_for("image", name, s.pos, k or 0, attempt)
        img, facts = RENDERERS[s.kind](rng)
        data = encode(img, s.fmt, s.quality)
        h = phash_bytes(data)
        if index.nearest(h) >= MIN_APART:
            index.add(f"{name}/images/{s.image_name(k)}", h)
            return img, facts, data
    raise RuntimeError(f"could not draw a distinct {s.kind} for {s.id}")


IMAGE_FAULTS = ("missing", "escape", "bomb", "random_bytes", "truncated")  # the file is the fault


def render_images(slots: dict[str, list[Slot]], out: Output) -> None:
    index = HashIndex()
    originals: dict[tuple[str, int], tuple[Image.Image, bytes]] = {}
    for name, row in slots.items():
        for s in row:
            if s.kind is None or s.copy_of is not None:
                continue
            folder = f"{name}/images/"
            if s.multi:  # two distinct images in one record
                for k in (1, 2):
                    img, facts, data = render_distinct(name, s, k, index)
                    s.facts.append(facts)
                    s.images.append(s.image_name(k))
                    out.put(folder + s.image_name(k), data)
                continue
            if s.fault in IMAGE_FAULTS:  # broken or absent: never a dedup candidate, not indexed
                rng = rng_for("image", name, s.pos)
                img, facts = RENDERERS[s.kind](rng)
                s.facts.append(facts)
                s.images.append(s.image_name())
                if s.fault == "missing":
                    continue  # referenced, never written
                if s.fault == "escape":
                    s.images[0] = "../../etc/passwd"
                    continue
                if s.fault == "bomb":
                    data = png_bomb(100_000, 100_000)
                elif s.fault == "random_bytes":
                    data = rng.integers(0, 256, randint(rng, 2000, 6000), dtype=np.uint8).tobytes()
                else:  # truncated: a valid file cut at 40-70% of its bytes
                    data = encode(img, s.fmt, s.quality)
                    data = data[: int(len(data) * uniform(rng, 0.4, 0.7))]
                out.put(folder + s.image_name(), data)
                continue
            img, facts, data = render_distinct(name, s, None, index)
            s.facts.append(facts)
            s.images.append(s.image_name())
            out.put(folder + s.image_name(), data)
            originals[(name, s.pos)] = (img, data)

    for name, row in slots.items():  # the copies, now that every original exists
        for s in row:
            if s.copy_of is None:
                continue
            rng = rng_for("copy", name, s.pos)
            orig = slots[s.copy_of[0]][s.copy_of[1]]
            img, data = originals[s.copy_of]
            s.facts = list(orig.facts)
            s.images = [s.image_name()]
            a, b = f"{orig.source}/images/{orig.images[0]}", f"{name}/images/{s.images[0]}"
            copy = data if s.copy_how == "exact" else None
            if copy is None:
                # Candidates of the planned kind, then resizes, until one is near its original
                # (and only to it); an exact copy always qualifies, so it is the last resort.
                h_orig = phash_bytes(data)
                for how in dict.fromkeys([s.copy_how, "resize"]):
                    for _ in range(TRIES):
                        candidate = near_copy(rng, how, img, data, s, orig.quality)
                        h = phash_bytes(candidate)
                        if (h != h_orig).sum() <= MAX_NEAR and index.nearest(h, but=a) >= MIN_APART:
                            copy, s.copy_how = candidate, how
                            break
                    if copy is not None:
                        break
            if copy is None:
                copy, s.copy_how = data, "exact"
            index.add(b, phash_bytes(copy))
            out.put(b, copy)
            if s.copy_how == "exact":
                out.exact.append([a, b])
            else:
                out.near.append([a, b, s.copy_how])


def record_for(s: Slot, rng: Rng) -> dict[str, Any]:
    """The record of one slot, before any fault is applied to it."""
    src = BY_NAME[s.source]
    if s.kind is None:  # text-only
        return {"id": s.id, "conversations": conversation(text_task(rng), images=0)}
    if src.style == "caption":
        turns = [(pick(rng, CAPTION_PROMPTS), caption(s.kind, s.facts[0]))]
    elif s.multi:
        turns = [compare_scenes(rng, s.facts[0], s.facts[1])]
    else:
        turns = choose_turns(rng, qa_pairs(s.kind, s.facts[0]), src.style)
    image: str | list[str] = s.images if s.multi else s.images[0]
    rec: dict[str, Any] = {"id": s.id, "image": image}
    if s.source == "ocr_docs":
        rec["data_type"] = "ocr" if s.kind in ("document", "receipt") else "doc_chart_screen"
    if s.source == "math":
        rec["data_type"] = "math_reasoning"
    rec["conversations"] = conversation(turns, images=len(s.images))
    if s.source in ("general", "ocr_docs", "math"):
        # a precomputed per-sample loss, long-tailed like real ones, for "drop loss top 5%"
        rec["loss"] = round(float(rng.gamma(2.0, 0.45)) + 0.05, 4)
    if s.source == "seed":
        rec["score"] = int(rng.choice(np.arange(1, 11), p=np.array([1, 1, 1, 2, 3, 5, 10, 20, 25, 12]) / 80))
    return rec


def compare_scenes(rng: Rng, a: Facts, b: Facts) -> tuple[str, str]:
    if a["houses"] != b["houses"]:
        more = "The first image" if a["houses"] > b["houses"] else "The second image"
        most, least = max(a["houses"], b["houses"]), min(a["houses"], b["houses"])
        return ("Which of the two images shows more houses?",
                f"{more}: it shows {plural(most, 'house')}, the other {plural(least, 'house')}.")
    return ("Do the two images show the same number of houses?", f"Yes, both show {plural(a['houses'], 'house')}.")


def apply_fault(s: Slot, rec: dict[str, Any], rng: Rng) -> dict[str, Any] | bytes:
    """Break a record as planned. Returns the record, or the raw line bytes for line-level faults."""
    if s.fault == "malformed_json":
        line = json.dumps(rec, ensure_ascii=False)
        broken = pick(rng, ["cut", "quotes", "comma"])
        if broken == "cut":  # a line cut short, as from an interrupted write
            return line[: len(line) * 2 // 3].encode()
        if broken == "quotes":  # a Python repr instead of JSON
            return repr(rec).encode()
        return (line[:-1] + ",}").encode()  # a trailing comma
    if s.fault == "invalid_utf8":  # a latin-1 encoded line in a UTF-8 file
        rec["conversations"][-1]["value"] += " Café crème, naïve façade."
        return json.dumps(rec, ensure_ascii=False).encode("latin-1", errors="replace")
    if s.fault == "not_alternating":
        conv = rec["conversations"]
        if s.source == "text":  # starts with the assistant
            rec["conversations"] = [conv[1], conv[0], *conv[2:]]
        else:  # two human turns in a row
            rec["conversations"] = [conv[0], {"from": "human", "value": "Please answer carefully."}, *conv[1:]]
    elif s.fault == "empty_conversation":
        rec["conversations"] = []
    elif s.fault == "token_mismatch":
        first = rec["conversations"][0]
        if s.multi:  # two images, one token
            first["value"] = first["value"].replace("<image>\n", "", 1)
        else:  # one image, two tokens
            first["value"] = "<image>\n" + first["value"]
    return rec


def write_records(slots: dict[str, list[Slot]], out: Output) -> None:
    for src in SOURCES:
        row = slots[src.name]
        lines: list[bytes] = []
        records: list[dict[str, Any]] = []
        for s in row:
            rng = rng_for("record", src.name, s.pos)
            rec = apply_fault(s, record_for(s, rng), rng)
            if isinstance(rec, bytes):
                lines.append(rec)
            else:
                records.append(rec)
                lines.append(json.dumps(rec, ensure_ascii=False).encode())
            if s.fault:
                entry: dict[str, Any] = {"source": src.name, "file": f"{src.name}/{src.data_file}"}
                if src.data_file.endswith(".parquet"):
                    entry["row"] = s.pos  # 0-based
                else:  # 1-based; a JSON array has "[" on line 1 and one record per line
                    entry["line"] = s.pos + (2 if src.data_file.endswith(".json") else 1)
                entry["id"] = None if isinstance(rec, bytes) else s.id
                if s.images:
                    entry["image"] = s.images if s.multi else s.images[0]
                entry["reason"] = s.reason
                entry["fault"] = s.fault
                out.rejects.append(entry)
        path = f"{src.name}/{src.data_file}"
        if src.data_file.endswith(".jsonl"):
            out.put(path, b"".join(line + b"\n" for line in lines))
        elif src.data_file.endswith(".json"):
            out.put(path, b"[\n" + b",\n".join(lines) + b"\n]\n")
        else:
            out.put(path, parquet_bytes(records))


def parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", pa.list_(turn)),
                        ("data_type", pa.string()), ("loss", pa.float64())])
    table = pa.Table.from_pylist(records, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def generate(scale: float = 1.0) -> Output:
    slots = plan(scale)
    out = Output()
    render_images(slots, out)
    write_records(slots, out)
    for name, obj in [("planted_duplicates.json", {"exact": out.exact, "near": out.near}),
                      ("planted_rejects.json", {"rejects": out.rejects})]:
        out.put(name, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())
    return out


MANAGED = [s.name for s in SOURCES] + ["planted_duplicates.json", "planted_rejects.json"]


def write(out: Output, root: Path) -> None:
    """Write every file; remove stale files in the folders this script owns (and only those)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in sorted(out.files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:  # keep mtimes of unchanged files
            path.write_bytes(data)
    for name in MANAGED:
        base = root / name
        if base.is_dir():
            for path in sorted(base.rglob("*"), reverse=True):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and rel not in out.files:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink record and duplicate counts (tests use 0.1)")
    args = ap.parse_args(argv)
    if not 0 < args.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    out = generate(args.scale)
    write(out, args.out)
    images = sum(1 for rel in out.files if "/images/" in rel)
    print(f"wrote {len(out.files)} files ({images} images, {sum(map(len, out.files.values())) / 1e6:.2f} MB) to {args.out}; "
          f"{len(out.exact)} exact and {len(out.near)} near duplicates, {len(out.rejects)} planted rejects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
