"""collect: the datasets of a recipe, concatenated in plan order; and the table plumbing of data ops.

`run` concatenates its inputs in the order the plan lists them (ingested sources, then synthesized
sets), so "first in collect order" means: earlier source first, then earlier record. Nothing is
dropped.

The helpers below are shared by the data operations (dedup, clean, cuts, mix, export): one input
table, a mask of the records an op judges (`on`), rejects built from rows, provenance stamped on
the records an op touched, output cut into chunks of a fixed size (never dependent on workers).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipec import records
from recipec.ops.base import Chunk, Reject, StepContext

CHUNK_ROWS = 65_536  # records per output shard


def run(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    out = Rebatcher()
    for batch in Records(inputs).batches():
        yield from out.add(batch, consumed=batch.num_rows)
    yield from out.finish()


run.streams = True  # type: ignore[attr-defined]


# ---- streaming ----------------------------------------------------------------------------------


class Records:
    """The records of an op's inputs, in order, read a batch at a time.

    An input is a `pa.Table` or anything with `num_rows` and `batches(columns)` (the executor's
    `store.StoredTable`), so the streaming ops run the same on tables in tests and on stored steps
    that do not fit in memory. Batches are conformed to `records.SCHEMA` (for the columns asked).
    """

    def __init__(self, inputs: Sequence[Any]):
        self.inputs = list(inputs)
        self.num_rows = sum(int(t.num_rows) for t in self.inputs)

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        for part in self.inputs:
            if isinstance(part, pa.Table):
                pieces = (part.slice(a, CHUNK_ROWS) for a in range(0, part.num_rows, CHUNK_ROWS))
                selected = (p.select([c for c in columns if c in p.column_names]) if columns is not None else p
                            for p in pieces)
            else:
                selected = part.batches(columns)
            for batch in selected:
                if batch.num_rows:
                    yield conform(batch, columns)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every record (compact columns only: ids, sources, a score)."""
        chunks = [c for b in self.batches([name]) for c in b.column(name).chunks]
        return pa.chunked_array(chunks, type=records.SCHEMA.field(name).type)

    def table(self) -> pa.Table:
        return concat([t if isinstance(t, pa.Table) else t.read() for t in self.inputs])


