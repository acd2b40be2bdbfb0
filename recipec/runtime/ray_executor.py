"""Runs a plan on Ray Data: the local executor's run, with each step's chunks made on a Ray cluster.

`execute_ray(plan, store=..., recipe_dir=..., options=RayOptions(...))` is `executor.execute` with
another way of producing a step's chunks; everything else is the local executor's own code: the
selection, the keys (early cutoff included), what is cached, the `_Tally` that checks the counts,
the store's writer and commit, the manifests and the report. The store must be a path every node
sees (a shared filesystem); the driver holds its lock and is the only one that commits steps.

How a step runs (`PARTITIONED`, `WHOLE`, `ON_DRIVER`):

* Row-local steps (a record's output depends on that record and the step's params only:
  threshold, clean, judge_relevance, judge_score, score_loss, generate_answers) are cut into
  partitions, contiguous ranges of input positions. The unchanged op runs on each partition in a
  `map_batches` over a dataset of partition descriptors: stateless tasks (`num_cpus=0.5`) for the
  data ops, an actor pool for the model ops, each actor holding one engine (the executor's
  `load_engine` behind the store's request cache; `num_gpus` per actor when asked). A finished
  partition's output (records, rejects, counts) is written atomically under the step's
  `store.work_dir(key)/partitions/`, so a run killed mid-way keeps it and the next run computes
  only the partitions missing. The driver then reads the partitions back in order and cuts them
  into the chunks the local op would have yielded, so the stored step is byte-identical.

  The ranges are ranges, not a hash of the record id, because byte identity needs them: the
  local ops cut their output (and, for the data ops, group their rejects) by input batch, and an
  engine's batches, whose padding and sampling seed shape what a model answers, are cut from the
  op's request list in chunks of the engine's `chunk_size`. A partition therefore never straddles
  an input batch (the stored input shards for a streaming op, 65,536-row slices for the others),
  and a model step's partitions start at a multiple of `REQUEST_ALIGN` requests (every engine's
  chunk size divides it), so each partition asks exactly the chunks the local run asks. The
  boundaries depend only on the input, which the step's key fixes: a resumed run sees the same
  partitions.

* Global steps (dedup_exact, dedup_phash, percentile, mix) run as the aggregations they are. Each
  of these ops is two functions that the local op also calls (`local op = decide(ctx, inputs,
  per_record(ctx, inputs))`, attributes `per_record`, `combine`, `decide` of the op):
  its per-record pass (dedup_phash: the pHash, size, source and file digest of each first image,
  the expensive part; dedup_exact: the 16-byte key of each record; percentile: the score column;
  mix: the id, source, balancing and ordering columns) runs as `map_batches` tasks of half a CPU
  over the same partitions as the row-local steps (stored input shards, at most `partition_rows`
  records), each finished partition's compact result pickled atomically under
  `work_dir(key)/partitions/`, so a killed run computes only the partitions missing. Then one task
  combines the results in input order (`combine`: rows renumbered, source codes remapped to the
  first-seen order of one pass) and runs the decision over them (`decide`: the pairs and best
  copies, the key groups, the cut, the selection), which reads the inputs again only for the few
  ids and paths it names and to write the records kept, as the local op does; mix's gather of the
  chosen rows stays the local code. The result equals one pass over all the input, so the step's
  bytes are the local ones.

* The other steps that look across records (collect, map_tags, tag_images, tag_instructions,
  generate_questions, merge_turns), ingest and export run their unchanged code as one Ray task on
  a worker, which writes the chunks it yields under the step's work dir for the driver to store.

* train runs on the driver, with the same code as the local executor. Training across nodes is
  `recipec train --emit torchrun|slurm`.

When steps run: each as soon as its inputs are stored, the driver storing them in plan order.
The driver walks the plan as the local executor does, and stores (commits), reports and caches
each step at its turn. A step's work, though, starts on the cluster once it can: when every input
is stored or cached and the step's key, settled on their content (early cutoff), is not done. At
each turn the driver starts the step whose turn it is, unless it started already, and every later
step of the run that can start then (the other ingests; a stage's mix and export while another
stage's run; the filter chains of different sources), then waits for the one whose turn it is and
stores it from what its work left under its work dir. A whole step's work is its Ray task. A
partitioned or global step's work is its Ray Data job (then its decision): the driver runs it
itself when it starts at the step's turn, as it would only wait for it, and in a task of no CPU
when it starts ahead, so that the driver goes on meanwhile and can cancel it whole.

What runs at once is bounded by the cluster: Ray starts the tasks as their CPUs and GPUs are free;
at most one step per CPU of the cluster (two at least) is running (a step whose work is done
holds nothing until its turn), and a whole data task asks for the CPUs shared among the steps
running. One model step at a time is in flight, as its actor pool (`actors` of `gpus_per_actor`
each) is sized for the cluster's GPUs; and a train step's turn waits for the model steps in
flight and starts none, since the driver may train on those GPUs.
The outputs are the local executor's, whatever ran at the same time: each step's work reads only
stored inputs and writes only under its own work dir.

A step that fails ahead of its turn fails the run at its turn, once the steps before it are
stored, with the error a local run gives, and nothing more is started meanwhile. A failing or
interrupted step cancels the work in flight (its tasks, actors and Ray Data jobs); what a step
that had finished left under its work dir is kept, and the next run stores it without computing
it again, as it computes only the partitions a cancelled step had not finished.

Ray is imported here only; `recipec run` imports this module only for `--executor ray`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from recipec.diagnostics import RecipecError
from recipec.plan import MODEL_OPS, Plan, Step
from recipec.runtime.executor import Operation, RunResult, StepOutcome, _StepRunner, execute
from recipec.runtime.store import Store, atomic_write

log = logging.getLogger("recipec.run")

INSTALL_HINT = "pip install 'recipec[ray]'"
REQUEST_ALIGN = 64  # request chunks of every engine divide it: transformers 16 (CPU) or 64 (GPU), others 64
CHUNK_ROWS = 65_536  # collect.CHUNK_ROWS, without importing pyarrow at import time

# op -> how the local op cuts its input and output:
#   "shards": a streaming op reading each stored input shard as a batch, one chunk group per batch
#   "rows":   an op over the concatenated input in CHUNK_ROWS slices, one chunk group per slice
#   "emit":   a model op whose counts and rejects all ride on its first chunk
PARTITIONED: dict[str, str] = {
    "threshold": "shards",
    "clean": "rows",
    "judge_relevance": "emit",
    "judge_score": "emit",
    "score_loss": "emit",
    "generate_answers": "emit",
}
ON_DRIVER = frozenset({"train"})


class RayUnavailable(RecipecError):
    """Ray is not installed, or its cluster cannot be reached: nothing was run."""


@dataclass
class RayOptions:
    address: str | None = None  # a running cluster (`ray://host:10001`, `auto`); None: a local one
    gpus_per_actor: float = 0.0  # per model actor
    actors: int | None = None  # model actors per step (default: one per GPU, else one per two CPUs)
    cpus_per_task: float = 0.5  # data tasks and model actors: fractional, so readers are never starved
    partition_rows: int = CHUNK_ROWS  # at most, per partition of a data op
    partition_requests: int = 4 * REQUEST_ALIGN  # per partition of a model op (rounded up to request_align)
    request_align: int = REQUEST_ALIGN
    num_cpus: int | None = None  # of the local cluster (default: the cores this process may use)


# ---- the cluster --------------------------------------------------------------------------------


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--executor ray needs Ray Data, which is not installed here ({e}); "
                             f"install it with `{INSTALL_HINT}`") from None
    return ray


def connect(options: RayOptions) -> Any:
    """ray.init: the cluster at `options.address`, else a quiet local one on this machine's cores."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    from recipec.runtime.executor import available_cores

    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
             "configure_logging": True}
    if options.address:
        _check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            cpus = options.num_cpus or available_cores()
            # Ray keeps as many idle workers as CPUs; steps launched together start more than that on
            # a small machine, and each restart imports ray.data again (about 1.5 s): keep a few more
            ray.init(num_cpus=cpus, _system_config={"num_workers_soft_limit": max(8, 2 * cpus)}, **quiet)
            logging.getLogger("ray").setLevel(logging.ERROR)
    except ConnectionError as e:
        raise RayUnavailable(f"cannot reach the Ray cluster at {options.address!r}: {e}") from None
    except Exception as e:  # ray raises several kinds for an address it cannot use
        if options.address:
            raise RayUnavailable(f"cannot reach the Ray cluster at {options.address!r}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        raise
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a cluster address nothing answers at (ray.init would wait minutes for it)."""
    import socket

    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def execute_ray(plan: Plan, *, store: Store, recipe_dir: str | os.PathLike, options: RayOptions | None = None,
                **kwargs: Any) -> RunResult:
    """`executor.execute` with the steps' chunks made on Ray (see the module's docstring)."""
    options = options or RayOptions()
    connect(options)

    runners: list[RayStepRunner] = []

    def runner(*args: Any) -> _StepRunner:
        runners.append(RayStepRunner(*args, options=options))
        return runners[-1]

    try:
        return execute(plan, store=store, recipe_dir=recipe_dir, step_runner=runner, **kwargs)
    finally:
        for started in runners:  # however the run ended, nothing it started goes on running
            started.abandon()


# ---- what a worker needs to run a step ----------------------------------------------------------


@dataclass
class _Task:
    """A step as a worker runs it: everything pickled, nothing that holds the driver's state."""

    step: Step
    operation: Operation
    key: str
    store_root: str
    models_dir: str
    recipe_dir: str
    seed: int
    workers: int
    inputs: list[tuple[list[str], list[int]]]  # per input: its shard paths and their rows
    input_dirs: list[str]

    @property
    def work_dir(self) -> Path:
        return Store(self.store_root).work_dir(self.key)


