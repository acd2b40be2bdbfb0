"""The contract between the executor and the operations.

An operation is a function `run(ctx, inputs) -> Iterator[Chunk]`: it reads its input tables (records
in the schema of `recipec.records`) and yields chunks of output records and rejects. The executor
writes each chunk as a shard, counts records in/out and drops by reason, and keeps the conservation
law `records_in == records_out + sum(dropped)` for every step, where dropped counts rejects
and `skipped` by reason. Model-backed operations get an engine
from `ctx.engine(model_use)`; data operations never touch it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pyarrow as pa


@dataclass
class Reject:
    reason: str  # a stable code, e.g. "image_truncated", "json_malformed", "near_duplicate"
    detail: str  # for people: what exactly was wrong, and where
    id: str = ""
    source: str = ""
    origin: str = ""
    record: str = ""  # the record (or raw input line) as JSON text


@dataclass
class Chunk:
    records: pa.Table | None = None  # rows in records.SCHEMA
    rejects: list[Reject] = field(default_factory=list)
    consumed: int = 0  # input records (or raw input lines) this chunk accounts for
    # records dropped on purpose that are not bad data (e.g. not selected by a mixture): counted by
    # reason in the report, with no reject rows
    skipped: dict[str, int] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # extra artifacts by relative name (export)
    file_paths: dict[str, Path] = field(default_factory=dict)  # artifacts already on disk, moved in (checkpoints)


class OperationError(Exception):
    """An operation cannot produce its output; the message says why, for the person running it."""


class Progress(Protocol):
    def advance(self, n: int, tokens: int = 0) -> None: ...
    def total(self, n: int | None) -> None: ...


class _NoProgress:
    def advance(self, n: int, tokens: int = 0) -> None:
        pass

    def total(self, n: int | None) -> None:
        pass


@dataclass
class StepContext:
    step_id: str
    op: str
    params: dict[str, Any]
    fingerprint: str
    recipe_dir: Path  # source paths in the IR are relative to it
    seed: int = 0
    workers: int = 1
    progress: Progress = field(default_factory=_NoProgress)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("recipec"))
    engine: Callable[[dict[str, Any]], Any] | None = None  # model_use params -> engine
    # the stored folders of the step's inputs, in `inputs` order (their files/ hold artifacts such
    # as the previous stage's checkpoint)
    input_dirs: list[Path] = field(default_factory=list)
    work_dir: Path | None = None  # survives a crash of this step; removed once the step is stored
    models_dir: Path | None = None  # where tiny:// models are built


Operation = Callable[[StepContext, list[pa.Table]], Iterator[Chunk]]