class RowIds:
    """The ids of some rows of `Records`, read from the id column only when asked (ties at a cut)."""

    def __init__(self, recs: Records, rows: np.ndarray):
        self.recs = recs
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: pa.Array) -> pa.Array:
        wanted = self.rows[np.asarray(indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
        order = np.argsort(wanted, kind="stable")
        found = ids_at(self.recs, wanted[order])
        values = [None] * len(wanted)
        for i, row in zip(order.tolist(), wanted[order].tolist()):
            values[i] = found[row]
        return pa.array(values, pa.string())


def ids_at(recs: Records, rows: np.ndarray) -> dict[int, str]:
    """The ids of some rows (sorted, numbered across the inputs), reading only the id column."""
    found: dict[int, str] = {}
    start = 0
    for batch in recs.batches(["id"]):
        m = batch.num_rows
        lo, hi = np.searchsorted(rows, [start, start + m])
        if hi > lo:
            local = rows[lo:hi] - start
            for row, value in zip(rows[lo:hi].tolist(), batch.column("id").take(pa.array(local)).to_pylist()):
                found[row] = value
        start += m
    return found


class Rebatcher:
    """Cuts a stream of record tables into output chunks of exactly CHUNK_ROWS rows (the last one
    shorter), so a step's shards depend only on its output records, never on how they were read.
    Counts, rejects, skips and files ride on the chunk that is emitted next."""

    def __init__(self, rows: int = CHUNK_ROWS):
        self.rows = rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.consumed = 0
        self.rejects: list[Reject] = []
        self.skipped: dict[str, int] = {}
        self.files: dict[str, bytes] = {}
        self.emitted = False

    def add(self, table: pa.Table | None, *, consumed: int = 0, rejects: Sequence[Reject] = (),
            skipped: dict[str, int] | None = None, files: dict[str, bytes] | None = None) -> Iterator[Chunk]:
        self.consumed += consumed
        self.rejects.extend(rejects)
        for k, v in (skipped or {}).items():
            if v:
                self.skipped[k] = self.skipped.get(k, 0) + v
        self.files.update(files or {})
        if table is not None and table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows:
            whole = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
            yield self._chunk(whole.slice(0, self.rows))
            rest = whole.slice(self.rows)
            self.pending = [rest] if rest.num_rows else []
            self.pending_rows = rest.num_rows

    def finish(self) -> Iterator[Chunk]:
        if self.pending_rows or not self.emitted or self.consumed or self.rejects or self.skipped or self.files:
            whole = (pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]) if self.pending \
                else records.empty_table()
            self.pending, self.pending_rows = [], 0
            yield self._chunk(whole)

    def _chunk(self, table: pa.Table) -> Chunk:
        chunk = Chunk(records=table.combine_chunks(), rejects=self.rejects, consumed=self.consumed,
                      skipped=self.skipped, files=self.files)
        self.rejects, self.consumed, self.skipped, self.files = [], 0, {}, {}
        self.emitted = True
        return chunk


# ---- tables -------------------------------------------------------------------------------------


def concat(inputs: Sequence[pa.Table]) -> pa.Table:
    """The inputs as one table in `records.SCHEMA` (column order and types normalised)."""
    tables = [conform(t) for t in inputs]
    if not tables:
        return records.empty_table()
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def conform(table: pa.Table, columns: Sequence[str] | None = None) -> pa.Table:
    """`table` in `records.SCHEMA` (or in its `columns`, in that order), older tables filled in."""
    schema = records.SCHEMA if columns is None else pa.schema([records.SCHEMA.field(c) for c in columns])
    if table.schema.equals(schema):
        return table
    for name in records.NULLABLE_ADDED:
        if name in schema.names and name not in table.column_names:
            table = table.append_column(records.SCHEMA.field(name), pa.nulls(table.num_rows, records.SCHEMA.field(name).type))
    return table.select(schema.names).cast(schema)


def emit(table: pa.Table | None, *, consumed: int, rejects: Sequence[Reject] = (),
         skipped: dict[str, int] | None = None, files: dict[str, bytes] | None = None) -> Iterator[Chunk]:
    """Yield `table` as chunks of CHUNK_ROWS records; the counts, rejects and files ride on the first."""
    total = table.num_rows if table is not None else 0
    starts = range(0, total, CHUNK_ROWS) if total else [0]
    for i, start in enumerate(starts):
        part = table.slice(start, CHUNK_ROWS) if table is not None else records.empty_table()
        first = i == 0
        yield Chunk(records=part, rejects=list(rejects) if first else [], consumed=consumed if first else 0,
                    skipped={k: v for k, v in (skipped or {}).items() if v} if first else {},
                    files=dict(files or {}) if first else {})


def source_mask(table: pa.Table, on: Iterable[str] | None) -> np.ndarray:
    """Which records an op judges: those whose source is in `on` (all of them when `on` is None)."""
    if on is None:
        return np.ones(table.num_rows, dtype=bool)
    value_set = pa.array(sorted(set(on)), pa.string())
    return _bools(pc.is_in(table.column("source"), value_set=value_set))


def _bools(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def add_provenance(table: pa.Table, step_id: str, mask: np.ndarray | None = None) -> pa.Table:
    """Append `step_id` to the provenance of the records in `mask` (all when None), vectorised."""
    n = table.num_rows
    if n == 0:
        return table
    touched = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not touched.any():
        return table
    column = table.column("provenance").combine_chunks()
    column = pc.fill_null(column, pa.scalar([], pa.list_(pa.string()))) if column.null_count else column
    old_offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(old_offsets[0], old_offsets[-1] - old_offsets[0])
    old_offsets -= old_offsets[0]
    lengths = np.diff(old_offsets)
    added = touched.astype(np.int64)
    new_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths + added, out=new_offsets[1:])
    # Old value j of row i moves to j + (records touched before row i); the new one goes at the end.
    shift = np.concatenate([[0], np.cumsum(added)[:-1]])
    take = np.full(int(new_offsets[-1]), len(values), dtype=np.int64)
    rows = np.repeat(np.arange(n), lengths)
    take[np.arange(len(values)) + shift[rows]] = np.arange(len(values))
    pool = pa.concat_arrays([values, pa.array([step_id], pa.string())])
    new = pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), pool.take(pa.array(take)))
    return table.set_column(table.schema.get_field_index("provenance"), "provenance", new)


