"""ingest: read one source into unified records (`recipec.records.SCHEMA`), validating everything.

Params: `{"source": <ir.Source dump>}`. `source.paths` are globs relative to the recipe directory
(`ctx.recipe_dir`); the matched files are read in sorted order. Image paths in the data are relative
to the source's `images` folder (also relative to the recipe directory) and are stored that way.

Formats
    llava_json    a JSON array of LLaVA records (a file that does not start with `[` is read as
                  JSON Lines); line numbers are tracked through the array
    llava_jsonl   one LLaVA record per line; blank lines are not records (skipped, not counted)
    parquet       one record per row
    hf_dataset    a folder written by `datasets.save_to_disk` (a Dataset, or a DatasetDict whose
                  splits are read in the order its `dataset_dict.json` lists them)
    image_folder  one record per image file, without conversation (seeds for tagging and
                  synthesis); a path that names a folder takes every image under it

A LLaVA record has `image` (a path, or a list of paths) or `images` (a list), and `conversations`
(turns `{"from": "human"|"gpt", "value": str}`). Optional: `id` (the dataset's own id, a string or an
integer: kept as `source_id` and in `origin`; recipec's `id` is `records.record_id`), `data_type` (used when it is a known type; required when the
source's type is `mixed`), `image_tags` / `instruction_tags` (lists of strings), `scores` (an object
of numbers), and any other top-level number (`loss`, `score`, ...), which goes to `scores`.
`source.columns` renames: unified name -> the source's column. A `text` column (used only when there
is no `conversations`) becomes one answer after a human turn made of the `<image>` tokens.
Per-record `category` is read only when `columns` maps it; otherwise it is the source's.

Origins: `<file>:<line>` (1-based) for JSON and JSON Lines, `<file>#<row>` (0-based) for Parquet
and HF datasets, `<file>` for image folders; `<file>` is relative to the recipe directory, and
` id=<id>` follows when the input has its own id.

Reject reasons (stable codes). Checks run in this order; a record gets the first that fails:
    json_malformed                 the line (or array element) is not JSON; NaN/Infinity count
    utf8_invalid                   the bytes are not UTF-8, or a string holds a lone surrogate
    record_invalid                 not an object, or fields of the wrong type (`image` not a path,
                                   a turn without `from`/`value` strings, an image given as
                                   embedded bytes, a `mixed` source's record without `data_type`)
    conversation_empty             no turns
    conversation_not_alternating   must start with `human`, alternate human/gpt, end with `gpt`
    image_token_mismatch           the `<image>` tokens in human turns are not one per image, or an
                                   answer holds `<image>`. Strict on purpose: LLaVA would silently
                                   prepend a token for a single image without one; we reject so the
                                   data says what it means.
    image_missing, image_unreadable, image_corrupt, image_truncated, image_too_large (pixels over
    `source.max_pixels`: decompression bombs), image_path_escapes_root, image_path_invalid
                                   from `recipec.ops.images` (a source without `images` has no root:
                                   its image paths are `image_path_invalid`)
    duplicate_id                   the data set's own id is the id of an earlier record of the
                                   source (a real id clash, whatever the content; the first is kept)

Records with the same content are not rejected here: finding duplicates is the business of the
recipe's `dedup` steps (`exact_duplicate`, `near_duplicate`), and a recipe without one keeps them.
Their recipec ids stay unique: the second copy of a content in a source gets `record_id(..., copy=1)`,
the third `copy=2`, in input order.

Work is cut into blocks (BLOCK_BYTES of whole lines of a JSON Lines file, BLOCK items of the other
formats) and reassembled in order, so the output never depends on the number of workers. Parsing
(pyarrow or orjson for JSON Lines), validation, the content id of a record without images and the
16-byte keys of its ids run per block in `ctx.workers` processes; numbering copies and spotting
reused ids, which depend on the records before, run in input order in the step's process, on those
keys, a block at a time.
Image inspection (a full decode of every image, the slow part when there are images) runs in
`ctx.workers` processes too, once per distinct image of recent blocks.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import gc
import glob
import hashlib
import itertools
import json
import math
import os
import posixpath
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from recipec import ir, records
from recipec.ops import images as imaging
from recipec.ops import ingest_columnar
from recipec.ops.ingest_columnar import KEY, LINE, OWN, ROW_SCHEMA, own_key
from recipec.ops.base import Chunk, OperationError, Reject, StepContext
from recipec.ops.collect import Rebatcher, canonical_json

REASONS = frozenset({
    "json_malformed", "utf8_invalid", "record_invalid", "conversation_empty", "conversation_not_alternating",
    "image_token_mismatch", "duplicate_id", *imaging.REASONS,
})

AHEAD = 6  # blocks in flight per preparing process: enough that none waits while the step's own process is busy
BLOCK = 2048  # items per block of the formats read item by item: the unit of the workers' batches
BLOCK_BYTES = 1 << 20  # of whole lines per block of a JSON Lines file (one line may make a larger one)
PIECE = 64  # images per task sent to a worker
INLINE_IMAGES = 256  # images of a source inspected in the step's process before the pool starts
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_CACHE_SIZE = 65_536  # inspected images remembered across blocks (records often share an image)
_KNOWN_FIELDS = {"id", "image", "images", "conversations", "data_type", "category", "image_tags",
                 "instruction_tags", "scores", "text"}


class _Bad(Exception):
    """A record-level problem found while reading a record."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Raw:
    """One input item before validation: where it is, its text as read, and the parsed value."""

    origin: str
    text: str
    value: Any = None
    problem: _Bad | None = None  # set when the item could not even be parsed
    utf8: bool = False  # its strings are known to be valid UTF-8 (orjson refuses lone surrogates)


@dataclass
class _Candidate:
    """A structurally valid record whose images still need inspecting."""

    origin: str
    text: str
    image_paths: list[str]
    conversations: list[dict[str, str]]
    data_type: str
    category: str
    image_tags: list[str] = field(default_factory=list)
    instruction_tags: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    source_id: str | None = None  # the data set's own id


# ---- the operation ------------------------------------------------------------------------------


