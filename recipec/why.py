"""Provenance of records: where each came from, what touched it, and where it ended (`recipec why`).

The index is one SQLite file per run in the store, `STORE/index/<digest of the run's step keys>.sqlite`:
the same steps give the same index, so it is built once, on first use (or by `recipec package`),
and answers every later question with a few B-tree lookups. Building it reads only the `id`,
`source`, `origin` and `source_id` columns of every step's record shards and the rejects' ids and
reasons, in plan order:

- `records`: one row per record (recipec's id; a line rejected before it became a record gets a row
  of its own, keyed by its origin): its source, origin (`file:line`), the data set's own id, the last
  step whose output holds it (shard and row), the step and reason that dropped it, and the stages
  whose mix selected it;
- `seen`: for the steps that learn something about a record (ingest: the scores the data carries;
  taggers, judges, loss scoring, synthesis), where the record is in that step's output, so `why` can show the tags and scores each
  step added;
- `unselected`: per stage, the reason its mix left a record out (a record another stage took is not
  lost, so the mix's rejects are no record's fate);
- `steps`: the run's steps in order, with their store keys.

A question is a recipec id (or a unique prefix of at least 8 characters), the data set's own id, or
an origin (`file:line`, as in the rejects; a leading folder may be left out). The answer reads the
record itself from one row group of one shard, so it stays well under a second on a run of millions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from recipec.runtime.store import Store, canonical

INDEX_FORMAT = 1
LEARNING_OPS = frozenset({"ingest", "tag_images", "tag_instructions", "generate_questions", "judge_relevance",
                          "generate_answers", "judge_score", "score_loss", "merge_turns"})
SKIPPED_OPS = frozenset({"export", "train", "map_tags"})  # no records of their own to trace
_KEPT = re.compile(r"\bkept ([0-9a-f]{8,64})\b|\bas ([0-9a-f]{32})\b")


class WhyError(Exception):
    """The run or its index cannot be read."""


def index_path(store: Store, report: dict[str, Any]) -> Path:
    keys = [[s["id"], s["key"]] for s in report["steps"]]
    digest = hashlib.sha256(canonical({"format": INDEX_FORMAT, "steps": keys}).encode("utf-8")).hexdigest()[:32]
    return store.root / "index" / f"{digest}.sqlite"


def ensure_index(store: Store, report: dict[str, Any], plan_steps: dict[str, dict[str, Any]] | None = None) -> Path:
    """The run's index, built now if it is not in the store yet."""
    path = index_path(store, report)
    if not path.exists():
        build_index(store, report, path)
    return path


def _manifest(store: Store, key: str) -> dict[str, Any]:
    manifest = store.manifest(key)
    if manifest is None:
        raise WhyError(f"step {key[:12]}... is not in the store {store.root} (was it cleaned, or is this another store?)")
    return manifest


