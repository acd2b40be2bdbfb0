"""The LLaVA-OneVision model a stage trains: built from its two towers, or loaded from the previous stage.

First stage: `LlavaOnevisionForConditionalGeneration` from a config made of the vision tower's and
the language tower's own configs; the vision tower's weights from the vision ref, the language
tower's (and its LM head, unless tied) from the language ref; the projector (`mlp2x_gelu`) and the
image-newline separator fresh, seeded. The vision tower keeps the layers up to `vision_layer`
(LLaVA's truncation: -2 drops the last layer), so its features are the tower's last hidden state
and the parameters are exactly what `plan` counts. Later stages load the previous stage's
checkpoint with `from_pretrained` (safetensors only).

Either way the stage then sets its own grid pinpoints (config and image processor), and the
parameters of each part are told apart by name (`part_of`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from recipec.train.settings import StageSettings

log = logging.getLogger("recipec.train")

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
PROJECTORS = {"mlp2x_gelu"}  # what transformers' LLaVA-OneVision projector is (Linear, GELU, Linear)


class ModelBuildError(Exception):
    """The model cannot be built as the recipe says (the message says why)."""


def part_of(name: str) -> str:
    """vision, projector or language: the part a parameter of LlavaOnevisionForConditionalGeneration is in."""
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.multi_modal_projector.") or name == "model.image_newline":
        return "projector"  # the newline separator feeds the language model beside the projected features
    if name.startswith(("model.language_model.", "lm_head.")):
        return "language"
    raise ModelBuildError(f"parameter {name!r} belongs to no known part of LLaVA-OneVision")


def resolve_dir(model_use: Mapping[str, Any], models_dir: Path | None, base_dir: Path | None) -> Path:
    """The local folder of a model ref, offline: tiny:// built on the spot, a folder, or the HF cache."""
    from recipec.models import tiny

    ref = model_use["ref"]
    if tiny.is_tiny(ref):
        return tiny.materialize(ref, models_dir)
    local = Path(ref).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=model_use.get("revision"), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:
        pinned = f" at revision {model_use['revision']!r}" if model_use.get("revision") else ""
        raise ModelBuildError(f"the weights of {ref!r}{pinned} are neither a local folder nor in the Hugging Face "
                              "cache (offline: download them first, or point the ref at a local folder)") from e


def _layers_kept(num_layers: int, vision_layer: int) -> int:
    kept = vision_layer if vision_layer >= 0 else num_layers + 1 + vision_layer
    if not 1 <= kept <= num_layers:
        raise ModelBuildError(f"vision_layer {vision_layer} is out of range for a tower of {num_layers} layers")
    return kept


def _media_ids(tokenizer: Any, vocab_size: int) -> tuple[int, int]:
    """Ids of `<image>` and `<video>`, added as special tokens when the tokenizer lacks them."""
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if max(ids) >= vocab_size:
        raise ModelBuildError(f"the language tower's vocabulary ({vocab_size}) has no room for {IMAGE_TOKEN} "
                              f"and {VIDEO_TOKEN} (ids {ids})")
    return ids


def image_processor_for(vision_dir: Path | None, tile: int, pinpoints: list[list[int]]) -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # SigLIP's
    source = vision_dir / "preprocessor_config.json" if vision_dir is not None else None
    if source is not None and source.is_file():
        found = json.loads(source.read_text(encoding="utf-8"))
        mean, std = found.get("image_mean", mean), found.get("image_std", std)
    return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                           image_mean=mean, image_std=std)


def llava_config(vision: Mapping[str, Any], language: Mapping[str, Any], architecture: Mapping[str, Any],
                 settings: StageSettings, image_id: int, video_id: int) -> Any:
    """The LlavaOnevisionConfig of two tower configs (dicts), as the recipe's model block and the stage say."""
    import transformers as tf

    kept = _layers_kept(int(vision["num_hidden_layers"]), int(architecture.get("vision_layer", -1)))
    vision_dict = {**vision, "num_hidden_layers": kept, "vision_use_head": False}
    tie = architecture.get("tie_word_embeddings")
    if tie is None:
        tie = bool(language.get("tie_word_embeddings", False))
    tile = int(vision["image_size"])
    if settings.image_size != tile:
        raise ModelBuildError(f"stage `{settings.name}` feeds {settings.image_size}px tiles to a vision tower made for "
                              f"{tile}px; LLaVA-OneVision tiles at the tower's size")
    return tf.LlavaOnevisionConfig(
        vision_config=vision_dict, text_config={**language, "tie_word_embeddings": tie}, vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_token_index=image_id, video_token_index=video_id, image_grid_pinpoints=settings.pinpoints(tile),
        vision_aspect_ratio=settings.aspect_ratio(), tie_word_embeddings=tie)


