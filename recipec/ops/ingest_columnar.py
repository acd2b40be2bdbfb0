"""ingest's fast path for JSON Lines: a block of lines parsed by `pyarrow.json` and checked column
by column, for the records in the common shape.

The rule is the one `ingest._plain_candidate` keeps: accept only what the full checks accept, with
the same result, and leave everything else to them. So a line goes back to the per-line path
(`ingest._jsonl_line`, then `_validate`) when anything about it is unusual: it has an image, it
fails to parse here (pyarrow names the row, and the lines before and after it are parsed again
without it), it holds a value the two parsers read differently (NaN, Inf and Infinity, which
pyarrow reads as floats, found after parsing), or a field has a type this path does not handle. Those
lines keep their exact reasons and details; the records read here are the same rows, field for
field, as the per-line path would give.

Pyarrow parses a block in C++, several times faster than Python can build the objects, and the
checks are vectorised; what is left per record in Python is its content id (orjson and sha256).

The rows carry three columns beyond records.SCHEMA for the step's process (`ROW_SCHEMA`): the raw
16 bytes of the content id and the 16-byte key of the data set's own id (`own_key`: the keys it
numbers copies and spots reused ids by), and the row's line number (to find its text again, should it be rejected).
"""

from __future__ import annotations

import io
from hashlib import blake2b, sha256

import numpy as np
from orjson import dumps
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from recipec import ir, records

MAX_SPLITS = 16  # lines pyarrow refuses in one block before the rest of it goes line by line
_READ = pj.ReadOptions(use_threads=False, block_size=1 << 26)
_PARSE = pj.ParseOptions(newlines_in_values=False)

KEY, OWN, LINE = "_key", "_own", "_line"
ROW_SCHEMA = pa.schema([*records.SCHEMA, pa.field(KEY, pa.binary(16)), pa.field(OWN, pa.binary(16)),
                        pa.field(LINE, pa.int64())])


SHORT_ID = 15  # UTF-8 bytes of an own id that is its own key, after a byte for its length


def own_key(source_id: str) -> bytes:
    """The 16-byte key of a data set's own id: a short id's length and bytes (no hashing), a longer
    one's blake2b with the top bit of its first byte set, which no length below 16 has. A lone
    surrogate, which only the stdlib reads, is kept as is."""
    data = source_id.encode("utf-8", "surrogatepass")
    if len(data) <= SHORT_ID:
        return bytes([len(data)]) + data.ljust(SHORT_ID, b"\0")
    digest = blake2b(data, digest_size=16).digest()
    return bytes([digest[0] | 0x80]) + digest[1:]


def own_keys(ids: pa.Array) -> bytes:
    """`own_key` of each string of `ids` (nulls: 16 zero bytes), short ones built as whole arrays."""
    n = len(ids)
    if not n:
        return b""
    ids = ids.cast(pa.string())
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset:ids.offset + n + 1].astype(np.int64)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = offsets[1:] - offsets[:-1]
    valid = _valid(ids)
    keys = np.zeros((n, 16), dtype=np.uint8)
    short = valid & (lengths <= SHORT_ID)
    keys[short, 0] = lengths[short]
    for j in range(int(lengths[short].max(initial=0))):
        at = np.flatnonzero(short & (lengths > j))
        keys[at, j + 1] = data[offsets[at] + j]
    raw = memoryview(data)
    for i in np.flatnonzero(valid & ~short).tolist():
        digest = blake2b(raw[offsets[i]:offsets[i + 1]], digest_size=16).digest()
        keys[i] = np.frombuffer(digest, dtype=np.uint8)
        keys[i, 0] |= 0x80
    return keys.tobytes()


def eligible(source: ir.Source) -> bool:
    """Whether a source's records can be read here: no renamed columns, not an image folder."""
    return not source.columns and source.format in ("llava_jsonl", "llava_json")


