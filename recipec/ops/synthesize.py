"""Instruction synthesis (Infinity-MM 3.2.3-3.2.4): questions, answers in three styles, multi-turn merge.

generate_questions
    For each distinct seed image (first-seen order; the first `images` of them when the recipe
    caps it): the instruction types its tags map to (`map_tags`, the mapping's `top_k`), and
    `questions_per_image` questions cycling over those types. Each prompt shows the image, the
    target type as its path in the taxonomy and `few_shot` examples of that type from the tagged
    seed data (their images and questions), chosen deterministically from the recipe seed. An
    image whose tags map to no type, or a seed record without an image, is skipped with a reason.

generate_answers
    Each question is answered once per style (`short`, `brief_reason`, `detailed_reason`), with
    the style's instruction appended to the question as training data has it.

Every output the model gives that cannot be used is a reject: empty (`empty_output`), cut at
`max_new_tokens` (`truncated`), or an engine failure with its own code. Each (image, question
slot) and each (question, style) is one unit of account: an output record or a reject.

merge_turns
    The QA pairs of one image become one multi-turn sample (`merge = per_image`): turns in input
    order, the image placeholder only in the first question, scores averaged per field,
    instruction tags merged. `merge = none` passes records through.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from recipec import records
from recipec.models.engine import IMAGE_PLACEHOLDER, Generate, Generation, RequestError, Sampling
from recipec.ops.base import Chunk, StepContext
from recipec.ops.collect import concat, emit, sha_key
from recipec.ops.mapping import rank_types
from recipec.ops.model_io import (ImageFolders, ask, engine_reject, fill, messages_of, read_json_artifact, reject,
                                  scores_dict, stamp, strip_images, to_table)

REASONS = frozenset({"empty_output", "truncated"})  # rejects; skipped: no_image, same_image, untagged_image, over_image_cap

DEFAULT_QUESTION_PROMPT = (
    "You are given an image and a target instruction type: {task}.\n"
    "Here are examples of questions of this type about other images:\n{examples}\n"
    "Write one new question of the same type about this image. Reply with the question only."
)
DEFAULT_STYLE_PROMPTS = {
    "short": "Answer the question using a single word or phrase.",
    "brief_reason": "Please provide the reasoning process first, and then give the answer.",
    "detailed_reason": "Explain your reasoning in detail, then give the answer.",
}


def clean_output(generation: Generation) -> tuple[str | None, str | None]:
    """(text, None) for a usable output, (None, reason) otherwise."""
    if generation.finish_reason == "length":
        return None, "truncated"
    text = generation.text.strip().strip('"').strip()
    for prefix in ("Question:", "Answer:", "Q:", "A:"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
    text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return (text, None) if text else (None, "empty_output")


def _question_of(record: dict[str, Any]) -> str:
    return next((strip_images(m["content"]) for m in messages_of(record) if m["role"] == "user"), "")


def run_generate_questions(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    p = ctx.params
    seed_count = p["seeds"]
    seeds = concat(inputs[:seed_count]).to_pylist()
    folders = ImageFolders(ctx)
    weights = top_k = min_score = None
    image_tags: dict[str, list[str]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    if len(inputs) > seed_count:
        document = read_json_artifact(ctx.input_dirs[seed_count], "mapping.json")
        weights, top_k, min_score = document["types"], document["top_k"], document["min_score"]
        for row in concat([inputs[seed_count + 1]]).to_pylist():
            for image in row.get("images") or ():
                image_tags.setdefault(image["sha256"], row.get("image_tags") or [])
        for row in concat([inputs[seed_count + 2]]).to_pylist():
            if len(row.get("images") or ()) == 1:
                for kind in row.get("instruction_tags") or ():
                    examples.setdefault(kind, []).append(row)

    template = (p.get("prompt") or {}).get("text") or DEFAULT_QUESTION_PROMPT
    skipped: dict[str, int] = {}
    plans = []  # (seed record, its image, instruction type or None, slot)
    seen: set[str] = set()
    for row in seeds:
        images = row.get("images") or []
        if len(images) != 1:
            skipped["no_image"] = skipped.get("no_image", 0) + 1  # text-only or multi-image seeds
            continue
        digest = images[0]["sha256"]
        if digest in seen:
            skipped["same_image"] = skipped.get("same_image", 0) + 1
            continue
        if p.get("images") is not None and len(seen) >= p["images"]:
            skipped["over_image_cap"] = skipped.get("over_image_cap", 0) + 1
            continue
        seen.add(digest)
        kinds: list[str | None] = [None]
        if weights is not None:
            ranked = rank_types(weights, image_tags.get(digest, []), top_k=top_k, min_score=min_score)
            if not ranked:
                skipped["untagged_image"] = skipped.get("untagged_image", 0) + 1
                continue
            kinds = [kind for kind, _ in ranked]
        for slot in range(p["questions_per_image"]):
            plans.append((row, kinds[slot % len(kinds)], slot))

    requests = []
    for row, kind, slot in plans:
        target = folders.images(row)[0]
        shots = []
        if kind is not None and p["few_shot"]:
            pool = [r for r in examples.get(kind, []) if r["images"][0]["sha256"] != target.sha256]
            pool.sort(key=lambda r: (sha_key(p["seed"], target.sha256, kind, r["id"]), r["id"]))
            shots = pool[:p["few_shot"]]
        lines = [f"Example {n}: {IMAGE_PLACEHOLDER}\nQuestion: {_question_of(r)}" for n, r in enumerate(shots, 1)]
        task = " / ".join(kind.split("/")) if kind else "any question the image can answer"
        text = fill(template, task=task, examples="\n".join(lines) or "(none)")
        if text.count(IMAGE_PLACEHOLDER) != len(shots):  # a template without {examples} shows no example images
            shots = []
            text = text.replace(IMAGE_PLACEHOLDER, "")
        images = (target, *(folders.images(r)[0] for r in shots))
        requests.append(Generate(({"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"},), images,
                                 Sampling(p["max_new_tokens"], p["temperature"], 1.0,
                                          sha_key(p["seed"], target.sha256, slot) & 0x7FFFFFFF)))

    engine = ctx.engine(p["model"])
    ctx.progress.total(len(requests))
    out, rejects = [], []
    for (row, kind, slot), answer in zip(plans, ask(ctx, engine, "generate", requests)):
        if isinstance(answer, RequestError):
            rejects.append(engine_reject(row, answer, "generating a question"))
            continue
        question, problem = clean_output(answer)
        if problem:
            rejects.append(reject(row, problem, f"question {slot + 1} for {row['origin']}: {answer.text[:200]!r}"))
            continue
        conversations = [{"from": records.USER, "value": f"{IMAGE_PLACEHOLDER}\n{question}"}]
        image = dict(row["images"][0])
        out.append(stamp({
            "id": records.record_id(p["source"], [image], conversations), "source": p["source"],
            "origin": f"{row['origin']}#q{slot + 1}", "images": [image], "conversations": conversations,
            "category": "synthetic", "data_type": "synthetic", "image_tags": image_tags.get(image["sha256"], []),
            "instruction_tags": [kind] if kind else [], "scores": [], "provenance": list(row.get("provenance") or []),
        }, ctx.step_id))
    consumed = len(plans) + sum(skipped.values())
    yield from emit(to_table(out), consumed=consumed, rejects=rejects, skipped=skipped)


def run_generate_answers(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    p = ctx.params
    rows = concat(inputs).to_pylist()
    folders = ImageFolders(ctx)
    styles = list(p["styles"])
    prompts = {s: ((p.get("prompts") or {}).get(s) or {}).get("text") or DEFAULT_STYLE_PROMPTS[s] for s in styles}
    units, requests = [], []
    for row in rows:
        question = _question_of(row)
        for style in styles:
            human = f"{IMAGE_PLACEHOLDER}\n{question}\n{prompts[style]}" if row.get("images") else f"{question}\n{prompts[style]}"
            units.append((row, style, human))
            requests.append(Generate(({"role": "user", "content": human},), folders.images(row),
                                     Sampling(p["max_new_tokens"], p["temperature"], 1.0,
                                              sha_key(p["seed"], row["id"], style) & 0x7FFFFFFF)))
    engine = ctx.engine(p["model"])
    ctx.progress.total(len(requests))
    out, rejects = [], []
    for (row, style, human), answer in zip(units, ask(ctx, engine, "generate", requests)):
        if isinstance(answer, RequestError):
            rejects.append(engine_reject(row, answer, f"answering in the {style} style"))
            continue
        text, problem = clean_output(answer)
        if problem:
            rejects.append(reject(row, problem, f"{style} answer to {row['origin']}: {answer.text[:200]!r}"))
            continue
        conversations = [{"from": records.USER, "value": human}, {"from": records.ASSISTANT, "value": text}]
        out.append(stamp({**row, "id": records.record_id(row["source"], row["images"], conversations),
                          "origin": f"{row['origin']}#{style}", "conversations": conversations}, ctx.step_id))
    yield from emit(to_table(out), consumed=len(units), rejects=rejects)


def run_merge_turns(ctx: StepContext, inputs: list[pa.Table]) -> Iterator[Chunk]:
    p = ctx.params
    table = concat(inputs)
    rows = table.to_pylist()
    if p["merge"] == "none" or not rows:
        yield from emit(to_table([_as_dataset(r, p, ctx.step_id) for r in rows]), consumed=len(rows))
        return
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple(i["sha256"] for i in row.get("images") or ()) or (row["id"],)
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        conversations = []
        for n, member in enumerate(members):
            for turn in member["conversations"]:
                value = turn["value"]
                if n and turn["from"] == records.USER:
                    value = strip_images(value)
                conversations.append({"from": turn["from"], "value": value})
        fields: dict[str, list[float]] = {}
        for member in members:
            for k, v in scores_dict(member).items():
                fields.setdefault(k, []).append(v)
        first = members[0]
        merged = {**first, "conversations": conversations,
                  "origin": first["origin"].split("#", 1)[0] + f"#{len(members)}qa",
                  "instruction_tags": list(dict.fromkeys(t for m in members for t in m.get("instruction_tags") or ())),
                  "scores": sorted((k, sum(v) / len(v)) for k, v in fields.items()),
                  "provenance": list(dict.fromkeys(s for m in members for s in m.get("provenance") or ()))}
        out.append(_as_dataset(merged, p, ctx.step_id))
    yield from emit(to_table(out), consumed=len(rows), skipped={"merged_into_multi_turn": len(rows) - len(out)})


def _as_dataset(row: dict[str, Any], p: dict[str, Any], step_id: str) -> dict[str, Any]:
    source = p["source"]
    images = row.get("images") or []
    return stamp({**row, "source": source, "category": p["category"], "data_type": p["data_type"],
                  "id": records.record_id(source, images, row["conversations"])}, step_id)