def build_index(store: Store, report: dict[str, Any], path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    rows: dict[str, list] = {}  # id -> [source, origin, source_id, last_ord, last_shard, last_row, drop_ord, drop_shard, drop_row, reason, detail, stages]
    orphans: list[list] = []  # rejects that never became records (no id)
    seen: list[tuple] = []
    unselected: list[tuple] = []
    steps = []
    for ord_, step in enumerate(report["steps"]):
        steps.append((ord_, step["id"], step["op"], step["key"], _stage_of(store, step)))
        if step["op"] in SKIPPED_OPS:
            continue
        manifest = _manifest(store, step["key"])
        stage = steps[-1][4] if step["op"] == "mix" else None
        learning = step["op"] in LEARNING_OPS
        for shard, entry in enumerate(manifest.get("records") or []):
            file = store.path(step["key"], entry["name"])
            names = pq.read_schema(file).names
            columns = [c for c in ("id", "source", "origin", "source_id") if c in names]
            table = pq.read_table(file, columns=columns)
            ids = table.column("id").to_pylist()
            sources = table.column("source").to_pylist()
            origins = table.column("origin").to_pylist()
            source_ids = table.column("source_id").to_pylist() if "source_id" in columns else [None] * len(ids)
            for row, rid in enumerate(ids):
                r = rows.get(rid)
                if r is None:
                    rows[rid] = [sources[row], origins[row], source_ids[row], ord_, shard, row, None, None, None,
                                 None, None, [stage] if stage else []]
                    if learning:
                        seen.append((rid, ord_, shard, row))
                    continue
                r[3], r[4], r[5] = ord_, shard, row
                if stage:
                    r[11].append(stage)
                if learning:
                    seen.append((rid, ord_, shard, row))
        for shard, entry in enumerate(manifest.get("rejects") or []):
            file = store.path(step["key"], entry["name"])
            table = pq.read_table(file, columns=["id", "source", "origin", "reason", "detail"])
            cols = [table.column(c).to_pylist() for c in ("id", "source", "origin", "reason", "detail")]
            for row, (rid, source, origin, reason, detail) in enumerate(zip(*cols)):
                if stage:
                    unselected.append((rid, stage, ord_, reason))
                    continue
                if not rid:
                    orphans.append([source, origin, None, None, None, None, ord_, shard, row, reason, detail, []])
                    continue
                r = rows.get(rid)
                if r is None:
                    rows[rid] = r = [source, origin, None, None, None, None, None, None, None, None, None, []]
                r[6], r[7], r[8], r[9], r[10] = ord_, shard, row, reason, detail
    db = sqlite3.connect(tmp)
    try:
        db.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT);
            CREATE TABLE steps (ord INTEGER PRIMARY KEY, id TEXT, op TEXT, key TEXT, stage TEXT);
            CREATE TABLE records (n INTEGER PRIMARY KEY, id TEXT, source TEXT, origin TEXT, source_id TEXT,
                last_ord INTEGER, last_shard INTEGER, last_row INTEGER, drop_ord INTEGER, drop_shard INTEGER,
                drop_row INTEGER, reason TEXT, detail TEXT, stages TEXT);
            CREATE TABLE seen (id TEXT, ord INTEGER, shard INTEGER, row INTEGER);
            CREATE TABLE unselected (id TEXT, stage TEXT, ord INTEGER, reason TEXT);
        """)
        db.execute("INSERT INTO meta VALUES ('format', ?), ('recipe', ?), ('fingerprint', ?)",
                   (str(INDEX_FORMAT), report["recipe"], report["fingerprint"]))
        db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?)", steps)
        db.executemany("INSERT INTO records (id, source, origin, source_id, last_ord, last_shard, last_row, drop_ord,"
                       " drop_shard, drop_row, reason, detail, stages) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       ((rid, *r[:11], ",".join(r[11])) for rid, r in rows.items()))
        db.executemany("INSERT INTO records (id, source, origin, source_id, last_ord, last_shard, last_row, drop_ord,"
                       " drop_shard, drop_row, reason, detail, stages) VALUES ('',?,?,?,?,?,?,?,?,?,?,?,'')",
                       (r[:11] for r in orphans))
        db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?)", seen)
        db.executemany("INSERT INTO unselected VALUES (?, ?, ?, ?)", unselected)
        db.executescript("""
            CREATE INDEX records_id ON records (id); CREATE INDEX records_source_id ON records (source_id);
            CREATE INDEX records_origin ON records (origin); CREATE INDEX seen_id ON seen (id);
            CREATE INDEX unselected_id ON unselected (id);
        """)
        db.commit()
    finally:
        db.close()
    os.replace(tmp, path)


def _stage_of(store: Store, step: dict[str, Any]) -> str | None:
    if step["op"] != "mix":
        return None
    manifest = _manifest(store, step["key"])
    return (manifest.get("params") or {}).get("stage")


# ---- questions ----------------------------------------------------------------------------------

_COLUMNS = ("n", "id", "source", "origin", "source_id", "last_ord", "last_shard", "last_row", "drop_ord",
            "drop_shard", "drop_row", "reason", "detail", "stages")


def find(db: sqlite3.Connection, query: str) -> list[dict[str, Any]]:
    """The records `query` names: an id, a unique id prefix, the data set's own id, or an origin."""
    select = f"SELECT {', '.join(_COLUMNS)} FROM records WHERE "
    attempts: list[tuple[str, tuple]] = [
        ("id = ? AND id != ''", (query,)),
        ("source_id = ?", (query,)),
        ("origin = ?", (query,)),
        ("origin >= ? AND origin < ?", (query + " ", query + "!")),  # `file:line` of `file:line id=...`
    ]
    if re.fullmatch(r"[0-9a-f]{8,31}", query):
        attempts.append(("id >= ? AND id < ?", (query, query + "g")))
    for where, args in attempts:
        found = db.execute(select + where + " ORDER BY n LIMIT 20", args).fetchall()
        if found:
            return [dict(zip(_COLUMNS, r)) for r in found]
    if "/" in query and ":" in query:  # an origin given from another folder: drop leading folders
        parts = query.split("/")
        for i in range(1, len(parts)):
            tail = "/".join(parts[i:])
            found = db.execute(select + "(origin = ? OR (origin >= ? AND origin < ?)) ORDER BY n LIMIT 20",
                               (tail, tail + " ", tail + "!")).fetchall()
            if found:
                return [dict(zip(_COLUMNS, r)) for r in found]
    return []