def read(data: bytes, bounds: np.ndarray, numbers: np.ndarray, shown: str, source: ir.Source, step_id: str,
         known_fields: frozenset[str] | set[str]) -> tuple[pa.Table, np.ndarray]:
    """The plain records among the lines of `data` (line i is `data[bounds[i]:bounds[i + 1]]`, none
    blank; `numbers` are their line numbers) as rows in ROW_SCHEMA, `id` being their content id; and
    which lines they are (the others are left)."""
    n = len(bounds) - 1
    accepted = np.zeros(n, dtype=bool)
    usable = _closed(data, bounds)
    for _ in range(MAX_SPLITS + 1):
        # the usable lines parsed as one body (one call, whatever lines are left out between them)
        lines = np.flatnonzero(usable)
        if not len(lines):
            break
        if len(lines) == n:
            body = data
        else:
            runs = np.flatnonzero(np.diff(lines) != 1) + 1  # where a run of consecutive lines starts
            firsts, lasts = lines[np.concatenate([[0], runs])], lines[np.concatenate([runs - 1, [len(lines) - 1]])]
            body = b"".join([data[a:b] for a, b in zip(bounds[firsts].tolist(), bounds[lasts + 1].tolist())])
        try:
            parsed = pj.read_json(io.BytesIO(body), read_options=_READ, parse_options=_PARSE)
        except pa.ArrowInvalid as e:
            bad = _row_of(str(e))
            if bad is None or bad >= len(lines):
                break  # the rest of the block line by line
            usable[lines[bad]] = False
            continue  # again, without the line pyarrow refused
        except Exception:  # e.g. bytes that are not UTF-8: the per-line path says what is wrong
            break
        if parsed.num_rows != len(lines):  # a line with two values: the per-line path rejects it
            break
        odd = _non_finite_rows(parsed)
        if odd.any():  # NaN, Inf, Infinity: pyarrow reads them, the per-line path rejects the line
            usable[lines[odd]] = False
            continue
        # no `<image>` in the bytes and no \u escape that could spell one: no turn holds the token
        tokens = (b"<" in body and b"<image>" in body) or (b"\\" in body and b"\\u" in body)  # memchr first
        rows, ok = _convert(parsed, numbers[lines], shown, source, step_id, known_fields, tokens)
        accepted[lines] = ok
        return rows, accepted
    return ROW_SCHEMA.empty_table(), accepted


