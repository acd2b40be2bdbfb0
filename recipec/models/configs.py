"""Offline model-config resolution and exact parameter / image-token arithmetic.

`recipec check` and `recipec plan` need the size of each tower and the number of image tokens of
each stage, derived from the real ``config.json`` files rather than restated. This module finds a
config without a network (a tiny built-in, a local path, the Hugging Face cache, or a copy shipped
in ``recipec/models/configs/``) and counts what a LLaVA-OneVision model built from it holds.

It must stay importable without torch or transformers: the CLI's fast commands import it.

Shipped configs (``configs/<org>--<name>.json``):

- google/siglip-so400m-patch14-384, Qwen/Qwen2.5-1.5B-Instruct, Qwen/Qwen2-VL-2B-Instruct,
  Qwen/Qwen2-VL-7B-Instruct: the published ``config.json`` files, cross-checked against copies
  quoted in public repositories.
- openbmb/MiniCPM-V-2_6 and lmms-lab/llava-onevision-qwen2-0.5b-ov: reconstructed from the
  published values (the towers' sizes are exact; incidental keys may differ from the hub file).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_REFS",
    "ModelConfigError",
    "ResolvedConfig",
    "VisionGeometry",
    "count_model_params",
    "count_params",
    "hf_hub_cache",
    "language_tower_config",
    "max_image_tokens",
    "resolve_config",
    "shipped_refs",
    "tower_configs",
    "vision_geometry",
    "vision_tower_config",
]


class ModelConfigError(Exception):
    """A model reference could not be resolved, or its config cannot be used."""


@dataclass(frozen=True)
class ResolvedConfig:
    ref: str  # the reference as written
    origin: str  # "local" | "hf_cache" | "shipped" | "tiny"
    location: str  # path or tiny:// name it came from
    # A dict is unhashable: leave it out of the hash so the record itself stays hashable.
    config: dict[str, Any] = field(hash=False)


# --------------------------------------------------------------------------------------------
# Tiny configs: real architectures, small enough to build and train on a CPU in tests.
# --------------------------------------------------------------------------------------------

TINY_SCHEME = "tiny://"


def _tiny_siglip() -> dict[str, Any]:
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        # head_dim 64: the smallest vLLM's CPU attention accepts
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        # LLaVA-OneVision never holds SigLIP's pooling head (transformers' own default for it).
        "vision_use_head": False,
    }


def _tiny_qwen2() -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        # ids of the tokenizer recipec trains for tiny models (recipec.models.tiny): <|endoftext|>,
        # <|im_end|>; <image> and <video> are the last two ids
        "bos_token_id": None,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


def _tiny_llava_onevision() -> dict[str, Any]:
    vision = _tiny_siglip()
    text = _tiny_qwen2()
    tile = vision["image_size"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "vision_config": vision,
        "text_config": text,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        # LLaVA-OV's pinpoints: every (rows x cols) multiple of the tile up to 6x6.
        "image_grid_pinpoints": [[tile * r, tile * c] for r in range(1, 7) for c in range(1, 7)],
        # The real ids (151646/151647) lie outside a 512-token vocabulary: use the last two ids.
        "image_token_index": text["vocab_size"] - 2,
        "video_token_index": text["vocab_size"] - 1,
        "tie_word_embeddings": True,
    }


def _tiny_siglip_tagger() -> dict[str, Any]:
    """A whole SigLIP (both towers) for zero-shot image tagging."""
    vision = {k: v for k, v in _tiny_siglip().items() if k not in ("architectures", "vision_use_head")}
    vision["model_type"] = "siglip_vision_model"
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "vision_config": vision,
        "text_config": {
            "model_type": "siglip_text_model",
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "projection_size": 128,
        },
    }


def _tiny_qwen2_vl() -> dict[str, Any]:
    text = _tiny_qwen2()
    vocab = text["vocab_size"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "text_config": {**{k: v for k, v in text.items() if k != "architectures"}, "model_type": "qwen2_vl_text",
                        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
                        "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12],
                                            "rope_theta": 1000000.0}},
        "vision_config": {
            "model_type": "qwen2_vl", "depth": 2, "embed_dim": 128, "hidden_size": 128, "mlp_ratio": 2,
            "num_heads": 2, "in_channels": 3, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        "image_token_id": vocab - 2,
        "video_token_id": vocab - 1,
        # Qwen2-VL brackets image tokens; the tiny tokenizer has no such ids to spare, so these reuse
        # <|im_start|> and <|endoftext|>-adjacent specials of recipec's tiny tokenizer
        "vision_start_token_id": 3,
        "vision_end_token_id": 4,
        "tie_word_embeddings": True,
        "vocab_size": vocab,
    }


_TINY: dict[str, Callable[[], dict[str, Any]]] = {
    "llava-onevision": _tiny_llava_onevision,
    "siglip": _tiny_siglip,
    "siglip-tagger": _tiny_siglip_tagger,
    "qwen2": _tiny_qwen2,
    "qwen2-vl": _tiny_qwen2_vl,
}

TINY_REFS: tuple[str, ...] = tuple(TINY_SCHEME + name for name in _TINY)


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

_SHIPPED_DIR = Path(__file__).with_name("configs")
# Hugging Face repo ids: "org/name" with letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shipped_refs() -> list[str]:
    """The hub ids whose config ships with recipec (for listings and "did you mean" hints)."""
    return sorted(p.stem.replace("--", "/", 1) for p in _SHIPPED_DIR.glob("*--*.json"))


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, chosen the way huggingface_hub chooses it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_config(
    ref: str, *, revision: str | None = None, base_dir: Path | None = None
) -> ResolvedConfig:
    """Find and parse the config.json behind a model reference, without touching the network.

    Tried in order: ``tiny://<name>``; a local directory holding config.json (or a JSON file),
    absolute or relative to `base_dir` (default: the working directory); a hub id ``org/name``
    in the local Hugging Face cache, then in the configs shipped with recipec.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelConfigError(f"model reference {ref!r} is empty")

    if ref.startswith(TINY_SCHEME):
        name = ref[len(TINY_SCHEME) :]
        if name not in _TINY:
            known = ", ".join(TINY_REFS)
            raise ModelConfigError(f"unknown tiny model {ref!r}; known: {known}")
        return ResolvedConfig(ref, "tiny", ref, _TINY[name]())

    looked: list[str] = []

    local = _local_candidate(ref, base_dir)
    if local is not None:
        if local.is_file():
            return ResolvedConfig(ref, "local", str(local), _read_config(ref, local))
        if (local / "config.json").is_file():
            path = local / "config.json"
            return ResolvedConfig(ref, "local", str(path), _read_config(ref, path))
        looked.append(f"local path {local}" + (" (no config.json)" if local.is_dir() else ""))

    if _HUB_ID.match(ref) and ".." not in ref:
        cached = _hf_cache_config(ref, revision)
        if cached is not None:
            return ResolvedConfig(ref, "hf_cache", str(cached), _read_config(ref, cached))
        looked.append(_describe_hf_cache(ref, revision))

        shipped = _SHIPPED_DIR / (ref.replace("/", "--") + ".json")
        if shipped.is_file():
            return ResolvedConfig(ref, "shipped", str(shipped), _read_config(ref, shipped))
        looked.append(f"shipped configs ({shipped.name} not in {_SHIPPED_DIR})")
    elif local is None or not _looks_like_path(ref):
        looked.append("not a tiny:// name, an existing local path or a hub id 'org/name'")

    raise ModelConfigError(f"cannot resolve model config {ref!r}: looked in " + "; ".join(looked))