def _row(store: Store, key: str, kind: str, shard: int, row: int, columns: list[str] | None = None) -> dict[str, Any]:
    """One row of one shard of a stored step, reading only the row group that holds it."""
    import pyarrow.parquet as pq

    manifest = _manifest(store, key)
    entry = (manifest.get(kind) or [])[shard]
    pf = pq.ParquetFile(store.path(key, entry["name"]))
    start = 0
    for group in range(pf.metadata.num_row_groups):
        count = pf.metadata.row_group(group).num_rows
        if row < start + count:
            table = pf.read_row_group(group, columns=columns)
            return table.slice(row - start, 1).to_pylist()[0]
        start += count
    raise WhyError(f"row {row} is not in {entry['name']} of step {key[:12]}...")


def explain(store: Store, db: sqlite3.Connection, hit: dict[str, Any], *, follow: bool = True) -> dict[str, Any]:
    """Everything the index and the store know about one record, as JSON-ready data."""
    steps = {r[0]: {"id": r[1], "op": r[2], "key": r[3], "stage": r[4]}
             for r in db.execute("SELECT ord, id, op, key, stage FROM steps")}
    answer: dict[str, Any] = {"id": hit["id"] or None, "source": hit["source"], "origin": hit["origin"],
                              "source_id": hit["source_id"]}
    record: dict[str, Any] | None = None
    if hit["last_ord"] is not None:
        step = steps[hit["last_ord"]]
        record = _row(store, step["key"], "records", hit["last_shard"], hit["last_row"])
        answer["last_step"] = step["id"]
    rejected = None
    if hit["drop_ord"] is not None:
        step = steps[hit["drop_ord"]]
        rejected = _row(store, step["key"], "rejects", hit["drop_shard"], hit["drop_row"])
        if record is None and rejected.get("record"):
            try:
                candidate = json.loads(rejected["record"])
                record = candidate if isinstance(candidate, dict) else None
            except ValueError:
                record = None
    if record is not None:
        answer["provenance"] = list(record.get("provenance") or [])
        answer["images"] = [i.get("path") for i in record.get("images") or []]
        answer["category"], answer["data_type"] = record.get("category"), record.get("data_type")
        answer["image_tags"] = list(record.get("image_tags") or [])
        answer["instruction_tags"] = list(record.get("instruction_tags") or [])
        answer["scores"] = _scores(record.get("scores"))
        answer["conversation"] = [[t.get("from"), t.get("value")] for t in record.get("conversations") or []]
    learnt = []
    if hit["id"]:
        for ord_, shard, row in db.execute("SELECT ord, shard, row FROM seen WHERE id = ? ORDER BY ord", (hit["id"],)):
            step = steps[ord_]
            values = _row(store, step["key"], "records", shard, row, ["image_tags", "instruction_tags", "scores"])
            learnt.append({"step": step["id"], "op": step["op"], "image_tags": values.get("image_tags") or [],
                           "instruction_tags": values.get("instruction_tags") or [],
                           "scores": _scores(values.get("scores"))})
    answer["learnt"] = _differences(learnt)
    stages = [s for s in (hit["stages"] or "").split(",") if s]
    answer["stages"] = stages
    if rejected is not None:
        answer["dropped"] = {"step": steps[hit["drop_ord"]]["id"], "op": steps[hit["drop_ord"]]["op"],
                             "reason": hit["reason"], "detail": hit["detail"]}
        kept = _KEPT.search(hit["detail"] or "")
        if kept and follow:
            kept_id = kept.group(1) or kept.group(2)
            other = find(db, kept_id)
            if other:
                copy = explain(store, db, other[0], follow=False)
                answer["dropped"]["kept_copy"] = {"id": copy["id"], "source": copy["source"], "origin": copy["origin"],
                                                  "stages": copy["stages"], "dropped": copy.get("dropped")}
    if hit["id"]:
        answer["not_selected"] = [{"stage": s, "reason": r} for s, r in db.execute(
            "SELECT stage, reason FROM unselected WHERE id = ? ORDER BY ord", (hit["id"],))]
    if stages:
        answer["fate"] = "in stage" + ("s " if len(stages) > 1 else " ") + ", ".join(stages)
    elif rejected is not None:
        answer["fate"] = f"dropped by {answer['dropped']['step']}: {hit['reason']}"
    else:
        answer["fate"] = "kept by every filter, selected by no stage"
    return answer


