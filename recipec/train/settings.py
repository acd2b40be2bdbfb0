"""A training stage's settings, as the plan hands them to the `train` step (no torch here).

The plan's `train.<stage>` params carry the IR stage (`stage`), the IR architecture (`model`), the
recipe seed and the image folder of every data set (`roots`). This module reads them into one
frozen object with the arithmetic every part of training shares: batch geometry (global batch =
micro batch x gradient accumulation x devices), the anyres grid pinpoints and `anyres_max_N`, the
learning rate of each model part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

PARTS = ("vision", "projector", "language")
DEFAULT_MICRO_BATCH = 8  # the largest divisor of the per-device batch up to this, when a stage sets none
DEFAULT_CHECKPOINT_EVERY = 500


class SettingsError(ValueError):
    """A stage cannot be trained as written (the message says why, for the person running it)."""


@dataclass(frozen=True)
class StageSettings:
    name: str
    train: tuple[str, ...]
    image_size: int
    grid: tuple[int, int]
    max_tiles: int | None
    lr: float
    part_lr: Mapping[str, float]
    batch: int
    micro_batch: int | None
    epochs: float
    warmup: float
    schedule: str
    weight_decay: float
    max_length: int
    after: str | None = None
    gradient_checkpointing: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    grad_clip: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, stage: Mapping[str, Any]) -> "StageSettings":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in stage.items() if k in known and v is not None}
        values["train"] = tuple(values.get("train", PARTS))
        values["grid"] = tuple(values.get("grid", (1, 1)))
        values["part_lr"] = dict(values.get("part_lr", {}))
        for key, default in (("max_tiles", None), ("micro_batch", None), ("after", None)):
            values.setdefault(key, default)
        unknown = set(values["train"]) - set(PARTS)
        if unknown:
            raise SettingsError(f"stage `{stage.get('name')}` trains unknown part(s) {sorted(unknown)}")
        return cls(**values, extra={k: v for k, v in stage.items() if k not in known})

    # ---- learning rates ----------------------------------------------------------------------

    def lr_of(self, part: str) -> float:
        return float(self.part_lr.get(part, self.lr))

    # ---- images ------------------------------------------------------------------------------

    def pinpoints(self, tile: int) -> list[list[int]]:
        """LLaVA-OneVision's grid pinpoints for this stage: every rows x cols up to the grid, in pixels."""
        rows, cols = self.grid
        return [[tile * r, tile * c] for r in range(1, rows + 1) for c in range(1, cols + 1)]

    def tiles(self) -> int:
        rows, cols = self.grid
        return rows * cols if self.max_tiles is None else min(rows * cols, self.max_tiles)

    def aspect_ratio(self) -> str:
        """`anyres_max_N`: the most tiles one image may take (LLaVA-OneVision's token budget)."""
        return f"anyres_max_{self.tiles()}"

    # ---- batch geometry ----------------------------------------------------------------------

    def geometry(self, world: int) -> tuple[int, int]:
        """(micro batch per device, gradient accumulation steps) for `world` devices."""
        if self.batch % world:
            raise SettingsError(f"stage `{self.name}`: the batch of {self.batch} does not split over {world} devices")
        per_device = self.batch // world
        micro = self.micro_batch
        if micro is None:
            micro = max(m for m in range(1, min(per_device, DEFAULT_MICRO_BATCH) + 1) if per_device % m == 0)
        if per_device % micro:
            raise SettingsError(f"stage `{self.name}`: batch {self.batch} is not micro_batch {micro} x gradient "
                                f"accumulation x {world} device(s); choose a micro_batch that divides {per_device}")
        return micro, per_device // micro