@dataclass
class _Partition:
    index: int
    start: int  # input positions [start, stop) over the inputs concatenated
    stop: int
    requests_before: int = 0  # requests the local op asks for the records before `start` (model ops)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-{self.start}-{self.stop}.pkl"


@dataclass
class _Outcome:
    """What a worker hands back: counts and where its output lies; the data stay on disk."""

    error: str | None = None  # "operation" (a message for the user) or "internal"
    message: str = ""
    trace: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # the partition that failed, for a step run in partitions


def _context(task: _Task, engines: Any = None) -> Any:
    from recipec.ops.base import StepContext

    step = task.step
    return StepContext(step_id=step.id, op=step.op, params=pickle.loads(pickle.dumps(step.params)),
                       fingerprint=step.fingerprint, recipe_dir=Path(task.recipe_dir), seed=task.seed,
                       workers=task.workers, log=logging.getLogger(f"recipec.ops.{step.op}"),
                       engine=engines if step.op in MODEL_OPS else None,
                       input_dirs=[Path(d) for d in task.input_dirs], work_dir=task.work_dir,
                       models_dir=Path(task.models_dir))


def _engines(task: _Task) -> Any:
    from recipec.runtime.executor import _Engines, load_engine

    store = Store(task.store_root)
    store.models_dir = Path(task.models_dir)
    return _Engines(load_engine, task.workers, store, Path(task.recipe_dir))


