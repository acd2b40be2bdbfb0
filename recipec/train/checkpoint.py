"""Intermediate checkpoints (to resume a stage) and the final one (to hand the stage on).

An intermediate checkpoint is a folder `step-NNNNNNN/` in the step's work folder, written under a
temporary name and renamed when complete, so a kill at any moment leaves either the whole folder
or none:

    trainable.safetensors   the trainable parameters (frozen ones never change: the stage's
                            starting model has them)
    optimizer.safetensors   AdamW's state per parameter (`<name>/exp_avg`, `<name>/exp_avg_sq`,
                            `<name>/step`); only the newest checkpoint keeps it
    rng.safetensors         torch's CPU (and CUDA) generator states
    state.json              step, scheduler, Python RNG, rejects so far, the job's digest

Everything is safetensors or JSON: nothing is unpickled on resume.

The final checkpoint is `save_pretrained` of the whole model (safetensors), with the tokenizer and
image processor, so `LlavaOnevisionForConditionalGeneration.from_pretrained` loads it, projector-only
stages included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from recipec.runtime.store import fsync_dir

STATE = "state.json"
COMPLETE = "COMPLETE"


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def latest(folder: Path) -> Path | None:
    """The newest complete intermediate checkpoint under `folder`, if any."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / COMPLETE).is_file())
    return done[-1] if done else None


def save(folder: Path, step: int, *, trainable: dict[str, Any], optimizer: dict[str, Any], rng: dict[str, Any],
         state: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically; drop the optimizer state of older ones."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(trainable, tmp / "trainable.safetensors")
    _save_tensors(optimizer, tmp / "optimizer.safetensors")
    _save_tensors(rng, tmp / "rng.safetensors")
    _write_json(tmp / STATE, state)
    (tmp / COMPLETE).write_text("")
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(folder)
    for older in folder.iterdir():
        if older.name.startswith("step-") and older != final:
            (older / "optimizer.safetensors").unlink(missing_ok=True)
    return final


def load(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(trainable, optimizer, rng tensors, state) of a checkpoint written by `save`."""
    from safetensors.torch import load_file

    state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    return (load_file(str(checkpoint / "trainable.safetensors")), load_file(str(checkpoint / "optimizer.safetensors")),
            load_file(str(checkpoint / "rng.safetensors")), state)


# ---- optimizer and RNG state as flat tensors ----------------------------------------------------


def optimizer_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by parameter name (torch.distributed.checkpoint's
    `get_optimizer_state_dict`) as flat tensors `<param name>/<field>`."""
    import torch

    return {f"{name}/{key}": value if torch.is_tensor(value) else torch.tensor(value)
            for name, fields in state["state"].items() for key, value in fields.items()}


def optimizer_state(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of `optimizer_tensors`: parameter name -> its AdamW fields."""
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        by_name.setdefault(name, {})[field] = value
    return by_name


def rng_tensors() -> dict[str, Any]:
    import torch

    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, Any], python_state: Any) -> None:
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# ---- the final checkpoint -----------------------------------------------------------------------


def save_final(model: Any, tokenizer: Any, processor: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
