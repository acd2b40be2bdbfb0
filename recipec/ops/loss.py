"""score_loss: each record's mean token loss over its answers under a reference VLM.

The loss is teacher-forced over the assistant tokens only (questions and images are context), as
Infinity-MM scores samples with Qwen2-VL; `scores[field]` (default `loss`) holds it and the
percentile step after this one drops the top N%. Requests are batched by length inside the
engine. Records outside `on` pass through; one the engine cannot score (an image its processor
refuses, no answer to score, over the length limit) is a reject with that reason.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from recipec.models.engine import Loss, RequestError
from recipec.ops.base import Chunk, StepContext
from recipec.ops.collect import concat, emit
from recipec.ops.model_io import ImageFolders, ask_records, engine_reject, messages_of, stamp, to_table, with_scores


def run(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    field = ctx.params.get("field") or "loss"
    rows = concat(inputs).to_pylist()
    folders = ImageFolders(ctx)
    values = ask_records(ctx, "loss", rows, lambda row: Loss(messages_of(row), folders.images(row)))
    out, rejects = [], []
    for i, row in enumerate(rows):
        if i not in values:
            out.append(row)
        elif isinstance(values[i], RequestError):
            rejects.append(engine_reject(row, values[i], f"scoring {field}"))
        else:
            out.append(stamp(with_scores(row, **{field: round(values[i].loss, 6)}), ctx.step_id))
    yield from emit(to_table(out), consumed=len(rows), rejects=rejects)
