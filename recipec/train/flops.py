"""Model FLOPs of a training step, vision and language both, and the peak they are measured against.

Per micro batch: the vision tower runs over every tile (patch embedding and layers: 2 FLOPs per
weight per patch, plus attention 4·S²·h per layer over the S patches of a tile), the projector over
every patch, the language model over every real (unpadded) token (2 per weight, plus causal
attention 2·n²·h per layer) and the LM head over the tokens the loss counts. A part that trains
costs 3x its forward pass (forward, input gradients, weight gradients); a frozen part that gradients
flow through to a trained part before it costs 2x; a frozen part with nothing trained before it, 1x.
Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

MFU = model FLOPs per second / (peak FLOPs per device x devices). Peaks are the dense bf16 figures
of known GPUs; elsewhere (a CPU) MFU is left out unless `RECIPEC_PEAK_TFLOPS` gives the peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L4": 121e12, "A10": 125e12}


@dataclass(frozen=True)
class Costs:
    vision_weights: int  # weights multiplied per patch
    vision_layers: int
    vision_hidden: int
    patches_per_tile: int
    projector_weights: int
    language_weights: int  # per token, without embeddings and LM head
    language_layers: int
    language_hidden: int
    head_weights: int
    multipliers: tuple[float, float, float]  # vision, projector, language

    @classmethod
    def of(cls, model: Any, trained: tuple[str, ...]) -> "Costs":
        cfg = model.config
        v, t = cfg.vision_config, cfg.text_config
        vision = model.model.vision_tower
        vision_weights = sum(p.numel() for n, p in vision.named_parameters() if "position_embedding" not in n)
        projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
        language = model.model.language_model
        embed = language.get_input_embeddings().weight.numel()
        language_weights = sum(p.numel() for p in language.parameters()) - embed
        vt = "vision" in trained
        pt = "projector" in trained
        lt = "language" in trained
        multipliers = (3.0 if vt else 1.0, 3.0 if pt else (2.0 if vt else 1.0),
                       3.0 if lt else (2.0 if (vt or pt) else 1.0))
        return cls(vision_weights, v.num_hidden_layers, v.hidden_size, (v.image_size // v.patch_size) ** 2, projector,
                   language_weights, t.num_hidden_layers, t.hidden_size, t.vocab_size * t.hidden_size, multipliers)

    def micro_batch(self, tiles: int, lengths: list[int], label_tokens: int) -> float:
        s = self.patches_per_tile
        vision = tiles * (2 * self.vision_weights * s + self.vision_layers * 4 * s * s * self.vision_hidden)
        projector = tiles * 2 * self.projector_weights * s
        language = sum(2 * self.language_weights * n + self.language_layers * 2 * n * n * self.language_hidden
                       for n in lengths) + 2 * self.head_weights * label_tokens
        mv, mp, ml = self.multipliers
        return mv * vision + mp * projector + ml * language


def peak_flops(device: Any) -> float | None:
    """Peak FLOP/s of one device, or None when unknown."""
    override = os.environ.get("RECIPEC_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None
