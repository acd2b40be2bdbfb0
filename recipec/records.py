"""The unified record: one Arrow schema every data step reads and writes.

A record is one training sample: its images (relative to its source's image root), its LLaVA-style
conversation, what it is (category, data type), what was learnt about it (tags, scores) and where it
came from (origin, and the steps that touched it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import pyarrow as pa

IMAGE = pa.struct([
    ("path", pa.string()),  # POSIX, relative to the source's image root
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
TURN = pa.struct([("from", pa.string()), ("value", pa.string())])

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("origin", pa.string()),  # `file:line` or `file:row`, for people tracing a record back
    ("images", pa.list_(IMAGE)),
    ("conversations", pa.list_(TURN)),
    ("category", pa.string()),
    ("data_type", pa.string()),
    ("image_tags", pa.list_(pa.string())),
    ("instruction_tags", pa.list_(pa.string())),
    ("scores", pa.map_(pa.string(), pa.float64())),
    ("provenance", pa.list_(pa.string())),
    # the id the record had in its data set (`id`, or the column `columns.id` names; an image
    # folder's records: the image's path); null when the data had none. `id` above is recipec's.
    ("source_id", pa.string()),
])

# Columns added to SCHEMA after records were first stored: a table without them (written by an
# older version, or by an op that builds rows without them) gets them as nulls (`collect.conform`).
NULLABLE_ADDED = ("source_id",)

# Rejected records: what was dropped, where, why, and the record itself as JSON.
REJECT_SCHEMA = pa.schema([
    ("step", pa.string()),
    ("id", pa.string()),  # empty when the input never became a record (a broken JSON line)
    ("source", pa.string()),
    ("origin", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("record", pa.string()),
])

USER, ASSISTANT = "human", "gpt"
IMAGE_TOKEN = "<image>"


def record_id(source: str, images: list[dict[str, Any]], conversations: list[dict[str, str]], copy: int = 0) -> str:
    """Stable id from the source and the content (image hashes and text), not from file positions.

    `copy` tells apart records of one source with the same content: the first has copy 0 (and the
    id of the content alone), the next copy 1, and so on in input order, so ids stay unique.
    """
    content: dict[str, Any] = {"conversations": [[t["from"], t["value"]] for t in conversations]}
    if copy:
        content["copy"] = copy
    content["images"] = [i["sha256"] for i in images]
    content["source"] = source
    return content_digest(content)


def content_digest(content: dict[str, Any]) -> str:
    """The id of a record's content: sha256 of its canonical JSON (sorted keys, compact, UTF-8).
    `content`'s keys come in sorted order, so orjson writes those same bytes, several times faster."""
    try:
        payload = orjson.dumps(content)
    except TypeError:  # what orjson refuses (a lone surrogate, a huge int): json.dumps decides
        payload = _canonical(content).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:32]


def _canonical(content: dict[str, Any]) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def text_of(conversations: list[dict[str, str]]) -> str:
    return "\n".join(f"{t['from']}: {t['value']}" for t in conversations)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()
