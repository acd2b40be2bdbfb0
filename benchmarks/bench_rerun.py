#!/usr/bin/env python
"""A cold run of the quickstart, then no-op re-runs: how long `recipec run` takes when all is cached.

    python benchmarks/bench_rerun.py [--recipe examples/quickstart.recipe] [--repeat 5] [--workers N]

Everything goes to a fresh temporary store and output folder (`--keep` leaves them). Printed:

* the cold run, as one `recipec run` process;
* the no-op re-run as a whole `recipec run` process (interpreter start, imports, compiling the
  recipe, checking the store, refreshing the outputs): the number a user feels; target < 1 s;
* the no-op re-run in-process, imports excluded: compiling and planning, then the executor and the
  outputs on their own;
* the ratio of the cold run to the no-op re-run.

When this installation cannot run every op of the plan (training, say), the benchmark runs its
data part, `--until` every stage, and says so.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def selection(recipe: Path) -> tuple[list[str], str]:
    """`--until` arguments for what this installation can run, and a note on what was left out."""
    from recipec.compiler import compile_or_raise
    from recipec.plan import build_plan
    from recipec.runtime.executor import load_operations

    plan = build_plan(compile_or_raise(recipe))
    operations = load_operations()
    missing = sorted({s.op for s in plan.steps.values()} - set(operations))
    if not missing:
        return [], "the whole plan"
    stages = [s.name for s in plan.recipe.stages]
    until = [arg for stage in stages for arg in ("--until", stage)]
    return until, f"the data part (--until every stage): this installation has no {', '.join(missing)}"


def run_process(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recipec", "run", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"recipec run failed ({done.returncode}):\n{done.stderr}")
    return seconds


def run_in_process(recipe: Path, store_dir: Path, out: Path, until: list[str], workers: int | None) -> tuple[float, float]:
    """(compile and plan, executor and outputs) seconds of one no-op run, imports excluded."""
    from recipec.compiler import compile_or_raise
    from recipec.plan import build_plan
    from recipec.runtime.executor import execute
    from recipec.runtime.report import write_outputs
    from recipec.runtime.store import Store

    started = time.perf_counter()
    plan = build_plan(compile_or_raise(recipe))
    planned = time.perf_counter()
    store = Store(store_dir)
    with store.locked():
        result = execute(plan, store=store, recipe_dir=recipe.parent, workers=workers, until=until[1::2])
        write_outputs(result, store, out)
    finished = time.perf_counter()
    if not all(o.cached for o in result.outcomes):
        sys.exit("the re-run was not a no-op: some steps ran again")
    return planned - started, finished - planned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "examples/quickstart.recipe")
    parser.add_argument("--repeat", type=int, default=5, help="no-op re-runs to time (default 5)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and outputs")
    args = parser.parse_args(argv)
    recipe = args.recipe.resolve()
    if not recipe.exists():
        sys.exit(f"no recipe at {recipe}")

    until, what = selection(recipe)
    work = Path(tempfile.mkdtemp(prefix="recipec-bench-rerun-"))
    store, out = work / "store", work / "out"
    common = [str(recipe), "--store", str(store), "--out", str(out), "--quiet", *until]
    if args.workers:
        common += ["--workers", str(args.workers)]
    try:
        print(f"recipe: {recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe}; runs {what}")
        cold = run_process(common)
        print(f"cold run (process):                 {cold:8.3f} s")
        warm = [run_process(common) for _ in range(args.repeat)]
        median = statistics.median(warm)
        print(f"no-op re-run (process):             {median:8.3f} s  (median of {len(warm)}; min {min(warm):.3f} s)")
        timings = [run_in_process(recipe, store, out, until, args.workers) for _ in range(args.repeat)]
        compile_s = statistics.median(t[0] for t in timings)
        execute_s = statistics.median(t[1] for t in timings)
        print(f"no-op re-run (in-process):          {compile_s + execute_s:8.3f} s  "
              f"(compile and plan {compile_s:.3f} s, executor and outputs {execute_s:.3f} s)")
        print(f"cold / no-op re-run (process):      {cold / median:8.1f}x")
        print(f"target: no-op re-run < 1 s as a process: {'met' if median < 1.0 else 'NOT met'}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