def _looks_like_path(ref: str) -> bool:
    return (
        os.path.isabs(ref)
        or ref.startswith(("./", "../", "~", ".\\", "..\\"))
        or ref.endswith(".json")
        or ref.count("/") > 1
    )


def _local_candidate(ref: str, base_dir: Path | None) -> Path | None:
    """The local path `ref` names, if it exists or is unmistakably meant as a path."""
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    if path.exists() or _looks_like_path(ref):
        return path
    return None


def _hf_cache_config(ref: str, revision: str | None) -> Path | None:
    """config.json of `ref` in the HF cache: models--org--name/snapshots/<commit>/config.json."""
    repo = hf_hub_cache() / ("models--" + ref.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None

    def snapshot_of(name: str) -> Path | None:
        # A ref (branch or tag) file holds the commit hash its snapshot is named after.
        ref_file = repo / "refs" / name
        if ref_file.is_file():
            try:
                commit = ref_file.read_text(encoding="utf-8").strip()
            except OSError:
                commit = ""
            if commit and (snapshots / commit / "config.json").is_file():
                return snapshots / commit / "config.json"
        if (snapshots / name / "config.json").is_file():
            return snapshots / name / "config.json"
        return None

    if revision is not None:
        # A pinned revision must not silently become another one from the cache.
        return snapshot_of(revision)
    found = snapshot_of("main")
    if found is not None:
        return found
    # No refs/main (e.g. a cache filled by a pinned download): take the newest snapshot.
    candidates = [p / "config.json" for p in snapshots.iterdir() if (p / "config.json").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.parent.name))


