"""Chat messages and images -> model inputs, for generation, scoring and training alike.

`Encoder.encode(messages, images)` renders the messages with the tokenizer's own chat template,
expands every `<image>` placeholder into the exact number of image tokens the model will fill
(computed with the model's own arithmetic: LLaVA-OneVision's anyres tiling with `anyres_max_N`,
Qwen2-VL's merged patch grid), and marks the tokens of assistant turns, which are the only ones a
loss counts. `Encoder.collate(encoded, padding_side)` pads a batch and stacks its pixels.

Image processing goes through transformers' PIL image processors (no torchvision), so the pixels
are exactly what the model families' own processors produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recipec.models.engine import IMAGE_PLACEHOLDER


class EncodeError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_mask: list[bool]  # True on tokens of assistant turns (content and end-of-turn token)
    vision: dict[str, Any] = field(default_factory=dict)  # this sample's image tensors
    image_tokens: int = 0


class ImageAdapter:
    """How one model family turns PIL images into pixel tensors and token counts."""

    def prepare(self, images: Sequence[Any]) -> tuple[dict[str, Any], list[int]]:
        raise NotImplementedError

    def placeholder(self, tokens: int) -> str:
        raise NotImplementedError

    def collate(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def token_types(self, input_ids: Any) -> dict[str, Any]:
        """Extra per-token inputs the model needs beside the ids (none by default)."""
        return {}


class LlavaOnevisionImages(ImageAdapter):
    def __init__(self, image_processor: Any, config: Any, tokenizer: Any, max_tiles: int | None = None):
        from transformers import LlavaOnevisionProcessor

        self.image_processor = image_processor
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id if hasattr(config, "image_token_id")
                                                           else config.image_token_index)
        vision = config.vision_config
        tokens_per_tile = (vision.image_size // vision.patch_size) ** 2
        aspect = f"anyres_max_{max_tiles}" if max_tiles else getattr(config, "vision_aspect_ratio", "anyres_max_9")
        # HF's own feature arithmetic; its processor cannot be built without torchvision's video
        # processor, so an instance is made without __init__ and given what the method reads.
        counter = object.__new__(LlavaOnevisionProcessor)
        counter.image_processor = image_processor
        counter.num_image_tokens = tokens_per_tile
        counter.vision_aspect_ratio = aspect
        counter.vision_feature_select_strategy = config.vision_feature_select_strategy
        self._counter = counter
        # The model's forward does not pass `vision_aspect_ratio` on to its image features: it
        # reads the config. Setting it here keeps the token count and the features in step.
        config.vision_aspect_ratio = aspect
        self.strategy = config.vision_feature_select_strategy
        size = image_processor.size
        side = size.get("shortest_edge") or min(size["height"], size["width"])
        # A 1x1 grid is LLaVA's `square` mode: the base tile alone. HF's anyres has no such mode
        # (the pinpoint [tile, tile] still adds a tile beside the base), so such an image is shown
        # as LLaVA-OneVision shows each of several images: its base tile and a newline.
        self.single_tile = all(list(p) == [side, side] for p in image_processor.image_grid_pinpoints)
        self.base_tokens = tokens_per_tile + 1 - (self.strategy == "default")

    def tokens_for(self, width: int, height: int) -> int:
        """Image tokens of one image alone in its sample (anyres: base tile, tiles, newlines)."""
        if self.single_tile:
            return self.base_tokens
        size = self.image_processor.size
        side = size.get("shortest_edge") or min(size["height"], size["width"])
        n = self._counter._get_number_of_features(height, width, side, side)
        return n - 1 if self.strategy == "default" else n

    def counts_for(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Image tokens of each image of one sample, from the images' (width, height)."""
        if len(sizes) == 1:
            return [self.tokens_for(*sizes[0])]
        return [self.base_tokens] * len(sizes)  # several images: each its base tile and a newline

    def prepare(self, images):
        out = self.image_processor(list(images), return_tensors="pt")
        counts = self.counts_for([img.size for img in images])
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"], "images": len(images)}, counts

    def placeholder(self, tokens: int) -> str:
        return self.image_token * tokens

    def collate(self, parts):
        import torch

        parts = [p for p in parts if p]
        if not parts:
            return {}
        pixels = [p["pixel_values"] for p in parts]
        most = max(x.shape[1] for x in pixels)
        padded = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, most - x.shape[1])) for x in pixels]
        images = [p["images"] for p in parts]
        if self.single_tile:
            # HF tiles an image only when its sample holds exactly one (`batch_num_images` of 1):
            # one entry larger than the batch's image count marks every image as one of several
            images = [sum(images) + 1]
        return {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([p["image_sizes"] for p in parts]),
                "batch_num_images": torch.tensor(images)}


