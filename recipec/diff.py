"""Two compiled recipes compared by meaning: what changed, per stage mixture, and what a run would recompute.

The diff is data (frozen dataclasses); rendering it is the CLI's job. Both sides are `ir.Recipe`s, so
layout, comments, block order and derivation never show: a variant against its base shows only
what the variant changes.

How the IR is walked: mappings are compared key by key; a list of things with a `name` (stages,
filters, mix entries, taxonomy nodes) is aligned by name, not position; a filter's `ops` by op kind
and occurrence (`ops.dedup_phash`, `ops[threshold#2]`); keep/drop rules by verb and field
(`rules[keep score]`). Any other list is one value. When the names of an aligned list keep their
items but change their order (stages, filters, ops), that is a change of the list itself. A removed
and an added block of the same kind whose content (all but the name) is equal is a rename; mix
entries and other references are not blocks, so a mix drawing on another source is not one. A
stage's derived numbers (composition, image tokens, parameters) appear in its mixture table, not as
changes.

`RecipeDiff.to_json()` gives these keys, which are stable:

    {
      "a": {"label": str, "recipe": str},            # the two sides; label is what the user named
      "b": {"label": str, "recipe": str},
      "equal": bool,
      "changes": [{"path": str, "kind": "added" | "removed" | "changed" | "renamed",
                   "before": JSON | null, "after": JSON | null}],
      "renames": [{"collection": str, "before": str, "after": str}],
      "stages": [{                                   # stages whose mixture or derived numbers differ,
                                                     # in b's order, then those only in a
        "name": str, "status": "added" | "removed" | "changed", "renamed_from": str | null,
        "samples": {"before": int | null, "after": int | null, "delta": int | null},
        "max_image_tokens": {"before", "after", "delta"},
        "trainable_params": {"before", "after", "delta"},
        "by_source" | "by_data_type" | "by_category": [{
          "name": str, "status": "added" | "removed" | "changed" | "unchanged", "renamed_from": str | null,
          "before": int | null, "after": int | null, "delta": int | null,
          "share_before": float | null, "share_after": float | null}],
      }],
      "cost": {
        "recompute": [{"id": str, "op": str, "uses_model": bool, "reason": "added" | "changed",
                       "may_stay_cached": true}],            # the last only where it holds
        "cached": [str],                             # b's steps whose fingerprint a already has
        "removed": [str],                            # a's steps that b has no more, nor their results
      },
    }

Paths read like `sources.gpt4_ocr.expect`, `stages.s4.mix.synthetic` or
`filters.processing.ops.dedup_phash.max_distance`; a name that is not an identifier is bracketed:
`tree[Coarse Perception]`. A rename is listed at the old name's path, with the two names as before
and after. In a mixture row a key absent on one side counts 0 samples; null means the count is not
known (a source without `expect`). A missing stage has null numbers. Shares are fractions of the
stage's samples, rounded to 6 digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from recipec import ir
from recipec.plan import MODEL_OPS, build_plan

ADDED, REMOVED, CHANGED, RENAMED, UNCHANGED = "added", "removed", "changed", "renamed", "unchanged"

# The recipe's blocks, by kind: the collections whose items can be renamed.
BLOCKS = ("models", "model_refs", "sources", "taxonomies", "prompts", "image_taggers", "instruction_taggers",
          "mappings", "syntheses", "filters", "pools", "stages")

# Derived numbers of a stage: shown in its mixture table rather than as changes.
STAGE_DERIVED = ("composition", "max_image_tokens", "trainable_params", "total_params")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_MISSING = object()


# ---- the diff as data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    path: str
    kind: str  # added | removed | changed | renamed
    before: Any = None
    after: Any = None

    def mirrored(self) -> Change:
        kind = {ADDED: REMOVED, REMOVED: ADDED}.get(self.kind, self.kind)
        return Change(self.path if self.kind != RENAMED else _rename_path(self.path, self.after), kind,
                      self.after, self.before)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class Rename:
    collection: str  # the path of the collection the item lives in
    before: str
    after: str

    def mirrored(self) -> Rename:
        return Rename(self.collection, self.after, self.before)

    def to_json(self) -> dict[str, Any]:
        return {"collection": self.collection, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class Quantity:
    before: int | None
    after: int | None

    @property
    def delta(self) -> int | None:
        return None if self.before is None or self.after is None else self.after - self.before

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def mirrored(self) -> Quantity:
        return Quantity(self.after, self.before)

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "delta": self.delta}


@dataclass(frozen=True)
class Row:
    """One line of a mixture table: a source, data type or category of a stage."""

    name: str
    status: str  # added | removed | changed | unchanged
    before: int | None
    after: int | None
    share_before: float | None
    share_after: float | None
    renamed_from: str | None = None

    @property
    def delta(self) -> int | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def mirrored(self) -> Row:
        status = {ADDED: REMOVED, REMOVED: ADDED}.get(self.status, self.status)
        name, renamed_from = (self.renamed_from, self.name) if self.renamed_from else (self.name, None)
        return Row(name, status, self.after, self.before, self.share_after, self.share_before, renamed_from)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "renamed_from": self.renamed_from,
                "before": self.before, "after": self.after, "delta": self.delta,
                "share_before": self.share_before, "share_after": self.share_after}


@dataclass(frozen=True)
class StageDiff:
    name: str
    status: str  # added | removed | changed
    samples: Quantity
    max_image_tokens: Quantity
    trainable_params: Quantity
    by_source: tuple[Row, ...]
    by_data_type: tuple[Row, ...]
    by_category: tuple[Row, ...]
    renamed_from: str | None = None

    def mirrored(self) -> StageDiff:
        status = {ADDED: REMOVED, REMOVED: ADDED}.get(self.status, self.status)
        name, renamed_from = (self.renamed_from, self.name) if self.renamed_from else (self.name, None)
        return StageDiff(name, status, self.samples.mirrored(), self.max_image_tokens.mirrored(),
                         self.trainable_params.mirrored(), tuple(r.mirrored() for r in self.by_source),
                         tuple(r.mirrored() for r in self.by_data_type),
                         tuple(r.mirrored() for r in self.by_category), renamed_from)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "renamed_from": self.renamed_from,
                "samples": self.samples.to_json(), "max_image_tokens": self.max_image_tokens.to_json(),
                "trainable_params": self.trainable_params.to_json(),
                "by_source": [r.to_json() for r in self.by_source],
                "by_data_type": [r.to_json() for r in self.by_data_type],
                "by_category": [r.to_json() for r in self.by_category]}


@dataclass(frozen=True)
class StepCost:
    id: str
    op: str
    uses_model: bool
    reason: str  # added (a step a does not have) | changed (same step, new fingerprint)
    # only its inputs changed (the step itself, its op and params, did not): the run keys it on its
    # inputs' content once they are done, and finds it cached when they come out as before
    may_stay_cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "uses_model": self.uses_model, "reason": self.reason,
                **({"may_stay_cached": True} if self.may_stay_cached else {})}


@dataclass(frozen=True)
class Cost:
    """What running b costs after a has run: steps are cached by fingerprint, whatever their id."""

    recompute: tuple[StepCost, ...]
    cached: tuple[str, ...]
    removed: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"recompute": [s.to_json() for s in self.recompute], "cached": list(self.cached),
                "removed": list(self.removed)}


@dataclass(frozen=True)
class Side:
    label: str
    recipe: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "recipe": self.recipe}


@dataclass(frozen=True)
class RecipeDiff:
    a: Side
    b: Side
    changes: tuple[Change, ...]
    renames: tuple[Rename, ...]
    stages: tuple[StageDiff, ...]
    cost: Cost

    @property
    def equal(self) -> bool:
        return not self.changes and not self.stages

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a.to_json(), "b": self.b.to_json(), "equal": self.equal,
                "changes": [c.to_json() for c in self.changes], "renames": [r.to_json() for r in self.renames],
                "stages": [s.to_json() for s in self.stages], "cost": self.cost.to_json()}


# ---- walking the IR -----------------------------------------------------------------------------


def _segment(key: str) -> str:
    return f".{key}" if _IDENTIFIER.match(key) else f"[{key}]"


def _join(path: str, key: str) -> str:
    segment = _segment(key)
    return segment[1:] if not path and segment.startswith(".") else path + segment


def _rename_path(path: str, new_name: str) -> str:
    """The path of a renamed item under its other name (the last segment replaced)."""
    match = re.search(r"(\.[A-Za-z_][A-Za-z0-9_\-]*|\[[^\]]*\])\Z", path)
    parent = path[: match.start()] if match else ""
    return _join(parent, new_name)


def _list_keys(items: list[Any]) -> list[str] | None:
    """How a list aligns: by name, by op kind and occurrence, by rule; None when it is one value."""
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if all("name" in i for i in items):
        bases = [str(i["name"]) for i in items]
    elif all("verb" in i and "field" in i for i in items):  # keep/drop rules (which also carry an `op`)
        bases = [f"{i['verb']} {i['field']}" for i in items]
    elif all("op" in i for i in items):
        bases = [str(i["op"]) for i in items]
    else:
        return None
    seen: dict[str, int] = {}
    keys = []
    for base in bases:
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return keys


def _aligned(a: list[Any], b: list[Any]) -> tuple[list[str], list[str]] | None:
    """The keys both lists align by, or None when they compare as single values."""
    keys_a, keys_b = _list_keys(a), _list_keys(b)
    if keys_a is not None and keys_b is not None:
        return keys_a, keys_b
    if keys_a is not None and not b:
        return keys_a, []
    if keys_b is not None and not a:
        return [], keys_b
    return None


def _without_name(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "name"} if isinstance(value, dict) else value


def _is_collection(*mappings: dict) -> bool:
    """A mapping of named things keyed by their names (`sources`, `models`, ...)."""
    items = [(k, v) for m in mappings for k, v in m.items()]
    return bool(items) and all(isinstance(v, dict) and v.get("name") == k for k, v in items)


class _Walker:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.renames: list[Rename] = []

    def value(self, path: str, a: Any, b: Any) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            self.mapping(path, a, b)
        elif isinstance(a, list) and isinstance(b, list) and (keys := _aligned(a, b)) is not None:
            self.keyed(path, dict(zip(keys[0], a)), dict(zip(keys[1], b)), ordered=True)
        else:
            self.changes.append(Change(path, CHANGED, a, b))

    def mapping(self, path: str, a: dict, b: dict) -> None:
        if path in BLOCKS or _is_collection(a, b):
            self.keyed(path, a, b, ordered=False)
            return
        for key in [*a, *(k for k in b if k not in a)]:
            self.entry(_join(path, str(key)), a.get(key, _MISSING), b.get(key, _MISSING))

    def entry(self, path: str, a: Any, b: Any) -> None:
        if a is _MISSING:
            self.changes.append(Change(path, ADDED, None, b))
        elif b is _MISSING:
            self.changes.append(Change(path, REMOVED, a, None))
        else:
            self.value(path, a, b)

    def keyed(self, path: str, a: dict[str, Any], b: dict[str, Any], *, ordered: bool) -> None:
        """Items aligned by key; unmatched items of equal content are renames."""
        gone = [k for k in a if k not in b]
        new = [k for k in b if k not in a]
        renamed: dict[str, str] = {}  # name in b -> name in a
        for old in gone if path in BLOCKS else ():
            for candidate in new:
                if candidate not in renamed and _without_name(a[old]) == _without_name(b[candidate]):
                    renamed[candidate] = old
                    break
        if ordered:
            order_a = [k for k in a if k in b or k in renamed.values()]
            order_b = [renamed.get(k, k) for k in b if k in a or k in renamed]
            if order_a != order_b:
                self.changes.append(Change(path, CHANGED, list(a), list(b)))
        for key in a:
            if key in b:
                self.value(_join(path, key), a[key], b[key])
            elif key not in renamed.values():
                self.changes.append(Change(_join(path, key), REMOVED, a[key], None))
        for key in b:
            if key in renamed:
                self.changes.append(Change(_join(path, renamed[key]), RENAMED, renamed[key], key))
                self.renames.append(Rename(path, renamed[key], key))
            elif key not in a:
                self.changes.append(Change(_join(path, key), ADDED, None, b[key]))


def _dump(recipe: ir.Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json")
    data["stages"] = [{k: v for k, v in stage.items() if k not in STAGE_DERIVED} for stage in data["stages"]]
    return data


# ---- stage mixtures -----------------------------------------------------------------------------


def _share(count: int | None, total: int | None) -> float | None:
    if count is None or not total:
        return None
    return round(count / total, 6)


def _rows(a: dict[str, int | None] | None, b: dict[str, int | None] | None, total_a: int | None,
          total_b: int | None, renamed: dict[str, str], order: Iterable[str] = ()) -> tuple[Row, ...]:
    """Rows over the keys of both sides; `renamed` maps a name in b to its name in a."""
    a, b = a or {}, b or {}
    matched = {new: old for new, old in renamed.items() if new in b and old in a and new not in a and old not in b}
    old_names = set(matched.values())
    keys_b = list(b)
    names = [k for k in order if k in a or k in b]
    names += [k for k in a if k not in names and k not in old_names]
    names += [k for k in keys_b if k not in names]
    rows = []
    for name in names:
        source = matched.get(name, name)
        in_a, in_b = source in a, name in b
        if not in_a and not in_b:
            continue
        before = a.get(source) if in_a else 0
        after = b.get(name) if in_b else 0
        status = ADDED if not in_a else REMOVED if not in_b else UNCHANGED if before == after else CHANGED
        rows.append(Row(name, status, before, after, _share(before, total_a) if in_a else None,
                        _share(after, total_b) if in_b else None, source if source != name else None))
    return tuple(rows)


def _stage_diff(name: str, a: ir.Stage | None, b: ir.Stage | None, renamed: dict[str, str],
                renamed_from: str | None) -> StageDiff:
    ca = a.composition if a else None
    cb = b.composition if b else None
    total_a, total_b = (ca.total if ca else None), (cb.total if cb else None)
    status = ADDED if a is None else REMOVED if b is None else CHANGED
    return StageDiff(
        name=name, status=status,
        samples=Quantity(total_a, total_b),
        max_image_tokens=Quantity(a.max_image_tokens if a else None, b.max_image_tokens if b else None),
        trainable_params=Quantity(a.trainable_params if a else None, b.trainable_params if b else None),
        by_source=_rows(ca.by_source if ca else None, cb.by_source if cb else None, total_a, total_b, renamed),
        by_data_type=_rows(ca.by_data_type if ca else None, cb.by_data_type if cb else None, total_a, total_b, {},
                           (*ir.DATA_TYPES, "mixed")),
        by_category=_rows(ca.by_category if ca else None, cb.by_category if cb else None, total_a, total_b, {},
                          ir.CATEGORIES),
        renamed_from=renamed_from,
    )


def _stages(a: ir.Recipe, b: ir.Recipe, renames: list[Rename]) -> tuple[StageDiff, ...]:
    datasets = {r.after: r.before for r in renames if r.collection in ("sources", "syntheses")}
    stage_renames = {r.after: r.before for r in renames if r.collection == "stages"}
    stages_a = {s.name: s for s in a.stages}
    stages_b = {s.name: s for s in b.stages}
    matched_a: set[str] = set()
    result = []
    for name, stage in stages_b.items():
        old = name if name in stages_a else stage_renames.get(name)
        before = stages_a.get(old) if old else None
        if before is not None:
            matched_a.add(old)
            if all(getattr(before, f) == getattr(stage, f) for f in STAGE_DERIVED):
                continue
        result.append(_stage_diff(name, before, stage, datasets, old if old and old != name else None))
    for name, stage in stages_a.items():
        if name not in matched_a:
            result.append(_stage_diff(name, stage, None, datasets, None))
    return tuple(result)


# ---- cost ---------------------------------------------------------------------------------------


def cost(a: ir.Recipe, b: ir.Recipe) -> Cost:
    plan_a, plan_b = build_plan(a), build_plan(b)
    known = {step.fingerprint for step in plan_a.steps.values()}
    kept = {step.fingerprint for step in plan_b.steps.values()}
    recompute = tuple(StepCost(s.id, s.op, s.op in MODEL_OPS, CHANGED if s.id in plan_a.steps else ADDED,
                               _only_inputs_changed(s, plan_a, a.seed == b.seed))
                      for s in plan_b.steps.values() if s.fingerprint not in known)
    cached = tuple(s.id for s in plan_b.steps.values() if s.fingerprint in known)
    removed = tuple(s.id for s in plan_a.steps.values() if s.id not in plan_b.steps and s.fingerprint not in kept)
    return Cost(recompute, cached, removed)


def _only_inputs_changed(step: Any, plan_a: Any, same_seed: bool) -> bool:
    """Whether `step` is a's step of that id with its own op, version and params, so that early
    cutoff can find it cached (ingest steps are keyed on their files, never on inputs)."""
    from recipec.runtime.store import local_fingerprint

    before = plan_a.steps.get(step.id)
    return (same_seed and before is not None and bool(step.inputs) and step.op != "ingest"
            and local_fingerprint(before) == local_fingerprint(step))


# ---- entry point --------------------------------------------------------------------------------


def empty_recipe() -> ir.Recipe:
    """The other side of a recipe that exists on one side only (a new or deleted file)."""
    return ir.Recipe(name="")


def diff(a: ir.Recipe, b: ir.Recipe, *, a_label: str = "a", b_label: str = "b") -> RecipeDiff:
    walker = _Walker()
    walker.value("", _dump(a), _dump(b))
    return RecipeDiff(
        a=Side(a_label, a.name), b=Side(b_label, b.name),
        changes=tuple(walker.changes), renames=tuple(walker.renames),
        stages=_stages(a, b, walker.renames), cost=cost(a, b),
    )