def run(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    source = ir.Source.model_validate(ctx.params["source"])
    recipe_dir = Path(ctx.recipe_dir)
    folder = image_root(source)
    root = _resolve(recipe_dir, folder) if folder else None
    with _Inspector(root, source.max_pixels, ctx.workers) as inspector, \
            _Preparer(source, ctx.step_id, ctx.workers) as preparer:
        assembler = _Assembler(source, ctx.step_id)
        out = Rebatcher()
        pending: collections.deque[tuple[_Prepared, _Results]] = collections.deque()
        for prepared in preparer.prepare(_blocks_of(source, recipe_dir)):
            paths = [p for candidate in prepared.candidates for p in candidate.image_paths]
            pending.append((prepared, inspector.submit(paths)))
            if len(pending) > 1:  # one block's images in flight while the next is prepared
                prepared, results = pending.popleft()
                yield from _rechunk(out, assembler.chunk(prepared, results()))
        while pending:
            prepared, results = pending.popleft()
            yield from _rechunk(out, assembler.chunk(prepared, results()))
        yield from out.finish()


run.streams = True  # type: ignore[attr-defined]


def _rechunk(out: Rebatcher, chunk: Chunk) -> Iterator[Chunk]:
    """Blocks gathered into output chunks of CHUNK_ROWS records (fewer, larger shards)."""
    return out.add(chunk.records, consumed=chunk.consumed, rejects=chunk.rejects)


# ---- preparing blocks ---------------------------------------------------------------------------
#
# Everything a record needs that does not depend on the records before it (parsing, validation,
# the content id of a record without images, the Arrow row) is done per block, in `ctx.workers`
# processes when there are several. What does depend on them (numbering copies, spotting a reused
# id) and the images' results are then applied in input order by `_Assembler`, so the output is
# the same for any number of workers.

_ROW, _CANDIDATE, _REJECT = 0, 1, 2


@dataclass
class _Prepared:
    """One block of input items, prepared: each item is a row, a candidate or a reject (`kinds`)."""

    kinds: bytes
    rows: pa.Table  # the items with no images, in ROW_SCHEMA; `id` is their content id (copy 0)
    texts: list[str] | None  # per row, the item's text (for a duplicate_id reject); None: see `lines`
    candidates: list[_Candidate]  # the items with images, which are inspected before they become rows
    rejects: list[Reject]
    lines: "_Lines | None" = None  # the block of lines the rows came from (set in the step's process)
    _split: list[bytes] | None = None  # those lines, split when a first text is asked for

    def __getstate__(self) -> dict[str, Any]:
        # the rows cross to the step's process as one Arrow IPC stream: written in a few copies and
        # read back with none, where pickling a table costs several times more both ways
        state = dict(self.__dict__)
        state["rows"] = _ipc_bytes(self.rows)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["rows"] = pa.ipc.open_stream(pa.py_buffer(state["rows"])).read_all()
        self.__dict__.update(state)

    def text(self, row: int) -> str:
        """The text of a row's item: of its line, for a block of lines (found again only when needed)."""
        if self.texts is not None:
            return self.texts[row]
        if self._split is None:
            self._split = self.lines.split()
        number = self.rows.column(LINE)[row].as_py()
        return _line_text(self._split[number - self.lines.first])


def _ipc_bytes(table: pa.Table) -> bytes:
    """`table` as an Arrow IPC stream, written into a buffer of its exact size."""
    size = pa.MockOutputStream()
    with pa.ipc.new_stream(size, table.schema) as writer:
        writer.write_table(table)
    buffer = pa.allocate_buffer(size.size())
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(buffer), table.schema) as writer:
        writer.write_table(table)
    return buffer.to_pybytes()


@dataclass
class _Lines:
    """A block of whole lines of a JSON Lines file, read but not split or parsed: a worker's job."""

    data: bytes
    shown: str
    first: int  # the 1-based number of the first line
    id_key: str

    def split(self) -> list[bytes]:
        """The lines, each with its newline (the last may have none), as iterating the file gives them."""
        lines = [line + b"\n" for line in self.data.split(b"\n")]
        last = lines.pop()
        if last != b"\n":
            lines.append(last[:-1])
        return lines


def _line_text(line: bytes) -> str:
    """A record's text as `_jsonl_line` keeps it (a line it read has valid UTF-8)."""
    return line.decode("utf-8").strip().lstrip("\ufeff")


def _blocks_of(source: ir.Source, recipe_dir: Path) -> Iterator[_Lines | list[_Raw | _Candidate]]:
    """The source's items in blocks of at most BLOCK: raw lines of a JSON Lines file, else items."""
    if source.format in ("llava_jsonl", "llava_json"):
        for path, shown in _files(source, recipe_dir):
            if source.format == "llava_json" and _is_array(path):
                yield from _blocks(_json_file(path, shown), BLOCK)
                continue
            with open(path, "rb") as f:
                number = 1
                while data := f.read(BLOCK_BYTES):
                    if not data.endswith(b"\n"):
                        data += f.readline()
                    yield _Lines(data, shown, number, source.columns.get("id", "id"))
                    number += data.count(b"\n") + (not data.endswith(b"\n"))
        return
    yield from _blocks(_read(source, recipe_dir), BLOCK)


def _is_array(path: Path) -> bool:
    """Whether a .json file holds an array (else it is read as JSON Lines), as `_json_file` decides."""
    text = _Text(path)
    return text.startswith("[", text.skip_ws(0))


def _prepare(block: _Lines | list[_Raw | _Candidate], source: ir.Source, step_id: str) -> _Prepared:
    with _fewer_collections():
        return _prepare_block(block, source, step_id)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector less often: a block allocates a few containers per record, none
    of them in cycles, and the default thresholds spend a third of the time scanning them."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], 100_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def _prepare_block(block: _Lines | list[_Raw | _Candidate], source: ir.Source, step_id: str) -> _Prepared:
    if isinstance(block, _Lines):
        return _prepare_lines(block, source, step_id)
    return _prepare_items(block, source, step_id)


def _prepare_lines(block: _Lines, source: ir.Source, step_id: str) -> _Prepared:
    """Lines of JSON Lines: the plain records columnar (`ingest_columnar`), the others one by one."""
    octets = np.frombuffer(block.data, dtype=np.uint8)
    ends = np.flatnonzero(octets == 10) + 1
    bounds = np.concatenate([[0], ends, [len(octets)] if len(octets) and octets[-1] != 10 else []]).astype(np.int64)
    if len(bounds) > 1 and (octets[bounds[:-1]] == ord("{")).all() and ingest_columnar.eligible(source):
        # every line opens an object, so none is blank: the block as it came, not split
        data, numbers = block.data, np.arange(block.first, block.first + len(bounds) - 1)
    else:
        numbered = [(number, line) for number, line in enumerate(block.split(), start=block.first) if line.strip()]
        if not numbered or not ingest_columnar.eligible(source):
            slow = _prepare_items([raw for number, line in numbered
                                   for raw in _jsonl_line(line, f"{block.shown}:{number}", block.id_key)],
                                  source, step_id)
            return _with_lines(slow, [number for number, _ in numbered])
        data = b"".join(line for _, line in numbered)
        bounds = np.concatenate([[0], np.cumsum([len(line) for _, line in numbered])]).astype(np.int64)
        numbers = np.array([number for number, _ in numbered], dtype=np.int64)
    fast, accepted = ingest_columnar.read(data, bounds, numbers, block.shown, source, step_id, _KNOWN_FIELDS)
    left = np.flatnonzero(~accepted)
    slow = _prepare_items([item for i in left.tolist() for item in _jsonl_line(
        data[bounds[i]:bounds[i + 1]], f"{block.shown}:{numbers[i]}", block.id_key)], source, step_id)
    left = numbers[left].tolist()
    if not slow.kinds:
        return _Prepared(bytes([_ROW]) * fast.num_rows, fast, None, [], [])
    slow = _with_lines(slow, left)
    # every non-blank line is one row of `fast` (accepted) or one item of `slow`, in order
    kinds = np.full(len(accepted), _ROW, dtype=np.uint8)
    kinds[~accepted] = np.frombuffer(slow.kinds, dtype=np.uint8)
    if not slow.rows.num_rows:  # the others all rejects or candidates: the rows are `fast`'s, in order
        return _Prepared(kinds.tobytes(), fast, None, slow.candidates, slow.rejects)
    is_row = kinds == _ROW
    slow_row = ~accepted & is_row
    order = np.where(accepted, np.cumsum(accepted) - 1, fast.num_rows + np.cumsum(slow_row) - 1)[is_row]
    rows = pa.concat_tables([fast, slow.rows]).take(pa.array(order))
    return _Prepared(kinds.tobytes(), rows, None, slow.candidates, slow.rejects)


def _with_lines(prepared: _Prepared, numbers: list[int]) -> _Prepared:
    """Items read from lines (`numbers`: each item's line, in order): their rows get their line number
    instead of their text, which the step's process finds again in the block when it needs it."""
    kinds = prepared.kinds
    row_numbers = [number for number, kind in zip(numbers, kinds) if kind == _ROW]
    rows = prepared.rows.set_column(ROW_SCHEMA.get_field_index(LINE), ROW_SCHEMA.field(LINE),
                                    pa.array(row_numbers, pa.int64()))
    return _Prepared(kinds, rows, None, prepared.candidates, prepared.rejects)