def _stored_inputs(task: _Task) -> list[Any]:
    from recipec.runtime.store import StoredTable

    return [StoredTable([Path(p) for p in paths], rows) for paths, rows in task.inputs]


def _failure(e: BaseException) -> _Outcome:
    from recipec.ops.base import OperationError
    from recipec.runtime.store import StoreError

    if isinstance(e, (OperationError, StoreError)):
        return _Outcome(error="operation", message=str(e))
    return _Outcome(error="internal", message=f"{type(e).__name__}: {e}", trace=traceback.format_exc())


class _Pickler(pickle.Pickler):
    """Arrow tables go as Arrow IPC, with the spelling of their map types. Neither pickle nor IPC
    keeps the name of a map's entries field: a `scores` column read from Parquet has entries named
    `scores`, one built in memory `entries`, and the name is in the Parquet footer a step writes,
    so a table must come back exactly as the op made it for the step's bytes to be the same."""

    def reducer_override(self, obj: Any) -> Any:
        import pyarrow as pa

        if isinstance(obj, pa.Table):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, obj.schema) as writer:
                writer.write_table(obj)
            maps = {f.name: str(f.type) for f in obj.schema if pa.types.is_map(f.type)}
            return _table_from_ipc, (sink.getvalue().to_pybytes(), maps)
        return NotImplemented


def _table_from_ipc(data: bytes, maps: dict[str, str]) -> Any:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.ipc.open_stream(data).read_all()
    for name, spelled in maps.items():
        index = table.schema.get_field_index(name)
        field = table.schema.field(index)
        if str(field.type) == spelled:
            continue
        # the other spelling is the one a Parquet reader gives: the entries named after the column
        buffer = io.BytesIO()
        pq.write_table(pa.table({name: pa.array([], field.type)}), buffer)
        read = pq.read_schema(pa.BufferReader(buffer.getvalue())).field(name)
        if str(read.type) != spelled:
            raise RuntimeError(f"cannot give column {name} back its type {spelled} (got {field.type})")
        table = table.set_column(index, field.with_type(read.type), table.column(name).cast(read.type))
    return table


def _write_pickle(path: Path, value: Any) -> None:
    import io

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    atomic_write(path, buffer.getvalue())


def _read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


# ---- a whole step as one task ---------------------------------------------------------------------


def _run_whole(task: _Task) -> _Outcome:
    """Run the op over all its inputs; each chunk it yields goes to work_dir/whole/, in order."""
    done = task.work_dir / "whole"
    tmp = task.work_dir / f"whole.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    engines = _engines(task) if task.step.op in MODEL_OPS else None
    try:
        ctx = _context(task, engines)
        inputs = _stored_inputs(task)
        if not getattr(task.operation, "streams", False):
            inputs = [t.read() for t in inputs]
        if engines is not None:
            engines.step_started()
        n = 0
        for chunk in task.operation(ctx, inputs):
            _write_pickle(tmp / f"chunk-{n:06d}.pkl", chunk)
            n += 1
        usage = (engines.step_usage() if engines is not None else None) or {}
        _write_pickle(tmp / "outcome.pkl", {"chunks": n, "usage": usage})
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        return _failure(e)
    finally:
        if engines is not None:
            engines.shutdown()
    shutil.rmtree(done, ignore_errors=True)
    os.rename(tmp, done)
    return _Outcome(usage=usage)


# ---- partitions ---------------------------------------------------------------------------------