# ---- rejects ------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def row_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A record row from `to_pylist` in plain JSON types (the scores map becomes an object)."""
    out = dict(row)
    if isinstance(out.get("scores"), list):
        out["scores"] = {k: v for k, v in out["scores"]}
    return out


def rejects_for(table: pa.Table, dropped: dict[int, tuple[str, str]]) -> list[Reject]:
    """Rejects for the rows `dropped` (row -> (reason, detail)), in row order, each carrying its record."""
    if not dropped:
        return []
    rows = sorted(dropped)
    taken = table.take(pa.array(rows, pa.int64())).to_pylist()
    result = []
    for row, data in zip(rows, taken):
        reason, detail = dropped[row]
        result.append(Reject(reason=reason, detail=detail, id=data["id"] or "", source=data["source"] or "",
                             origin=data["origin"] or "", record=canonical_json(row_dict(data))))
    return result


def judge(ctx: StepContext, table: "pa.Table | Records", judged: np.ndarray,
          dropped: dict[int, tuple[str, str]]) -> Iterator[Chunk]:
    """Keep every row not in `dropped`; stamp the judged survivors with this step; reject the others.

    `table` is a table or the op's `Records`, read again batch by batch: rows are numbered across
    the whole input, and only one batch is in memory at a time.
    """
    recs = table if isinstance(table, Records) else Records([table])
    out = Rebatcher()
    rows = np.fromiter(sorted(dropped), dtype=np.int64, count=len(dropped))
    start = 0
    for batch in recs.batches():
        n = batch.num_rows
        lo, hi = np.searchsorted(rows, [start, start + n])
        local = {int(r) - start: dropped[int(r)] for r in rows[lo:hi]}
        keep = np.ones(n, dtype=bool)
        if local:
            keep[rows[lo:hi] - start] = False
        kept = add_provenance(batch, ctx.step_id, judged[start:start + n] & keep)
        kept = kept.filter(pa.array(keep)) if local else kept
        yield from out.add(kept, consumed=n, rejects=rejects_for(batch, local))
        start += n
    yield from out.finish()


# ---- ranking ------------------------------------------------------------------------------------


def smallest(values: np.ndarray, m: int, ids: Any) -> np.ndarray:
    """Mask of the `m` smallest `values`, ties broken by id (ascending): exact and order-independent.

    `ids` (a sequence, or anything with `take(indices) -> pa.Array`) is read only for the values
    tied at the cut.
    """
    n = len(values)
    if m <= 0:
        return np.zeros(n, dtype=bool)
    if m >= n:
        return np.ones(n, dtype=bool)
    cut = np.partition(values, m - 1)[m - 1]
    mask = values < cut
    need = m - int(np.count_nonzero(mask))
    tied = np.flatnonzero(values == cut)
    if len(tied) > need:
        tied = tied[id_order(ids, tied)[:need]]
    mask[tied] = True
    return mask


def id_order(ids: Any, indices: np.ndarray) -> np.ndarray:
    """The permutation sorting `ids[indices]` ascending (vectorised with Arrow when it can be)."""
    if hasattr(ids, "take"):
        chosen = ids.take(pa.array(indices, pa.int64()))
        chosen = chosen.combine_chunks() if isinstance(chosen, pa.ChunkedArray) else chosen
        return pc.sort_indices(chosen).to_numpy()
    keys = [ids[int(i)] for i in indices]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def sha_key(*parts: object) -> int:
    """A 64-bit key from text parts (for seeding ranks), stable across runs and platforms."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
