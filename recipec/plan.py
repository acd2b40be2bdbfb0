"""IR -> the execution plan: a DAG of steps, each fingerprinted by its op, op version, params and inputs.

A step's fingerprint changes exactly when something that could change its output changes, so a run
recomputes a step only when its fingerprint is new. Data files are not read here: the runtime folds
the content of each source's files into its ingest step when it runs.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from recipec import ir

# Bump an op's version when its implementation changes what it outputs.
OP_VERSIONS = {
    "ingest": 2,
    "tag_images": 1,
    "tag_instructions": 1,
    "map_tags": 1,
    "generate_questions": 1,
    "judge_relevance": 1,
    "generate_answers": 1,
    "judge_score": 1,
    "score_loss": 1,
    "threshold": 1,
    "percentile": 1,
    "merge_turns": 1,
    "collect": 1,
    "dedup_exact": 2,
    "dedup_phash": 2,
    "clean": 1,
    "mix": 1,
    "export": 3,  # 3: files cut in fixed pieces, each depending on its records alone
    "train": 1,
}

# Ops that load a model: they run on an engine and are the expensive part of a plan.
MODEL_OPS = {"tag_images", "tag_instructions", "generate_questions", "judge_relevance", "generate_answers",
             "judge_score", "score_loss", "train"}
# Ops whose inputs are partly context (tags, mappings, seeds) rather than records they account for
# one by one; the executor does not hold them to consuming every input record.
CONTEXT_OPS = MODEL_OPS | {"map_tags"}


# Ops that open images: their params carry every data set's image folder (records hold paths
# relative to it).
IMAGE_OPS = {"dedup_phash", "tag_images", "generate_questions", "judge_relevance", "generate_answers", "judge_score",
             "score_loss", "train"}


@dataclass(frozen=True)
class Step:
    id: str
    op: str
    inputs: tuple[str, ...]
    params: dict[str, Any] = field(hash=False)
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "inputs": list(self.inputs), "fingerprint": self.fingerprint,
                "params": self.params}


@dataclass
class Plan:
    recipe: ir.Recipe
    steps: dict[str, Step]  # in dependency order

    def upstream(self, step_id: str) -> list[str]:
        """`step_id` and everything it needs, in dependency order."""
        needed: set[str] = set()
        stack = [step_id]
        while stack:
            current = stack.pop()
            if current not in needed:
                needed.add(current)
                stack.extend(self.steps[current].inputs)
        return [s for s in self.steps if s in needed]

    def downstream(self, step_ids: set[str]) -> set[str]:
        """Every step that depends, directly or not, on one of `step_ids`."""
        affected = set(step_ids)
        for step in self.steps.values():  # dependency order: one pass suffices
            if any(i in affected for i in step.inputs):
                affected.add(step.id)
        return affected


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def _fingerprint(op: str, params: dict[str, Any], inputs: list[Step]) -> str:
    payload = {"op": op, "version": OP_VERSIONS[op], "params": params, "inputs": [s.fingerprint for s in inputs]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _members(stage: ir.Stage, pools: dict[str, list[str]]) -> list[str]:
    """The data sets a stage's mixture draws from (a pool stands for its sources)."""
    return sorted({m for e in stage.mix for m in pools.get(e.name, [e.name])})