def _prepare_items(block: list[_Raw | _Candidate], source: ir.Source, step_id: str) -> _Prepared:
    kinds = bytearray()
    columns: dict[str, list[Any]] = {name: [] for name in records.SCHEMA.names}
    ids, origins, turns, categories, types, image_tags, instruction_tags, scores, source_ids = (
        columns["id"], columns["origin"], columns["conversations"], columns["category"], columns["data_type"],
        columns["image_tags"], columns["instruction_tags"], columns["scores"], columns["source_id"])
    texts: list[str] = []
    candidates: list[_Candidate] = []
    rejects: list[Reject] = []
    name = source.name
    for raw in block:
        item = _validate(raw, source)
        if isinstance(item, Reject):
            kinds.append(_REJECT)
            rejects.append(item)
        elif item.image_paths:
            kinds.append(_CANDIDATE)
            candidates.append(item)
        else:
            kinds.append(_ROW)
            ids.append(records.record_id(name, [], item.conversations))
            origins.append(item.origin)
            turns.append(item.conversations)
            categories.append(item.category)
            types.append(item.data_type)
            image_tags.append(item.image_tags)
            instruction_tags.append(item.instruction_tags)
            scores.append(sorted(item.scores.items()))
            source_ids.append(item.source_id)
            texts.append(item.text)
    n = len(ids)
    columns["source"] = [name] * n
    columns["images"] = [[]] * n
    columns["provenance"] = [[step_id]] * n
    columns[KEY] = [bytes.fromhex(i) for i in ids]
    columns[OWN] = [None if sid is None else own_key(sid) for sid in source_ids]
    columns[LINE] = [None] * n
    return _Prepared(bytes(kinds), pa.Table.from_pydict(columns, schema=ROW_SCHEMA), texts, candidates, rejects)


_SOURCES: dict[str, ir.Source] = {}


def _worker_started() -> None:
    """A preparing process's collector: what it imported is frozen out of its scans (else each full
    collection walks every module's objects), and young collections come rarely (see `_fewer_collections`)."""
    gc.freeze()
    gc.set_threshold(100_000, *gc.get_threshold()[1:])


def _prepare_in_worker(block: _Lines | list[_Raw | _Candidate], source_json: str, step_id: str) -> _Prepared:
    source = _SOURCES.get(source_json)
    if source is None:
        source = _SOURCES[source_json] = ir.Source.model_validate_json(source_json)
    return _prepare(block, source, step_id)


class _Preparer:
    """Prepares blocks in order: inline with one worker, else in a process pool, a few blocks ahead."""

    def __init__(self, source: ir.Source, step_id: str, workers: int):
        self.source = source
        self.step_id = step_id
        self.workers = max(1, workers)
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Preparer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, blocks: Iterator[_Lines | list[_Raw | _Candidate]]) -> Iterator[_Prepared]:
        # the first block inline: starting processes costs more than a small source takes; with
        # more blocks, the processes start on the next ones while this one is prepared
        first = next(blocks, None)
        second = next(blocks, None) if first is not None and self.workers > 1 else None
        if second is None:
            for block in itertools.chain([first] if first is not None else [], blocks):
                yield _with_block(_prepare(block, self.source, self.step_id), block)
            return
        # spawn: safe whatever the parent holds (threads, a GPU context)
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                        initializer=_worker_started)
        source_json = self.source.model_dump_json()
        ahead: collections.deque[Any] = collections.deque()
        blocks = itertools.chain([second], blocks)
        for block in itertools.islice(blocks, AHEAD * self.workers):
            ahead.append((block, self.pool.submit(_prepare_in_worker, block, source_json, self.step_id)))
        yield _with_block(_prepare(first, self.source, self.step_id), first)
        for block in blocks:
            ahead.append((block, self.pool.submit(_prepare_in_worker, block, source_json, self.step_id)))
            if len(ahead) > AHEAD * self.workers:
                done, future = ahead.popleft()
                yield _with_block(future.result(), done)
        while ahead:
            done, future = ahead.popleft()
            yield _with_block(future.result(), done)


def _with_block(prepared: _Prepared, block: _Lines | list[_Raw | _Candidate]) -> _Prepared:
    if isinstance(block, _Lines):
        prepared.lines = block
    return prepared