def _describe_hf_cache(ref: str, revision: str | None) -> str:
    repo = hf_hub_cache() / ("models--" + ref.replace("/", "--"))
    pinned = f" at revision {revision!r}" if revision is not None else ""
    return f"Hugging Face cache ({repo}{pinned}: no config.json)"


def _read_config(ref: str, path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"model config {ref!r}: cannot read {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(
            f"model config {ref!r}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg})"
        ) from e
    if not isinstance(data, dict):
        raise ModelConfigError(
            f"model config {ref!r}: {path} holds a JSON {type(data).__name__}, not an object"
        )
    return data


# --------------------------------------------------------------------------------------------
# Towers and geometry
# --------------------------------------------------------------------------------------------


def tower_configs(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision_config, text_config) of a composite LLaVA-OneVision style config.json."""
    vision, text = cfg.get("vision_config"), cfg.get("text_config")
    if isinstance(vision, dict) and isinstance(text, dict):
        return vision, text
    kind = cfg.get("model_type", "?")
    if "mm_vision_tower" in cfg:
        # The original LLaVA-NeXT layout names its vision tower instead of nesting its config.
        raise ModelConfigError(
            f"config of model_type {kind!r} names its vision tower "
            f"({cfg['mm_vision_tower']!r}) instead of nesting vision_config/text_config; "
            "resolve the towers separately"
        )
    raise ModelConfigError(
        f"config of model_type {kind!r} has no nested vision_config and text_config"
    )


def vision_tower_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The vision tower's config: the nested vision_config of a SiglipModel or composite config."""
    nested = cfg.get("vision_config")
    return dict(nested) if isinstance(nested, dict) else dict(cfg)


def language_tower_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The language tower's config: the nested text_config of a composite config, else `cfg`."""
    nested = cfg.get("text_config")
    return dict(nested) if isinstance(nested, dict) else dict(cfg)


@dataclass(frozen=True)
class VisionGeometry:
    image_size: int
    patch_size: int
    tokens_per_tile: int
    hidden_size: int


