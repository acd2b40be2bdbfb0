"""Runs a plan: each step's operation over its inputs' stored outputs, in dependency order.

`execute(plan, store=..., recipe_dir=...)` is the whole runtime in one call. In order:

1. Select the steps: all of them, `until` (each named step and its upstream) or `only` (one step,
   whose inputs must already be stored). A stage name stands for its export step.
2. Compute every needed step's store key (store.py): the plan fingerprint chained with the input
   keys and, for ingest steps, a digest of the data. A selected step whose key is done in the store
   is cached: not run, and its inputs are not even read.
3. Refuse to start when a step that must run has no operation in this installation, naming each
   such step and its op, and suggesting an `--until` that runs the part that can run.
4. Run the rest one after the other in plan order. An operation marked `streams` (the data ops)
   gets each input as a `store.StoredTable`, which it reads shard by shard, so its memory does not
   grow with the data; the others get whole `pa.Table`s. Steps run sequentially; operations parallelise
   internally with `ctx.workers` processes or threads, and must give the same output for any
   number of them. Each chunk an op yields is written as it comes (records, rejects, files), and
   the step is committed to the store whole when the op is done.

What the executor checks on every op, because the report's counts must add up:

* `sum(consumed) == records out + rejects + sum(skipped)`: the conservation law; the step's
  `records_in` is `sum(consumed)`.
* For a data op with inputs, `sum(consumed)` is also the number of input records: an op cannot
  forget a record. Model-backed ops and the tag mapping (`CONTEXT_OPS`) are exempt from this one,
  as they also read context tables (tags, mappings, seeds) that they do not consume.

A failing op fails its step: `OperationError` carries a message for the user, any other exception
is an internal error whose traceback goes to the log. Either way nothing of the step is stored, and
the steps finished before it stay finished.

Model-backed ops get `ctx.engine(model_use)`, which loads an engine through
`recipec.models.engines.load_engine(model_use, workers=...)` when first asked; torch and the like
are imported there and only then. One engine is kept at a time: consecutive steps on one model
share it, and a step on another model frees it first (two VLMs rarely fit one GPU together).

The operations registry (and with it pyarrow, numpy, PIL) is imported only when a step has to run,
so a run that finds everything cached stays fast to start.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from recipec.diagnostics import RecipecError
from recipec.plan import CONTEXT_OPS, MODEL_OPS, OP_VERSIONS, Plan, Step
from recipec.runtime.progress import RunProgress
from recipec.runtime.store import DataDigests, Store, StoreError, canonical, plan_keys

Operation = Callable[..., Any]
EngineFactory = Callable[[dict[str, Any]], Any]
log = logging.getLogger("recipec.run")


class RunError(RecipecError):
    """The run cannot start: nothing was run."""


class StepFailed(RecipecError):
    def __init__(self, step: Step, message: str, *, internal: bool = False):
        self.step_id = step.id
        self.op = step.op
        self.message = message
        self.internal = internal  # a bug in an op or in recipec, not a problem with the data
        super().__init__(f"step {step.id} (op `{step.op}`) failed: {message}")


@dataclass
class StepOutcome:
    id: str
    op: str
    key: str
    cached: bool
    records_in: int
    records_out: int
    dropped: dict[str, int]
    seconds: float  # spent by this run: close to zero for a cached step
    manifest: dict[str, Any] = field(repr=False)


@dataclass
class RunResult:
    plan: Plan
    recipe_dir: Path
    keys: dict[str, str]  # the selected steps and everything upstream of them
    selected: list[str]
    outcomes: list[StepOutcome]
    until: list[str]
    only: str | None
    workers: int
    seconds: float
    data_only: bool = False

    @property
    def full(self) -> bool:
        return not self.until and self.only is None and not self.data_only


def available_cores() -> int:
    """The cores this process may use (its CPU affinity, which containers often narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- selection ----------------------------------------------------------------------------------


def resolve_step(plan: Plan, name: str) -> str:
    """A step id, or a stage name for that stage's export step."""
    if name in plan.steps:
        return name
    stages = {s.name for s in plan.recipe.stages}
    if name in stages and f"export.{name}" in plan.steps:
        return f"export.{name}"
    candidates = [*plan.steps, *sorted(stages)]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else "; `recipec plan` lists the steps"
    raise RunError(f"no step or stage named `{name}` in recipe {plan.recipe.name}{hint}")


def select(plan: Plan, until: Sequence[str] = (), only: str | None = None, data_only: bool = False) -> list[str]:
    if only is not None and until:
        raise RunError("--only and --until exclude each other")
    if only is not None:
        return [resolve_step(plan, only)]
    steps = list(plan.steps)
    if until:
        wanted: set[str] = set()
        for name in until:
            wanted.update(plan.upstream(resolve_step(plan, name)))
        steps = [s for s in steps if s in wanted]
    if data_only:
        # every step that loads no model and needs none of those that do
        blocked = plan.downstream({s for s in plan.steps if plan.steps[s].op in MODEL_OPS})
        steps = [s for s in steps if s not in blocked]
    return steps


# ---- operations and engines ---------------------------------------------------------------------


def load_operations() -> Mapping[str, Operation]:
    """The installed operations by op name; empty when this installation has no registry yet."""
    try:
        from recipec.ops.registry import OPERATIONS
    except ModuleNotFoundError as e:
        if e.name != "recipec.ops.registry":
            raise
        return {}
    return OPERATIONS


def load_engine(model_use: dict[str, Any], *, workers: int, models_dir: Path | None = None,
                base_dir: Path | None = None) -> Any:
    from recipec.models.engine import EngineError
    from recipec.ops.base import OperationError

    from recipec.models.engines import load_engine as load

    try:
        return load(model_use, workers=workers, models_dir=models_dir, base_dir=base_dir)
    except EngineError as e:
        raise OperationError(str(e)) from None


class _Engines:
    """ctx.engine: loads on first use, keeps one engine at a time, answers through the request cache."""

    def __init__(self, factory: Callable[..., Any], workers: int, store: Store, recipe_dir: Path):
        self.factory = factory
        self.workers = workers
        self.store = store
        self.recipe_dir = recipe_dir
        self._key: str | None = None
        self._engine: Any = None
        self._cache: Any = None
        self.used: dict[str, tuple[str, Any]] = {}  # model ref -> (engine kind, its cached engine), for this step's counts
        self.remote: dict[str, dict[str, Any]] = {}  # model ref -> usage reported by engines in other processes

    def __call__(self, model_use: dict[str, Any]) -> Any:
        from recipec.models.cache import CachedEngine, RequestCache

        key = canonical(model_use)
        if key != self._key:
            self.close()
            engine = self.factory(model_use, workers=self.workers, models_dir=self.store.models_dir,
                                  base_dir=self.recipe_dir)
            if self._cache is None:
                self._cache = RequestCache(self.store.requests_path)
            self._engine = engine if not hasattr(engine, "identity") else CachedEngine(engine, self._cache)
            self._key = key
        self.used.setdefault(model_use.get("ref", "?"), (model_use.get("engine", "transformers"), self._engine))
        return self._engine

    def step_started(self) -> None:
        self.used = {}
        self.remote = {}
        if hasattr(self._engine, "counts"):  # an engine kept from the previous step counts afresh
            from recipec.models.cache import Counts

            self._engine.counts = Counts()

    def step_usage(self) -> dict[str, Any] | None:
        """Per model the step used: engine, identity, requests sent and answered from the cache, tokens."""
        usage = {ref: {"engine": kind, "identity": e.identity, **e.counts.as_dict()}
                 for ref, (kind, e) in self.used.items() if hasattr(e, "counts")}
        for ref, counts in self.remote.items():
            usage[ref] = add_usage(usage.get(ref), counts)
        return dict(sorted(usage.items())) if self.remote else usage or None

    def add_remote(self, usage: Mapping[str, dict[str, Any]] | None) -> None:
        """Counts of engines that ran this step's requests elsewhere (another executor's workers)."""
        for ref, counts in (usage or {}).items():
            self.remote[ref] = add_usage(self.remote.get(ref), counts)

    def close(self) -> None:
        engine, self._engine, self._key = self._engine, None, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()

    def shutdown(self) -> None:
        self.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def add_usage(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two engines' usage of one model added up: the numbers summed, errors by reason."""
    if a is None:
        return copy.deepcopy(b)
    out = dict(a)
    for name, value in b.items():
        if isinstance(value, bool) or name in ("engine", "identity"):
            out.setdefault(name, value)
        elif isinstance(value, (int, float)):
            out[name] = out.get(name, 0) + value
        elif isinstance(value, dict):
            merged = dict(out.get(name) or {})
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            out[name] = dict(sorted(merged.items()))
        else:
            out.setdefault(name, value)
    return out


def _missing_ops_message(plan: Plan, selected: list[str], missing: list[str], operations: Mapping[str, Operation]) -> str:
    lines = ["cannot run this plan here; nothing was run:"]
    if not operations:
        lines.append("  this installation has no operations yet (no module recipec.ops.registry)")
    for step_id in missing:
        op = plan.steps[step_id].op
        known = "" if op in OP_VERSIONS else " (an op the plan knows nothing of)"
        lines.append(f"  step `{step_id}` needs op `{op}`{known}, which this installation cannot run yet")
    blocked = plan.downstream(set(missing))
    waiting = sum(1 for s in selected if s in blocked) - len(missing)
    if waiting:
        lines.append(f"  and the {waiting} step(s) that depend on these")
    runnable = [s for s in selected if s not in blocked]
    exports = [plan.steps[s].params.get("stage", s) for s in runnable if plan.steps[s].op == "export"]
    if not exports:
        needed_by_runnable = {i for s in runnable for i in plan.steps[s].inputs}
        exports = [s for s in runnable if s not in needed_by_runnable]
    if exports and all(plan.steps[s].op in MODEL_OPS for s in missing):
        lines.append("hint: run every step that needs no model with --data-only")
    elif exports:
        lines.append("hint: run the part that can run with " + " ".join(f"--until {e}" for e in exports))
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------


def execute(
    plan: Plan,
    *,
    store: Store,
    recipe_dir: str | os.PathLike,
    workers: int | None = None,
    operations: Mapping[str, Operation] | None = None,
    until: Sequence[str] = (),
    only: str | None = None,
    data_only: bool = False,
    verify: bool = False,
    progress: RunProgress | None = None,
    engines: Callable[..., Any] | None = None,
    step_runner: Callable[..., "_StepRunner"] | None = None,
) -> RunResult:
    started = time.perf_counter()
    recipe_dir = Path(recipe_dir).absolute()
    workers = workers or available_cores()
    progress = progress or RunProgress()
    selected = select(plan, until, only, data_only)

    with store.locked():
        files = store.file_digests()
        keys = plan_keys(plan, selected, recipe_dir, DataDigests(files), store)
        files.save()

        done: dict[str, dict[str, Any] | None] = {}
        for step_id in selected:
            done[step_id] = store.done(keys[step_id], verify=verify)
            if done[step_id] is None and store.manifest(keys[step_id]) is not None:
                log.warning("step %s: its stored output is damaged; computing it again", step_id)
        if only is not None:
            step = plan.steps[selected[0]]
            absent = [i for i in step.inputs if store.done(keys[i]) is None]
            if absent and done[step.id] is None:
                raise RunError(f"--only {step.id}: its input(s) {', '.join(f'`{i}`' for i in absent)} are not in "
                               f"the store {store.root}; run with --until {step.id} first")
        to_run = [s for s in selected if done[s] is None]
        if operations is None:  # importing every op costs more than a cached run: only when needed
            operations = load_operations() if to_run else {}
        missing = [s for s in to_run if plan.steps[s].op not in operations]
        if missing:
            raise RunError(_missing_ops_message(plan, selected, missing, operations))

        log.info("run of %s: %d step(s) selected, %d cached, %d to run, workers=%d, store=%s",
                 plan.recipe.name, len(selected), len(selected) - len(to_run), len(to_run), workers, store.root)
        runner = (step_runner or _StepRunner)(plan, store, keys, recipe_dir, workers, operations, progress,
                                              _Engines(engines or load_engine, workers, store, recipe_dir))
        runner.verify = verify
        runner.selected = selected
        runner.manifests.update((s, m) for s, m in done.items() if m is not None)  # the cached ones, known ahead
        outcomes: list[StepOutcome] = []
        progress.start(len(selected))
        try:
            for position, step_id in enumerate(selected, start=1):
                step = plan.steps[step_id]
                if done[step_id] is not None:
                    outcome = _outcome(step, keys[step_id], done[step_id], cached=True, seconds=0.0)
                    runner.manifests[step_id] = done[step_id]
                    progress.step_finished(position, outcome)
                    log.info("step %s (%s) cached: key %s", step_id, step.op, keys[step_id])
                else:
                    settled = runner.settle_key(step)
                    if settled is not None:  # early cutoff: its inputs came out as they were
                        log.info("step %s (%s) stays cached: its inputs' content is unchanged (key %s)",
                                 step_id, step.op, runner.keys[step_id])
                        outcome = _outcome(step, runner.keys[step_id], settled, cached=True, seconds=0.0)
                        runner.manifests[step_id] = settled
                        progress.step_finished(position, outcome)
                    else:
                        outcome = runner.run(step, position)
                outcomes.append(outcome)
        finally:
            runner.engines.shutdown()
            progress.close()

    return RunResult(plan, recipe_dir, keys, selected, outcomes, [resolve_step(plan, u) for u in until],
                     resolve_step(plan, only) if only is not None else None, workers, time.perf_counter() - started,
                     data_only)


def _outcome(step: Step, key: str, manifest: dict[str, Any], *, cached: bool, seconds: float) -> StepOutcome:
    return StepOutcome(step.id, step.op, key, cached, manifest["records_in"], manifest["records_out"],
                       dict(manifest["dropped"]), seconds, manifest)


class _StepRunner:
    def __init__(self, plan: Plan, store: Store, keys: dict[str, str], recipe_dir: Path, workers: int,
                 operations: Mapping[str, Operation], progress: RunProgress, engines: _Engines):
        self.plan = plan
        self.store = store
        self.keys = keys
        self.recipe_dir = recipe_dir
        self.workers = workers
        self.operations = operations
        self.progress = progress
        self.engines = engines
        self.manifests: dict[str, dict[str, Any]] = {}
        self.verify = False
        self.selected: list[str] = []  # the run's steps, in plan order

    def manifest_of(self, step_id: str) -> dict[str, Any]:
        if step_id not in self.manifests:  # an upstream step outside the selection (--only)
            manifest = self.store.done(self.keys[step_id])
            if manifest is None:
                raise RunError(f"the output of step `{step_id}` is not in the store {self.store.root}")
            self.manifests[step_id] = manifest
        return self.manifests[step_id]

    def settle_key(self, step: Step) -> dict[str, Any] | None:
        """Key `step` on its inputs' output digests, now that they are done; its manifest if that key
        is done in the store already (the step stays cached), else None."""
        if step.op == "ingest" or not step.inputs:
            return None
        from recipec.runtime.store import content_key, output_digest

        digests = [output_digest(self.manifest_of(i)) for i in step.inputs]
        self.keys[step.id] = content_key(step, digests, seed=self.plan.recipe.seed)
        return self.store.done(self.keys[step.id], verify=self.verify)

    def run(self, step: Step, position: int) -> StepOutcome:
        from recipec.ops.base import OperationError, StepContext

        key = self.keys[step.id]
        started = time.perf_counter()
        log.info("step %s (%s) running: key %s", step.id, step.op, key)
        operation = self.operations[step.op]
        inputs = self.open_inputs(step, operation)
        input_rows = sum(int(t.num_rows) for t in inputs)
        step_progress = self.progress.step_started(step, position, input_rows if step.inputs else None)
        ctx = StepContext(
            step_id=step.id, op=step.op, params=copy.deepcopy(step.params), fingerprint=step.fingerprint,
            recipe_dir=self.recipe_dir, seed=self.plan.recipe.seed, workers=self.workers, progress=step_progress,
            log=logging.getLogger(f"recipec.ops.{step.op}"),
            engine=self.engines if step.op in MODEL_OPS else None,
            input_dirs=[self.store.step_dir(self.keys[i]) for i in step.inputs],
            work_dir=self.store.work_dir(key), models_dir=self.store.models_dir)
        writer = self.store.writer(key)
        self.engines.step_started()
        try:
            tally = _Tally(step)
            for chunk in self.chunks(step, operation, ctx, inputs):
                tally.write(chunk, writer)
                step_progress.chunk_consumed(chunk.consumed)
            del inputs
            tally.finish(writer, input_rows if step.inputs and step.op not in CONTEXT_OPS else None)
            manifest = writer.commit({
                "step": step.id, "op": step.op, "op_version": OP_VERSIONS.get(step.op), "fingerprint": step.fingerprint,
                "params": step.params, "inputs": [{"step": i, "key": self.keys[i]} for i in step.inputs],
                "records_in": tally.consumed, "records_out": tally.out, "dropped": dict(sorted(tally.dropped.items())),
                "composition": tally.composition(), "seconds": round(time.perf_counter() - started, 3),
                **({"models": usage} if (usage := self.engines.step_usage()) else {})})
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
            self.store.remember_computed(step, self.plan.recipe.seed)
        except (OperationError, StoreError) as e:
            writer.abort()
            log.error("step %s (%s) failed: %s", step.id, step.op, e)
            raise StepFailed(step, str(e)) from e
        except StepFailed as e:
            writer.abort()
            log.error("%s", e)
            raise
        except Exception as e:
            writer.abort()
            log.exception("step %s (%s) failed with an internal error", step.id, step.op)
            raise StepFailed(step, f"internal error: {type(e).__name__}: {e}", internal=True) from e
        except BaseException:
            writer.abort()  # interrupted: the next run starts this step again
            raise
        seconds = time.perf_counter() - started
        self.manifests[step.id] = manifest
        outcome = _outcome(step, key, manifest, cached=False, seconds=seconds)
        self.progress.step_finished(position, outcome, step_progress)
        log.info("step %s (%s) done in %.2f s: %d in, %d out, dropped %s", step.id, step.op, seconds,
                 outcome.records_in, outcome.records_out, outcome.dropped or "nothing")
        return outcome


    def open_inputs(self, step: Step, operation: Operation) -> list[Any]:
        if getattr(operation, "streams", False):  # reads its inputs batch by batch: memory stays bounded
            return [self.store.open_records(self.keys[i], self.manifest_of(i)) for i in step.inputs]
        # whole tables (the model-backed ops, which model throughput bounds anyway)
        return [self.store.read_records(self.keys[i], self.manifest_of(i)) for i in step.inputs]

    def chunks(self, step: Step, operation: Operation, ctx: Any, inputs: list[Any]) -> Any:
        """The chunks of the step's output, in order: here, the operation run in this process."""
        return operation(ctx, inputs)


class _Tally:
    """Writes one step's chunks and keeps its counts."""

    COMPOSITION = ("source", "data_type", "category")

    def __init__(self, step: Step):
        self.step = step
        self.consumed = 0
        self.out = 0
        self.dropped: Counter[str] = Counter()
        self.by: dict[str, Counter[str]] | None = None
        self.schema = None  # of the first record table, to store an empty step with its schema
        self.shards = 0

    def write(self, chunk: Any, writer: Any) -> None:
        import pyarrow as pa

        from recipec.ops.base import Chunk

        if not isinstance(chunk, Chunk):
            raise StepFailed(self.step, f"the op yielded a {type(chunk).__name__}, not a Chunk", internal=True)
        if chunk.consumed < 0 or any(n < 0 for n in chunk.skipped.values()):
            raise StepFailed(self.step, "the op yielded a chunk with a negative count", internal=True)
        table = chunk.records
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table is not None:
            if self.schema is None:
                self.schema = table.schema
            if table.num_rows:
                writer.add_records(table)
                self.shards += 1
                self.out += table.num_rows
                self._count(table)
        if chunk.rejects:
            writer.add_rejects(self._rejects_table(chunk.rejects))
            self.dropped.update(r.reason for r in chunk.rejects)
        for reason, n in chunk.skipped.items():
            if n:
                self.dropped[reason] += n
        for name, data in chunk.files.items():
            writer.add_file(name, data)
        for name, path in chunk.file_paths.items():
            writer.move_file(name, path)
        self.consumed += chunk.consumed

    def finish(self, writer: Any, input_rows: int | None) -> None:
        if self.shards == 0 and self.schema is not None:
            writer.add_records(self.schema.empty_table())  # keeps the schema of an empty output
        dropped = sum(self.dropped.values())
        if self.consumed != self.out + dropped:
            raise StepFailed(self.step, (
                f"the op broke the conservation law: it consumed {self.consumed:,} records but accounted for "
                f"{self.out + dropped:,} ({self.out:,} out, {dropped:,} dropped)"), internal=True)
        if input_rows is not None and self.consumed != input_rows:
            raise StepFailed(self.step, (
                f"the op accounted for {self.consumed:,} records of the {input_rows:,} it was given"), internal=True)

    def _rejects_table(self, rejects: list) -> Any:
        import pyarrow as pa

        from recipec.records import REJECT_SCHEMA

        columns = {name: [] for name in REJECT_SCHEMA.names}
        for r in rejects:
            columns["step"].append(self.step.id)
            columns["id"].append(r.id)
            columns["source"].append(r.source)
            columns["origin"].append(r.origin)
            columns["reason"].append(r.reason)
            columns["detail"].append(r.detail)
            columns["record"].append(r.record)
        return pa.Table.from_pydict(columns, schema=REJECT_SCHEMA)

    def _count(self, table: Any) -> None:
        import pyarrow.compute as pc

        if not all(c in table.column_names for c in self.COMPOSITION):
            return
        if self.by is None:
            self.by = {c: Counter() for c in self.COMPOSITION}
        for column in self.COMPOSITION:
            counts = pc.value_counts(table[column])
            for value, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
                self.by[column]["(none)" if value is None else str(value)] += n

    def composition(self) -> dict[str, Any] | None:
        """Output records by source, data type and category, for the report's realised mixtures."""
        if self.by is None:
            return None if self.out else {"total": 0, "by_source": {}, "by_data_type": {}, "by_category": {}}
        return {"total": self.out, **{f"by_{c}": dict(sorted(self.by[c].items())) for c in self.COMPOSITION}}
