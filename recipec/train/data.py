"""A stage's export as training samples, and the order they are trained in.

`prepare` turns each exported record into chat messages (LLaVA `human`/`gpt` turns -> `user`/
`assistant`) and measures it without decoding an image: the exact token count (the chat template
with every `<image>` expanded into the model's image tokens, from the image's stored width and
height) and the number of assistant tokens the loss counts. A sample over the stage's
`max_length` is rejected with reason `too_long`, never truncated.

`schedule` fixes every optimizer step up front, so a resumed run continues at a step index and
nothing else: each epoch walks the export in the order the stage's mix gave it (the mix shuffles
with the recipe seed, or orders as the recipe says); a global batch is the next `batch` samples;
inside it, samples are grouped by modality (with or without images) and sorted by length, then cut
into micro batches, so a micro batch wastes little padding. As the loss is normalised by the
assistant tokens of the whole global batch, this regrouping changes no gradient, only the padding.

`encode` opens the images of one micro batch (with the project's safety checks) and builds the
model inputs through `recipec.models.multimodal.Encoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from recipec.models.multimodal import EncodeError, Encoder, ImageAdapter
from recipec.ops.base import Reject

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass
class Sample:
    index: int  # position in the export
    id: str
    source: str
    messages: list[dict[str, str]]
    images: list[tuple[Path, str]]  # (image root, path relative to it)
    sizes: list[tuple[int, int]]  # (width, height) as stored by ingest
    length: int = 0
    label_tokens: int = 0

    @property
    def modality(self) -> int:
        return 1 if self.images else 0


@dataclass
class Step:
    """One optimizer step: its micro batches (sample positions in `samples`) and their label tokens."""

    micro_batches: list[list[int]]
    label_tokens: int
    samples: int


@dataclass
class Prepared:
    samples: list[Sample]
    rejects: list[Reject] = field(default_factory=list)


class _Sizes(ImageAdapter):
    """The real adapter's token arithmetic on stored image sizes, with no pixel decoded."""

    def __init__(self, real: Any):
        self.real = real

    def prepare(self, sizes):
        return {}, self.real.counts_for(sizes)

    def placeholder(self, tokens: int) -> str:
        return self.real.placeholder(tokens)


def reject(sample_or_row: Any, reason: str, detail: str) -> Reject:
    import json

    if isinstance(sample_or_row, Sample):
        return Reject(reason=reason, detail=detail, id=sample_or_row.id, source=sample_or_row.source)
    row = sample_or_row
    return Reject(reason=reason, detail=detail, id=row.get("id") or "", source=row.get("source") or "",
                  origin=row.get("origin") or "", record=json.dumps(row, sort_keys=True, ensure_ascii=False, default=str))


def prepare(rows: Sequence[Mapping[str, Any]], roots: Mapping[str, str | None], recipe_dir: Path,
            encoder: Encoder) -> Prepared:
    """Samples in export order, measured; rejects for what cannot be trained (too long, malformed)."""
    counting = Encoder(encoder.tokenizer, _Sizes(encoder.images) if encoder.images is not None else None,
                       encoder.max_length)
    out = Prepared([])
    for index, row in enumerate(rows):
        messages = []
        bad = None
        for turn in row.get("conversations") or []:
            role = ROLES.get(turn.get("from"))
            if role is None:
                bad = f"turn from {turn.get('from')!r}: not human, gpt or system"
                break
            messages.append({"role": role, "content": turn.get("value") or ""})
        if bad is None and not any(m["role"] == "assistant" for m in messages):
            bad = "no gpt turn: nothing to learn"
        if bad is not None:
            out.rejects.append(reject(row, "conversation_unusable", bad))
            continue
        images = list(row.get("images") or [])
        root = roots.get(row.get("source"))
        if images and root is None:
            out.rejects.append(reject(row, "image_root_unknown", f"data set {row.get('source')!r} has no image folder"))
            continue
        base = (recipe_dir / root) if root is not None else recipe_dir
        sample = Sample(index, row.get("id") or "", row.get("source") or "", messages,
                        [(base, i["path"]) for i in images], [(int(i["width"]), int(i["height"])) for i in images])
        try:
            encoded = counting.encode(messages, sample.sizes)
        except EncodeError as e:
            out.rejects.append(reject(row, e.reason, e.detail))
            continue
        sample.length = len(encoded.input_ids)
        sample.label_tokens = sum(encoded.assistant_mask[1:])  # the first token is never predicted
        if sample.label_tokens == 0:
            out.rejects.append(reject(row, "conversation_unusable", "no assistant token to learn"))
            continue
        out.samples.append(sample)
    return out


def total_steps(samples: int, batch: int, epochs: float) -> tuple[int, int]:
    """(samples seen, optimizer steps) for `epochs` passes over `samples` in global batches of `batch`."""
    seen = round(samples * epochs)
    return seen, math.ceil(seen / batch) if seen else 0


def schedule(samples: Sequence[Sample], batch: int, micro: int, epochs: float) -> list[Step]:
    """Every optimizer step of the stage (see the module doc)."""
    n = len(samples)
    seen, steps = total_steps(n, batch, epochs)
    order = [i % n for i in range(seen)] if n else []
    out = []
    for s in range(steps):
        members = order[s * batch:(s + 1) * batch]
        grouped = sorted(members, key=lambda i: (-samples[i].modality, -samples[i].length, i))
        micro_batches = [grouped[k:k + micro] for k in range(0, len(grouped), micro)]
        out.append(Step(micro_batches, sum(samples[i].label_tokens for i in members), len(members)))
    return out


def encode(samples: Sequence[Sample], encoder: Encoder) -> tuple[dict[str, Any] | None, list[int], list[Reject]]:
    """Model inputs of one micro batch (None if every sample failed), the positions kept, the rejects."""
    from recipec.ops.images import ImageReject, open_image

    encoded, kept, rejects = [], [], []
    for position, sample in enumerate(samples):
        try:
            images = [open_image(root, path) for root, path in sample.images]
        except ImageReject as e:
            rejects.append(reject(sample, e.reason, e.detail))
            continue
        try:
            item = encoder.encode(sample.messages, images)
        except EncodeError as e:
            rejects.append(reject(sample, e.reason, e.detail))
            continue
        if len(item.input_ids) != sample.length:  # the image on disk is not the one ingest measured
            rejects.append(reject(sample, "image_changed", f"{len(item.input_ids)} tokens, measured {sample.length}"))
            continue
        encoded.append(item)
        kept.append(position)
    if not encoded:
        return None, kept, rejects
    return encoder.collate(encoded, padding_side="right", labels=True), kept, rejects
