"""judge_relevance and judge_score: a VLM's constrained verdict on a record, kept as a score.

judge_relevance (Infinity-MM 3.2.3: "re-ask the VLM whether each question fits the image")
    `yes`/`no` by constrained choice; `scores["relevance"]` is the probability of `yes`.

judge_score (3.2.4: score each (image, question, answer) 1-10; also a filter over any records,
as Eagle 2 judges existing data)
    One of `1`..`10` by constrained choice (never parsed from free text); `scores[field]` is the
    chosen score, the most probable label.

With a `condition` (the synthesis rules `keep relevance >= 0.5`, `keep score >= 8`) the step also
cuts, rejecting with `threshold_<field>` as the threshold op does; as a filter's scoring step it
only scores, and the threshold or percentile step after it cuts. Records outside `on` pass
through untouched. A record the engine cannot judge is a reject with the engine's reason.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from recipec.models.engine import IMAGE_PLACEHOLDER, Choose, RequestError
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import concat, emit
from recipec.ops.cuts import OPS
from recipec.ops.model_io import (ImageFolders, ask_records, engine_reject, fill, messages_of, reject, stamp,
                                  strip_images, to_table, transcript, with_scores)

DEFAULT_RELEVANCE_PROMPT = ("Look at the image and the question below. Is the question clearly related to the content "
                            "of the image and answerable from it? Reply with \"yes\" or \"no\".\nQuestion: {question}")
DEFAULT_SCORE_PROMPT = ("Rate the quality of this conversation about the image on a scale of 1 to 10, where 10 means "
                        "the questions fit the image and the answers are correct, complete and well written. Reply "
                        "with the number only.\n{conversation}")
SCORES = tuple(str(n) for n in range(1, 11))


def _prompt(template: str, record: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = messages_of(record)
    questions = "\n".join(strip_images(m["content"]) for m in messages if m["role"] == "user")
    answers = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    text = fill(template, question=questions, answer=answers, conversation=strip_images(transcript(record)))
    images = len(record.get("images") or ())
    return ({"role": "user", "content": (IMAGE_PLACEHOLDER + "\n") * images + strip_images(text)},)


def _judge(ctx: StepContext, inputs: list[pa.Table], field: str, labels: tuple[str, ...], template: str,
           value_of) -> Iterator[Chunk]:
    condition = ctx.params.get("condition")
    if condition is not None and condition["op"] not in OPS:
        raise OperationError(f"`{condition['verb']} {field}` compares with {', '.join(OPS)}, not `{condition['op']}`")
    rows = concat(inputs).to_pylist()
    folders = ImageFolders(ctx)
    verdicts = ask_records(ctx, "choose", rows, lambda row: Choose(_prompt(template, row), labels, folders.images(row)))
    out, rejects = [], []
    for i, row in enumerate(rows):
        if i not in verdicts:
            out.append(row)
            continue
        verdict = verdicts[i]
        if isinstance(verdict, RequestError):
            rejects.append(engine_reject(row, verdict, f"judging {field}"))
            continue
        value = value_of(verdict)
        row = with_scores(row, **{field: value})
        passes = condition is None or OPS[condition["op"]](value, condition["value"]) == (condition["verb"] == "keep")
        if not passes:
            rejects.append(reject(row, f"threshold_{field}", f"{field} = {value:g}, rule `{condition['verb']} {field} "
                                                             f"{condition['op']} {condition['value']:g}`"))
            continue
        out.append(stamp(row, ctx.step_id))
    yield from emit(to_table(out), consumed=len(rows), rejects=rejects)


def run_judge_relevance(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    template = (ctx.params.get("prompt") or {}).get("text") or DEFAULT_RELEVANCE_PROMPT
    yield from _judge(ctx, inputs, "relevance", ("yes", "no"), template, lambda v: round(v.probs["yes"], 6))


def run_judge_score(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    condition = ctx.params.get("condition")
    field = ctx.params.get("field") or (condition or {}).get("field") or "score"
    template = (ctx.params.get("prompt") or {}).get("text") or DEFAULT_SCORE_PROMPT
    yield from _judge(ctx, inputs, field, SCORES, template, lambda v: float(v.label))
