"""What the model-backed operations share: records as chat requests, prompts, asking in fixed chunks.

Requests go to the engine in chunks (the engine's `chunk_size`, a few of its batches; else
`REQUEST_CHUNK`), always in the same order for the same inputs, so the chunks (and the batches an
engine forms inside each) are the same in every run: a resumed run asks exactly the requests a
killed one did not finish, grouped as they would have been. The request cache answers the rest
and keeps each chunk's answers as soon as the chunk is done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from recipec import records
from recipec.models.engine import IMAGE_PLACEHOLDER, Image, RequestError
from recipec.ops.base import OperationError, Reject, StepContext
from recipec.ops.collect import canonical_json, row_dict

REQUEST_CHUNK = 64
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FIELD = re.compile(r"\{([a-z_]+)\}")


def fill(template: str, **values: Any) -> str:
    """`{name}` replaced by `values[name]` for the names given; every other brace stays as written."""
    return _FIELD.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


class ImageFolders:
    """Record image paths -> `engine.Image`, through each data set's image folder."""

    def __init__(self, ctx: StepContext):
        self.recipe_dir = ctx.recipe_dir
        self.roots: dict[str, str | None] = ctx.params.get("roots") or {}

    def images(self, record: dict[str, Any]) -> tuple[Image, ...]:
        if not record.get("images"):
            return ()
        root = self.roots.get(record["source"])
        if root is None:
            raise OperationError(f"records of `{record['source']}` have images but no image folder is known for it")
        base = Path(root) if Path(root).is_absolute() else self.recipe_dir / root
        return tuple(Image(str(base / image["path"]), image["sha256"]) for image in record["images"])


def messages_of(record: dict[str, Any]) -> tuple[dict[str, str], ...]:
    """A record's LLaVA conversation as chat messages, with one `<image>` per image.

    LLaVA data marks where images go with `<image>` in a human turn; a record that does not gets
    its images at the start of the first human turn, as LLaVA's loaders place them.
    """
    turns = record.get("conversations") or []
    messages = [{"role": ROLES.get(t["from"], "user"), "content": t["value"] or ""} for t in turns]
    wanted = len(record.get("images") or ())
    present = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if wanted and present != wanted:
        for m in messages:
            m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            messages.insert(0, {"role": "user", "content": ""})
            first = messages[0]
        first["content"] = (IMAGE_PLACEHOLDER + "\n") * wanted + first["content"]
    return tuple(messages)


def strip_images(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def transcript(record: dict[str, Any]) -> str:
    """The conversation as `Question:` / `Answer:` lines, image placeholders kept in place."""
    lines = []
    for m in messages_of(record):
        label = {"user": "Question", "assistant": "Answer", "system": "System"}[m["role"]]
        lines.append(f"{label}: {m['content']}")
    return "\n".join(lines)


def ask(ctx: StepContext, engine: Any, method: str, requests: Sequence[Any]) -> Iterator[Any]:
    """The engine's answers to `requests`, in order, asked chunk by chunk with progress."""
    call: Callable[[list[Any]], list[Any]] = getattr(engine, method)
    size = getattr(engine, "chunk_size", None) or REQUEST_CHUNK
    for start in range(0, len(requests), size):
        chunk = list(requests[start:start + size])
        answers = call(chunk)
        if len(answers) != len(chunk):
            raise OperationError(f"the engine answered {len(answers)} of {len(chunk)} requests")
        tokens = sum(getattr(a, "tokens_in", 0) + getattr(a, "tokens_out", 0) for a in answers)
        ctx.progress.advance(len(chunk), tokens=tokens)
        yield from answers


def ask_records(ctx: StepContext, method: str, rows: list[dict[str, Any]],
                request_of: Callable[[dict[str, Any]], Any]) -> dict[int, Any]:
    """The engine's answer for each record the step's `on` selects (all when None), by row number;
    the rows it does not select get none and pass through the step untouched."""
    on = ctx.params.get("on")
    chosen = [i for i, row in enumerate(rows) if on is None or row["source"] in on]
    requests = [request_of(rows[i]) for i in chosen]
    engine = ctx.engine(ctx.params["model"])
    ctx.progress.total(len(requests))
    return dict(zip(chosen, ask(ctx, engine, method, requests)))


def reject(record: dict[str, Any], reason: str, detail: str) -> Reject:
    return Reject(reason=reason, detail=detail, id=record.get("id") or "", source=record.get("source") or "",
                  origin=record.get("origin") or "", record=canonical_json(row_dict(record)))


def engine_reject(record: dict[str, Any], error: RequestError, what: str) -> Reject:
    return reject(record, error.reason, f"{what}: {error.detail}")


def scores_dict(record: dict[str, Any]) -> dict[str, float]:
    scores = record.get("scores")
    if isinstance(scores, list):
        return {k: v for k, v in scores}
    return dict(scores or {})


def with_scores(record: dict[str, Any], **new: float) -> dict[str, Any]:
    scores = scores_dict(record)
    scores.update(new)
    return {**record, "scores": sorted(scores.items())}


def stamp(record: dict[str, Any], step_id: str) -> dict[str, Any]:
    return {**record, "provenance": [*(record.get("provenance") or []), step_id]}


def to_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=records.SCHEMA) if rows else records.empty_table()


def read_json_artifact(directory: Path, name: str) -> Any:
    path = directory / "files" / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OperationError(f"cannot read {name} of an upstream step ({path}): {e}") from e