class _Builder:
    def __init__(self, recipe: ir.Recipe):
        self.recipe = recipe
        self.steps: dict[str, Step] = {}

    def add(self, step_id: str, op: str, inputs: list[str], params: dict[str, Any]) -> str:
        if op in IMAGE_OPS and "roots" not in params:
            params = {**params, "roots": self.roots}
        params = json.loads(json.dumps(params, sort_keys=True))  # plain JSON types, canonical order
        fingerprint = _fingerprint(op, params, [self.steps[i] for i in inputs])
        self.steps[step_id] = Step(step_id, op, tuple(inputs), params, fingerprint)
        return step_id

    @functools.cached_property
    def roots(self) -> dict[str, str | None]:
        """The image folder of every data set, for the steps that open images.

        Records keep image paths relative to their source's image folder (as
        `recipec.ops.ingest.image_root` finds them; not imported, planning stays free of pyarrow).
        A synthesized set's is its seeds' common folder, if they share one."""
        roots: dict[str, str | None] = {}
        for name, src in self.recipe.sources.items():
            roots[name] = src.images
            if src.images is None and src.format == "image_folder":
                fixed = [posixpath.join(*parts) if parts else "." for parts in (
                    list(itertools.takewhile(lambda p: not glob.has_magic(p), PurePosixPath(path).parts))
                    for path in src.paths)]
                roots[name] = posixpath.commonpath(fixed) if len(fixed) > 1 else fixed[0]
        for name, syn in self.recipe.syntheses.items():
            seeds = {roots.get(s) for s in syn.from_sources}
            roots[name] = seeds.pop() if len(seeds) == 1 else None
        return roots

    def build(self) -> Plan:
        r = self.recipe
        ingest = {name: self.add(f"ingest.{name}", "ingest", [], {"source": _dump(src)}) for name, src in r.sources.items()}

        image_tags = {}
        for name, tagger in r.image_taggers.items():
            image_tags[name] = self.add(f"tag_images.{name}", "tag_images", [ingest[s] for s in tagger.on if s in ingest],
                                        {"tagger": _dump(tagger)})
        instruction_tags = {}
        for name, tagger in r.instruction_taggers.items():
            taxonomy = r.taxonomies[tagger.taxonomy]
            instruction_tags[name] = self.add(
                f"tag_instructions.{name}", "tag_instructions", [ingest[s] for s in tagger.on if s in ingest],
                {"tagger": _dump(tagger), "taxonomy": _dump(taxonomy)})
        mappings = {}
        for name, mapping in r.mappings.items():
            mappings[name] = self.add(f"map.{name}", "map_tags",
                                      [image_tags[mapping.image_tags], instruction_tags[mapping.instruction_tags]],
                                      {"mapping": _dump(mapping)})

        synthesized = {name: self.synthesis(syn, ingest, image_tags, instruction_tags, mappings)
                       for name, syn in r.syntheses.items()}

        datasets = [*ingest.values(), *synthesized.values()]
        current = self.add("collect", "collect", datasets, {"order": [*ingest, *synthesized]})
        for flt in r.filters:
            for index, op in enumerate(flt.ops, start=1):
                current = self.filter_op(flt, index, op, current)

        trained: dict[str, str] = {}
        for stage in r.stages:
            pools = {e.name: list(r.pools[e.name].sources) for e in stage.mix if e.name in r.pools}
            mixed = self.add(f"mix.{stage.name}", "mix", [current], {
                "stage": stage.name, "mix": [_dump(e) for e in stage.mix], "pools": pools,
                "samples": stage.samples, "balance": _dump(stage.balance), "order": _dump(stage.order),
                "seed": r.seed, "data_types": {n: d.data_type for n, d in r.datasets().items()},
                "categories": {n: d.category for n, d in r.datasets().items()},
            })
            exported = self.add(f"export.{stage.name}", "export", [mixed], self.export_params(stage, pools))
            inputs = [exported] + ([trained[stage.after]] if stage.after in trained else [])
            model = r.models[stage.model]
            training = {k: v for k, v in _dump(stage).items() if k not in ("mix", "composition", "samples", "balance", "order")}
            # the image folders of the stage's own data sets: an edit elsewhere leaves the step as it is
            roots = {m: self.roots.get(m) for m in _members(stage, pools)}
            trained[stage.name] = self.add(f"train.{stage.name}", "train", inputs,
                                           {"stage": training, "model": _dump(model), "seed": r.seed, "roots": roots})
        return Plan(r, self.steps)

    def export_params(self, stage: ir.Stage, pools: dict[str, list[str]]) -> dict[str, Any]:
        """What the export of `stage` writes (recipe's `export`), its data sets' image folders, and
        the training settings that travel with the export."""
        members = _members(stage, pools)
        model = self.recipe.models[stage.model]
        training = {k: v for k, v in _dump(stage).items() if k not in ("mix", "composition", "samples", "balance", "order")}
        training["model"] = {"name": model.name, "vision": model.vision.ref, "language": model.language.ref,
                             "projector": model.projector, "vision_layer": model.vision_layer}
        return {"stage": stage.name, "export": _dump(self.recipe.export),
                "roots": {m: self.roots.get(m) for m in members}, "training": training}

    def synthesis(self, syn: ir.Synthesis, ingest, image_tags, instruction_tags, mappings) -> str:
        r = self.recipe
        prefix = f"synthesize.{syn.name}"
        seeds = [ingest[s] for s in syn.from_sources]
        context = []
        if syn.mapping:
            mapping = r.mappings[syn.mapping]
            context = [mappings[syn.mapping], image_tags[mapping.image_tags], instruction_tags[mapping.instruction_tags]]
        model = _dump(syn.model)
        current = self.add(f"{prefix}.questions", "generate_questions", seeds + context, {
            "source": syn.name, "seeds": len(seeds), "model": model, "few_shot": syn.few_shot, "questions_per_image": syn.questions_per_image,
            "images": syn.images, "prompt": _dump(syn.prompts.get("question")), "seed": r.seed,
            "max_new_tokens": syn.max_new_tokens, "temperature": syn.temperature})
        rules = {c.field: c for c in syn.rules}
        if "relevance" in rules:
            current = self.add(f"{prefix}.relevance", "judge_relevance", [current], {
                "model": model, "prompt": _dump(syn.prompts.get("relevance")), "condition": _dump(rules["relevance"])})
        current = self.add(f"{prefix}.answers", "generate_answers", [current], {
            "model": model, "styles": list(syn.styles), "seed": r.seed, "max_new_tokens": syn.max_new_tokens,
            "temperature": syn.temperature,
            "prompts": {s: _dump(syn.prompts.get(f"answer_{s}")) for s in syn.styles}})
        if "score" in rules:
            current = self.add(f"{prefix}.score", "judge_score", [current], {
                "model": model, "prompt": _dump(syn.prompts.get("score")), "condition": _dump(rules["score"])})
        for name, condition in rules.items():
            if name in ("relevance", "score"):
                continue
            current = self.condition_steps(f"{prefix}.{name}", condition, current, on=None)
        return self.add(f"{prefix}.merge", "merge_turns", [current], {
            "merge": syn.merge, "source": syn.name, "category": syn.category, "data_type": syn.data_type})

    def condition_steps(self, prefix: str, condition: ir.Condition, current: str, on: list[str] | None) -> str:
        """A keep/drop rule: a scoring step when a model computes the field, then the cut itself."""
        if condition.model is not None:
            current = self.add(f"{prefix}.score", "score_loss" if condition.field == "loss" else "judge_score", [current],
                               {"model": _dump(condition.model), "field": condition.field, "on": on,
                                "prompt": _dump(condition.prompt)})
        op = "percentile" if condition.op in ("top", "bottom") else "threshold"
        cut = condition.model_copy(update={"model": None, "prompt": None})
        return self.add(f"{prefix}.{op}" if condition.model is not None else prefix, op, [current],
                        {"condition": _dump(cut), "on": on})

    def filter_op(self, flt: ir.Filter, index: int, op: Any, current: str) -> str:
        on = list(flt.on)
        prefix = f"filter.{flt.name}.{index}"
        if isinstance(op, (ir.Threshold, ir.Percentile)):
            return self.condition_steps(f"{prefix}.{op.condition.verb}_{op.condition.field}", op.condition, current, on)
        params = {k: v for k, v in _dump(op).items() if k != "op"}
        return self.add(f"{prefix}.{op.op}", op.op, [current], {**params, "on": on, "seed": self.recipe.seed})