def _closed(data: bytes, bounds: np.ndarray) -> np.ndarray:
    """Whether each line ends with `}` (before its newline): a line cut short, the usual broken line,
    goes to the per-line path without costing pyarrow a failed parse and a second one (a line with
    spaces after its `}` goes there too, and is read right all the same)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    starts, at = bounds[:-1], bounds[1:] - 1  # each line's last byte
    if not len(at):
        return np.zeros(0, dtype=bool)
    at = at - (raw[at] == 10)
    at = at - ((at >= starts) & (raw[np.maximum(at, 0)] == 13))  # a Windows line end: the byte before \r
    return (at >= starts) & (raw[np.maximum(at, 0)] == ord("}"))


def _non_finite_rows(table: pa.Table) -> np.ndarray:
    """Rows holding a NaN or an infinity anywhere (a float column, or one inside lists and objects)."""
    odd = np.zeros(table.num_rows, dtype=bool)
    for column in table.columns:
        if _has_floats(column.type):
            odd |= _non_finite(column.combine_chunks())
    return odd


def _has_floats(t: pa.DataType) -> bool:
    if pa.types.is_floating(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_floats(t.value_type)
    return pa.types.is_struct(t) and any(_has_floats(f.type) for f in t)


def _non_finite(array: pa.Array) -> np.ndarray:
    t = array.type
    if pa.types.is_floating(t):  # valid and not finite (Kleene logic: a null is not odd)
        return np.asarray(pc.and_not_kleene(pc.is_valid(array), pc.is_finite(array)), dtype=bool)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _non_finite(array.flatten())
        parents = np.asarray(pc.list_parent_indices(array), dtype=np.int64)
        return np.bincount(parents[inner], minlength=len(array)) > 0 if inner.any() else np.zeros(len(array), bool)
    odd = np.zeros(len(array), dtype=bool)
    if pa.types.is_struct(t):
        for f, child in zip(t, array.flatten()):
            if _has_floats(f.type):
                odd |= _non_finite(child)
    return odd


def _row_of(message: str) -> int | None:
    """The row pyarrow names in a parse error ("... in row 17")."""
    head, sep, tail = message.rpartition(" in row ")
    return int(tail) if sep and tail.strip().isdigit() else None


def _column(table: pa.Table, name: str) -> pa.Array | None:
    return table.column(name).combine_chunks() if name in table.column_names else None


def _valid(array: pa.Array) -> np.ndarray:
    return np.asarray(array.is_valid(), dtype=bool) if array.null_count else np.ones(len(array), dtype=bool)


def _strings(array: pa.Array | None) -> bool:
    return array is not None and (pa.types.is_string(array.type) or pa.types.is_large_string(array.type))


def _is_null(array: pa.Array | None) -> bool:
    return array is None or pa.types.is_null(array.type)


def _per_row(flags: np.ndarray, parents: np.ndarray, n: int) -> np.ndarray:
    """Rows with at least one flagged child."""
    return np.bincount(parents[flags], minlength=n) > 0 if flags.any() else np.zeros(n, dtype=bool)


def _convert(t: pa.Table, numbers: list[int], shown: str, source: ir.Source, step_id: str,
             known_fields: frozenset[str] | set[str], may_hold_tokens: bool = True) -> tuple[pa.Table, np.ndarray]:
    n = t.num_rows
    ok = np.ones(n, dtype=bool)

    for key in ("image", "images"):  # a record with images is inspected first: the per-line path
        column = _column(t, key)
        if not _is_null(column):
            ok &= ~_valid(column)

    conversations = _column(t, "conversations")
    turn_type = conversations.type.value_type if conversations is not None and pa.types.is_list(conversations.type) \
        else None
    if turn_type is None or not pa.types.is_struct(turn_type) or turn_type.get_field_index("from") < 0 \
            or turn_type.get_field_index("value") < 0:
        return ROW_SCHEMA.empty_table(), np.zeros(n, dtype=bool)
    turns = conversations.flatten()
    who, said = turns.field("from"), turns.field("value")
    if not (_strings(who) and _strings(said)):
        return ROW_SCHEMA.empty_table(), np.zeros(n, dtype=bool)
    ok &= _valid(conversations)
    lengths = np.asarray(pc.list_value_length(conversations).fill_null(0), dtype=np.int64)
    ok &= (lengths >= 2) & (lengths % 2 == 0)
    parents = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    asking = (np.arange(len(turns)) - starts[parents]) % 2 == 0
    human = np.asarray(pc.equal(who, records.USER).fill_null(False), dtype=bool)
    answer = np.asarray(pc.equal(who, records.ASSISTANT).fill_null(False), dtype=bool)
    tokens = np.asarray(pc.count_substring(said, records.IMAGE_TOKEN).fill_null(0), dtype=np.int64) \
        if may_hold_tokens else np.zeros(len(said), dtype=np.int64)
    bad_turn = ~_valid(turns) | ~_valid(said) | np.where(asking, ~human, ~answer) | (~asking & (tokens > 0))
    ok &= ~_per_row(bad_turn, parents, n)
    ok &= np.bincount(parents, weights=tokens, minlength=n) == 0  # no image, so no <image> token

    data_type = _column(t, "data_type")
    if _strings(data_type):
        known = np.asarray(pc.is_in(data_type, pa.array(list(ir.DATA_TYPES))).fill_null(False), dtype=bool)
        data_types = pc.if_else(pa.array(known), data_type, pa.scalar(source.data_type))
    else:
        known = np.zeros(n, dtype=bool)
        if not _is_null(data_type):  # a number, say: the per-line path says what it makes of it
            ok &= ~_valid(data_type)
        data_types = pa.array([source.data_type] * n, pa.string())
    if source.data_type == "mixed":  # each record names its own type, or is rejected
        ok &= known

    tags = {}
    no_tags = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string()))
    for key in ("image_tags", "instruction_tags"):
        column = _column(t, key)
        if _is_null(column):
            tags[key] = no_tags
            continue
        if not pa.types.is_list(column.type) or not (pa.types.is_string(column.type.value_type)
                                                     or pa.types.is_null(column.type.value_type)):
            ok &= ~_valid(column)
            tags[key] = no_tags
            continue
        items = column.flatten()
        counts = np.asarray(pc.list_value_length(column).fill_null(0), dtype=np.int64)
        ok &= ~_per_row(~_valid(items), np.repeat(np.arange(n), counts), n)
        tags[key] = column.fill_null(pa.scalar([], column.type)).cast(pa.list_(pa.string()))

    own = _column(t, "id")
    if _is_null(own) or pa.types.is_boolean(own.type):
        source_ids = pa.nulls(n, pa.string())
    elif _strings(own) or pa.types.is_int64(own.type):
        source_ids = own.cast(pa.string())
    else:  # a float (an integer past 64 bits, say), a timestamp pyarrow saw in a string: line by line
        ok &= ~_valid(own)
        source_ids = pa.nulls(n, pa.string())

    numeric = [name for name in t.column_names if name not in known_fields
               and (pa.types.is_int64(t.schema.field(name).type) or pa.types.is_float64(t.schema.field(name).type))]
    given = _column(t, "scores")
    nested: list[str] = []
    if not _is_null(given):
        if pa.types.is_struct(given.type):
            nested = [f.name for f in given.type if pa.types.is_int64(f.type) or pa.types.is_float64(f.type)]
        else:
            ok &= ~_valid(given)
            given = None

    keep = np.flatnonzero(ok)
    if not len(keep):
        return ROW_SCHEMA.empty_table(), ok
    everything = len(keep) == n
    picked = pa.array(keep)

    def kept(array: pa.Array) -> pa.Array:
        return array if everything else array.take(picked)

    kept_turns = kept(conversations)
    flat = kept_turns.flatten()
    values = flat.field("value").to_pylist()

    name = source.name
    bounds = np.concatenate([[0], np.cumsum(lengths[keep])]).tolist()
    # the JSON records.record_id hashes, around orjson's array of (from, value) pairs: a kept row's
    # turns alternate human and gpt from its first, so `from` need not be read; strings read by
    # pyarrow are valid UTF-8, which is all that could make orjson refuse them
    pairs = list(zip((records.USER, records.ASSISTANT) * (len(values) // 2), values))
    head, tail = b'{"conversations":', b',"images":[],"source":' + dumps(name) + b"}"
    keys = [sha256(head + dumps(pairs[a:b]) + tail).digest()[:16] for a, b in zip(bounds, bounds[1:])]
    kept_ids = kept(source_ids)
    lines = pa.array(np.asarray(numbers, dtype=np.int64)[keep]).cast(pa.string())
    where = pc.binary_join_element_wise(shown + ":", lines, "")
    origins = pc.coalesce(pc.binary_join_element_wise(where, " id=", kept_ids, ""), where) if kept_ids.null_count < len(keep) \
        else where
    count = len(keep)
    if len(numeric) == 1 and not nested:  # the common case: one score, as a map array built whole
        scores = _one_score(numeric[0], kept(t.column(numeric[0])).combine_chunks())
    else:
        columns = {key: kept(t.column(key)).to_pylist() for key in numeric}
        nested_columns = {key: kept(given.field(key)).to_pylist() for key in nested} if nested else {}
        given_valid = _valid(given)[keep].tolist() if nested else None
        entries = []
        for k in range(count):
            entry = {key: float(v) for key in numeric if (v := columns[key][k]) is not None}
            if nested and given_valid[k]:
                entry.update({key: float(v) for key in nested if (v := nested_columns[key][k]) is not None})
            entries.append(sorted(entry.items()))
        scores = pa.array(entries, records.SCHEMA.field("scores").type)

    key_bytes = b"".join(keys)
    table = pa.Table.from_arrays([
        _hex(key_bytes, count),
        pa.repeat(name, count),
        origins,
        _lists(np.zeros(count + 1, dtype=np.int32), pa.array([], records.IMAGE), "images"),
        _turns(kept_turns, count),
        pa.repeat(source.category, count),
        kept(data_types).cast(pa.string()),
        kept(tags["image_tags"]),
        kept(tags["instruction_tags"]),
        scores,
        _lists(np.arange(count + 1, dtype=np.int32), pa.repeat(step_id, count), "provenance"),
        kept_ids,
        pa.Array.from_buffers(pa.binary(16), count, [None, pa.py_buffer(key_bytes)]),
        pa.Array.from_buffers(pa.binary(16), count, [_validity(kept_ids), pa.py_buffer(own_keys(kept_ids))]),
        pa.array(np.asarray(numbers, dtype=np.int64)[keep]),
    ], schema=ROW_SCHEMA)
    return table, ok


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _validity(array: pa.Array) -> pa.Buffer | None:
    """`array`'s validity as a bitmap of its own (none when it has no nulls)."""
    if not array.null_count:
        return None
    return pa.py_buffer(np.packbits(_valid(array), bitorder="little").tobytes())


