"""The flags that reproduce a stage with LLaVA-NeXT's own training script (`llava/train/train_mem.py`).

Written per stage as a bash file defining `ARGS` (an array), for teams that train there:

    NUM_GPUS=8 source s2a.sh && deepspeed llava/train/train_mem.py "${ARGS[@]}"

Paths are those of `recipec run`'s output folder (run it from there): `<stage>/<stage>.yaml` as
`--data_path` and `<stage>/images` as `--image_folder`. Each stage writes to `checkpoints/<stage>`
and starts from the previous stage's, LLaVA-NeXT style: after a projector-only stage from the
language model with `--pretrain_mm_mlp_adapter`, else from the previous stage's folder.
Gradient accumulation follows from the stage's global batch and `NUM_GPUS`.
"""

from __future__ import annotations

import shlex
from typing import Any, Mapping

TUNABLE = {"vision": "mm_vision_tower", "projector": "mm_mlp_adapter", "language": "mm_language_model"}


def conversation_version(language_ref: str) -> str:
    """LLaVA-NeXT's conversation template for a language tower (ChatML for Qwen)."""
    ref = language_ref.lower()
    if "qwen" in ref:
        return "qwen_1_5"
    if "llama-3" in ref or "llama3" in ref:
        return "llava_llama_3"
    return "plain"


def args_script(params: Mapping[str, Any], result: Mapping[str, Any], previous_train: list[str] | None = None) -> str:
    """The bash file of one stage; `previous_train`: the parts the stage it continues trained."""
    stage, model = params["stage"], params["model"]
    name = stage["name"]
    rows, cols = stage.get("grid", (1, 1))
    tiles = rows * cols if stage.get("max_tiles") is None else min(rows * cols, stage["max_tiles"])
    train = list(stage.get("train", TUNABLE))
    micro = int(result.get("micro_batch") or stage.get("micro_batch") or 1)
    after = stage.get("after")
    flags: list[tuple[str, Any]] = []
    start = model["language"]["ref"]
    previous_projector_only = previous_train == ["projector"]
    if after and not previous_projector_only:
        start = f"checkpoints/{after}"
    flags.append(("--model_name_or_path", start))
    if after and previous_projector_only:
        flags.append(("--pretrain_mm_mlp_adapter", f"checkpoints/{after}/mm_projector.bin"))
    flags += [
        ("--version", conversation_version(model["language"]["ref"])),
        ("--data_path", f"{name}/{name}.yaml"),
        ("--image_folder", f"{name}/images"),
        ("--vision_tower", model["vision"]["ref"]),
        ("--mm_projector_type", model.get("projector", "mlp2x_gelu")),
        ("--mm_vision_select_layer", model.get("vision_layer", -1)),
        ("--mm_use_im_start_end", "False"),
        ("--mm_use_im_patch_token", "False"),
        ("--mm_tunable_parts", ",".join(TUNABLE[p] for p in ("vision", "projector", "language") if p in train)),
    ]
    part_lr = stage.get("part_lr") or {}
    if "vision" in part_lr:
        flags.append(("--mm_vision_tower_lr", part_lr["vision"]))
    if "projector" in part_lr:
        flags.append(("--mm_projector_lr", part_lr["projector"]))
    if (rows, cols) == (1, 1):
        flags.append(("--image_aspect_ratio", "square"))
    else:
        flags += [("--image_aspect_ratio", f"anyres_max_{tiles}"),
                  ("--image_grid_pinpoints", ",".join(f"({r}x{c})" for r in range(1, rows + 1) for c in range(1, cols + 1))),
                  ("--mm_patch_merge_type", "spatial_unpad")]
    flags += [
        ("--bf16", "True"),
        ("--output_dir", f"checkpoints/{name}"),
        ("--num_train_epochs", stage.get("epochs", 1)),
        ("--per_device_train_batch_size", micro),
        ("--gradient_accumulation_steps", f"$(( {stage['batch']} / ({micro} * NUM_GPUS) ))"),
        ("--learning_rate", stage["lr"]),
        ("--weight_decay", stage.get("weight_decay", 0.0)),
        ("--warmup_ratio", stage.get("warmup", 0.03)),
        ("--lr_scheduler_type", stage.get("schedule", "cosine").replace("constant", "constant_with_warmup")),
        ("--max_grad_norm", stage.get("grad_clip", 1.0)),
        ("--model_max_length", stage.get("max_length", 8192)),
        ("--gradient_checkpointing", str(bool(stage.get("gradient_checkpointing", False)))),
        ("--group_by_modality_length", "True"),
        ("--save_strategy", "steps"),
        ("--save_steps", stage.get("checkpoint_every") or 500),
        ("--logging_steps", 1),
        ("--seed", params.get("seed", 0)),
        ("--lazy_preprocess", "True"),
        ("--report_to", "none"),
    ]
    lines = [
        "# LLaVA-NeXT flags for stage " + shlex.quote(name) + ", written by recipec.",
        "# From the recipec output folder:",
        f"#   NUM_GPUS=8 source llava_next/{name}.sh && deepspeed llava/train/train_mem.py \"${{ARGS[@]}}\"",
        "NUM_GPUS=${NUM_GPUS:-1}",
        "ARGS=(",
    ]
    for flag, value in flags:
        text = str(value)
        shown = f"\"{text}\"" if text.startswith("$((") else shlex.quote(text)
        lines.append(f"  {flag} {shown}")
    lines.append(")")
    return "\n".join(lines) + "\n"