def _partition_input(task: _Task, part: _Partition) -> Any:
    """The records at input positions [start, stop), read from the shards that hold them."""
    import pyarrow.parquet as pq

    from recipec.ops.collect import concat

    pieces = []
    offset = 0
    for paths, rows in task.inputs:
        for path, n in zip(paths, rows):
            lo, hi = max(part.start, offset), min(part.stop, offset + n)
            if lo < hi:
                table = pq.read_table(path, memory_map=True)
                pieces.append(table.slice(lo - offset, hi - lo))
            offset += n
    return concat(pieces) if pieces else concat([])


def _run_partition(task: _Task, part: _Partition, engines: Any = None) -> _Outcome:
    """Run the op on one partition and keep its output under work_dir/partitions/ (atomically)."""
    import pyarrow as pa

    from recipec import records as schema

    target = task.work_dir / "partitions" / part.name
    if target.exists():  # finished by an earlier try of this task
        return _Outcome()
    try:
        ctx = _context(task, engines)
        if engines is not None:
            engines.step_started()
        table = _partition_input(task, part)
        tables, rejects, consumed, skipped, files = [], [], 0, {}, {}
        for chunk in task.operation(ctx, [table]):
            if chunk.records is not None and chunk.records.num_rows:
                tables.append(chunk.records if isinstance(chunk.records, pa.Table)
                              else pa.Table.from_batches([chunk.records]))
            rejects.extend(chunk.rejects)
            consumed += chunk.consumed
            for k, v in chunk.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
            files.update(chunk.files)
            files.update(chunk.file_paths)
        if files:
            raise RuntimeError(f"op {task.step.op} made files in a partition; it cannot run partitioned")
        usage = (engines.step_usage() if engines is not None else None) or {}
        if engines is not None:
            for used in engines.used.values():
                size = getattr(used[1], "chunk_size", None) or REQUEST_ALIGN
                if part.requests_before % size:
                    raise RuntimeError(f"partition {part.index} starts at request {part.requests_before}, not at a "
                                       f"multiple of the engine's chunk size {size}: its batches would differ")
        out = pa.concat_tables(tables) if tables else schema.empty_table()
        _write_pickle(target, {"records": out, "rejects": rejects, "consumed": consumed, "skipped": skipped,
                               "usage": usage, "input_schema": str(table.schema)})
    except Exception as e:
        return _failure(e)
    return _Outcome(usage=usage)


def has_split(operation: Any) -> bool:
    """Whether a global op exposes its per-record pass and its decision (`per_record`, `combine`,
    `decide`: the local op is `decide(ctx, inputs, per_record(ctx, inputs))`)."""
    return all(callable(getattr(operation, name, None)) for name in ("per_record", "combine", "decide"))


def _run_pass(task: _Task, part: _Partition) -> _Outcome:
    """A global op's per-record pass over one partition, kept under work_dir/partitions/ (atomically)."""
    target = task.work_dir / "partitions" / part.name
    if target.exists():  # finished by an earlier try of this task
        return _Outcome()
    try:
        found = task.operation.per_record(_context(task), [_partition_input(task, part)])
        if found.num_rows != part.stop - part.start:
            raise RuntimeError(f"the per-record pass of partition {part.index} gave {found.num_rows} records "
                               f"for {part.stop - part.start}")
        _write_pickle(target, found)
    except Exception as e:
        return _failure(e)
    return _Outcome()


def _pass_partitions(batch: dict[str, Any], task: _Task, parts: Sequence[_Partition]) -> dict[str, Any]:
    """map_batches function of a global op's per-record pass: each row of the batch is one partition."""
    outcomes = [_run_pass(task, parts[int(i)]) for i in batch["index"]]
    return {"index": list(batch["index"]), "outcome": [pickle.dumps(o) for o in outcomes]}


class _Decision:
    """A global op's decision as an operation: the partitions' per-record results, combined in input
    order, then the op's `decide` over its inputs (read again to write the output)."""

    streams = True

    def __init__(self, operation: Any, paths: list[str]):
        self.operation = operation
        self.paths = paths

    def __call__(self, ctx: Any, inputs: list[Any]) -> Iterator[Any]:
        found = self.operation.combine([_read_pickle(Path(p)) for p in self.paths])
        yield from self.operation.decide(ctx, inputs, found)


def _data_partitions(batch: dict[str, Any], task: _Task, parts: Sequence[_Partition]) -> dict[str, Any]:
    """map_batches function of a data op: each row of the batch is one partition to run."""
    return _run_batch(batch, task, parts, None)


class _ModelPartitions:
    """map_batches class of a model op: an actor holding one engine (loaded at its first request)."""

    def __init__(self, task: _Task):
        self.engines = _engines(task)

    def __call__(self, batch: dict[str, Any], task: _Task, parts: Sequence[_Partition]) -> dict[str, Any]:
        return _run_batch(batch, task, parts, self.engines)

    def __del__(self) -> None:
        try:
            self.engines.shutdown()
        except Exception:
            pass