def _hex(key_bytes: bytes, count: int) -> pa.Array:
    """16-byte keys as 32 hex digits each, a string array built whole (what `.hex()` gives)."""
    raw = np.frombuffer(key_bytes, dtype=np.uint8)
    digits = np.empty(2 * len(raw), dtype=np.uint8)
    digits[0::2], digits[1::2] = _HEX_DIGITS[raw >> 4], _HEX_DIGITS[raw & 15]
    offsets = np.arange(0, 32 * count + 1, 32, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(digits)])


def _lists(offsets: np.ndarray, values: pa.Array, name: str) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=records.SCHEMA.field(name).type)


def _one_score(key: str, values: pa.Array) -> pa.Array:
    """`scores` when one top-level number is the only score: {key: float(value)}, {} where it is null."""
    present = _valid(values)
    offsets = np.concatenate([[0], np.cumsum(present)]).astype(np.int32)
    given = values.filter(pa.array(present)) if values.null_count else values
    items = given.cast(pa.float64(), safe=False)  # as float() rounds an integer past 2**53
    return pa.MapArray.from_arrays(pa.array(offsets), pa.repeat(key, len(items)), items,
                                   type=records.SCHEMA.field("scores").type)


def _turns(conversations: pa.Array, count: int) -> pa.Array:
    """The turns as records.TURN lists: `from` and `value` only, whatever else a turn held."""
    flat = conversations.flatten()
    turn = records.SCHEMA.field("conversations").type.value_type
    values = pa.StructArray.from_arrays([flat.field("from").cast(pa.string()), flat.field("value").cast(pa.string())],
                                        fields=list(turn))
    lengths = np.asarray(pc.list_value_length(conversations).fill_null(0), dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, type=records.SCHEMA.field("conversations").type)

