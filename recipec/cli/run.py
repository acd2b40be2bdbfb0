"""`recipec run FILE`: run what is not cached, resumably, and write the outputs and the report.

    recipec run FILE [--store DIR] [--out DIR] [--workers N] [--until STEP]... [--only STEP]
                     [--verify] [--quiet] [--debug]
                     [--executor local|ray] [--address ADDR] [--gpus-per-actor G] [--actors N]

--store   the content-addressed store (default $RECIPEC_STORE, else .recipec/store)
--out     the outputs: per stage its data, rejects/, report.json, run.log (default out/<recipe name>)
--workers processes or threads an operation may use (default: every core); outputs do not depend on it
--until   run this step (or stage: its export step) and what it needs; may be given several times
--only    run this step alone; its inputs must already be in the store
--verify  check the sha256 of every cached output before trusting it
--locked  refuse to start (exit 2) when anything FILE.lock pins drifted, naming each file
--executor  local (default) or ray: the same plan, operations, keys and store, the steps' work
          done on a Ray cluster (runtime/ray_executor.py); needs `pip install 'recipec[ray]'`
--address   the Ray cluster to join (`auto`, `ray://HOST:10001`); without it, a local one on
          this machine's cores
--gpus-per-actor, --actors   per model step on Ray: the GPUs each engine actor holds, and how
          many actors (default: one per GPU, else one per two CPUs)
--strict  a stage short of its plan or empty, or a filter that drops every record it gets, is an
          error (exit 1) instead of a warning; either way it is in report.json's `warnings`

Exit codes: 0 success; 1 a step failed (its id, the message and the log's path are printed; the
traceback of an internal error is in the log, and on stderr with --debug; the outputs of the steps
that finished and a report saying the run failed are written all the same), or the outputs could
not be made as the recipe asks (an image gone or outside its source's root); 2 the recipe has errors,
the store is in use by another run, the run cannot start (an unknown step, an operation this
installation lacks, inputs of --only missing), or the store or --out cannot be written.

This module is imported by every `recipec` command, so it imports the runtime only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from recipec.cli.common import compile_reporting

EXIT_OK, EXIT_STEP_FAILED, EXIT_ERROR = 0, 1, 2
DEFAULT_STORE = Path(".recipec") / "store"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("--store", metavar="DIR", help=f"the step store (default $RECIPEC_STORE, else {DEFAULT_STORE})")
    parser.add_argument("--out", metavar="DIR", help="where the outputs go (default out/<recipe name>)")
    parser.add_argument("--workers", metavar="N", type=_positive, help="processes or threads per operation (default: all cores)")
    parser.add_argument("--until", metavar="STEP", action="append", default=[],
                        help="run STEP (or a stage's export) and its upstream only; repeatable")
    parser.add_argument("--only", metavar="STEP", help="run STEP alone; its inputs must already be stored")
    parser.add_argument("--data-only", action="store_true",
                        help="run every step that loads no model (ingest, filters, mixing, export)")
    parser.add_argument("--verify", action="store_true", help="check the sha256 of cached outputs before using them")
    parser.add_argument("--locked", action="store_true",
                        help="refuse to run when a source, model or included file differs from FILE.lock")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a stage falls short of its plan or a filter empties its input")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where the steps run: this process (default) or a Ray cluster")
    parser.add_argument("--address", metavar="ADDR", help="with --executor ray: the cluster to join (default: a local one)")
    parser.add_argument("--gpus-per-actor", metavar="G", type=_fraction,
                        help="with --executor ray: GPUs per model actor (may be a fraction)")
    parser.add_argument("--actors", metavar="N", type=_positive, help="with --executor ray: model actors per step")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value


def _executor(args: argparse.Namespace):
    """`execute`, or the Ray executor's with its options; None (after saying why) when it cannot start."""
    from recipec.runtime.executor import execute

    ray_only = [flag for flag, value in (("--address", args.address), ("--gpus-per-actor", args.gpus_per_actor),
                                         ("--actors", args.actors)) if value is not None]
    if args.executor != "ray":
        if ray_only:
            _error(f"{', '.join(ray_only)} go(es) with --executor ray")
            return None
        return execute
    from recipec.runtime.ray_executor import RayOptions, RayUnavailable, connect, execute_ray

    options = RayOptions(address=args.address, gpus_per_actor=args.gpus_per_actor or 0.0, actors=args.actors,
                         num_cpus=args.workers)
    try:
        connect(options)
    except RayUnavailable as e:
        _error(str(e))
        return None

    def run_on_ray(plan, **kwargs):
        return execute_ray(plan, options=options, **kwargs)

    return run_on_ray