def from_towers(architecture: Mapping[str, Any], settings: StageSettings, *, seed: int, models_dir: Path | None,
                base_dir: Path | None, random_init: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of a first stage; `random_init` skips loading tower
    weights (a full-size benchmark needs only the shapes)."""
    import torch
    import transformers as tf

    if architecture.get("projector", "mlp2x_gelu") not in PROJECTORS:
        raise ModelBuildError(f"projector {architecture['projector']!r} is not supported by transformers' "
                              f"LLaVA-OneVision (supported: {', '.join(sorted(PROJECTORS))})")
    vision_dir = resolve_dir(architecture["vision"], models_dir, base_dir)
    language_dir = resolve_dir(architecture["language"], models_dir, base_dir)
    vision_cfg = tf.AutoConfig.from_pretrained(vision_dir)
    vision_cfg = getattr(vision_cfg, "vision_config", None) or vision_cfg
    language_cfg = tf.AutoConfig.from_pretrained(language_dir)
    language_cfg = getattr(language_cfg, "text_config", None) or language_cfg
    tokenizer = tf.AutoTokenizer.from_pretrained(language_dir)
    image_id, video_id = _media_ids(tokenizer, language_cfg.vocab_size)
    config = llava_config(vision_cfg.to_dict(), language_cfg.to_dict(), architecture, settings, image_id, video_id)
    tie, tile, pinpoints = config.tie_word_embeddings, config.vision_config.image_size, config.image_grid_pinpoints
    full_layers, kept = vision_cfg.num_hidden_layers, config.vision_config.num_hidden_layers
    torch.manual_seed(seed)
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    if not random_init:
        tower = tf.SiglipVisionModel.from_pretrained(vision_dir, dtype=torch.float32, use_safetensors=True)
        _copy_state(model.model.vision_tower, tower.state_dict(), "vision")
        del tower
        language = tf.AutoModelForCausalLM.from_pretrained(language_dir, dtype=torch.float32, use_safetensors=True)
        _copy_state(model.model.language_model, language.model.state_dict(), "language")
        if not tie:
            _copy_state(model.lm_head, language.lm_head.state_dict(), "language (LM head)")
        del language
    model.tie_weights()
    log.info("built LLaVA-OneVision from %s (%d of %d vision layers) and %s; projector fresh (seed %d)",
             architecture["vision"]["ref"], kept, full_layers, architecture["language"]["ref"], seed)
    return model, tokenizer, image_processor_for(vision_dir, tile, pinpoints)


def _copy_state(target: Any, source: Mapping[str, Any], what: str) -> None:
    """Copy the tensors `target` holds from `source` (which may hold more: a truncated tower's
    dropped layers and head); every tensor of `target` must be there, with its shape."""
    own = target.state_dict()
    missing = [k for k in own if k not in source]
    if missing:
        raise ModelBuildError(f"the {what} tower's weights lack {len(missing)} tensor(s), e.g. {missing[0]!r}")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(source[k].shape)]
    if wrong:
        raise ModelBuildError(f"the {what} tower's tensor {wrong[0]!r} has shape {tuple(source[wrong[0]].shape)}, "
                              f"the model expects {tuple(own[wrong[0]].shape)}")
    target.load_state_dict({k: source[k] for k in own}, strict=True)


def from_checkpoint(folder: Path, settings: StageSettings) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) from a previous stage's checkpoint."""
    import torch
    import transformers as tf

    model = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    tile = int(model.config.vision_config.image_size)
    if settings.image_size != tile:
        raise ModelBuildError(f"stage `{settings.name}` feeds {settings.image_size}px tiles to a vision tower made for "
                              f"{tile}px; LLaVA-OneVision tiles at the tower's size")
    processor = image_processor_for(folder, tile, settings.pinpoints(tile))
    return model, tokenizer, processor


def configure_stage(model: Any, processor: Any, settings: StageSettings) -> None:
    """This stage's grid and tile budget, in the config (which the forward reads) and the processor."""
    tile = int(model.config.vision_config.image_size)
    pinpoints = settings.pinpoints(tile)
    model.config.image_grid_pinpoints = pinpoints
    model.config.vision_aspect_ratio = settings.aspect_ratio()
    processor.image_grid_pinpoints = pinpoints


def freeze(model: Any, parts: tuple[str, ...]) -> dict[str, int]:
    """Trainable parameters of `parts`, every other frozen; the count of each part (tied ones once)."""
    counts = {p: 0 for p in ("vision", "projector", "language")}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(part in parts)
        if id(param) not in seen:
            seen.add(id(param))
            counts[part] += param.numel()
    return counts
