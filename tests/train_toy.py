"""A toy task for training tests: the answer is the colour of the shape in a generated image."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
QUESTION = "<image>\nWhat color is the shape?"


def draw(path: Path, colour: str, rng: random.Random, size: int = 32) -> dict[str, Any]:
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(90, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(image)
    side = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side - 1, y + side - 1)
    (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=COLOURS[colour])
    image.save(path, format="PNG")
    data = path.read_bytes()
    return {"path": path.name, "sha256": hashlib.sha256(data).hexdigest(), "width": size, "height": size}


def records(folder: Path, n: int, seed: int, *, source: str = "toy", text_only: int = 0) -> Any:
    """`n` image records (and `text_only` records without an image) in recipec's record schema."""
    import pyarrow as pa

    from recipec import records as rec

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        image = draw(folder / f"{source}-{seed}-{i:04d}.png", colour, rng)
        rows.append(_row(f"{source}-{seed}-{i}", source, [image], [
            {"from": "human", "value": QUESTION}, {"from": "gpt", "value": colour}]))
    for i in range(text_only):
        word = rng.choice(sorted(COLOURS))
        rows.append(_row(f"{source}-{seed}-text-{i}", source, [], [
            {"from": "human", "value": f"Say the word {word}."}, {"from": "gpt", "value": word}]))
    return pa.Table.from_pylist(rows, schema=rec.SCHEMA)


def _row(id_: str, source: str, images: list, conversations: list) -> dict[str, Any]:
    return {"id": id_, "source": source, "origin": f"{id_}.json:1", "images": images, "conversations": conversations,
            "category": "caption", "data_type": "general", "image_tags": [], "instruction_tags": [], "scores": [],
            "provenance": [], "source_id": id_}


def stage(name: str, train: list[str], lr: float, **overrides: Any) -> dict[str, Any]:
    """Plan params of a stage (the IR stage's fields the train op reads)."""
    base = {"name": name, "model": "tiny_vlm", "train": train, "image_size": 32, "grid": [1, 1], "max_tiles": None,
            "image_token_budget": None, "lr": lr, "part_lr": {}, "batch": 16, "micro_batch": 8, "epochs": 1.0,
            "warmup": 0.0, "schedule": "cosine", "weight_decay": 0.0, "max_length": 256, "after": None,
            "max_image_tokens": 16, "trainable_params": 0, "total_params": 0}
    return {**base, **overrides}


ARCHITECTURE = {"name": "tiny_vlm", "architecture": "llava_onevision",
                "vision": {"ref": "tiny://siglip", "revision": None, "trust_remote_code": False, "engine": "transformers",
                           "dtype": "bfloat16", "endpoint": None},
                "language": {"ref": "tiny://qwen2", "revision": None, "trust_remote_code": False,
                             "engine": "transformers", "dtype": "bfloat16", "endpoint": None},
                "projector": "mlp2x_gelu", "vision_layer": -1, "tie_word_embeddings": None}
