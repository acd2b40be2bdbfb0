"""clean: rule-based cleaning of the records whose source is in `on` (all when `on` is None).

Params: `rules` (any of the keys below) and `on`. A record breaking a rule is rejected with reason
`clean_<rule>`; when it breaks several, the first in this order names it:

    min_turns / max_turns   rounds of question and answer (a human turn and its gpt answer)
    min_answer_chars        every answer has at least this many characters (whitespace trimmed)
    max_text_chars          the conversation's text (all turns' values) has at most this many
    min_image_side          every image's shorter side is at least this many pixels
    max_aspect_ratio        every image's long side / short side is at most this
    drop_empty_answers      (true) no answer is empty or whitespace only
    require_image           (true) the record has at least one image

Every rule is per record: a record's verdict depends on that record alone, so the op streams. It
reads its inputs a batch at a time (`collect.Records`: a stored step's shards one by one), measures
and judges each batch column-wise with Arrow and numpy, and emits the survivors through a
`Rebatcher`, so memory holds one batch whatever the stage's size and the output shards depend only on
the records. Nothing global is kept (rows, rejects and counts come out as each batch is judged).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipec import records
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import Rebatcher, Records, add_provenance, rejects_for, source_mask

RULES = ("min_turns", "max_turns", "min_answer_chars", "max_text_chars", "min_image_side", "max_aspect_ratio",
         "drop_empty_answers", "require_image")
REASONS = frozenset(f"clean_{rule}" for rule in RULES)


def run(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    rules: dict[str, Any] = dict(ctx.params.get("rules") or {})
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise OperationError(f"unknown cleaning rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    active = [rule for rule in RULES if rules.get(rule) is not None and rules[rule] is not False]
    on = ctx.params.get("on")
    out = Rebatcher()
    for batch in Records(inputs).batches():
        judged = source_mask(batch, on)
        dropped = verdicts(_Facts(batch), judged, {rule: rules[rule] for rule in active})
        keep = np.ones(batch.num_rows, dtype=bool)
        keep[list(dropped)] = False
        kept = add_provenance(batch, ctx.step_id, judged & keep)
        kept = kept.filter(pa.array(keep)) if dropped else kept
        yield from out.add(kept, consumed=batch.num_rows, rejects=rejects_for(batch, dropped))
    yield from out.finish()


run.streams = True  # type: ignore[attr-defined]


def verdicts(facts: "_Facts", judged: np.ndarray, rules: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """Row (in the batch) -> (reason, detail) for the judged records that break a rule: the first
    broken rule in RULES order names it."""
    dropped: dict[int, tuple[str, str]] = {}
    for rule, limit in rules.items():
        broken, details = CHECKS[rule](facts, limit)
        for row in np.flatnonzero(broken & judged).tolist():
            dropped.setdefault(row, (f"clean_{rule}", details(row)))
    return dropped


class _Facts:
    """Per-record measurements, computed once from the flattened list columns."""

    def __init__(self, table: pa.Table):
        n = table.num_rows
        self.n = n
        turns = _column(table, "conversations")
        images = _column(table, "images")
        self.n_turns = _lengths(turns)
        self.n_images = _lengths(images)

        flat = turns.flatten()
        owner = pc.list_parent_indices(turns).to_numpy() if len(flat) else np.zeros(0, np.int64)
        values = flat.field("value")
        is_answer = _numpy(pc.equal(flat.field("from"), records.ASSISTANT), bool) if len(flat) else np.zeros(0, bool)
        chars = _numpy(pc.utf8_length(values), np.int64) if len(flat) else np.zeros(0, np.int64)
        trimmed = _numpy(pc.utf8_length(pc.utf8_trim_whitespace(values)), np.int64) if len(flat) else chars
        self.text_chars = np.bincount(owner, weights=chars, minlength=n).astype(np.int64)
        big = np.iinfo(np.int64).max
        self.shortest_answer = np.full(n, big, dtype=np.int64)
        np.minimum.at(self.shortest_answer, owner[is_answer], trimmed[is_answer])
        self.has_answer = self.shortest_answer < big

        flat_images = images.flatten()
        image_owner = pc.list_parent_indices(images).to_numpy() if len(flat_images) else np.zeros(0, np.int64)
        width = _numpy(flat_images.field("width"), np.int64) if len(flat_images) else np.zeros(0, np.int64)
        height = _numpy(flat_images.field("height"), np.int64) if len(flat_images) else np.zeros(0, np.int64)
        short, long = np.minimum(width, height), np.maximum(width, height)
        self.smallest_side = np.full(n, big, dtype=np.int64)
        np.minimum.at(self.smallest_side, image_owner, short)
        self.widest_ratio = np.zeros(n, dtype=np.float64)
        np.maximum.at(self.widest_ratio, image_owner, long / np.maximum(short, 1))


def _column(table: pa.Table, name: str) -> pa.Array:
    if table.num_rows == 0:
        return pa.array([], records.SCHEMA.field(name).type)
    return table.column(name).combine_chunks()


def _lengths(array: pa.Array) -> np.ndarray:
    return _numpy(pc.fill_null(pc.list_value_length(array), 0), np.int64) if len(array) else np.zeros(0, np.int64)


def _numpy(array: pa.Array, dtype: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(array, 0 if dtype is not bool else False).to_numpy(zero_copy_only=False), dtype=dtype)


Check = Any  # (facts, threshold) -> (broken mask, row -> detail)


def _min_turns(f: _Facts, limit: int):
    rounds = f.n_turns // 2
    return rounds < limit, lambda r: f"{rounds[r]} round(s) of question and answer, fewer than {limit}"


def _max_turns(f: _Facts, limit: int):
    rounds = f.n_turns // 2
    return rounds > limit, lambda r: f"{rounds[r]} round(s) of question and answer, more than {limit}"


def _min_answer_chars(f: _Facts, limit: int):
    return f.has_answer & (f.shortest_answer < limit), \
        lambda r: f"an answer of {f.shortest_answer[r]} character(s), fewer than {limit}"


def _max_text_chars(f: _Facts, limit: int):
    return f.text_chars > limit, lambda r: f"{f.text_chars[r]} characters of text, more than {limit}"


def _min_image_side(f: _Facts, limit: int):
    return (f.n_images > 0) & (f.smallest_side < limit), \
        lambda r: f"an image side of {f.smallest_side[r]} px, less than {limit}"


def _max_aspect_ratio(f: _Facts, limit: float):
    return (f.n_images > 0) & (f.widest_ratio > limit), \
        lambda r: f"an image with aspect ratio {f.widest_ratio[r]:.3g}, more than {limit:g}"


def _drop_empty_answers(f: _Facts, on: bool):
    return f.has_answer & (f.shortest_answer == 0), lambda r: "an empty answer"


def _require_image(f: _Facts, on: bool):
    return f.n_images == 0, lambda r: "no image"


CHECKS: dict[str, Check] = {
    "min_turns": _min_turns, "max_turns": _max_turns, "min_answer_chars": _min_answer_chars,
    "max_text_chars": _max_text_chars, "min_image_side": _min_image_side, "max_aspect_ratio": _max_aspect_ratio,
    "drop_empty_answers": _drop_empty_answers, "require_image": _require_image,
}
