"""tag_images and tag_instructions: what each seed image shows, what each seed instruction asks.

tag_images (Infinity-MM 3.2.1 uses RAM++; recipec's default is zero-shot SigLIP)
    Every distinct image (by sha256) is tagged once against the recipe's vocabulary: a sigmoid
    probability per tag; the tags at or above `threshold`, most probable first (ties by name), up
    to `max_tags`. A record's `image_tags` are its images' tags merged (highest probability per
    tag). Records without images pass through untagged. An image the model cannot read is a reject.

tag_instructions
    Each record's instruction (its human turns) is placed in the three-level taxonomy by
    constrained choice, level by level: first among the top-level classes, then among the
    children of the chosen ones, then among their leaves. A beam of `max_tags` paths is kept at
    every level, ranked by the product of the choice probabilities along the path; the record gets
    up to `max_tags` leaves as `instruction_tags` ("class/task/subtask"), most probable first, and
    each path's probability as `scores["instruction_tag:<path>"]`. A label is never parsed from
    free text, so every tag is a real leaf.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from recipec.models.engine import Choose, RequestError, Tag
from recipec.ops.base import Chunk, OperationError, StepContext
from recipec.ops.collect import concat, emit
from recipec.ops.model_io import (ImageFolders, ask, engine_reject, fill, messages_of, stamp, strip_images, to_table,
                                  with_scores)

DEFAULT_INSTRUCTION_PROMPT = (
    "Classify the instruction below by the kind of task it asks for.\n"
    "Instruction: {instruction}\n"
    "Which {level} fits it best? Options: {options}.\n"
    "Reply with one option exactly as written."
)


def run_tag_images(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    tagger = ctx.params["tagger"]
    labels = tuple(tagger.get("tags") or ())
    if not labels:
        raise OperationError(f"image_tagger `{tagger['name']}` has no tag vocabulary: give it "
                             "`vocabulary = \"tags.txt\"` (one tag per line)")
    table = concat(inputs)
    rows = table.to_pylist()
    folders = ImageFolders(ctx)
    engine = ctx.engine(tagger["model"])
    # one request per distinct image, in first-seen order
    distinct: dict[str, Any] = {}
    for row in rows:
        for image in folders.images(row):
            distinct.setdefault(image.sha256, image)
    ctx.progress.total(len(distinct))
    answers = dict(zip(distinct, ask(ctx, engine, "tag", [Tag((image,), labels) for image in distinct.values()])))

    out, rejects = [], []
    for row in rows:
        merged: dict[str, float] = {}
        failed = None
        for image in folders.images(row):
            answer = answers[image.sha256]
            if isinstance(answer, RequestError):
                failed = answer
                break
            for label, p in zip(labels, answer.scores):
                if p >= tagger["threshold"] and p > merged.get(label, -1.0):
                    merged[label] = p
        if failed is not None:
            rejects.append(engine_reject(row, failed, "tagging an image"))
            continue
        ranked = sorted(merged, key=lambda label: (-merged[label], label))[:tagger["max_tags"]]
        out.append(stamp({**row, "image_tags": ranked}, ctx.step_id))
    yield from emit(to_table(out), consumed=len(rows), rejects=rejects)


def instruction_of(record: dict[str, Any]) -> str:
    return "\n".join(strip_images(m["content"]) for m in messages_of(record) if m["role"] == "user").strip()


def run_tag_instructions(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    tagger = ctx.params["tagger"]
    taxonomy = ctx.params["taxonomy"]
    levels = list(taxonomy.get("levels") or ("category", "task", "subtask"))
    template = (tagger.get("prompt") or {}).get("text") or DEFAULT_INSTRUCTION_PROMPT
    beam_width = tagger["max_tags"]
    table = concat(inputs)
    rows = table.to_pylist()
    engine = ctx.engine(tagger["model"])
    instructions = [instruction_of(row) for row in rows]

    # beams[i]: (path of names, nodes' children, probability) for record i
    beams: list[list[tuple[tuple[str, ...], tuple, float]]] = [[((), tuple(taxonomy["tree"]), 1.0)] for _ in rows]
    failures: dict[int, RequestError] = {}
    depth = 0
    ctx.progress.total(None)
    while True:
        asks: list[tuple[int, int]] = []  # (record, beam entry) pairs that still branch
        requests = []
        for i, beam in enumerate(beams):
            if i in failures:
                continue
            for k, (path, children, _) in enumerate(beam):
                if children:
                    names = [child["name"] for child in children]
                    level = levels[min(depth, len(levels) - 1)]
                    prompt = fill(template, instruction=instructions[i], level=level, options="; ".join(names),
                                  taxonomy="; ".join(names), max_tags=beam_width, path=" / ".join(path) or "(top level)")
                    requests.append(Choose(({"role": "user", "content": prompt},), tuple(names)))
                    asks.append((i, k))
        if not requests:
            break
        answers = list(ask(ctx, engine, "choose", requests))
        expanded: dict[int, list] = {}
        for (i, k), answer in zip(asks, answers):
            if isinstance(answer, RequestError):
                failures[i] = answer
                continue
            path, children, p = beams[i][k]
            for child in children:
                expanded.setdefault(i, []).append(((*path, child["name"]), tuple(child.get("children") or ()),
                                                   p * answer.probs[child["name"]]))
        for i, beam in enumerate(beams):
            if i in failures:
                continue
            done = [entry for entry in beam if not entry[1]]  # leaves reached at a shallower depth
            grown = done + expanded.get(i, [])
            beams[i] = sorted(grown, key=lambda e: (-e[2], e[0]))[:beam_width]
        depth += 1

    out, rejects = [], []
    for i, row in enumerate(rows):
        if i in failures:
            rejects.append(engine_reject(row, failures[i], "tagging the instruction"))
            continue
        tags = ["/".join(path) for path, _, _ in beams[i]]
        probs = {f"instruction_tag:{'/'.join(path)}": round(p, 6) for path, _, p in beams[i]}
        out.append(stamp(with_scores({**row, "instruction_tags": tags}, **probs), ctx.step_id))
    yield from emit(to_table(out), consumed=len(rows), rejects=rejects)