def vision_geometry(vision_cfg: Mapping[str, Any], image_size: int | None = None) -> VisionGeometry:
    """Patch geometry of one image tile, e.g. SigLIP 384/14 -> 27*27 = 729 tokens.

    `image_size` overrides the config's (a stage may feed another resolution).
    """
    vcfg = _vision_with_defaults(vision_tower_config(vision_cfg))
    size = _square(image_size if image_size is not None else vcfg["image_size"], "image_size")
    patch = _square(vcfg["patch_size"], "patch_size")
    if size < patch:
        raise ModelConfigError(f"image_size {size} is smaller than patch_size {patch}")
    return VisionGeometry(
        image_size=size,
        patch_size=patch,
        tokens_per_tile=(size // patch) ** 2,
        hidden_size=int(vcfg["hidden_size"]),
    )


def max_image_tokens(tokens_per_tile: int, grid: tuple[int, int], max_tiles: int | None) -> int:
    """Most image tokens one image can take under LLaVA-OneVision's anyres_max.

    A 1x1 grid is the base image alone; otherwise the base (overview) image plus up to
    ``min(rows*cols, max_tiles)`` tiles: 2x2,max4 -> 5 tiles' worth, 6x6,max9 -> 10.
    """
    rows, cols = grid
    if tokens_per_tile < 1 or rows < 1 or cols < 1:
        raise ValueError(f"need positive tokens and grid, got {tokens_per_tile}, {rows}x{cols}")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    if rows * cols == 1:
        return tokens_per_tile
    tiles = rows * cols if max_tiles is None else min(rows * cols, max_tiles)
    return (1 + tiles) * tokens_per_tile


def _square(value: Any, what: str) -> int:
    # transformers allows int or (h, w); the arithmetic here is for square tiles and patches.
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ModelConfigError(f"non-square {what} {value!r} is not supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------

# transformers' defaults for keys a config.json may omit, so counts match what it would build.
_SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
}
_VISION_TYPES = {"siglip_vision_model", "siglip"}

_LANGUAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Qwen2: q/k/v carry a bias, o_proj and the MLP do not.
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "tie_word_embeddings": False,
    },
    # Llama-style: one attention_bias flag for q/k/v/o, one mlp_bias flag for the MLP.
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
}

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def count_params(
    vision_cfg: Mapping[str, Any],
    language_cfg: Mapping[str, Any],
    *,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int | Sequence[int] = -1,
    tie_word_embeddings: bool | None = None,
) -> dict[str, int]:
    """Exact parameter counts of a LLaVA-OneVision model built from two tower configs.

    Returns ``{"vision", "projector", "language", "image_newline", "total"}``. The vision tower
    holds only the layers up to `vision_feature_layer` (LLaVA style: -1 keeps every layer, -2
    drops the last). ``image_newline`` is the one learned vector (text hidden size) that
    LLaVA-OneVision appends after each row of image features; ``total`` is the sum of all four.
    """
    vcfg = _vision_with_defaults(vision_tower_config(vision_cfg))
    lcfg = language_tower_config(language_cfg)

    layers = _layers_used(int(vcfg["num_hidden_layers"]), vision_feature_layer)
    n_features = 1 if isinstance(vision_feature_layer, int) else len(vision_feature_layer)
    vision = _siglip_vision_params(vcfg, layers)

    text_hidden = int(_language_with_defaults(lcfg)["hidden_size"])
    proj = _projector_params(projector, int(vcfg["hidden_size"]) * n_features, text_hidden)
    language = _decoder_params(lcfg, tie_word_embeddings)
    newline = text_hidden
    return {
        "vision": vision,
        "projector": proj,
        "language": language,
        "image_newline": newline,
        "total": vision + proj + language + newline,
    }