class _Seen:
    """How many times each 16-byte key was seen before, in bounded memory, with the reference (an
    integer the caller chose) of its first sighting while that is recent.

    Keys are rows of two uint64. The merged keys are two arrays sorted by their first half (16 bytes
    a key, no references); the recent ones (fewer than RECENT) are sorted runs with their references,
    merged in once they reach RECENT; keys seen more than once keep a count; and a bit filter over
    all keys, 8 to 16 bits a key, answers "never seen" for nearly every new key without a search
    (random probes into sorted arrays cost microseconds a key once they outgrow the caches). Whatever
    the calls' sizes, the result is that of taking the keys one at a time, merges included."""

    RECENT = 1 << 18
    BITS_PER_KEY = 8
    RUNS = 8  # recent runs searched apart before they are sorted into one

    def __init__(self) -> None:
        self.old_hi = np.zeros(0, dtype=np.uint64)  # first halves of the merged keys, sorted
        self.old_lo = np.zeros(0, dtype=np.uint64)  # their second halves, in the same order
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # recent (hi, lo, ref), by hi
        self.recent = 0
        self.horizon = 0  # references below it are never returned again (their keys were merged)
        self.again: dict[bytes, int] = {}  # keys seen more than once -> times seen
        self._filter_for(0)

    def seen_all(self, keys: np.ndarray, refs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each key of `keys` (V16) in order: the times it was seen before, and the reference
        (`refs`, increasing from call to call) of its first sighting if still recent, else -1."""
        halves = _halves(keys)
        refs = np.zeros(len(halves), dtype=np.int64) if refs is None else np.asarray(refs, dtype=np.int64)
        times = np.zeros(len(halves), dtype=np.int64)
        firsts = np.full(len(halves), -1, dtype=np.int64)
        start = 0
        while start < len(halves):  # in runs too short to fill `recent` but by their last key
            end = min(len(halves), start + max(1, self.RECENT - 1 - self.recent))
            times[start:end], firsts[start:end] = self._run(halves[start:end], refs[start:end])
            if self.recent >= self.RECENT:
                self._merge()
                self.horizon = int(refs[end - 1]) + 1
            start = end
        return times, firsts

    def _run(self, halves: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(halves)
        # equal keys in groups, each in input order; `heads` the first of each group
        firsts_sorted = np.sort(halves[:, 0])
        if not (firsts_sorted[1:] == firsts_sorted[:-1]).any():  # all distinct: a group each
            group = heads = np.arange(n)
            rank = np.zeros(n, dtype=np.int64)
            size = np.ones(n, dtype=np.int64)
        else:
            order = np.lexsort((np.arange(n), halves[:, 1], halves[:, 0]))
            ordered = halves[order]
            starts = np.ones(n, dtype=bool)
            starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
            sorted_group = np.cumsum(starts) - 1
            group = np.empty(n, dtype=np.int64)
            group[order] = sorted_group
            rank = np.empty(n, dtype=np.int64)  # earlier keys of its group in this run
            rank[order] = np.arange(n) - np.flatnonzero(starts)[sorted_group]
            heads = order[starts]
            size = np.bincount(sorted_group)

        # what was known of each group's key before: times seen, first reference if recent
        before = np.zeros(len(heads), dtype=np.int64)
        first = np.full(len(heads), -1, dtype=np.int64)
        byte, bit = self._slots(halves[heads])
        maybe = np.flatnonzero(self.filter[byte] & bit)
        if len(maybe):
            asked = halves[heads[maybe]]
            in_recent, ref = self._in_recent(asked)
            known = in_recent | self._in_old(asked)
            first[maybe] = np.where(in_recent, ref, -1)
            for g in maybe[known].tolist():
                before[g] = self.again.get(halves[heads[g]].tobytes(), 1)
        new = before == 0
        times = before[group] + rank
        firsts = np.where((rank > 0) & new[group], refs[heads][group], first[group])

        for g in np.flatnonzero(before + size > 1).tolist():
            self.again[halves[heads[g]].tobytes()] = int(before[g] + size[g])
        fresh = heads[new]
        if len(fresh):
            np.bitwise_or.at(self.filter, byte[new], bit[new])
            fresh = fresh[np.argsort(halves[fresh, 0], kind="stable")]
            self.runs.append((halves[fresh, 0], halves[fresh, 1], refs[fresh]))
            self.recent += len(fresh)
            if len(self.runs) > self.RUNS:
                self.runs = [self._joined_runs()]
        return times, firsts

    def _joined_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The recent runs as one: the later ones sorted together, then put into the first in place
        (an insert moves the first run's memory once, where sorting it again costs far more)."""
        if len(self.runs) == 1:
            return self.runs[0]
        hi, lo, ref = (np.concatenate(parts) for parts in zip(*self.runs[1:]))
        by_hi = np.argsort(hi, kind="stable")
        first_hi, first_lo, first_ref = self.runs[0]
        at = np.searchsorted(first_hi, hi[by_hi])
        return np.insert(first_hi, at, hi[by_hi]), np.insert(first_lo, at, lo[by_hi]), np.insert(first_ref, at, ref[by_hi])

    def _merge(self) -> None:
        hi, lo, _ = self._joined_runs()
        at = np.searchsorted(self.old_hi, hi)
        self.old_hi = np.insert(self.old_hi, at, hi)
        self.old_lo = np.insert(self.old_lo, at, lo)
        self.runs, self.recent = [], 0
        if len(self.filter) * 8 < self.BITS_PER_KEY * (len(self.old_hi) + self.RECENT):
            self._filter_for(len(self.old_hi) + self.RECENT)
            self._mark(np.stack([self.old_hi, self.old_lo], axis=1))

    def _filter_for(self, keys: int) -> None:
        self.bits = max(16, math.ceil(math.log2(self.BITS_PER_KEY * max(keys, self.RECENT))))
        self.filter = np.zeros(1 << (self.bits - 3), dtype=np.uint8)

    def _slots(self, halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # multiply-xor mixing, so that keys other than digests spread over the filter too
        mixed = (halves[:, 0] ^ (halves[:, 1] * np.uint64(0x9E3779B97F4A7C15))) * np.uint64(0xBF58476D1CE4E5B9)
        slot = mixed >> np.uint64(64 - self.bits)
        return (slot >> np.uint64(3)).astype(np.intp), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8)

    def _mark(self, halves: np.ndarray) -> None:
        byte, bit = self._slots(halves)
        np.bitwise_or.at(self.filter, byte, bit)

    def _in_recent(self, halves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether each key is a recent one, and its reference if so."""
        found = np.zeros(len(halves), dtype=bool)
        ref = np.full(len(halves), -1, dtype=np.int64)
        for hi, lo, refs in self.runs:
            at = _find(hi, lo, halves)
            hit = at >= 0
            found |= hit
            ref[hit] = refs[at[hit]]
        return found, ref

    def _in_old(self, halves: np.ndarray) -> np.ndarray:
        """Whether each key is among the merged ones."""
        return _find(self.old_hi, self.old_lo, halves) >= 0


def _copy_ids(source: str, conversations: pa.Array, copies: list[int]) -> list[str]:
    """`records.record_id` of rows with no images that are later copies, from their turns as Arrow:
    orjson's bytes of the same content, written around its array of (from, value) pairs."""
    flat = conversations.flatten()
    pairs = list(zip(flat.field("from").to_pylist(), flat.field("value").to_pylist()))
    bounds = np.asarray(conversations.offsets, dtype=np.int64)
    bounds = (bounds - bounds[0]).tolist()
    tail = b',"images":[],"source":' + orjson.dumps(source) + b"}"
    return [hashlib.sha256(b'{"conversations":' + orjson.dumps(pairs[a:b]) + b',"copy":%d' % copy + tail)
            .hexdigest()[:32] for a, b, copy in zip(bounds, bounds[1:], copies)]


def _find(hi: np.ndarray, lo: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """Where each key of `halves` is in (hi, lo), sorted by hi; -1 where it is not."""
    if not len(hi) or not len(halves):
        return np.full(len(halves), -1, dtype=np.int64)
    # queries in increasing order: numpy narrows each binary search by the one before
    order = np.argsort(halves[:, 0])
    left = np.empty(len(halves), dtype=np.int64)
    left[order] = np.searchsorted(hi, halves[order, 0])
    left = np.minimum(left, len(hi) - 1)
    same = hi[left] == halves[:, 0]
    at = np.where(same & (lo[left] == halves[:, 1]), left, -1)
    shared = np.flatnonzero(same & (hi[np.minimum(left + 1, len(hi) - 1)] == halves[:, 0]) & (left + 1 < len(hi)))
    for i in shared.tolist():  # keys that share a first half with the next: rare
        right = int(np.searchsorted(hi, halves[i, 0], side="right"))
        match = np.flatnonzero(lo[left[i]:right] == halves[i, 1])
        at[i] = left[i] + match[0] if len(match) else -1
    return at


def _halves(keys: np.ndarray) -> np.ndarray:
    """16-byte keys (V16) as rows of two uint64, the first xor-ed with a multiple of the second: one
    to one, so equal keys stay equal, and keys alike in their first 8 bytes (short ids with a common
    prefix are their own keys) still spread over the sorted arrays by their first half."""
    halves = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=np.uint64).reshape(-1, 2).copy()
    halves[:, 0] ^= halves[:, 1] * np.uint64(0x9E3779B97F4A7C15)
    return halves


_Results = Callable[[], dict[str, Any]]  # path -> ImageInfo | (reason, detail), once ready


def _binary16(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_binary(16) column as a V16 array, without copying per value (nulls as zeros)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    data = array.buffers()[1]
    if data is None or not len(array):
        return np.zeros(len(array), dtype="V16")
    return np.frombuffer(data, dtype="V16", count=array.offset + len(array))[array.offset:]


def _images_of(item: _Candidate, images: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """A candidate's images as record fields, or the (reason, detail) of the first that failed."""
    found = []
    for path in item.image_paths:
        result = images[path]
        if isinstance(result, tuple):
            return [], result
        found.append({"path": result.path, "sha256": result.sha256, "width": result.width, "height": result.height})
    return found, None


class _Assembler:
    """Turns validated items plus image results into record tables, keeping ids unique per source."""

    def __init__(self, source: ir.Source, step_id: str):
        self.source = source
        self.step_id = step_id
        self.copies = _Seen()  # content ids -> records of that content so far
        self.own_ids = _Seen()  # the data set's ids (a digest) -> the record that has it first
        # the origins of the records whose ids `own_ids` may still name as first: blocks of
        # (first reference, rows in the block, items judged, the origins of the rows among them,
        # those of the candidates among them); the rows' origins are copied out, so that the
        # block's other columns are not kept with them
        self.judged = 0
        self.first_origins: collections.deque[tuple[int, int, np.ndarray, pa.Array, list[str]]] = \
            collections.deque()

    def chunk(self, prepared: _Prepared, images: dict[str, Any]) -> Chunk:
        """The block's records and rejects, in input order, once its images are inspected.

        The items that may become records are the block's rows (0..n-1, their keys computed by the
        worker) and then its candidates whose images are all good (n.., keys computed here); `order`
        lists them in input order, which is the order ids are judged in and records come out in."""
        table, name = prepared.rows, self.source.name
        n = table.num_rows
        kinds = np.frombuffer(prepared.kinds, dtype=np.uint8)
        positions = [np.flatnonzero(kinds == _ROW)]
        rejects: list[tuple[int, Reject]] = list(zip(np.flatnonzero(kinds == _REJECT).tolist(), prepared.rejects))
        live: list[tuple[_Candidate, list[dict[str, Any]]]] = []
        live_positions = []
        for position, item in zip(np.flatnonzero(kinds == _CANDIDATE).tolist(), prepared.candidates):
            image_dicts, failed = _images_of(item, images)
            if failed:
                rejects.append((position, self.reject(item, *failed)))
            else:
                live.append((item, image_dicts))
                live_positions.append(position)
        positions.append(np.array(live_positions, dtype=np.int64))
        position_of = np.concatenate(positions)
        order = np.argsort(position_of, kind="stable") if live else np.arange(n)

        # a data set id seen before: the first record keeps it
        own = _binary16(table.column(OWN))
        has_own = np.concatenate([pc.is_valid(table.column(OWN)).to_numpy(zero_copy_only=False),
                                  np.array([item.source_id is not None for item, _ in live], dtype=bool)])
        own_keys = np.concatenate([own, np.array([own_key(item.source_id) if item.source_id is not None else bytes(16)
                                                  for item, _ in live], dtype="V16")])
        judged = order[has_own[order]]
        reused: list[int] = []
        if len(judged):
            base = self.judged
            self.judged += len(judged)
            row_origins = table.column("origin").take(pa.array(judged[judged < n])).combine_chunks()  # new buffers
            self.first_origins.append((base, n, judged, row_origins,
                                       [live[k - n][0].origin for k in judged[judged >= n].tolist()]))
            times, firsts = self.own_ids.seen_all(own_keys[judged], np.arange(base, self.judged))
            for i in np.flatnonzero(times).tolist():
                k = int(judged[i])
                reused.append(k)
                rejects.append((int(position_of[k]), self._reused(prepared, live, k, self._origin(int(firsts[i])))))
            while self.first_origins and self.first_origins[0][0] + len(self.first_origins[0][2]) \
                    <= self.own_ids.horizon:
                self.first_origins.popleft()
        survivors = order
        if reused:
            alive = np.ones(len(position_of), dtype=bool)
            alive[reused] = False
            survivors = order[alive[order]]

        # copies of one content numbered in input order
        contents = [records.record_id(name, image_dicts, item.conversations) for item, image_dicts in live]
        keys = np.concatenate([_binary16(table.column(KEY)), np.array([bytes.fromhex(c) for c in contents], dtype="V16")])
        copies, _ = self.copies.seen_all(keys[survivors])
        renamed: dict[int, str] = {}  # rows that are a later copy -> their id
        later = np.flatnonzero(copies[:len(survivors)] > 0)
        later_rows = survivors[later][survivors[later] < n]
        if len(later_rows):
            renamed = dict(zip(later_rows.tolist(), _copy_ids(name, table.column("conversations").take(
                pa.array(later_rows)).combine_chunks(), copies[later][survivors[later] < n].tolist())))
        candidate_rows: list[dict[str, Any]] = []
        for k, copy in zip(survivors.tolist(), copies.tolist()) if live else ():
            if k < n:
                continue
            item, image_dicts = live[k - n]
            candidate_rows.append({
                "id": records.record_id(name, image_dicts, item.conversations, copy=copy) if copy else contents[k - n],
                "source": name, "origin": item.origin, "images": image_dicts, "conversations": item.conversations,
                "category": item.category, "data_type": item.data_type, "image_tags": item.image_tags,
                "instruction_tags": item.instruction_tags, "scores": sorted(item.scores.items()),
                "provenance": [self.step_id], "source_id": item.source_id,
            })
        out = table.select(records.SCHEMA.names)
        if renamed:
            mask = np.zeros(n, dtype=bool)
            mask[list(renamed)] = True
            ids = pc.replace_with_mask(out.column("id").combine_chunks(), pa.array(mask),
                                       pa.array([renamed[k] for k in sorted(renamed)], pa.string()))
            out = out.set_column(0, records.SCHEMA.field("id"), ids)
        if candidate_rows:  # in input order among the survivors, like the rows
            out = pa.concat_tables([out, pa.Table.from_pylist(candidate_rows, schema=records.SCHEMA)])
            index = np.arange(len(position_of))  # item -> its row of `out`: a row itself, a candidate after them
            index[survivors[survivors >= n]] = n + np.arange(len(candidate_rows))
            out = out.take(pa.array(index[survivors]))
        elif reused:
            out = out.take(pa.array(survivors))
        rejects.sort(key=lambda r: r[0])
        return Chunk(records=out, rejects=[r for _, r in rejects], consumed=len(prepared.kinds))

    def _origin(self, ref: int) -> str | None:
        """The origin of the record `own_ids` knows by `ref`; None for -1 (no longer known)."""
        if ref < 0:
            return None
        for base, n, judged, row_origins, candidate_origins in self.first_origins:
            if base <= ref < base + len(judged):
                before = judged[:ref - base]
                if judged[ref - base] < n:
                    return row_origins[int((before < n).sum())].as_py()
                return candidate_origins[int((before >= n).sum())]
        raise AssertionError(f"no origin kept for reference {ref}")

    def _reused(self, prepared: _Prepared, live: list[tuple[_Candidate, Any]], k: int, first: str | None) -> Reject:
        """The reject of item `k` (a row, or a live candidate after the n rows), whose own id is reused."""
        n = prepared.rows.num_rows
        sid = prepared.rows.column("source_id")[k].as_py() if k < n else live[k - n][0].source_id
        where = f"record at {first}" if first is not None else "an earlier record of the source"
        detail = f"id {sid!r} is already the id of the {where}"
        if k >= n:
            return self.reject(live[k - n][0], "duplicate_id", detail)
        return Reject(reason="duplicate_id", detail=detail, source=self.source.name,
                      origin=prepared.rows.column("origin")[k].as_py(), record=prepared.text(k))

    def reject(self, item: _Candidate, reason: str, detail: str, rid: str = "") -> Reject:
        return Reject(reason=reason, detail=detail, id=rid, source=self.source.name, origin=item.origin,
                      record=item.text)


# ---- reading ------------------------------------------------------------------------------------


def _resolve(recipe_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else recipe_dir / p


def _shown(path: Path, recipe_dir: Path) -> str:
    """A file as origins show it: relative to the recipe directory, POSIX."""
    return Path(os.path.relpath(path, recipe_dir)).as_posix()


def _matches(source: ir.Source, recipe_dir: Path, *, dirs: bool = False) -> list[Path]:
    found: set[Path] = set()
    for pattern in source.paths:
        hits = [Path(h) for h in glob.glob(str(_resolve(recipe_dir, pattern)), recursive=True)]
        if dirs:
            hits = [h for h in hits if h.is_dir()]
        if not hits:
            raise OperationError(f"source `{source.name}`: nothing matches {pattern!r} (relative to {recipe_dir})")
        found.update(hits)
    return sorted(found, key=lambda p: p.as_posix())


def _read(source: ir.Source, recipe_dir: Path) -> Iterator[_Raw | _Candidate]:
    """The items of a source that is not JSON: Parquet rows, HF dataset rows, image files."""
    if source.format == "image_folder":
        return _image_folder(source, recipe_dir)
    if source.format == "hf_dataset":
        return _hf_datasets(source, recipe_dir)
    return (raw for path, shown in _files(source, recipe_dir) for raw in _parquet_file(path, shown))


def _files(source: ir.Source, recipe_dir: Path) -> Iterator[tuple[Path, str]]:
    """The files a source's paths match, each with its name as origins show it."""
    for path in _matches(source, recipe_dir):
        if path.is_dir():
            raise OperationError(f"source `{source.name}`: {_shown(path, recipe_dir)} is a folder, "
                                 f"not a {source.format} file")
        yield path, _shown(path, recipe_dir)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_constant)


def _parse(text: str) -> Any:
    value, end = _DECODER.raw_decode(text, _skip_ws(text, 0))
    if _skip_ws(text, end) != len(text):
        raise ValueError(f"extra data after the JSON value at column {end + 1}")
    return value


def _jsonl_file(path: Path, shown: str) -> Iterator[_Raw]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            yield from _jsonl_line(line, f"{shown}:{number}")


def _jsonl_line(line: bytes, origin: str, id_key: str = "id") -> Iterator[_Raw]:
    if not line.strip():
        return  # a blank line is not a record
    # orjson parses several times faster; whatever it refuses goes the stdlib way below, so what is
    # accepted, and the message of what is not, stay as they were. It reads an integer past 64 bits
    # as a float, which matters only for the record's own id: such a record is read again.
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    else:
        if not (type(value) is dict and type(value.get(id_key)) is float):
            yield _Raw(origin, line.decode("utf-8").strip(), value, utf8=True)
            return
    yield from _jsonl_line_stdlib(line, origin)


def _jsonl_line_stdlib(line: bytes, origin: str) -> Iterator[_Raw]:
    if not line.strip():
        return
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raw = line.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        bad = line[e.start:e.start + 1]
        yield _Raw(origin, raw, problem=_Bad("utf8_invalid", f"byte {e.start + 1} is not UTF-8 ({bad!r})"))
        return
    text = text.strip().lstrip("\ufeff")
    try:
        value = _parse(text)
    except ValueError as e:  # JSONDecodeError is a ValueError
        yield _Raw(origin, text, problem=_Bad("json_malformed", str(e)))
        return
    yield _Raw(origin, text, value)


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_file(path: Path, shown: str) -> Iterator[_Raw]:
    """A JSON array, element by element, with the line each element starts on.

    A malformed element is rejected and reading resumes at the next line whose first character is
    a `{` in the column where the array's elements start (so one record per line and pretty-printed
    arrays both recover); the skipped text is one reject. A missing or extra comma between elements
    is forgiven. A file that does not start with `[` is read as JSON Lines. The file is read in
    windows (`_Text`), so memory holds one window and the element being read, whatever its size.
    """
    text = _Text(path)
    pos = text.skip_ws(0)
    if not text.startswith("[", pos):
        yield from _jsonl_file(path, shown)
        return
    pos += 1
    column: int | None = None  # where elements start on their line
    while True:
        pos = text.skip_ws(text.drop_before(pos))
        while text.startswith(",", pos):
            pos = text.skip_ws(pos + 1)
        if text.ended(pos):
            yield _Raw(f"{shown}:{text.line_at(pos)}", "",
                       problem=_Bad("json_malformed", "the file ends before the array is closed"))
            return
        if text.startswith("]", pos):
            rest = text.skip_ws(pos + 1)
            if not text.ended(rest):
                yield _Raw(f"{shown}:{text.line_at(rest)}", text.slice(rest, rest + 200),
                           problem=_Bad("json_malformed", "text after the end of the array"))
            return
        if column is None:
            column = pos - (text.text.rfind("\n", 0, pos) + 1)
        origin = f"{shown}:{text.line_at(pos)}"
        value, end, error = text.decode(pos)
        if error is not None:
            resume = text.resume(pos, column)
            yield _Raw(origin, _printable(text.text[pos:resume].rstrip()), problem=_Bad("json_malformed", str(error)))
            pos = resume
            continue
        raw = text.text[pos:end]
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as e:
            yield _Raw(origin, _printable(raw),
                       problem=_Bad("utf8_invalid", f"character {e.start + 1} of the element is not UTF-8"))
        else:
            yield _Raw(origin, raw, value)
        pos = end


class _Text:
    """A file's text, decoded window by window (bad bytes become lone surrogates). `text` holds the
    part from the last `drop_before` on; positions are into `text`, and reading more appends to it."""

    WINDOW = 1 << 22  # bytes read at a time
    TRUNCATED = 8  # an error this close to the end of the text read so far may just need more text

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text = ""
        self.done = False
        self.line = 1  # the line of `counted`
        self.counted = 0
        self.dropped = 0  # characters forgotten before `text`
        self.column = 0  # of text[0] on its line
        self.more()
        self.text = self.text.lstrip("\ufeff")

    def __del__(self) -> None:
        self.file.close()

    def more(self) -> bool:
        """Read the next window; False at the end of the file."""
        if self.done:
            return False
        data = self.file.read(self.WINDOW)
        self.text += self.decoder.decode(data, final=not data)
        if not data:
            self.done = True
            self.file.close()
        return True

    def ensure(self, end: int) -> None:
        while end > len(self.text) and self.more():
            pass

    def ended(self, pos: int) -> bool:
        self.ensure(pos + 1)
        return pos >= len(self.text)

    def startswith(self, prefix: str, pos: int) -> bool:
        self.ensure(pos + len(prefix))
        return self.text.startswith(prefix, pos)

    def slice(self, start: int, end: int) -> str:
        self.ensure(end)
        return self.text[start:end]

    def skip_ws(self, pos: int) -> int:
        while True:
            pos = _skip_ws(self.text, pos)
            if pos < len(self.text) or not self.more():
                return pos

    def line_at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def drop_before(self, pos: int) -> int:
        """Forget the text before `pos` once it is a window long; returns `pos` in the text kept."""
        if pos < self.WINDOW:
            return pos
        self.line_at(pos)
        newline = self.text.rfind("\n", 0, pos)
        self.column = pos - newline - 1 if newline >= 0 else self.column + pos
        self.dropped += pos
        self.text = self.text[pos:]
        self.counted = 0
        return 0

    def located(self, error: ValueError) -> ValueError:
        """A decoding error whose line, column and character count from the start of the file."""
        if not isinstance(error, json.JSONDecodeError) or not self.dropped:
            return error
        line = self.line + self.text.count("\n", self.counted, error.pos) if error.pos >= self.counted else \
            self.line - self.text.count("\n", error.pos, self.counted)
        column = error.colno + (self.column if "\n" not in self.text[:error.pos] else 0)
        return ValueError(f"{error.msg}: line {line} column {column} (char {self.dropped + error.pos})")

    def decode(self, pos: int) -> tuple[Any, int, ValueError | None]:
        """The JSON value at `pos` and where it ends, or the error; reads on while the value may be
        cut short by the end of the text read so far."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, pos)
            except ValueError as e:
                near_end = isinstance(e, json.JSONDecodeError) and (
                    e.pos >= len(self.text) - self.TRUNCATED or e.msg.startswith("Unterminated string"))
                if near_end and self.more():
                    continue
                return None, pos, self.located(e)
            if end >= len(self.text) and self.more():  # a number may go on
                continue
            return value, end, None

    def resume(self, pos: int, column: int) -> int:
        """The start of the next line holding an element start (`{` at `column`), or the array's end
        (a `]` left of that column, or at the start of a line when elements start there)."""
        while True:
            newline = self.text.find("\n", pos)
            while newline == -1 and self.more():
                newline = self.text.find("\n", pos)
            if newline == -1:
                return len(self.text)
            pos = newline + 1
            start = pos + column
            self.ensure(start + 1)
            if self.text.startswith("{", start) and not self.text[pos:start].strip():
                return start
            rest = self.skip_ws(pos)
            # the array's own `]`, left of where elements start: a nested list's is further right
            if self.text.startswith("]", rest) and rest - pos < max(column, 1) and "\n" not in self.text[pos:rest]:
                return rest


def _printable(text: str) -> str:
    """Text with lone surrogates (from undecodable bytes) shown as escapes, so it can be stored."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _parquet_file(path: Path, shown: str) -> Iterator[_Raw]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BLOCK):
        for value in batch.to_pylist():
            yield _Raw(f"{shown}#{row}", canonical_json(value), value)
            row += 1


def _hf_datasets(source: ir.Source, recipe_dir: Path) -> Iterator[_Raw]:
    for folder in _matches(source, recipe_dir, dirs=True):
        yield from _hf_dataset(folder, _shown(folder, recipe_dir), source.name)


def _hf_dataset(folder: Path, shown: str, name: str) -> Iterator[_Raw]:
    """Rows of a `save_to_disk` folder, read with pyarrow (no `datasets` needed)."""
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text(encoding="utf-8")).get("splits", [])
        for split in splits:
            yield from _hf_dataset(folder / split, f"{shown}/{split}", name)
        return
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise OperationError(f"source `{name}`: {shown} is not a saved HF dataset (no state.json or dataset_dict.json)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    row = 0
    for entry in state.get("_data_files", []):
        try:
            arrow = imaging.resolve_inside(folder, entry["filename"])
        except imaging.ImageReject as e:
            raise OperationError(f"source `{name}`: {shown}/state.json names a bad data file: {e.detail}") from None
        with pa.memory_map(str(arrow)) as f:
            try:
                reader = pa.ipc.open_stream(f)
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
            batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else \
                (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                for value in batch.to_pylist():
                    yield _Raw(f"{shown}#{row}", canonical_json(value), value)
                    row += 1


def _image_folder(source: ir.Source, recipe_dir: Path) -> Iterator[_Candidate | _Raw]:
    """One record per image file: the image alone, no conversation."""
    root = _resolve(recipe_dir, image_root(source) or ".")
    for pattern in source.paths:
        base = _resolve(recipe_dir, pattern)
        if base.is_dir():
            files = [p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            files = [Path(h) for h in glob.glob(str(base), recursive=True) if Path(h).is_file()]
        if not files:
            raise OperationError(f"source `{source.name}`: no image matches {pattern!r} (relative to {recipe_dir})")
        for path in sorted(files, key=lambda p: p.as_posix()):
            shown = _shown(path, recipe_dir)
            relative = Path(os.path.relpath(path, root)).as_posix()
            if relative == ".." or relative.startswith("../"):
                yield _Raw(shown, canonical_json({"image": shown}),
                           problem=_Bad("image_path_escapes_root", f"{shown} is outside the image root {str(root)!r}"))
                continue
            yield _Candidate(origin=shown, text=canonical_json({"image": relative}), image_paths=[relative],
                             conversations=[], data_type=_source_type(source), category=source.category,
                             source_id=relative)


def image_root(source: ir.Source) -> str | None:
    """The folder a source's image paths are relative to (relative to the recipe, or absolute).

    `images` when given; for an image folder without it, the folder its paths name (the common
    part before any wildcard), so `path = "photos"` or `"photos/**/*.jpg"` gives `photos`.
    """
    if source.images or source.format != "image_folder":
        return source.images
    prefixes = []
    for pattern in source.paths:
        parts = PurePosixPath(pattern).parts
        fixed = [p for p in itertools.takewhile(lambda p: not glob.has_magic(p), parts)]
        prefixes.append(posixpath.join(*fixed) if fixed else ".")
    return posixpath.commonpath(prefixes) if len(prefixes) > 1 else prefixes[0]


def _source_type(source: ir.Source) -> str:
    return source.data_type if source.data_type != "mixed" else "general"


def _blocks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    block: list[Any] = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


# ---- validating ---------------------------------------------------------------------------------


def _validate(item: _Raw | _Candidate, source: ir.Source) -> _Candidate | Reject:
    if isinstance(item, _Candidate):
        return item
    origin = item.origin
    try:
        if item.problem is not None:
            raise item.problem
        value = item.value
        if not isinstance(value, dict):
            raise _Bad("record_invalid", f"a record must be a JSON object, not {_kind(value)}")
        own_id = value.get(source.columns.get("id", "id"))
        source_id = None
        if isinstance(own_id, (str, int)) and not isinstance(own_id, bool):
            source_id = str(own_id)
            _check_text(source_id, "the record's `id`")
            origin = f"{origin} id={own_id}"
        candidate = None
        if not source.columns and source.format != "image_folder":
            candidate = _plain_candidate(value, source, origin, item.text, item.utf8)
        if candidate is None:
            candidate = _candidate(value, source, origin, item.text)
        candidate.source_id = source_id
        return candidate
    except _Bad as bad:
        return Reject(reason=bad.reason, detail=bad.detail, source=source.name, origin=origin, record=item.text)


def _plain_candidate(value: dict[str, Any], source: ir.Source, origin: str, text: str, utf8: bool) -> _Candidate | None:
    """A record in the common shape, checked in one pass; None when anything in it is unusual, and
    then `_candidate`'s checks, one after the other, decide and say exactly what is wrong. It
    accepts only what `_candidate` accepts, with the same result."""
    image, images = value.get("image"), value.get("images")
    if images is None:
        if image is None:
            paths = []
        elif type(image) is str:
            paths = [image]
        elif type(image) is list and all(type(p) is str for p in image):
            paths = list(image)
        else:
            return None
    elif image is None and type(images) is list and all(type(p) is str for p in images):
        paths = list(images)
    else:
        return None
    turns = value.get("conversations")
    if type(turns) is not list or not turns or len(turns) % 2:
        return None
    conversations = []
    asked = 0
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            return None
        who, said = turn.get("from"), turn.get("value")
        if type(said) is not str or who != (records.ASSISTANT if i % 2 else records.USER):
            return None
        if records.IMAGE_TOKEN in said:
            if i % 2:
                return None
            asked += said.count(records.IMAGE_TOKEN)
        conversations.append({"from": who, "value": said})
    if asked != len(paths):
        return None
    given = value.get("data_type")
    if type(given) is str and given in ir.DATA_TYPES:
        data_type = given
    elif source.data_type == "mixed":
        return None
    else:
        data_type = source.data_type
    tags = []
    for key in ("image_tags", "instruction_tags"):
        listed = value.get(key)
        if listed is None:
            tags.append([])
        elif type(listed) is list and all(type(t) is str for t in listed):
            tags.append(list(listed))
        else:
            return None
    if not utf8 and not all(_is_utf8(t) for t in [*paths, *(t["value"] for t in turns), *tags[0], *tags[1]]):
        return None
    scores = {}
    for key, number in value.items():
        if (type(number) is float or type(number) is int) and key not in _KNOWN_FIELDS and math.isfinite(number):
            scores[key] = float(number)
    listed = value.get("scores")
    if listed is not None:
        if type(listed) is not dict:
            return None
        scores.update({k: float(v) for k, v in listed.items() if isinstance(k, str) and _is_number(v)})
    return _Candidate(origin=origin, text=text, image_paths=paths, conversations=conversations, data_type=data_type,
                      category=source.category, image_tags=tags[0], instruction_tags=tags[1], scores=scores)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _column(value: dict[str, Any], source: ir.Source, name: str) -> Any:
    return value.get(source.columns.get(name, name))


def _candidate(value: dict[str, Any], source: ir.Source, origin: str, text: str) -> _Candidate:
    paths = _image_paths(value, source)
    conversations = _conversations(value, source, len(paths))
    for i, turn in enumerate(conversations, start=1):
        _check_text(turn["value"], f"turn {i}")
    for path in paths:
        _check_text(path, "an image path")
    if source.format != "image_folder":
        _check_dialogue(conversations)
        _check_tokens(conversations, len(paths))
    return _Candidate(
        origin=origin, text=text, image_paths=paths, conversations=conversations,
        data_type=_data_type(value, source), category=_category(value, source),
        image_tags=_strings(value, "image_tags"), instruction_tags=_strings(value, "instruction_tags"),
        scores=_scores(value, source),
    )


def _image_paths(value: dict[str, Any], source: ir.Source) -> list[str]:
    keys = [source.columns[k] for k in ("image", "images") if k in source.columns] or ["image", "images"]
    given = [(k, value[k]) for k in keys if value.get(k) is not None]
    if len(given) > 1:
        raise _Bad("record_invalid", f"both `{given[0][0]}` and `{given[1][0]}` are set; give the images once")
    if not given:
        return []
    key, raw = given[0]
    items = raw if isinstance(raw, list) else [raw]
    paths = []
    for item in items:
        if isinstance(item, dict):  # an HF `Image` feature: {"bytes": ..., "path": ...}
            if isinstance(item.get("path"), str) and item["path"]:
                item = item["path"]
            else:
                raise _Bad("record_invalid", f"`{key}` holds embedded image bytes; store the images as files under "
                                             "the source's `images` folder")
        if not isinstance(item, str):
            raise _Bad("record_invalid", f"`{key}` must be a path or a list of paths, not {_kind(item)}")
        paths.append(item)
    return paths


def _conversations(value: dict[str, Any], source: ir.Source, n_images: int) -> list[dict[str, str]]:
    key = source.columns.get("conversations", "conversations")
    turns = value.get(key)
    if turns is None and "text" in source.columns:
        text = value.get(source.columns["text"])
        if not isinstance(text, str):
            raise _Bad("record_invalid", f"`{source.columns['text']}` must be a string, not {_kind(text)}")
        if n_images == 0:
            raise _Bad("record_invalid", "a `text` column makes a caption, which needs an image")
        return [{"from": records.USER, "value": "\n".join([records.IMAGE_TOKEN] * n_images)},
                {"from": records.ASSISTANT, "value": text}]
    if turns is None:
        if source.format == "image_folder":
            return []
        raise _Bad("conversation_empty", f"no `{key}`")
    if not isinstance(turns, list):
        raise _Bad("record_invalid", f"`{key}` must be a list of turns, not {_kind(turns)}")
    result = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise _Bad("record_invalid", f"turn {i} must be an object with `from` and `value` strings")
        result.append({"from": turn["from"], "value": turn["value"]})
    return result


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad("utf8_invalid", f"{where} holds a lone surrogate at character {e.start + 1}") from None


def _check_dialogue(turns: list[dict[str, str]]) -> None:
    if not turns:
        raise _Bad("conversation_empty", "the conversation has no turns")
    for i, turn in enumerate(turns):
        expected = records.USER if i % 2 == 0 else records.ASSISTANT
        if turn["from"] != expected:
            raise _Bad("conversation_not_alternating",
                       f"turn {i + 1} is from {turn['from']!r}, expected {expected!r} (human first, then alternating)")
    if len(turns) % 2:
        raise _Bad("conversation_not_alternating", f"the last turn ({len(turns)}) is a question with no answer")


def _check_tokens(turns: list[dict[str, str]], n_images: int) -> None:
    asked = sum(t["value"].count(records.IMAGE_TOKEN) for t in turns if t["from"] == records.USER)
    answered = sum(t["value"].count(records.IMAGE_TOKEN) for t in turns if t["from"] != records.USER)
    if answered:
        raise _Bad("image_token_mismatch", f"an answer holds {records.IMAGE_TOKEN}")
    if asked != n_images:
        tokens = f"{asked} {records.IMAGE_TOKEN} token{'s' if asked != 1 else ''}"
        raise _Bad("image_token_mismatch", f"{tokens} for {n_images} image{'s' if n_images != 1 else ''}")


def _data_type(value: dict[str, Any], source: ir.Source) -> str:
    given = _column(value, source, "data_type")
    if isinstance(given, str) and given in ir.DATA_TYPES:
        return given
    if source.data_type == "mixed":
        raise _Bad("record_invalid", f"source `{source.name}` is of mixed type, so each record needs a `data_type` "
                                     f"among {', '.join(ir.DATA_TYPES)}; got {given!r}")
    return source.data_type


def _category(value: dict[str, Any], source: ir.Source) -> str:
    if "category" in source.columns:
        given = value.get(source.columns["category"])
        if isinstance(given, str) and given in ir.CATEGORIES:
            return given
    return source.category


def _strings(value: dict[str, Any], key: str) -> list[str]:
    given = value.get(key)
    if given is None:
        return []
    if not isinstance(given, list) or not all(isinstance(s, str) for s in given):
        raise _Bad("record_invalid", f"`{key}` must be a list of strings")
    for s in given:
        _check_text(s, f"`{key}`")
    return list(given)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _scores(value: dict[str, Any], source: ir.Source) -> dict[str, float]:
    mapped = set(source.columns.values())
    scores = {k: float(v) for k, v in value.items()
              if k not in _KNOWN_FIELDS and k not in mapped and _is_number(v)}
    given = value.get("scores")
    if isinstance(given, dict):
        scores.update({k: float(v) for k, v in given.items() if isinstance(k, str) and _is_number(v)})
    elif given is not None:
        raise _Bad("record_invalid", "`scores` must be an object of numbers")
    return scores


# ---- images -------------------------------------------------------------------------------------


def _inspect_piece(root: str | None, paths: list[str], max_pixels: int) -> list[imaging.ImageInfo | tuple[str, str]]:
    """Worker: inspect images; a reject comes back as (reason, detail)."""
    results: list[imaging.ImageInfo | tuple[str, str]] = []
    folder = imaging.resolved_root(root) if root is not None else None  # once for the piece, not once an image
    for path in paths:
        if folder is None:
            results.append(("image_path_invalid", f"{path!r}: the source declares no `images` folder"))
            continue
        try:
            results.append(imaging.inspect_image(folder, path, max_pixels=max_pixels))
        except imaging.ImageReject as e:
            results.append((e.reason, e.detail))
    return results


class _Inspector:
    """Inspects images inline or in a process pool; remembers recent results (shared images)."""

    def __init__(self, root: Path | None, max_pixels: int, workers: int):
        self.root = str(root) if root is not None else None
        self.max_pixels = max_pixels
        self.workers = max(1, workers)
        self.pool: ProcessPoolExecutor | None = None
        self.cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.inlined = 0

    def __enter__(self) -> "_Inspector":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, paths: list[str]) -> _Results:
        """Start inspecting `paths`; returns a callable giving {path: ImageInfo | (reason, detail)}."""
        todo = list(dict.fromkeys(p for p in paths if p not in self.cache))
        known = {p: self.cache[p] for p in paths if p in self.cache}
        # inline while few: a pool costs more to start than a small source's images take; past
        # that, every image goes to the pool, so decoding never holds up the step's own process
        if self.workers == 1 or (self.pool is None and self.inlined + len(todo) <= INLINE_IMAGES):
            self.inlined += len(todo)
            done = dict(zip(todo, _inspect_piece(self.root, todo, self.max_pixels)))
            return self._remember(known, todo, lambda: done)
        if self.pool is None:
            # spawn: safe whatever the parent holds (threads, a GPU context)
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                        initializer=_worker_started)
        pieces = [todo[i:i + PIECE] for i in range(0, len(todo), PIECE)]
        futures = [self.pool.submit(_inspect_piece, self.root, piece, self.max_pixels) for piece in pieces]

        def gather() -> dict[str, Any]:
            return {p: r for piece, f in zip(pieces, futures) for p, r in zip(piece, f.result())}

        return self._remember(known, todo, gather)

    def _remember(self, known: dict[str, Any], todo: list[str], fetch: _Results) -> _Results:
        def results() -> dict[str, Any]:
            fresh = fetch()
            for path in todo:
                self.cache[path] = fresh[path]
                self.cache.move_to_end(path)
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
            return {**known, **fresh}

        return results