def _run_batch(batch: dict[str, Any], task: _Task, parts: Sequence[_Partition], engines: Any) -> dict[str, Any]:
    outcomes = [_run_partition(task, parts[int(i)], engines) for i in batch["index"]]
    return {"index": list(batch["index"]), "outcome": [pickle.dumps(o) for o in outcomes]}


# ---- a step's partitions as one job on the cluster -------------------------------------------------


@dataclass
class _Job:
    """A step's partitions to run as one Ray Data job (`map_batches` over descriptors of the partitions),
    then, for a global op, its decision as one task once every partition is in."""

    task: _Task
    parts: list[_Partition]
    todo: list[_Partition]
    function: Any  # the map_batches function of a data op's partitions; None: a model op's actors
    cpus: float  # per data task, per actor
    actors: int = 1
    gpus: float = 0.0  # per actor
    decision: _Task | None = None
    decision_cpus: float = 1.0


def _coordinate(job: _Job) -> _Outcome:
    """A step's job: its partitions, then its decision. Run by the driver at the step's turn, or, ahead
    of it, as a task of no CPU, whose force cancel ends the job's tasks and actors with it."""
    try:
        outcome = _run_partitions(job) if job.todo else _Outcome()
        if outcome.error or job.decision is None:
            return outcome
        import ray

        run = ray.remote(_run_whole).options(num_cpus=job.decision_cpus, max_retries=0)
        return ray.get(run.remote(job.decision))
    except Exception as e:
        return _failure(e)


def _run_partitions(job: _Job) -> _Outcome:
    """The partitions of `job.todo`, each kept under the work dir; the first failure, by partition index."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    ds = ray.data.from_items([{"index": p.index} for p in job.todo], override_num_blocks=len(job.todo))
    common = {"batch_size": 1, "batch_format": "numpy", "fn_kwargs": {"task": job.task, "parts": job.parts},
              "num_cpus": job.cpus}
    if job.function is None:
        ds = ds.map_batches(_ModelPartitions, fn_constructor_kwargs={"task": job.task},
                            concurrency=max(1, min(job.actors, len(job.todo))), num_gpus=job.gpus or None, **common)
    else:
        ds = ds.map_batches(job.function, **common)
    failures: list[tuple[int, _Outcome]] = []
    for row in ds.iter_rows():
        outcome = pickle.loads(row["outcome"])  # counts and usage are read back with the partitions
        if outcome.error:
            failures.append((int(row["index"]), outcome))
    if not failures:
        return _Outcome()
    index, outcome = min(failures, key=lambda f: f[0])
    return replace(outcome, where=f"partition {index}")


# ---- the driver ---------------------------------------------------------------------------------


@dataclass
class _Launch:
    """A step's work, started once its inputs were stored. When the step's turn comes in plan order,
    the driver stores it from what that work left under the step's work dir."""

    task: _Task
    inputs: list[Any]
    ref: Any = None  # the work's ObjectRef, once started on the cluster
    job: _Job | None = None  # a job not started yet
    parts: list[_Partition] = field(default_factory=list)  # a partitioned step's, in order

    @property
    def model(self) -> bool:  # its actors or its task hold the GPUs
        return self.task.step.op in MODEL_OPS