def build_plan(recipe: ir.Recipe) -> Plan:
    return _Builder(recipe).build()


def stage_summary(recipe: ir.Recipe, stage: ir.Stage) -> dict[str, Any]:
    """The per-stage part of `recipec plan --json` (documented in DESIGN.md)."""
    model = recipe.models[stage.model]
    return {
        "name": stage.name,
        "model": stage.model,
        "samples": stage.composition.total,
        "mixture": dict(stage.composition.by_source),
        "by_data_type": dict(stage.composition.by_data_type),
        "by_category": dict(stage.composition.by_category),
        "image_size": stage.image_size,
        "grid": f"{stage.grid[0]}x{stage.grid[1]}",
        "max_tiles": stage.max_tiles,
        "tokens_per_tile": (stage.image_size // model.patch_size) ** 2,
        "max_image_tokens": stage.max_image_tokens,
        "train": list(stage.train),
        "trainable_params": stage.trainable_params,
        "total_params": stage.total_params,
        "lr": stage.lr,
        "part_lr": dict(stage.part_lr),
        "batch_size": stage.batch,
        "epochs": stage.epochs,
        "warmup": stage.warmup,
        "schedule": stage.schedule,
        "after": stage.after,
    }


def plan_json(plan: Plan, cached: set[str] | None = None, may_stay: set[str] | None = None) -> dict[str, Any]:
    """The plan as JSON; with a store, each step's `cached` and, for a step that will be recomputed
    only because an input is, `may_stay_cached` (early cutoff: it stays cached if that input comes
    out unchanged)."""
    r = plan.recipe
    steps = []
    for step in plan.steps.values():
        entry = {"id": step.id, "op": step.op, "inputs": list(step.inputs), "fingerprint": step.fingerprint,
                 "uses_model": step.op in MODEL_OPS}
        if cached is not None:
            entry["cached"] = step.id in cached
            if may_stay is not None and step.id in may_stay:
                entry["may_stay_cached"] = True
        steps.append(entry)
    return {
        "recipe": r.name,
        "base": r.base,
        "seed": r.seed,
        "fingerprint": ir.fingerprint(r),
        "models": {n: {"vision": m.vision.ref, "language": m.language.ref, "projector": m.projector,
                       "tokens_per_tile": m.tokens_per_tile, "params": _dump(m.params), "config_origin": m.config_origin}
                   for n, m in r.models.items()},
        "steps": steps,
        "stages": [stage_summary(r, s) for s in r.stages],
    }
