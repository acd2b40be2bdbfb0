"""threshold and percentile: keep or drop records by a score (`scores[field]`).

Params: `condition` ({verb, field, op, value}) and `on` (sources judged; all when None).

threshold (`keep score >= 8`, `drop loss > 3`)
    `keep`: a record stays when `value op threshold` holds; `drop`: it goes when it holds.
    Rejected records get reason `threshold_<field>`.

percentile (`drop loss top 5%`, `keep score bottom 10%`; value is the fraction, 0.05)
    Global and exact: over all judged records at once (not per shard), the "top p" set is the
    ceil(p * n) records with the highest values (rounded to 9 digits first, so 5% of 100 is 5, not 6),
    "bottom p" the ceil(p * n) with the lowest; ties at the cut are broken by record id (ascending
    first), so the set never depends on record order. `drop` rejects that set, `keep` keeps only it.
    Rejected records get reason `percentile_<field>`; the detail gives the cut value.

A judged record without the field (or with NaN) cannot be judged: it is rejected `score_missing`
rather than let through silently. Restrict `on` to the sources that carry the score.

percentile is its per-record pass (`score_column`: a bool and a float per record) and its cut
(`cut_percentile`); the Ray executor runs the pass per range of the input and the cut once over
the floats, put together by `combine_scores`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipec import ir
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import Records, RowIds, judge, smallest, source_mask

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def scores_of(table: pa.Table, field: str) -> np.ndarray:
    """`scores[field]` per record as float64, NaN where missing."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.float64)
    found = pc.map_lookup(table.column("scores"), pa.scalar(field, pa.string()), "first")
    return np.asarray(pc.fill_null(found.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


@dataclass
class ScoreColumn:
    """percentile's per-record pass: whether each record is judged, and its score (NaN: none)."""

    judged: np.ndarray  # bool per record
    values: np.ndarray  # float64 per record

    @property
    def num_rows(self) -> int:
        return len(self.values)


def score_column(ctx: StepContext, inputs: list[Any]) -> ScoreColumn:
    """One pass over the sources and the score: a bool and a float per record, nothing more."""
    recs = Records(inputs)
    condition = ir.Condition.model_validate(ctx.params["condition"])
    judged = np.zeros(recs.num_rows, dtype=bool)
    values = np.zeros(recs.num_rows, dtype=np.float64)
    start = 0
    for batch in recs.batches(["source", "scores"]):
        m = batch.num_rows
        judged[start:start + m] = source_mask(batch, ctx.params.get("on"))
        values[start:start + m] = scores_of(batch, condition.field)
        start += m
    return ScoreColumn(judged, values)


def combine_scores(parts: Sequence[ScoreColumn]) -> ScoreColumn:
    """The passes over consecutive ranges of the input, as one pass over all of it."""
    if not parts:
        return ScoreColumn(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float64))
    return ScoreColumn(np.concatenate([p.judged for p in parts]), np.concatenate([p.values for p in parts]))


def _missing(condition: ir.Condition, column: ScoreColumn) -> dict[int, tuple[str, str]]:
    missing = column.judged & np.isnan(column.values)
    reason = ("score_missing", f"no `{condition.field}` score to judge")
    return {row: reason for row in np.flatnonzero(missing).tolist()}


def _prepare(ctx: StepContext, inputs: list[Any]):
    recs = Records(inputs)
    column = score_column(ctx, inputs)
    condition = ir.Condition.model_validate(ctx.params["condition"])
    return recs, condition, column.judged, column.values, _missing(condition, column)


def run_threshold(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    recs, c, judged, values, dropped = _prepare(ctx, inputs)
    if c.op not in OPS:
        raise OperationError(f"a threshold compares with {', '.join(OPS)}, not `{c.op}`")
    present = judged & ~np.isnan(values)
    holds = np.zeros(recs.num_rows, dtype=bool)
    holds[present] = OPS[c.op](values[present], c.value)
    failing = present & (~holds if c.verb == "keep" else holds)
    for row in np.flatnonzero(failing).tolist():
        verdict = "is not" if c.verb == "keep" else "is"
        dropped[row] = (f"threshold_{c.field}", f"{c.field} = {values[row]:g} {verdict} {c.op} {c.value:g}")
    yield from judge(ctx, recs, judged, dropped)


def run_percentile(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    """percentile: its per-record pass (`score_column`) over all its input, then the cut (`cut_percentile`)."""
    _check_percentile(ctx)
    yield from cut_percentile(ctx, inputs, score_column(ctx, inputs))


def _check_percentile(ctx: StepContext) -> ir.Condition:
    c = ir.Condition.model_validate(ctx.params["condition"])
    if c.op not in ("top", "bottom"):
        raise OperationError(f"a percentile cut takes `top` or `bottom`, not `{c.op}`")
    if not 0.0 <= c.value <= 1.0:
        raise OperationError(f"a percentile cut takes a fraction between 0 and 1, not {c.value:g}")
    return c


def cut_percentile(ctx: StepContext, inputs: list[Any], column: ScoreColumn) -> Iterator[Chunk]:
    """percentile's decision, over the floats of `score_column` (the inputs are read again only for
    the ids of records tied at the cut, and to write the output)."""
    recs = Records(inputs)
    c = _check_percentile(ctx)
    if column.num_rows != recs.num_rows:
        raise RuntimeError(f"percentile: a score pass over {column.num_rows} records for {recs.num_rows} inputs")
    judged, values, dropped = column.judged, column.values, _missing(c, column)
    rows = np.flatnonzero(judged & ~np.isnan(values))
    k = cut_size(c.value, len(rows))
    ranked = -values[rows] if c.op == "top" else values[rows]
    chosen = smallest(ranked, k, RowIds(recs, rows))
    cut = values[rows][chosen].min() if c.op == "top" and k else values[rows][chosen].max() if k else math.nan
    out = rows[chosen] if c.verb == "drop" else rows[~chosen]
    where = f"{c.op} {c.value * 100:g}%"
    for row in out.tolist():
        inside = "in" if c.verb == "drop" else "not in"
        dropped[int(row)] = (f"percentile_{c.field}", f"{c.field} = {values[row]:g} is {inside} the {where} "
                                                     f"(cut at {cut:g}, {k} of {len(rows)})")
    yield from judge(ctx, recs, judged, dropped)


run_threshold.streams = True  # type: ignore[attr-defined]
run_percentile.streams = True  # type: ignore[attr-defined]
# the split the Ray executor runs: the per-record pass per input partition, the decision once
run_percentile.per_record = score_column  # type: ignore[attr-defined]
run_percentile.combine = combine_scores  # type: ignore[attr-defined]
run_percentile.decide = cut_percentile  # type: ignore[attr-defined]


def cut_size(fraction: float, n: int) -> int:
    """How many of `n` records the top/bottom `fraction` holds: ceil, after rounding away float noise."""
    return min(n, math.ceil(round(fraction * n, 9)))
