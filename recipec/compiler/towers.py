"""Checking the two towers' configs before any arithmetic is done with them.

A config read from a local directory (or the Hugging Face cache) is data anyone could have written:
each size the parameter count and the image geometry use must be a positive integer, heads must
divide the hidden size, and an image must hold at least one patch. A problem names the file and the
key, so it can be fixed where it is.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from recipec.diagnostics import printable

# the sizes each tower's arithmetic reads; absent keys take the architecture's defaults later
VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels")
LANGUAGE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")
MAX_SIZE = 2**40  # past any real model: a size above it is a typo or an attack on the arithmetic


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return printable(text if len(text) <= 40 else text[:37] + "...")


def problems(config: Mapping[str, Any], sizes: tuple[str, ...]) -> list[str]:
    """What is wrong with one tower's config, as `key: why` lines (empty when nothing is)."""
    found: list[str] = []
    for key in sizes:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
            found.append(f"`{key}` must be a positive integer, found {_show(value)}")
    if found:
        return found
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        found.append(f"`hidden_size` {hidden} is not divisible by `num_attention_heads` {heads}")
    kv = config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        found.append(f"`num_attention_heads` {heads} is not divisible by `num_key_value_heads` {kv}")
    image, patch = config.get("image_size"), config.get("patch_size")
    if image and patch and image < patch:
        found.append(f"`image_size` {image} is smaller than one patch (`patch_size` {patch})")
    return found