def count_model_params(cfg: Mapping[str, Any], *, projector: str | None = None) -> dict[str, int]:
    """count_params for a composite llava_onevision config.json, with its own settings."""
    vision, text = tower_configs(cfg)
    act = cfg.get("projector_hidden_act", "gelu")
    if projector is None:
        if act != "gelu":
            raise ModelConfigError(f"projector_hidden_act {act!r} is not supported (only gelu)")
        projector = "mlp2x_gelu"
    # transformers ties when either the composite or its text config says so.
    tie = bool(cfg.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    return count_params(
        vision,
        text,
        projector=projector,
        vision_feature_layer=cfg.get("vision_feature_layer", -1),
        tie_word_embeddings=tie,
    )


def _vision_with_defaults(vcfg: dict[str, Any]) -> dict[str, Any]:
    kind = vcfg.get("model_type")
    if kind not in _VISION_TYPES:
        raise ModelConfigError(
            f"vision tower model_type {kind!r} is not supported "
            f"(supported: {', '.join(sorted(_VISION_TYPES))})"
        )
    return {**_SIGLIP_VISION_DEFAULTS, **{k: v for k, v in vcfg.items() if v is not None}}


def _language_with_defaults(lcfg: dict[str, Any]) -> dict[str, Any]:
    kind = lcfg.get("model_type")
    if kind not in _LANGUAGE_DEFAULTS:
        raise ModelConfigError(
            f"language tower model_type {kind!r} is not supported "
            f"(supported: {', '.join(sorted(_LANGUAGE_DEFAULTS))})"
        )
    merged = {**_LANGUAGE_DEFAULTS[kind], **{k: v for k, v in lcfg.items() if v is not None}}
    if merged.get("num_key_value_heads") is None:
        merged["num_key_value_heads"] = merged["num_attention_heads"]
    return merged


def _layers_used(num_layers: int, feature_layer: int | Sequence[int]) -> int:
    """How many encoder layers the selected hidden state(s) depend on.

    hidden_states holds num_layers + 1 entries (the embeddings, then each layer's output), so
    index k >= 0 needs k layers and index -i needs num_layers + 1 - i.
    """
    indexes = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not indexes:
        raise ModelConfigError("vision_feature_layer is an empty list")
    used = 0
    for index in indexes:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ModelConfigError(f"vision_feature_layer {index!r} is not an integer")
        if not -(num_layers + 1) <= index <= num_layers:
            raise ModelConfigError(
                f"vision_feature_layer {index} is out of range for {num_layers} layers"
            )
        used = max(used, index if index >= 0 else num_layers + 1 + index)
    return used


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _siglip_vision_params(vcfg: dict[str, Any], layers: int) -> int:
    hidden = int(vcfg["hidden_size"])
    inter = int(vcfg["intermediate_size"])
    channels = int(vcfg["num_channels"])
    patch = _square(vcfg["patch_size"], "patch_size")
    image = _square(vcfg["image_size"], "image_size")
    layer_norm = 2 * hidden  # weight + bias
    mlp = _linear(hidden, inter) + _linear(inter, hidden)

    # Position embeddings are sized by the config's image_size, whatever a stage feeds later.
    embeddings = channels * patch * patch * hidden + hidden + (image // patch) ** 2 * hidden
    per_layer = 4 * _linear(hidden, hidden) + 2 * layer_norm + mlp
    total = embeddings + layers * per_layer

    all_layers = layers == int(vcfg["num_hidden_layers"])
    if all_layers:
        # post_layernorm follows the last layer: a truncated tower (LLaVA's -2) drops it.
        total += layer_norm
        # The attention-pooling head: probe, nn.MultiheadAttention (packed q/k/v + out), LN, MLP.
        if vcfg.get("vision_use_head", False):
            total += hidden + 3 * hidden * hidden + 3 * hidden + _linear(hidden, hidden)
            total += layer_norm + mlp
    return total


def _projector_params(projector: str, vision_hidden: int, text_hidden: int) -> int:
    if projector == "linear":
        return _linear(vision_hidden, text_hidden)
    if projector == "identity":
        if vision_hidden != text_hidden:
            raise ModelConfigError(
                f"identity projector needs equal widths, got {vision_hidden} -> {text_hidden}"
            )
        return 0
    match = _MLP_GELU.match(projector)
    if match and int(match.group(1)) >= 1:
        # LLaVA's builder: Linear(v, t), then (depth - 1) x [GELU, Linear(t, t)], all with bias.
        depth = int(match.group(1))
        return _linear(vision_hidden, text_hidden) + (depth - 1) * _linear(text_hidden, text_hidden)
    raise ModelConfigError(
        f"projector {projector!r} is not supported (linear, identity or mlp<N>x_gelu)"
    )


def _decoder_params(lcfg: dict[str, Any], tie_word_embeddings: bool | None) -> int:
    cfg = _language_with_defaults(lcfg)
    kind = cfg["model_type"]
    hidden = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    vocab = int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg["num_key_value_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)

    if kind == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(cfg["attention_bias"])
        mlp_bias = bool(cfg["mlp_bias"])

    attention = (
        _linear(hidden, heads * head_dim, qkv_bias)
        + 2 * _linear(hidden, kv_heads * head_dim, qkv_bias)
        + _linear(heads * head_dim, hidden, o_bias)
    )
    mlp = 2 * _linear(hidden, inter, mlp_bias) + _linear(inter, hidden, mlp_bias)
    per_layer = attention + mlp + 2 * hidden  # two RMSNorms, weight only

    tied = cfg["tie_word_embeddings"] if tie_word_embeddings is None else tie_word_embeddings
    embeddings = vocab * hidden
    lm_head = 0 if tied else vocab * hidden
    return embeddings + int(cfg["num_hidden_layers"]) * per_layer + hidden + lm_head