def _error(message: str) -> None:
    print(f"recipec run: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    compiled = compile_reporting(args.file)
    if not compiled.ok:
        return EXIT_ERROR

    from recipec.plan import build_plan
    from recipec.runtime.executor import RunError, StepFailed, select
    from recipec.runtime.lock import StoreInUse
    from recipec.runtime.progress import make_progress, print_summary
    from recipec.runtime.executor import RunResult, available_cores, resolve_step
    from recipec.runtime.report import Failure, OutcomeRecorder, OutputError, reserved_names, write_outputs
    from recipec.runtime.store import Store

    recipe = compiled.recipe
    clashes = sorted(reserved_names() & {s.name for s in recipe.stages})
    if clashes:
        _error(f"stage name(s) {', '.join(clashes)} clash with the files of --out; rename the stage")
        return EXIT_ERROR
    plan = build_plan(recipe)
    store = Store(args.store or os.environ.get("RECIPEC_STORE") or DEFAULT_STORE)
    if args.locked:
        from recipec.lockfile import drift, lock_path

        try:
            drifted = drift(recipe, args.file, compiled.chain, store)
        except OSError as e:
            drifted = [f"{e.strerror or e}: {e.filename}"]
        if drifted:
            _error(f"--locked: what the recipe reads differs from {lock_path(args.file)}:")
            for line in drifted:
                print(f"  {line}", file=sys.stderr)
            print(f"  (run `recipec lock {args.file}` to accept the change)", file=sys.stderr)
            return EXIT_ERROR
    out_dir = Path(args.out) if args.out else Path("out") / recipe.name
    log_path = out_dir / "run.log"

    try:
        select(plan, args.until, args.only, args.data_only)  # a bad step name is refused before anything is touched
        execute = _executor(args)  # Ray starts (or is joined) only for a run that can start
        if execute is None:
            return EXIT_ERROR
        with store.locked():
            out_dir.mkdir(parents=True, exist_ok=True)
            progress = OutcomeRecorder(make_progress(quiet=args.quiet))
            handlers = _attach_log(log_path, progress)
            logging.getLogger("recipec.run").info("recipec run %s (store %s, out %s)", args.file, store.root, out_dir)
            started = time.perf_counter()
            try:
                try:
                    result = execute(plan, store=store, recipe_dir=Path(args.file).parent, workers=args.workers,
                                     until=args.until, only=args.only, data_only=args.data_only, verify=args.verify,
                                     progress=progress)
                except StepFailed as failed:
                    # what finished before the failure is in the store: write its outputs and a report
                    partial = RunResult(plan, Path(args.file).parent.absolute(), {o.id: o.key for o in progress.outcomes},
                                        [o.id for o in progress.outcomes], list(progress.outcomes),
                                        [resolve_step(plan, u) for u in args.until],
                                        resolve_step(plan, args.only) if args.only else None,
                                        args.workers or available_cores(), time.perf_counter() - started,
                                        args.data_only)
                    try:
                        write_outputs(partial, store, out_dir, failure=Failure(failed.step_id, failed.op, failed.message),
                                      recipe_file=args.file)
                    except (OutputError, OSError) as e:
                        logging.getLogger("recipec.run").error("the outputs of the failed run are incomplete: %s", e)
                    raise
                report = write_outputs(result, store, out_dir, recipe_file=args.file)
                logging.getLogger("recipec.run").info("run finished in %.2f s", result.seconds)
            finally:
                progress.close()
                _detach_log(handlers)
    except StoreInUse as e:
        _error(str(e))
        return EXIT_ERROR
    except RunError as e:
        _error(str(e))
        return EXIT_ERROR
    except OutputError as e:
        _error(str(e))
        print(f"  log: {log_path}", file=sys.stderr)
        return EXIT_STEP_FAILED
    except StepFailed as e:
        _error(f"step {e.step_id} (op `{e.op}`) failed: {e.message}")
        print(f"  log: {log_path}", file=sys.stderr)
        print(f"  the outputs of the steps that finished and report.json are in {out_dir}", file=sys.stderr)
        if args.debug:
            traceback.print_exception(e)
        elif e.internal and e.__cause__ is not None:
            print("  (the traceback is in the log; --debug shows it here)", file=sys.stderr)
        return EXIT_STEP_FAILED
    except OSError as e:  # the store or the outputs cannot be written
        if args.debug:
            raise
        _error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return EXIT_ERROR

    print_summary(result.outcomes)
    ran = sum(not o.cached for o in result.outcomes)
    print(f"{len(result.outcomes)} step(s), {ran} run, {len(result.outcomes) - ran} cached, "
          f"in {result.seconds:.2f} s; outputs in {out_dir}")
    for stage, folder in (report.get("run") or {}).get("checkpoints", {}).items():
        print(f"  checkpoint of stage {stage}: {folder}")
    for warning in report.get("warnings") or ():
        _error(f"warning: {warning['message']}" if not args.strict else f"error (--strict): {warning['message']}")
    if args.strict and report.get("warnings"):
        return EXIT_STEP_FAILED
    return EXIT_OK


def _attach_log(path: Path, progress) -> list[tuple[logging.Logger, logging.Handler]]:
    from recipec.runtime.progress import ProgressLogHandler

    root = logging.getLogger("recipec")
    root.setLevel(logging.INFO)
    to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_screen = ProgressLogHandler(progress)
    root.addHandler(to_file)
    root.addHandler(to_screen)
    return [(root, to_file), (root, to_screen)]


def _detach_log(handlers: list[tuple[logging.Logger, logging.Handler]]) -> None:
    for logger, handler in handlers:
        logger.removeHandler(handler)
        handler.close()
