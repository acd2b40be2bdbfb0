"""train: one training stage of LLaVA-OneVision (the machinery is in `recipec.train`).

Params (from the plan): `stage` (the IR stage), `model` (the IR architecture), `seed`, `roots`.
Inputs: the stage's export and, for a stage that continues another, that stage's train step,
whose `files/checkpoint/` is the starting model.

Outputs (files): `checkpoint/` (the full model, `from_pretrained`-loadable, with tokenizer and image
processor), `train_log.jsonl` (one line per optimizer step), `checkpoints/step-N/` (the trainable
weights and state of every intermediate checkpoint), `train_result.json` (steps, batch geometry,
parameters, first and last loss) and `llava_next/<stage>.sh` (the LLaVA-NeXT flags of the stage).
No records.

Accounting: every exported record is consumed; a sample that cannot be trained (over `max_length`,
an image refused, a conversation without an assistant turn) is a reject with its reason; the
others are skipped as `trained`, or `not_trained` when the stage's epochs stop short of them.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa

from recipec import records
from recipec.ops.base import Chunk, OperationError, Reject, StepContext

REASONS = frozenset({"too_long", "conversation_unusable", "image_root_unknown", "image_refused", "image_changed",
                     "image_placeholders", "images_unsupported", "chat_template"})


def run(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    from recipec.ops.images import REASONS as IMAGE_REASONS
    from recipec.train import launch, llava_next
    from recipec.train.trainer import TrainError

    if ctx.work_dir is None:
        raise OperationError("the train op needs a work folder for its intermediate checkpoints")
    table = inputs[0]
    try:
        job = launch.make_job(ctx.step_id, ctx.params, table=table, input_dirs=ctx.input_dirs, work_dir=ctx.work_dir,
                              models_dir=ctx.models_dir, recipe_dir=ctx.recipe_dir, threads=ctx.workers)

        def progress(done: int, total: int) -> None:
            ctx.progress.total(total)
            ctx.progress.advance(1)

        result = launch.run_job(job, progress)
        files = launch.handoff(job)
    except TrainError as e:
        raise OperationError(str(e)) from e
    rejects = [Reject(**r) for r in result["rejects"]]
    unknown = {r.reason for r in rejects} - REASONS - IMAGE_REASONS
    if unknown:
        ctx.log.warning("train rejected samples for unlisted reason(s) %s", sorted(unknown))
    trained = result["trained"]
    previous = None
    if len(ctx.input_dirs) > 1 and (ctx.input_dirs[1] / "files" / "train_result.json").is_file():
        previous = json.loads((ctx.input_dirs[1] / "files" / "train_result.json").read_text(encoding="utf-8")).get("train")
    summary = {k: v for k, v in result.items() if k not in ("rejects", "files", "job")}
    extra = {
        "train_result.json": (json.dumps(summary, sort_keys=True, indent=1) + "\n").encode("utf-8"),
        f"llava_next/{ctx.params['stage']['name']}.sh": llava_next.args_script(ctx.params, result, previous).encode("utf-8"),
    }
    yield Chunk(records=records.empty_table(), rejects=rejects, consumed=table.num_rows,
                skipped={k: v for k, v in {"trained": trained,
                                           "not_trained": table.num_rows - trained - len(rejects)}.items() if v},
                files=extra, file_paths=files)