class RayStepRunner(_StepRunner):
    """The local executor's step runner, with each step computed on Ray once its inputs are stored."""

    def __init__(self, *args: Any, options: RayOptions):
        super().__init__(*args)
        self.options = options
        self.ray = import_ray()
        self._launched: dict[str, _Launch] = {}  # step id -> its work, started and not stored yet

    def open_inputs(self, step: Step, operation: Operation) -> list[Any]:
        if step.op in ON_DRIVER:
            return super().open_inputs(step, operation)
        # the driver reads only the manifests; the workers read the shards
        return [self.store.open_records(self.keys[i], self.manifest_of(i)) for i in step.inputs]

    def run(self, step: Step, position: int) -> StepOutcome:
        try:
            return super().run(step, position)
        except BaseException:
            self.abandon()  # the run stops at this step, as a local one would
            raise

    def chunks(self, step: Step, operation: Operation, ctx: Any, inputs: list[Any]) -> Iterator[Any]:
        self._launch_ready(step)
        if step.op in ON_DRIVER:
            yield from operation(ctx, inputs)
            return
        launch = self._launched.pop(step.id)
        if launch.job is not None:  # the driver would only wait for it: it runs the job itself
            self._raise(launch.task, _coordinate(launch.job))
        elif launch.ref is not None:
            self._raise(launch.task, self.ray.get(launch.ref))
        yield from self._replay(launch)

    def abandon(self) -> None:
        """Cancel the work in flight (the run stops); what a finished step left in its work dir is kept
        for the next run."""
        refs = [launch.ref for launch in self._launched.values() if launch.ref is not None]
        self._launched.clear()
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        if refs:  # the cancellations land before the driver lets go of the store's lock
            self.ray.wait(refs, num_returns=len(refs), timeout=30)

    # -- which steps start when -------------------------------------------------------------------

    def _launch_ready(self, current: Step) -> None:
        """Start the step whose turn it is, if not started yet, and every later step of the run that can
        start now, as far as the cluster has room. A train step's turn starts no model step, and
        waits for those in flight: the driver may train on the GPUs their actors hold."""
        on_driver = current.op in ON_DRIVER
        wave = [] if on_driver or current.id in self._launched else [current]
        if on_driver or (wave and current.op in MODEL_OPS):
            self._wait_for_models()  # one model step at a time: its actor pool is sized for all the GPUs
        running = self._running()  # a step whose work is done holds nothing of the cluster until its turn
        if not self._a_launched_step_failed():  # else the run ends at that step's turn: start nothing more
            models = not (on_driver or any(s.op in MODEL_OPS for s in wave) or any(l.model for l in running))
            wave += self._ready(wave, self._limit() - len(running) - len(wave), models)
        share = max(1, int(self._cluster_cpus()) // max(1, len(running) + len(wave)))
        for step in wave:
            try:
                self._launched[step.id] = launch = self._launch(step, share)
            except Exception as e:
                if step is current:
                    raise
                # another step's problem, not this one's: that step meets it again at its own turn
                log.debug("step %s (%s) not launched ahead: %s", step.id, step.op, e)
                continue
            if step is not current:
                self._start_job(launch)
                log.info("step %s (%s) launched on Ray ahead of its turn", step.id, step.op)

    def _ready(self, wave: list[Step], room: int, models: bool) -> list[Step]:
        """The later steps of the run that can start now, in plan order: every input stored or cached, the
        key settled on the inputs' content (early cutoff) and not done, no other step in flight with that
        key; at most one model step, and only when `models`."""
        found: list[Step] = []
        starting = {s.id for s in wave}
        keys = {launch.task.key for launch in self._launched.values()} | {self.keys[s] for s in starting}
        for step_id in self.selected:
            step = self.plan.steps[step_id]
            if len(found) >= room:
                break
            if (step_id in self.manifests or step_id in self._launched or step_id in starting or step.op in ON_DRIVER
                    or step.op not in self.operations or not all(i in self.manifests for i in step.inputs)):
                continue
            settled = self.settle_key(step)
            if settled is not None:  # it stays cached: the steps after it may be ready
                self.manifests[step_id] = settled
                continue
            model = step.op in MODEL_OPS
            if self.keys[step_id] in keys or (model and not models):
                continue
            models = models and not model
            keys.add(self.keys[step_id])
            found.append(step)
        return found

    def _wait_for_models(self) -> None:
        """Until the model steps in flight are done (their outcome is read at their turn)."""
        refs = [launch.ref for launch in self._launched.values() if launch.model and launch.ref is not None]
        if refs:
            self.ray.wait(refs, num_returns=len(refs))

    def _running(self) -> list[_Launch]:
        """The launched steps whose work is still running on the cluster."""
        refs = [launch.ref for launch in self._launched.values() if launch.ref is not None]
        _, running = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        return [launch for launch in self._launched.values() if launch.ref in set(running)]

    def _a_launched_step_failed(self) -> bool:
        """Whether a launched step's work has failed already (its error is raised at its turn)."""
        refs = [launch.ref for launch in self._launched.values() if launch.ref is not None]
        finished, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        for ref in finished:
            try:
                if self.ray.get(ref).error:
                    return True
            except Exception:
                return True
        return False

    def _limit(self) -> int:
        """Steps running at once at most: one per CPU of the cluster (two at least), each holding a task
        or a job."""
        return max(2, int(self._cluster_cpus()))

    # -- starting a step's work -------------------------------------------------------------------

    def _launch(self, step: Step, share: int) -> _Launch:
        """The step's work, without what a run stopped before storing the step had done: a whole step's
        task, started (`share`: the CPUs it may hold), or a partitioned or global step's job."""
        operation = self.operations[step.op]
        inputs = self.open_inputs(step, operation)
        task = self._task(step, operation, inputs)
        if step.op in PARTITIONED:
            return self._launch_partitioned(task, inputs)
        if step.op not in MODEL_OPS and has_split(operation):
            return self._launch_global(task, inputs, share)
        return self._launch_whole(task, inputs, share)

    def _task(self, step: Step, operation: Operation, inputs: list[Any]) -> _Task:
        return _Task(step=step, operation=operation, key=self.keys[step.id], store_root=str(self.store.root),
                     models_dir=str(self.store.models_dir), recipe_dir=str(self.recipe_dir), seed=self.plan.recipe.seed,
                     workers=1, inputs=[([str(p) for p in t.paths], list(t.rows)) for t in inputs],
                     input_dirs=[str(self.store.step_dir(self.keys[i])) for i in step.inputs])

    def _sized(self, task: _Task, share: int) -> tuple[_Task, dict[str, float]]:
        """A whole task's workers and resources: a data op parallelises inside (ctx.workers), a model op
        is bound by its engine."""
        if task.step.op in MODEL_OPS:
            return task, {"num_cpus": self.options.cpus_per_task, "num_gpus": self.options.gpus_per_actor}
        task = replace(task, workers=max(1, min(self.workers, share)))
        return task, {"num_cpus": float(task.workers), "num_gpus": 0}

    def _launch_whole(self, task: _Task, inputs: list[Any], share: int) -> _Launch:
        if (task.work_dir / "whole" / "outcome.pkl").exists():  # finished by a run stopped before it stored it
            return _Launch(task, inputs)
        task, resources = self._sized(task, share)
        return _Launch(task, inputs, ref=self.ray.remote(_run_whole).options(max_retries=0, **resources).remote(task))

    def _launch_global(self, task: _Task, inputs: list[Any], share: int) -> _Launch:
        """Its per-record pass in partitions, then its decision in one task over their results."""
        if (task.work_dir / "whole" / "outcome.pkl").exists():  # decided by a run stopped before it stored it
            log.info("step %s (%s) on Ray: decided already", task.step.id, task.step.op)
            return _Launch(task, inputs)
        parts = _split(_input_batches("shards", inputs), self.options.partition_rows)
        folder = task.work_dir / "partitions"
        todo = self._todo(task, parts, " of its per-record pass")
        decision, resources = self._sized(
            replace(task, operation=_Decision(task.operation, [str(folder / p.name) for p in parts])), share)
        job = _Job(task, parts, todo, _pass_partitions, self.options.cpus_per_task, decision=decision,
                   decision_cpus=resources["num_cpus"])
        return _Launch(task, inputs, job=job)

    def _launch_partitioned(self, task: _Task, inputs: list[Any]) -> _Launch:
        style = PARTITIONED[task.step.op]
        if style == "emit":
            parts = self._model_partitions(task, inputs)
        else:
            parts = _split(_input_batches(style, inputs), self.options.partition_rows)
        todo = self._todo(task, parts)
        if not todo:
            return _Launch(task, inputs, parts=parts)
        if task.step.op in MODEL_OPS:
            job = _Job(task, parts, todo, None, self.options.cpus_per_task,
                       actors=self.options.actors or self._default_actors(), gpus=self.options.gpus_per_actor)
        else:
            job = _Job(task, parts, todo, _data_partitions, self.options.cpus_per_task)
        return _Launch(task, inputs, job=job, parts=parts)

    def _todo(self, task: _Task, parts: list[_Partition], what: str = "") -> list[_Partition]:
        """The partitions a run stopped mid-step had not finished."""
        folder = task.work_dir / "partitions"
        folder.mkdir(parents=True, exist_ok=True)
        todo = [p for p in parts if not (folder / p.name).exists()]
        log.info("step %s (%s) on Ray: %d partition(s)%s, %d to run", task.step.id, task.step.op, len(parts), what,
                 len(todo))
        return todo

    def _start_job(self, launch: _Launch) -> None:
        """A job launched ahead of its step's turn runs in a task of no CPU, so that the driver goes on
        (and can cancel it whole). The step whose turn it is runs its job on the driver, which would
        only wait for it (and so starts no process for it)."""
        if launch.job is not None:
            launch.ref = self.ray.remote(_coordinate).options(num_cpus=0, max_retries=0).remote(launch.job)
            launch.job = None

    def _model_partitions(self, task: _Task, inputs: list[Any]) -> list[_Partition]:
        """Ranges whose requests start at multiples of the alignment: the chunks the local op asks."""
        per_record = _requests_per_record(task.step, inputs)
        align = self.options.request_align
        size = max(align, align * math.ceil(self.options.partition_requests / align))
        parts: list[_Partition] = []
        start, asked, count = 0, 0, 0
        for position, n in enumerate(per_record):
            if count >= size and asked % align == 0:
                parts.append(_Partition(len(parts), start, position, asked - count))
                start, count = position, 0
            asked += n
            count += n
        total = len(per_record)
        if total > start or not parts:
            parts.append(_Partition(len(parts), start, total, asked - count))
        return parts

    def _default_actors(self) -> int:
        resources = self.ray.cluster_resources()
        if self.options.gpus_per_actor:
            return max(1, int(resources.get("GPU", 0) // self.options.gpus_per_actor))
        return max(1, int(resources.get("CPU", 1) // 2))

    def _cluster_cpus(self) -> float:
        return float(self.ray.cluster_resources().get("CPU", 1))

    # -- storing a step from its work dir ---------------------------------------------------------

    def _replay(self, launch: _Launch) -> Iterator[Any]:
        """The chunks the local op would have yielded, from what the step's work left in its work dir."""
        task = launch.task
        if task.step.op in PARTITIONED:
            style = PARTITIONED[task.step.op]
            yield from _merge(style, launch.parts, _input_batches(style, launch.inputs), task.work_dir / "partitions",
                              self.engines)
            return
        done = task.work_dir / "whole"
        summary = _read_pickle(done / "outcome.pkl")
        self.engines.add_remote(summary["usage"])
        for n in range(summary["chunks"]):
            yield _read_pickle(done / f"chunk-{n:06d}.pkl")

    def _raise(self, task: _Task, outcome: _Outcome) -> None:
        from recipec.ops.base import OperationError

        if not outcome.error:
            return
        step = task.step
        if outcome.where:
            kept = len(list((task.work_dir / "partitions").glob("part-*.pkl")))
            log.info("step %s: %d partition(s) finished before the failure, kept for the next run", step.id, kept)
        prefix = f"{outcome.where}: " if outcome.where else ""
        if outcome.error == "operation":
            raise OperationError(prefix + outcome.message)
        log.error("step %s (%s) failed on a Ray worker:\n%s", step.id, step.op, outcome.trace)
        raise RuntimeError(prefix + outcome.message)


def _input_batches(style: str, inputs: Sequence[Any]) -> list[tuple[int, int]]:
    """The local op's input batches as position ranges over the inputs concatenated."""
    total = sum(int(t.num_rows) for t in inputs)
    if style == "shards":
        out, offset = [], 0
        for t in inputs:
            for n in t.rows:
                if n:
                    out.append((offset, offset + n))
                offset += n
        return out
    if style == "rows":
        return [(a, min(a + CHUNK_ROWS, total)) for a in range(0, total, CHUNK_ROWS)]
    return [(0, total)] if total else []


def _split(batches: list[tuple[int, int]], rows: int) -> list[_Partition]:
    """Partitions of at most `rows`, none straddling an input batch."""
    parts: list[_Partition] = []
    for lo, hi in batches:
        for a in range(lo, hi, max(1, rows)):
            parts.append(_Partition(len(parts), a, min(a + rows, hi)))
    return parts or [_Partition(0, 0, 0)]


def _requests_per_record(step: Step, inputs: Sequence[Any]) -> list[int]:
    """How many requests the local op asks for each input record, in order (from the source column)."""
    if step.op == "generate_answers":
        per = len(step.params["styles"])
        return [per] * sum(int(t.num_rows) for t in inputs)
    on = step.params.get("on")
    out: list[int] = []
    for t in inputs:
        if on is None:
            out.extend([1] * int(t.num_rows))
            continue
        for batch in t.batches(["source"]):
            out.extend(1 if s in on else 0 for s in batch.column("source").to_pylist())
    return out


def _one_spelling(tables: list[Any], input_spellings: set[str | None]) -> list[Any]:
    """The partitions of one input batch in the spelling of their types the local op gives the batch.

    Field names inside types (a list's `item` or `element`) are the op's business: one that
    rewrites a column (provenance) where a partition touches some row gives the batch its own
    spelling, and the local op, which sees the whole batch, gives it to every row of it.
    """
    spellings = {str(t.schema) for t in tables}
    if len(spellings) <= 1:
        return tables
    rewritten = spellings - input_spellings
    if len(rewritten) != 1:
        raise RuntimeError(f"the partitions of one batch came out in {len(spellings)} different schemas")
    target = next(t.schema for t in tables if str(t.schema) in rewritten)
    return [t if str(t.schema) in rewritten else t.cast(target) for t in tables]


def _merge(style: str, parts: list[_Partition], batches: list[tuple[int, int]], folder: Path,
           engines: Any) -> Iterator[Any]:
    """The partitions' outputs as the chunks the local op yields (see the module's docstring)."""
    from recipec.ops.collect import Rebatcher

    out = Rebatcher()

    def load(part: _Partition) -> dict[str, Any]:
        result = _read_pickle(folder / part.name)
        engines.add_remote(result.get("usage"))
        return result

    if style == "emit":
        results = [load(p) for p in parts]
        consumed = sum(r["consumed"] for r in results)
        rejects = [x for r in results for x in r["rejects"]]
        skipped: dict[str, int] = {}
        for r in results:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        first = True
        for r in results:
            yield from out.add(r["records"], consumed=consumed if first else 0, rejects=rejects if first else (),
                               skipped=skipped if first else None)
            first = False
        if first:  # no partition at all
            yield from out.add(None)
    else:
        by_batch: dict[int, list[_Partition]] = {}
        for part in parts:
            k = next((i for i, (lo, hi) in enumerate(batches) if lo <= part.start < hi), 0)
            by_batch.setdefault(k, []).append(part)
        import pyarrow as pa

        for k in sorted(by_batch):
            results = [load(p) for p in by_batch[k]]
            tables = _one_spelling([r["records"] for r in results if r["records"].num_rows],
                                   {r.get("input_schema") for r in results})
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0] if tables else None
            skipped = {}
            for r in results:
                for name, v in r["skipped"].items():
                    skipped[name] = skipped.get(name, 0) + v
            yield from out.add(table, consumed=sum(r["consumed"] for r in results),
                               rejects=[x for r in results for x in r["rejects"]], skipped=skipped)
    yield from out.finish()