class Qwen2VLImages(ImageAdapter):
    def __init__(self, image_processor: Any, config: Any, tokenizer: Any):
        self.image_processor = image_processor
        self.pad = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.start = tokenizer.convert_ids_to_tokens(config.vision_start_token_id)
        self.end = tokenizer.convert_ids_to_tokens(config.vision_end_token_id)
        self.merge = image_processor.merge_size
        self.image_token_id = config.image_token_id

    def prepare(self, images):
        out = self.image_processor(list(images), return_tensors="pt")
        grid = out["image_grid_thw"]
        counts = [int(g.prod().item()) // (self.merge ** 2) for g in grid]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts

    def placeholder(self, tokens: int) -> str:
        return self.start + self.pad * tokens + self.end

    def collate(self, parts):
        import torch

        parts = [p for p in parts if p]
        if not parts:
            return {}
        return {"pixel_values": torch.cat([p["pixel_values"] for p in parts]),
                "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts])}

    def token_types(self, input_ids):
        # multimodal RoPE needs to know which tokens are image tokens (1) and which text (0)
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}


def image_adapter(model_dir: str | Path, config: Any, tokenizer: Any, *, max_tiles: int | None = None) -> ImageAdapter | None:
    """The adapter for a model's family, with its image processor loaded from `model_dir`; None if text only."""
    model_type = getattr(config, "model_type", "")
    if model_type == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        return LlavaOnevisionImages(LlavaOnevisionImageProcessorPil.from_pretrained(model_dir), config, tokenizer, max_tiles)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImages(Qwen2VLImageProcessorPil.from_pretrained(model_dir), config, tokenizer)
    return None


class Encoder:
    def __init__(self, tokenizer: Any, images: ImageAdapter | None, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.images = images
        self.max_length = max_length
        if not getattr(tokenizer, "chat_template", None):
            raise EncodeError("no_chat_template", "the tokenizer has no chat template")

    def _render(self, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: Sequence[dict[str, str]], images: Sequence[Any] = (), *,
               generation_prompt: bool = False) -> Encoded:
        """Tokens of the rendered chat (with image tokens in place) and the assistant-token mask."""
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(images):
            raise EncodeError("image_placeholders", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
        vision: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            if self.images is None:
                raise EncodeError("images_unsupported", "this model reads no images")
            try:
                vision, counts = self.images.prepare(images)
            except Exception as e:  # the processor refuses the image (size, mode, aspect ratio)
                raise EncodeError("image_refused", f"the image processor refused an image: {type(e).__name__}: {e}") from e
        queue = list(counts)

        def expand(content: str) -> str:
            pieces = content.split(IMAGE_PLACEHOLDER)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.images.placeholder(queue.pop(0)) + piece
            return out

        expanded = [{"role": m["role"], "content": expand(m["content"])} for m in messages]
        ids: list[int] = []
        mask: list[bool] = []
        # Chat templates are prefix-stable at turn boundaries: render growing prefixes and mark
        # the tokens each assistant turn adds (its content and end-of-turn token).
        for index, message in enumerate(expanded):
            last = index == len(expanded) - 1
            if message["role"] == "assistant":
                before = self._ids(self._render(expanded[:index], True)) if index else []
                if before[:len(ids)] != ids:
                    raise EncodeError("chat_template", "the chat template is not prefix-stable at an assistant turn")
                mask.extend([False] * (len(before) - len(ids)))
                ids = before
            full = self._ids(self._render(expanded[:index + 1], generation_prompt and last))
            if full[:len(ids)] != ids:
                raise EncodeError("chat_template", "the chat template is not prefix-stable at a turn boundary")
            added = len(full) - len(ids)
            if message["role"] == "assistant":
                # the newline a template prints after the end-of-turn token is not the model's to predict
                trailing = self._trailing_after_eos(full)
                mask.extend([True] * (added - trailing) + [False] * trailing)
            else:
                mask.extend([False] * added)
            ids = full
        if self.max_length is not None and len(ids) > self.max_length:
            raise EncodeError("too_long", f"{len(ids)} tokens, more than the limit of {self.max_length}")
        return Encoded(ids, mask, vision, sum(counts))

    def _trailing_after_eos(self, ids: list[int]) -> int:
        eos = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token) if self.tokenizer.eos_token else None
        for back in range(min(len(ids), 3)):
            if ids[len(ids) - 1 - back] == eos:
                return back
        return 0

    def collate(self, batch: Sequence[Encoded], *, padding_side: str = "right", labels: bool = False) -> dict[str, Any]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(e.input_ids) for e in batch)
        input_ids, attention, label_rows = [], [], []
        for e in batch:
            n = longest - len(e.input_ids)
            ids = e.input_ids
            lab = [t if m else -100 for t, m in zip(e.input_ids, e.assistant_mask)]
            if padding_side == "left":
                input_ids.append([pad] * n + ids)
                attention.append([0] * n + [1] * len(ids))
                label_rows.append([-100] * n + lab)
            else:
                input_ids.append(ids + [pad] * n)
                attention.append([1] * len(ids) + [0] * n)
                label_rows.append(lab + [-100] * n)
        out: dict[str, Any] = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention)}
        if labels:
            out["labels"] = torch.tensor(label_rows)
        if self.images is not None:
            out.update(self.images.collate([e.vision for e in batch]))
            out.update(self.images.token_types(out["input_ids"]))
        return out


def load_pil(image: Any) -> Any:
    """An `engine.Image` (path) as a validated RGB PIL image (same checks as ingest)."""
    from recipec.ops.images import ImageReject, open_image

    path = Path(image.path)
    try:
        return open_image(path.parent, path.name)
    except ImageReject as e:
        raise EncodeError("image_refused", e.detail) from e