def _scores(scores: Any) -> dict[str, float]:
    if isinstance(scores, dict):
        return dict(sorted(scores.items()))
    return dict(sorted((k, v) for k, v in scores or ()))


def _differences(learnt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per learning step, only what it added to the record (new tags, new or changed scores)."""
    out = []
    prev: dict[str, Any] = {"image_tags": [], "instruction_tags": [], "scores": {}}
    for entry in learnt:
        added = {"step": entry["step"], "op": entry["op"]}
        for key in ("image_tags", "instruction_tags"):
            new = [t for t in entry[key] if t not in prev[key]]
            if new:
                added[key] = new
        scores = {k: v for k, v in entry["scores"].items() if prev["scores"].get(k) != v}
        if scores:
            added["scores"] = scores
        out.append(added)
        prev = entry
    return out


def render_text(answer: dict[str, Any]) -> str:
    lines = [f"record {answer['id'] or '(never became a record)'}"]
    lines.append(f"  source     {answer['source']}   origin {answer['origin']}"
                 + (f"   own id {answer['source_id']}" if answer.get("source_id") else ""))
    if answer.get("images"):
        lines.append(f"  images     {', '.join(answer['images'])}")
    if answer.get("provenance"):
        lines.append("  steps      " + " -> ".join(answer["provenance"]))
    for entry in answer.get("learnt") or []:
        parts = []
        if entry.get("image_tags"):
            parts.append("image tags " + ", ".join(entry["image_tags"]))
        if entry.get("instruction_tags"):
            parts.append("instruction types " + ", ".join(entry["instruction_tags"]))
        if entry.get("scores"):
            parts.append(", ".join(f"{k} = {v:g}" for k, v in entry["scores"].items()))
        lines.append(f"  learnt     {entry['step']}: " + ("; ".join(parts) or "(nothing new)"))
    if answer.get("scores"):
        lines.append("  scores     " + ", ".join(f"{k} = {v:g}" for k, v in answer["scores"].items()))
    lines.append(f"  fate       {answer['fate']}")
    dropped = answer.get("dropped")
    if dropped:
        lines.append(f"  why        {dropped['detail'] or dropped['reason']}")
        kept = dropped.get("kept_copy")
        if kept:
            where = ", ".join(kept["stages"]) if kept["stages"] else (
                f"dropped later by {kept['dropped']['step']}" if kept.get("dropped") else "in no stage")
            lines.append(f"  kept copy  {kept['id']} ({kept['source']}, {kept['origin']}): {where}")
    for miss in answer.get("not_selected") or []:
        lines.append(f"  not in     stage {miss['stage']} ({miss['reason']})")
    return "\n".join(lines)
