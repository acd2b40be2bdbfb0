"""mix: one stage's mixture, exactly as the IR says.

Params (from the planner): `stage`, `mix` (the entries), `pools` (pool -> member sources),
`samples`, `balance`, `order`, `seed`, `data_types`, `categories`. The last two are not read: at
run time the records' own `data_type` and `category` count (a `mixed` source has several).

How much: availability is counted from the input records (per entry, per member source) and given
to `recipec.allocate.allocate`, the function the planner uses, so a plan and a run share the rules.
Any problem it reports at run time (an entry asking for more than the data has, shares over the
stage's total) is an `OperationError`, and so is a mixture that realises fewer records than the
stage's `samples`.

Which records:
    all                 every record of the source
    first(N)            the first N in input order (collect order, after the filters)
    random(N), N, share, weight, cap, balanced
                        the N with the smallest rank, rank = hash(seed, record id). The rank does
                        not depend on the stage or on where a record sits, so a selection survives
                        resharding and reordering, and a smaller N takes a subset of a larger one.
    part(k, n)          the records of each member source sorted by hash(seed, entry name, id), cut
                        into n contiguous slices with `allocate.part_size`; the k-th is taken. Every
                        stage cuts the same order the same way, so parts are disjoint and cover the
                        pool by construction.
Ties (equal 64-bit ranks) are broken by record id. The hash: records' ids are sha256 digests
already (32 hex digits), so an id's first and last 8 bytes fold into a uniform 64-bit key, and a
rank is `(key ^ salt) * odd constant` with salt = sha256("seed:...")[:8] (`keyed`). That is the same
function of the id whatever the table, independent across salts (tested), and vectorised: ranking
10M records takes about 0.3 s where sha256 per record in Python takes about 10 s. (An id that is
not 32 bytes long gets its key from blake2b.)

Balancing (`balance { by = data_type }`): each entry's candidates are resolved first (all, its
part, or its N by rank), then grouped by the records' own `data_type` / `category` (a `mixed`
source contributes to several groups) and `allocate` water-fills the groups; within a group the
lowest ranks are taken (input order for `first`).

Order: `shuffle` sorts by hash(seed, stage, id); `sequential` keeps the entries in mix order, each
in input order; `ascending(field)` / `descending(field)` sort by `scores[field]` (records without
it last), then id.

Counts: the step consumes every input record. Those not taken are not bad data: they are counted
in `skipped` (`not_selected` for records of the stage's sources left out, `not_in_stage` for
records of other sources), with no reject rows. `composition.json` (in the chunk's files) holds
the realised composition per entry, source, data type and category.

The op is its per-record pass (`mix_columns`: the columns a selection reads) and its decision
(`decide_mix`: the selection, then the gather of the chosen rows); the Ray executor runs the pass
per range of the input and the decision once, over the columns put together by `combine_columns`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipec import ir, records
from recipec.allocate import Allocation, allocate, part_size
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import CHUNK_ROWS, Rebatcher, Records, add_provenance, sha_key, smallest
from recipec.ops.cuts import scores_of

ID_BYTES = 32  # records.record_id: 32 hex digits
_FOLD = np.uint64(0x9E3779B97F4A7C15)  # odd
_MIX = np.uint64(0xBF58476D1CE4E5B9)  # odd
_THREADS = max(1, min(8, os.cpu_count() or 1))  # for elementwise work only: results never depend on it
_SEP = "\x1f"  # joins source and group in balancing keys (allocate uses \x00 itself)


@dataclass(frozen=True)
class MixSpec:
    stage: str
    entries: tuple[ir.MixEntry, ...]
    pools: dict[str, tuple[str, ...]]
    samples: int | None
    balance: ir.Balance | None
    order: ir.Order
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MixSpec":
        balance = params.get("balance")
        return cls(
            stage=params["stage"], entries=tuple(ir.MixEntry.model_validate(e) for e in params["mix"]),
            pools={k: tuple(v) for k, v in (params.get("pools") or {}).items()}, samples=params.get("samples"),
            balance=ir.Balance.model_validate(balance) if balance else None,
            order=ir.Order.model_validate(params.get("order") or {}), seed=int(params.get("seed", 0)),
        )

    def members(self, entry: ir.MixEntry) -> tuple[str, ...]:
        return self.pools.get(entry.name, (entry.name,))


@dataclass
class Selection:
    positions: np.ndarray  # rows taken, in output order
    by_entry: dict[str, dict[str, int]]  # entry -> source -> rows taken
    allocation: Allocation
    not_selected: int  # rows of the stage's sources left out
    not_in_stage: int  # rows of other sources
    source_runs: "Runs | None" = None  # the source column as runs, reused to gather it


# ---- the operation ------------------------------------------------------------------------------


@dataclass
class MixColumns:
    """mix's per-record pass: the columns a selection reads (id, source, the balancing group) and
    the ordering score per record (NaN: none; None when the order reads no score)."""

    columns: dict[str, pa.ChunkedArray]
    order_values: np.ndarray | None

    @property
    def num_rows(self) -> int:
        return len(self.columns["id"])


def _wanted(spec: MixSpec) -> list[str]:
    return ["id", "source", *([spec.balance.by] if spec.balance is not None and spec.balance.by != "source" else []),
            *(["scores"] if spec.order.kind in ("ascending", "descending") else [])]


def mix_columns(ctx: StepContext, inputs: list[Any]) -> MixColumns:
    """Pass 1: the columns a selection reads (ids, sources, the balancing group, the ordering score)."""
    recs = Records(inputs)
    spec = MixSpec.from_params(ctx.params)
    wanted = _wanted(spec)
    parts: dict[str, list[pa.Array]] = {c: [] for c in wanted}
    order_parts = []
    for batch in recs.batches(wanted):
        for c in wanted:
            if c != "scores":
                parts[c].extend(batch.column(c).chunks)
        if "scores" in wanted:
            order_parts.append(scores_of(batch, spec.order.field))
    columns = {c: pa.chunked_array(v, type=records.SCHEMA.field(c).type) for c, v in parts.items() if c != "scores"}
    order_values = (np.concatenate(order_parts) if order_parts else np.zeros(0)) if "scores" in wanted else None
    return MixColumns(columns, order_values)


def combine_columns(parts: Sequence[MixColumns]) -> MixColumns:
    """The passes over consecutive ranges of the input, as one pass over all of it."""
    if not parts:
        raise ValueError("no pass to combine")
    columns = {name: pa.chunked_array([c for p in parts for c in p.columns[name].chunks], type=column.type)
               for name, column in parts[0].columns.items()}
    values = None if parts[0].order_values is None else np.concatenate([p.order_values for p in parts])
    return MixColumns(columns, values)


def run(ctx: StepContext, inputs: list[Any]) -> Iterator[Chunk]:
    """mix: its per-record pass (`mix_columns`) over all its input, then the selection and the
    gather of the chosen rows (`decide_mix`)."""
    yield from decide_mix(ctx, inputs, mix_columns(ctx, inputs))


def decide_mix(ctx: StepContext, inputs: list[Any], found: MixColumns) -> Iterator[Chunk]:
    """mix's selection over the columns of `mix_columns`, then pass 2 over the inputs: the chosen
    rows gathered in the stage's order."""
    recs = Records(inputs)
    spec = MixSpec.from_params(ctx.params)
    if found.num_rows != recs.num_rows:
        raise RuntimeError(f"mix: a column pass over {found.num_rows} records for {recs.num_rows} inputs")
    columns = dict(found.columns)
    group_column = columns[spec.balance.by] if spec.balance is not None else None
    chosen = select(columns["id"], columns["source"], spec, groups=group_column, order_values=found.order_values)
    del columns, group_column, found
    # Pass 2: the chosen rows in the stage's order, gathered batch by batch.
    out = Rebatcher()
    counts: dict[str, Counter[str]] = {"data_type": Counter(), "category": Counter()}
    first = {"consumed": recs.num_rows,
             "skipped": {"not_selected": chosen.not_selected, "not_in_stage": chosen.not_in_stage}}
    for table in gather(recs, chosen.positions, getattr(ctx, "work_dir", None)):
        table = add_provenance(table, ctx.step_id)
        for name, counter in counts.items():
            vc = pc.value_counts(table.column(name).combine_chunks())
            counter.update({str(v): int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())})
        yield from out.add(table, **first)
        first = {}
    composition = _composition(len(chosen.positions), counts, spec, chosen)
    files = {"composition.json": (json.dumps(composition, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode()}
    ctx.log.info("stage %s: %d records from %s", spec.stage, len(chosen.positions), composition["by_source"])
    yield from out.add(None, files=files, **first)
    yield from out.finish()


run.streams = True  # type: ignore[attr-defined]
# the split the Ray executor runs: the per-record pass per input partition, the decision once
run.per_record = mix_columns  # type: ignore[attr-defined]
run.combine = combine_columns  # type: ignore[attr-defined]
run.decide = decide_mix  # type: ignore[attr-defined]

SPILL_ROWS = 2 * CHUNK_ROWS  # output rows per spill bucket when the stage's order is not input order


def gather(recs: Records, positions: np.ndarray, work_dir: Path | None = None) -> Iterator[pa.Table]:
    """The rows `positions` (row numbers across the inputs) in that order, a bounded piece at a time.

    Rows in input order stream straight through. Otherwise each input batch's chosen rows go to the
    spill bucket of their output position (Arrow IPC files, zstd, in `work_dir`), and each bucket is
    then read back and sorted: two passes over the data, memory of one batch and one bucket.
    """
    n, m = recs.num_rows, len(positions)
    if m == 0:
        return
    out_pos = np.full(n, -1, dtype=np.int64)
    out_pos[positions] = np.arange(m, dtype=np.int64)
    if m == 1 or bool(np.all(np.diff(positions) > 0)):
        start = 0
        for batch in recs.batches():
            here = out_pos[start:start + batch.num_rows] >= 0
            start += batch.num_rows
            if here.any():
                yield batch.filter(pa.array(here)) if not here.all() else batch
        return
    with contextlib.ExitStack() as stack:
        if work_dir is not None:
            spill = Path(work_dir) / "mix-spill"
            shutil.rmtree(spill, ignore_errors=True)
            spill.mkdir(parents=True)
            stack.callback(shutil.rmtree, spill, True)
        else:
            spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recipec-mix-")))
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        schema = records.SCHEMA.append(pa.field("_pos", pa.int64()))
        writers: dict[int, Any] = {}
        start = 0
        for batch in recs.batches():
            pos = out_pos[start:start + batch.num_rows]
            start += batch.num_rows
            local = np.flatnonzero(pos >= 0)
            if not len(local):
                continue
            buckets = pos[local] // SPILL_ROWS
            order = np.argsort(buckets, kind="stable")
            local, buckets = local[order], buckets[order]
            bounds = np.flatnonzero(np.diff(buckets)) + 1
            for piece in np.split(np.arange(len(local)), bounds):
                bucket = int(buckets[piece[0]])
                rows = local[piece]
                part = batch.take(pa.array(rows)).append_column("_pos", pa.array(pos[rows]))
                if bucket not in writers:
                    writers[bucket] = stack.enter_context(
                        pa.ipc.new_stream(str(spill / f"{bucket:06d}.arrow"), schema, options=options))
                writers[bucket].write_table(part)
        for writer in writers.values():
            writer.close()
        del out_pos
        for bucket in range((m + SPILL_ROWS - 1) // SPILL_ROWS):
            with pa.memory_map(str(spill / f"{bucket:06d}.arrow")) as source:
                table = pa.ipc.open_stream(source).read_all()
            order = pc.sort_indices(table.column("_pos"))
            yield table.take(order).drop_columns(["_pos"])
            del table


def _composition(total: int, counts: dict[str, Counter[str]], spec: MixSpec, chosen: Selection) -> dict[str, Any]:
    by_source: dict[str, int] = {}
    for per_source in chosen.by_entry.values():
        for source, n in per_source.items():
            by_source[source] = by_source.get(source, 0) + n
    return {"stage": spec.stage, "samples": spec.samples, "total": int(total), "by_entry": chosen.by_entry,
            "by_source": by_source, "by_data_type": dict(counts["data_type"]), "by_category": dict(counts["category"]),
            "order": spec.order.model_dump(mode="json"), "not_selected": chosen.not_selected,
            "not_in_stage": chosen.not_in_stage}


# ---- selection ----------------------------------------------------------------------------------


def select(ids: pa.ChunkedArray | pa.Array, sources: pa.ChunkedArray | pa.Array, spec: MixSpec, *,
           groups: pa.ChunkedArray | pa.Array | None = None, order_values: np.ndarray | None = None) -> Selection:
    """Which rows the stage takes, and in which order (the core of `run`, on plain columns)."""
    n = len(ids)
    source_runs = runs_of(sources)
    by_source = positions_by_value(sources, source_runs)
    owner: dict[str, str] = {}
    for entry in spec.entries:
        for source in spec.members(entry):
            if source in owner:
                raise OperationError(f"stage `{spec.stage}`: source `{source}` is in both `{owner[source]}` and "
                                     f"`{entry.name}`; a record can be taken once per stage")
            owner[source] = entry.name
    empty = np.zeros(0, dtype=np.int64)
    pos = {s: by_source.get(s, empty) for s in owner}
    ranks = _Ranks(ids, spec.seed)

    if spec.balance is None:
        available = {e.name: {s: len(pos[s]) for s in spec.members(e)} for e in spec.entries}
        allocation = allocate(spec.entries, available, samples=spec.samples)
        _check(allocation, spec)
        taken = {e.name: {s: _take(e, pos[s], m, ranks) for s, m in allocation.by_entry.get(e.name, {}).items()}
                 for e in spec.entries}
    else:
        taken, allocation = _balanced(spec, pos, ranks, groups)

    parts, entry_of, by_entry = [], [], {}
    for index, entry in enumerate(spec.entries):
        by_entry[entry.name] = {}
        for source, rows in taken[entry.name].items():
            by_entry[entry.name][source] = by_entry[entry.name].get(source, 0) + len(rows)
            parts.append(rows)
            entry_of.append(np.full(len(rows), index, dtype=np.int64))
    chosen = np.concatenate(parts) if parts else empty
    entries = np.concatenate(entry_of) if entry_of else empty
    total = len(chosen)
    if spec.samples is not None and total < spec.samples:
        raise OperationError(f"stage `{spec.stage}` needs {spec.samples:,} samples but its mixture finds only "
                             f"{total:,} ({_describe(by_entry)}); lower `samples` or add data")

    in_stage = sum(len(p) for p in pos.values())
    return Selection(positions=_order(chosen, entries, spec, ranks, order_values), by_entry=by_entry,
                     allocation=allocation, not_selected=in_stage - total, not_in_stage=n - in_stage,
                     source_runs=source_runs)


def _check(allocation: Allocation, spec: MixSpec) -> None:
    if allocation.problems:
        lines = [p.message + (f" ({p.hint})" if p.hint else "") for p in allocation.problems]
        raise OperationError(f"stage `{spec.stage}`: " + "; ".join(lines))


def _describe(by_entry: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{e}: {sum(v.values()):,}" for e, v in by_entry.items()) or "nothing"


def _take(entry: ir.MixEntry, rows: np.ndarray, m: int, ranks: "_Ranks") -> np.ndarray:
    """`m` rows of one source for one entry, in input order."""
    if entry.kind == "part":  # allocate gives a part its whole slice
        return _part(entry, rows, ranks)
    if m >= len(rows):
        return rows
    if entry.kind == "first":
        return rows[:m]
    return rows[smallest(ranks.seeded(rows), m, ranks.ids_at(rows))]


def _part(entry: ir.MixEntry, rows: np.ndarray, ranks: "_Ranks") -> np.ndarray:
    """The k-th of n contiguous slices of `rows` sorted by hash(seed, entry, id), in input order."""
    k, n = entry.part or (1, 1)
    start = sum(part_size(len(rows), j, n) for j in range(1, k))
    stop = start + part_size(len(rows), k, n)
    key = ranks.salted(rows, "part", entry.name)
    ids = ranks.ids_at(rows)
    inside = smallest(key, stop, ids) & ~smallest(key, start, ids)
    return rows[inside]


def _balanced(spec: MixSpec, pos: dict[str, np.ndarray], ranks: "_Ranks",
              groups: pa.ChunkedArray | pa.Array | None) -> tuple[dict[str, dict[str, np.ndarray]], Allocation]:
    """Resolve each entry's candidates, split them by group, water-fill with `allocate`, take by rank."""
    assert spec.balance is not None
    if groups is None:
        raise OperationError(f"stage `{spec.stage}` balances by `{spec.balance.by}` but the records have no such column")
    group_codes, group_names = codes(groups)
    candidates: dict[tuple[str, str], np.ndarray] = {}  # (entry, source\0group) -> rows
    key_group: dict[str, str] = {}
    for entry in spec.entries:
        members = spec.members(entry)
        if entry.kind == "part":
            resolved = {s: _part(entry, pos[s], ranks) for s in members}
        elif entry.kind in ("count", "first", "random", "cap"):
            alone = allocate((entry,), {entry.name: {s: len(pos[s]) for s in members}}, samples=None)
            _check(alone, spec)
            resolved = {s: _take(entry, pos[s], m, ranks) for s, m in alone.by_entry.get(entry.name, {}).items()}
        else:  # all, share, weight: balancing decides how many
            resolved = {s: pos[s] for s in members}
        for source, rows in resolved.items():
            codes_here = group_codes[rows]
            for code in np.unique(codes_here).tolist():
                group = group_names[code] if spec.balance.by != "source" else source
                key = f"{source}{_SEP}{group}"
                candidates[(entry.name, key)] = rows[codes_here == code]
                key_group[key] = group
    available: dict[str, dict[str, int]] = {e.name: {} for e in spec.entries}
    for (entry_name, key), rows in candidates.items():
        available[entry_name][key] = len(rows)
    flat = tuple(ir.MixEntry(name=e.name, kind="all") for e in spec.entries)
    allocation = allocate(flat, available, samples=spec.samples, balance=spec.balance, groups=key_group)
    _check(allocation, spec)
    kinds = {e.name: e for e in spec.entries}
    taken: dict[str, dict[str, np.ndarray]] = {e.name: {} for e in spec.entries}
    for entry_name, per_key in allocation.by_entry.items():
        for key, m in per_key.items():
            rows = candidates[(entry_name, key)]
            if kinds[entry_name].kind == "first":
                chosen = rows[:m]
            else:
                chosen = rows[smallest(ranks.seeded(rows), m, ranks.ids_at(rows))] if m < len(rows) else rows
            source = key.split(_SEP, 1)[0]
            previous = taken[entry_name].get(source)
            taken[entry_name][source] = chosen if previous is None else np.sort(np.concatenate([previous, chosen]))
    return taken, allocation


def _order(chosen: np.ndarray, entries: np.ndarray, spec: MixSpec, ranks: "_Ranks",
           order_values: np.ndarray | None) -> np.ndarray:
    """The rows `chosen` in the stage's order."""
    m = len(chosen)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    kind = spec.order.kind
    if kind == "shuffle":
        salt = sha_key(spec.seed, "order", spec.stage)

        def full(rows: np.ndarray) -> list[tuple[int, str]]:
            return list(zip(keyed(ranks.keys[rows], salt).tolist(), ranks.ids_at(rows).values.to_pylist()))

        return sort_by_keys(keyed(_at(ranks.keys, chosen), salt), chosen, full)
    if kind == "sequential":  # entries in mix order, then input order
        bits = max(1, int(chosen.max()).bit_length())
        packed = (entries.astype(np.int64) << bits) | chosen
        packed.sort()
        return packed & ((1 << bits) - 1)
    values = order_values[chosen] if order_values is not None else np.full(m, np.nan)
    missing = np.isnan(values)
    values = np.where(missing, 0.0, values if kind == "ascending" else -values)
    id_rank = np.empty(m, dtype=np.int64)
    id_rank[pc.sort_indices(ranks.ids_at(chosen).values).to_numpy()] = np.arange(m)
    return chosen[np.lexsort((id_rank, values, missing))]


# ---- ranks --------------------------------------------------------------------------------------


class _Ranks:
    """Per-record 64-bit ranks from the ids, computed once per table and salted on demand."""

    def __init__(self, ids: pa.ChunkedArray | pa.Array, seed: int):
        self.ids = ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([ids])
        self.seed = seed
        self._keys: np.ndarray | None = None
        self._seeded: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = id_keys(self.ids)
        return self._keys

    def seeded(self, rows: np.ndarray) -> np.ndarray:
        """hash(seed, id): the stage-independent rank used by every drawn selection."""
        if self._seeded is None:
            self._seeded = keyed(self.keys, sha_key(self.seed))
        return _at(self._seeded, rows)

    def salted(self, rows: np.ndarray, *salt: str) -> np.ndarray:
        return keyed(_at(self.keys, rows), sha_key(self.seed, *salt))

    def ids_at(self, rows: np.ndarray) -> "_IdsAt":
        return _IdsAt(self.ids, rows)


def _at(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], as a view when the rows are one contiguous run (a source in collect order)."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
        return values[int(rows[0]):int(rows[-1]) + 1]
    return np.take(values, rows)


class _IdsAt:
    """The ids of some rows, fetched only when a tie needs them."""

    def __init__(self, ids: pa.ChunkedArray, rows: np.ndarray):
        self._ids = ids
        self._rows = rows

    def __getitem__(self, i: int) -> str:
        return self._ids[int(self._rows[i])].as_py()

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, indices: pa.Array) -> pa.Array:
        rows = self._rows[np.asarray(indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
        return self._ids.take(pa.array(rows, pa.int64())).combine_chunks()

    @property
    def values(self) -> pa.Array:
        return self.take(pa.array(np.arange(len(self._rows)), pa.int64()))


def id_keys(ids: pa.ChunkedArray | pa.Array | Sequence[str]) -> np.ndarray:
    """A 64-bit key per id: from its first and last 8 bytes when it is 32 bytes long (a record id:
    64 of its hash bits), else from blake2b of the id. The same id always gets the same key."""
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(list(ids), pa.string())
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    parts = [_chunk_keys(c) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _chunk_keys(chunk: pa.Array) -> np.ndarray:
    n = len(chunk)
    if pa.types.is_string(chunk.type) and chunk.null_count == 0:
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=chunk.offset + n + 1)[chunk.offset:]
        start, stop = int(offsets[0]), int(offsets[-1])
        if stop - start == ID_BYTES * n and bool(np.all(np.diff(offsets) == ID_BYTES)):
            data = np.frombuffer(data_buffer, dtype=np.uint8, count=stop)[start:]
            return _fold(data.view(np.uint64).reshape(n, ID_BYTES // 8))
    values = chunk.to_pylist()
    out = np.empty(n, dtype=np.uint64)
    fixed = [i for i, v in enumerate(values) if v is not None and len(v.encode("utf-8")) == ID_BYTES]
    if fixed:
        raw = b"".join(values[i].encode("utf-8") for i in fixed)
        out[fixed] = _fold(np.frombuffer(raw, dtype=np.uint8).view(np.uint64).reshape(len(fixed), ID_BYTES // 8))
    for i, v in enumerate(values):
        if v is None or len(v.encode("utf-8")) != ID_BYTES:
            digest = hashlib.blake2b((v or "").encode("utf-8"), digest_size=8).digest()
            out[i] = np.uint64(int.from_bytes(digest, "little"))
    return out


def _fold(words: np.ndarray) -> np.ndarray:
    """(n, 4) little-endian words -> n keys: w0 ^ w3 * c (wrapping)."""
    out = np.multiply(words[:, 3], _FOLD)
    np.bitwise_xor(out, words[:, 0], out=out)
    return out


def keyed(keys: np.ndarray, key: int) -> np.ndarray:
    """A salted rank: (keys ^ key) * an odd constant, wrapping (Knuth's multiplicative hashing).

    The keys come from sha256 ids, so they are uniform already; xor with a salt and one multiply
    (which carries every bit of the input into the top bits) give rankings that are independent
    across salts (checked: two salts' top 1%, 10% and 50% overlap as much as chance gives), at two
    vector operations per record, threaded over slices.
    """
    out = np.empty_like(keys)

    def span(a: int, b: int) -> None:
        np.bitwise_xor(keys[a:b], np.uint64(key), out=out[a:b])
        np.multiply(out[a:b], _MIX, out=out[a:b])

    _threaded(span, len(keys))
    return out


def _threaded(fn: Any, n: int, *, min_rows: int = 1 << 21) -> None:
    """Call fn(a, b) over contiguous spans of range(n) in threads (numpy releases the GIL)."""
    spans = _spans(n, min_rows)
    if len(spans) == 1:
        fn(*spans[0])
        return
    with ThreadPoolExecutor(len(spans)) as pool:
        list(pool.map(lambda ab: fn(*ab), spans))


def sort_by_keys(keys: np.ndarray, payload: np.ndarray, tie_keys: Any) -> np.ndarray:
    """`payload` (non-negative ints) sorted by `keys` (uint64), exactly, whatever the input order.

    One packed sort (a key's top bits above the payload's bits) instead of an argsort, which is
    several times slower; runs that tie on the top bits are then sorted by `tie_keys(payload_run)`
    (the full key, then the id).
    """
    m = len(keys)
    bits = max(1, int(payload.max()).bit_length()) if m else 1
    if bits > 40:
        return payload[np.argsort(keys, kind="stable")]
    low = np.uint64((1 << bits) - 1)
    packed = np.right_shift(keys, np.uint64(bits))
    np.left_shift(packed, np.uint64(bits), out=packed)
    np.bitwise_or(packed, payload.astype(np.uint64), out=packed)
    packed.sort()
    high = np.right_shift(packed, np.uint64(bits))
    result = np.bitwise_and(packed, low).astype(np.int64)
    tied = np.flatnonzero(high[1:] == high[:-1])
    if len(tied):
        starts = tied[np.concatenate([[True], np.diff(tied) > 1])]
        for start in starts.tolist():
            stop = start + 1
            while stop < m and high[stop] == high[start]:
                stop += 1
            run = result[start:stop]
            order = sorted(range(len(run)), key=tie_keys(run).__getitem__)
            result[start:stop] = run[order]
    return result


# ---- grouping and gathering ---------------------------------------------------------------------


@dataclass
class Runs:
    """A column as runs of equal values: data comes source by source, so runs are few."""

    codes: np.ndarray  # per row, a small integer
    names: list[str]  # the value of each code, first-seen order
    starts: np.ndarray  # run boundaries (one more than runs), when runs are few; else None
    run_codes: np.ndarray | None


def runs_of(column: pa.ChunkedArray | pa.Array) -> Runs:
    """Codes per row from run-end encoding (threaded over slices); a dictionary when runs are many."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    pieces = [chunk.slice(a, b - a) for chunk in chunks if len(chunk) for a, b in _spans(len(chunk))]
    n = sum(len(p) for p in pieces)
    if len(pieces) > 1:
        with ThreadPoolExecutor(min(_THREADS, len(pieces))) as pool:
            encoded = list(pool.map(pc.run_end_encode, pieces))
    else:
        encoded = [pc.run_end_encode(p) for p in pieces]
    names: dict[str, int] = {}
    ends, values, offset = [], [], 0
    for part, piece in zip(encoded, pieces):
        ends.append(part.run_ends.to_numpy().astype(np.int64) + offset)
        values.extend(part.values.to_pylist())
        offset += len(piece)
    if len(values) > max(64, n // 16):  # interleaved: a dictionary is cheaper than runs
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        dictionary = pc.dictionary_encode(array)
        values = dictionary.dictionary.to_pylist()
        remap = np.array([names.setdefault(str(v), len(names)) for v in values], dtype=np.int32)
        codes_ = remap[dictionary.indices.to_numpy(zero_copy_only=False)]
        return Runs(codes_, list(names), None, None)
    run_codes = np.array([names.setdefault(str(v), len(names)) for v in values], dtype=np.int32)
    bounds = np.concatenate([[0], *ends]) if ends else np.zeros(1, np.int64)
    small = run_codes.astype(np.int8) if len(names) < 128 else run_codes  # a smaller array to gather from
    codes_ = np.repeat(small, np.diff(bounds)) if n else np.zeros(0, np.int32)
    return Runs(codes_, list(names), bounds, run_codes)


def _spans(n: int, min_rows: int = 1 << 20) -> list[tuple[int, int]]:
    threads = min(_THREADS, max(1, n // min_rows))
    bounds = np.linspace(0, n, threads + 1).astype(int).tolist()
    return list(zip(bounds[:-1], bounds[1:])) or [(0, 0)]


def codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Small-integer codes per row and the value of each code (first-seen order)."""
    runs = runs_of(column)
    return runs.codes, runs.names


def positions_by_value(column: pa.ChunkedArray | pa.Array, runs: Runs | None = None) -> dict[str, np.ndarray]:
    """Rows holding each value, in input order."""
    runs = runs or runs_of(column)
    if not runs.names:
        return {}
    if runs.starts is not None:
        pieces: dict[int, list[np.ndarray]] = {}
        for code, a, b in zip(runs.run_codes.tolist(), runs.starts[:-1].tolist(), runs.starts[1:].tolist()):
            pieces.setdefault(code, []).append(np.arange(a, b, dtype=np.int64))
        return {runs.names[c]: np.concatenate(p) for c, p in pieces.items()}
    order = np.argsort(runs.codes, kind="stable")
    bounds = np.searchsorted(runs.codes[order], np.arange(len(runs.names) + 1))
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(runs.names)}


def take_rows(table: pa.Table, rows: np.ndarray, known: dict[str, Runs | None] | None = None) -> pa.Table:
    """`table.take(rows)`, faster for the columns a mix reads: fixed-width strings (ids) are gathered
    as machine words, columns given as few runs (`known`: source, data_type) as codes, the rest by
    Arrow; the columns in threads (both numpy and Arrow release the GIL)."""
    known = {k: v for k, v in (known or {}).items() if v is not None and v.starts is not None}
    index = pa.array(rows, pa.int64())

    def gather(name: str) -> pa.Array | pa.ChunkedArray:
        column = table.column(name)
        if name in known:
            runs = known[name]
            codes_ = pa.array(np.take(runs.codes, rows))
            dictionary = pa.DictionaryArray.from_arrays(codes_, pa.array(runs.names, pa.string()))
            return dictionary.cast(column.type)
        fixed = _fixed_width_take(column, rows)
        return fixed if fixed is not None else column.take(index)

    with ThreadPoolExecutor(min(_THREADS, max(1, table.num_columns))) as pool:
        columns = list(pool.map(gather, table.column_names))
    return pa.table(columns, schema=table.schema)


def _fixed_width_take(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array | None:
    if not pa.types.is_string(column.type) or column.null_count:
        return None
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    n = len(chunk)
    _, offsets_buffer, data_buffer = chunk.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32, count=chunk.offset + n + 1)[chunk.offset:]
    if n == 0 or int(offsets[-1] - offsets[0]) != ID_BYTES * n or not bool(np.all(np.diff(offsets) == ID_BYTES)):
        return None
    words = np.frombuffer(data_buffer, dtype=np.uint8, count=int(offsets[-1]))[int(offsets[0]):]
    gathered = np.take(words.view(np.uint64).reshape(n, ID_BYTES // 8), rows, axis=0)
    new_offsets = np.arange(len(rows) + 1, dtype=np.int32) * ID_BYTES
    return pa.Array.from_buffers(pa.string(), len(rows), [None, pa.py_buffer(new_offsets), pa.py_buffer(gathered)])
