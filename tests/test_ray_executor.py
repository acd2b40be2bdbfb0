"""The Ray executor gives the local executor's bytes, resumes by partition and fails clearly.

One local Ray cluster (2 CPUs) serves the module. The project is the quickstart without its
synthesis (so `--data-only` runs ingest, collect, both dedups, cleaning, the cuts, mixing and
export), plus a loss filter on a tiny model for the model step.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ray  # CI installs the test extra, which brings ray[data]: never skipped silently

from recipec.cli.main import main
from recipec.ops.base import OperationError
from recipec.plan import build_plan
from recipec.runtime.executor import StepFailed, execute
from recipec.runtime.ray_executor import RayOptions, connect, execute_ray
from recipec.runtime.store import Store, output_digest

ROOT = Path(__file__).resolve().parent.parent
DERIVED = """
recipe "qs-ray" {
  extends = "quickstart.recipe"
}

remove synthesize.synthetic
remove mapping.seed_to_task
remove image_tagger.seed_tags
remove instruction_tagger.seed_tasks

stage s3 {
  mix {
    remove synthetic
  }
}
"""
MODEL_FILTER = """
filter seed_loss {
  on = [seed]
  drop loss top 10% {
    model = tiny_judge
  }
}
"""
SCORE = "filter.seed_loss.1.drop_loss.score"
CUT = "filter.seed_loss.1.drop_loss.percentile"
THRESHOLD = "filter.seed_quality.1.keep_score"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    connect(RayOptions(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "examples" / "quickstart.recipe", folder)
    shutil.copytree(ROOT / "examples" / "quickstart", folder / "quickstart")
    (folder / "data.recipe").write_text(DERIVED)
    (folder / "model.recipe").write_text(DERIVED + MODEL_FILTER)
    return folder


@pytest.fixture(scope="module")
def data_runs(project, tmp_path_factory):
    """The data steps run locally and on Ray, into the same --out path (its YAML names it)."""
    base = tmp_path_factory.mktemp("data-runs")
    out = base / "out"
    common = [str(project / "data.recipe"), "--data-only", "-q", "--out", str(out)]
    assert main(["run", *common, "--store", str(base / "local")]) == 0
    out.rename(base / "out-local")
    assert main(["run", *common, "--store", str(base / "ray"), "--executor", "ray"]) == 0
    return base


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _manifests(store: Path) -> dict[str, dict]:
    found = {}
    for path in (store / "steps").glob("*/*/manifest.json"):
        manifest = json.loads(path.read_text())
        found[manifest["step"]] = manifest
    return found


def _drop_steps(store: Path, steps: set[str]) -> None:
    for path in (store / "steps").glob("*/*/manifest.json"):
        if json.loads(path.read_text())["step"] in steps:
            shutil.rmtree(path.parent)


def test_data_steps_on_ray_give_the_local_bytes(data_runs):
    report = ("run.log", "report.json", "report.html")
    local, on_ray = _files(data_runs / "out-local", report), _files(data_runs / "out", report)
    assert local and local == on_ray
    stored = _files(data_runs / "local" / "steps", ("manifest.json",))
    assert stored == _files(data_runs / "ray" / "steps", ("manifest.json",))
    manifests = _manifests(data_runs / "local"), _manifests(data_runs / "ray")
    assert {"dedup_exact", "dedup_phash", "clean", "percentile", "threshold", "mix", "export"} <= \
        {m["op"] for m in manifests[0].values()}
    for step, manifest in manifests[0].items():
        other = manifests[1][step]
        assert (other["key"], output_digest(other), other["records_in"], other["dropped"]) == \
            (manifest["key"], output_digest(manifest), manifest["records_in"], manifest["dropped"]), step


def test_a_model_step_on_an_actor_pool_gives_the_local_bytes(project, data_runs, model_cache, tmp_path, caplog):
    from recipec.compiler import compile_file

    plan = build_plan(compile_file(project / "model.recipe").recipe)
    # both runs start from the stored data steps; the model step and the cut after it run
    for name in ("local", "ray"):
        shutil.copytree(data_runs / "ray", tmp_path / name, ignore=shutil.ignore_patterns("lock", "requests.sqlite*"))
    local = execute(plan, store=Store(tmp_path / "local"), recipe_dir=project, until=[CUT], workers=1)
    caplog.set_level("INFO", logger="recipec.run")
    options = RayOptions(actors=2, request_align=16, partition_requests=16)  # the tiny model's chunks on a CPU
    on_ray = execute_ray(plan, store=Store(tmp_path / "ray"), recipe_dir=project, until=[CUT], options=options,
                         workers=1)
    ran = [(o.id, o.cached) for o in on_ray.outcomes if not o.cached]
    assert ran == [(SCORE, False), (CUT, False)]
    parts = re.search(rf"step {re.escape(SCORE)} \(score_loss\) on Ray: (\d+) partition\(s\), (\d+) to run", caplog.text)
    assert parts and int(parts[1]) == int(parts[2]) >= 2  # the seed records' requests, 16 to a partition
    local_steps = {o.id: o.manifest for o in local.outcomes}
    for outcome in on_ray.outcomes:
        assert output_digest(outcome.manifest) == output_digest(local_steps[outcome.id]), outcome.id
        assert outcome.manifest["rejects"] == local_steps[outcome.id]["rejects"], outcome.id
    usage, = on_ray.outcomes[[o.id for o in on_ray.outcomes].index(SCORE)].manifest["models"].values()
    local_usage, = local_steps[SCORE]["models"].values()
    assert usage["identity"] == local_usage["identity"] and usage["sent"] == local_usage["sent"] > 0


def _flaky_threshold(calls: Path, marker: Path, poisoned: str):
    """The threshold op, failing on the partition holding `poisoned` while `marker` exists."""
    from recipec.ops.cuts import run_threshold

    def run(ctx, inputs):
        ids = [i for t in inputs for i in t.column("id").to_pylist()]
        with open(calls, "a") as f:
            f.write(f"{len(ids)}\n")
        if marker.exists() and poisoned in ids:
            raise OperationError("injected failure")
        yield from run_threshold(ctx, inputs)

    run.streams = True
    return run


def test_a_killed_step_resumes_without_redoing_finished_partitions(project, data_runs, tmp_path):
    import cloudpickle

    from recipec.compiler import compile_file
    from recipec.ops.registry import OPERATIONS

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    plan = build_plan(compile_file(project / "data.recipe").recipe)
    store_dir = tmp_path / "store"
    shutil.copytree(data_runs / "ray", store_dir, ignore=shutil.ignore_patterns("lock"))
    _drop_steps(store_dir, {THRESHOLD})
    store = Store(store_dir)
    upstream = _manifests(store_dir)["filter.quality.1.drop_loss"]
    ids = store.read_records(upstream["key"], upstream).column("id").to_pylist()
    calls, marker = tmp_path / "calls", tmp_path / "marker"
    marker.touch()
    operations = {**OPERATIONS, "threshold": _flaky_threshold(calls, marker, ids[200])}
    options = RayOptions(partition_rows=40)  # 266 records: 7 partitions, the poisoned one the sixth
    with pytest.raises(StepFailed, match="partition 5: injected failure"):
        execute_ray(plan, store=store, recipe_dir=project, until=[THRESHOLD], operations=operations, options=options)
    parts = list(store_dir.glob("work/*/partitions/part-*.pkl"))
    assert 1 <= len(parts) <= 6 and all("-200-" not in p.name for p in parts)
    marker.unlink()
    calls.unlink()
    result = execute_ray(plan, store=store, recipe_dir=project, until=[THRESHOLD], operations=operations,
                         options=options)
    assert len(calls.read_text().split()) == 7 - len(parts)  # only the partitions not finished
    threshold = next(o for o in result.outcomes if o.id == THRESHOLD)
    assert not threshold.cached and not list(store_dir.glob("work/*/partitions"))
    assert output_digest(threshold.manifest) == output_digest(_manifests(data_runs / "local")[THRESHOLD])


GLOBAL_OPS = {"dedup_exact", "dedup_phash", "percentile", "mix"}
PASSES = re.compile(r"step (\S+) \((\w+)\) on Ray: (\d+) partition\(s\) of its per-record pass, (\d+) to run")


def _same_step(manifest: dict, expected: dict) -> None:
    for part in ("records", "rejects", "files"):
        assert [(e["name"], e["sha256"]) for e in manifest.get(part, ())] == \
            [(e["name"], e["sha256"]) for e in expected.get(part, ())], (manifest["step"], part)
    assert (manifest["records_in"], manifest["dropped"]) == (expected["records_in"], expected["dropped"])


def test_global_steps_run_their_per_record_pass_in_partitions(project, data_runs, tmp_path, caplog):
    """dedup_exact, dedup_phash (the images hashed per partition), percentile and mix: the per-record
    pass as several Ray tasks, the decision over their compact results, the local bytes."""
    from recipec.compiler import compile_file

    plan = build_plan(compile_file(project / "data.recipe").recipe)
    local = _manifests(data_runs / "local")
    steps = {step for step, m in local.items() if m["op"] in GLOBAL_OPS}
    store_dir = tmp_path / "store"
    shutil.copytree(data_runs / "ray", store_dir, ignore=shutil.ignore_patterns("lock"))
    _drop_steps(store_dir, steps)
    caplog.set_level("INFO", logger="recipec.run")
    result = execute_ray(plan, store=Store(store_dir), recipe_dir=project, until=sorted(steps),
                         options=RayOptions(partition_rows=64))
    for outcome in result.outcomes:
        _same_step(outcome.manifest, local[outcome.id])
    assert {o.id for o in result.outcomes if not o.cached} == steps
    passes = {step: (op, int(n), int(todo)) for step, op, n, todo in PASSES.findall(caplog.text)}
    assert set(passes) == steps and all(n == todo for _, n, todo in passes.values())
    most = {op: max(n for o, n, _ in passes.values() if o == op) for op in GLOBAL_OPS}
    assert all(n >= 3 for n in most.values()), most  # >= 130 records in each op's input, 64 to a partition
    assert not list(store_dir.glob("work/*"))  # the partitions went with the committed steps


def _flaky_phash(calls: Path, marker: Path, poisoned: str):
    """dedup_phash whose per-record pass fails on the partition holding `poisoned` while `marker` exists."""
    from recipec.ops import dedup

    def per_record(ctx, inputs):
        ids = [i for t in inputs for i in t.column("id").to_pylist()]
        with open(calls, "a") as f:
            f.write(f"{len(ids)}\n")
        if marker.exists() and poisoned in ids:
            raise OperationError("injected failure")
        return dedup.image_hashes(ctx, inputs)

    def run(ctx, inputs):
        yield from dedup.decide_phash(ctx, inputs, per_record(ctx, inputs))

    run.streams, run.per_record, run.combine, run.decide = True, per_record, dedup.combine_hashes, dedup.decide_phash
    return run


def test_a_killed_global_step_redoes_only_the_partitions_not_finished(project, data_runs, tmp_path):
    import cloudpickle

    from recipec.compiler import compile_file
    from recipec.ops.registry import OPERATIONS

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    plan = build_plan(compile_file(project / "data.recipe").recipe)
    local = _manifests(data_runs / "local")
    step = next(s for s, m in local.items() if m["op"] == "dedup_phash")
    store_dir = tmp_path / "store"
    shutil.copytree(data_runs / "ray", store_dir, ignore=shutil.ignore_patterns("lock"))
    _drop_steps(store_dir, {step})
    store = Store(store_dir)
    upstream = local[plan.steps[step].inputs[0]]
    ids = store.read_records(upstream["key"], upstream).column("id").to_pylist()
    size = 40
    total = -(-len(ids) // size)
    poisoned = (total - 2) * size  # the partition before the last
    calls, marker = tmp_path / "calls", tmp_path / "marker"
    marker.touch()
    operations = {**OPERATIONS, "dedup_phash": _flaky_phash(calls, marker, ids[poisoned])}
    options = RayOptions(partition_rows=size)
    with pytest.raises(StepFailed, match=f"partition {total - 2}: injected failure"):
        execute_ray(plan, store=store, recipe_dir=project, until=[step], operations=operations, options=options)
    parts = list(store_dir.glob("work/*/partitions/part-*.pkl"))
    assert 1 <= len(parts) <= total - 1 and all(f"-{poisoned}-" not in p.name for p in parts)
    assert not list(store_dir.glob("work/*/whole"))  # no decision without every partition
    marker.unlink()
    calls.unlink()
    result = execute_ray(plan, store=store, recipe_dir=project, until=[step], operations=operations, options=options)
    assert len(calls.read_text().split()) == total - len(parts)  # only the partitions not finished
    outcome = next(o for o in result.outcomes if o.id == step)
    assert not outcome.cached
    _same_step(outcome.manifest, local[step])


AHEAD = re.compile(r"step (\S+) \((\w+)\) launched on Ray ahead of its turn")


def test_the_ingests_run_at_the_same_time_and_the_driver_stores_them(project, data_runs, tmp_path, caplog):
    from recipec.compiler import compile_file

    plan = build_plan(compile_file(project / "data.recipe").recipe)
    local = _manifests(data_runs / "local")
    ingests = {step for step, m in local.items() if m["op"] == "ingest"}
    store_dir = tmp_path / "store"
    shutil.copytree(data_runs / "ray", store_dir, ignore=shutil.ignore_patterns("lock"))
    _drop_steps(store_dir, ingests)
    caplog.set_level("INFO", logger="recipec.run")
    result = execute_ray(plan, store=Store(store_dir), recipe_dir=project, until=sorted(ingests))
    ahead = set(AHEAD.findall(caplog.text))
    first = next(s for s in plan.steps if s in ingests)
    assert ahead == {(s, "ingest") for s in ingests - {first}} and len(ahead) >= 2  # each before its turn
    assert [o.id for o in result.outcomes] == [s for s in plan.steps if s in ingests]  # stored in plan order
    for outcome in result.outcomes:
        assert not outcome.cached
        _same_step(outcome.manifest, local[outcome.id])
    assert not list(store_dir.glob("work/*"))


def test_ray_missing_is_exit_2_with_the_install_hint(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code = main(["run", str(project / "data.recipe"), "--data-only", "-q", "--executor", "ray",
                 "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'recipec[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "steps").exists()


def test_an_unreachable_address_is_a_clear_error(project, tmp_path):
    ran = subprocess.run([sys.executable, "-m", "recipec", "run", str(project / "data.recipe"), "--data-only", "-q",
                          "--executor", "ray", "--address", "127.0.0.1:1", "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in ran.stderr and "Traceback" not in ran.stderr


def test_ray_flags_need_the_ray_executor(project, tmp_path, capsys):
    code = main(["run", str(project / "data.recipe"), "--data-only", "-q", "--address", "auto",
                 "--store", str(tmp_path / "s")])
    assert code == 2 and "--executor ray" in capsys.readouterr().err


# Two steps that do not depend on each other: export.s1 (one task) and mix.s2a (its per-record pass in
# partitions, then its decision). Plan order: export.s1 first.
EARLIER, LATER = "export.s1", "mix.s2a"


def _meeting_ops(events: Path) -> dict:
    """export and mix marking their start and end in `events`. The mix's per-record pass waits until the
    export has started, and the export until a pass of the mix has ended: the run finishes only if the
    two steps run at the same time, and the later step in plan order finishes first. (Self-contained:
    the workers cannot import this module.)"""
    from recipec.ops.registry import OPERATIONS

    export, mix = OPERATIONS["export"], OPERATIONS["mix"]

    def mark(line):
        with open(events, "a") as f:
            f.write(line + "\n")

    def wait_for(who, line):  # a minute at most: a step that never sees `line` was run alone
        import time

        deadline = time.monotonic() + 60
        while line not in events.read_text().splitlines():
            if time.monotonic() > deadline:
                raise OperationError(f"{who} waited in vain for {line!r}")
            time.sleep(0.05)

    def run_export(ctx, inputs):
        mark(f"start {ctx.step_id}")
        wait_for(ctx.step_id, f"end {LATER}")
        yield from export(ctx, inputs)
        mark(f"end {ctx.step_id}")

    def per_record(ctx, inputs):
        mark(f"start {ctx.step_id}")
        wait_for(ctx.step_id, f"start {EARLIER}")
        found = mix.per_record(ctx, inputs)
        mark(f"end {ctx.step_id}")
        return found

    def run_mix(ctx, inputs):
        yield from mix.decide(ctx, inputs, per_record(ctx, inputs))

    run_export.streams = getattr(export, "streams", False)
    run_mix.streams, run_mix.per_record, run_mix.combine, run_mix.decide = True, per_record, mix.combine, mix.decide
    return {**OPERATIONS, "export": run_export, "mix": run_mix}


def _without(project: Path, data_runs: Path, store_dir: Path, steps: set[str]):
    from recipec.compiler import compile_file

    shutil.copytree(data_runs / "ray", store_dir, ignore=shutil.ignore_patterns("lock"))
    _drop_steps(store_dir, steps)
    return build_plan(compile_file(project / "data.recipe").recipe)


DONE = re.compile(r"step (\S+) \((\w+)\) done in")


def test_independent_steps_run_at_the_same_time_and_are_stored_in_plan_order(project, data_runs, tmp_path,
                                                                              caplog):
    plan = _without(project, data_runs, tmp_path / "store", {EARLIER, LATER})
    events = tmp_path / "events"
    events.touch()
    caplog.set_level("INFO", logger="recipec.run")
    result = execute_ray(plan, store=Store(tmp_path / "store"), recipe_dir=project, until=[EARLIER, LATER],
                         operations=_meeting_ops(events))
    lines = events.read_text().splitlines()
    assert lines[-1] == f"end {EARLIER}" and f"end {LATER}" in lines  # the later one finished first ...
    assert [s for s, _ in DONE.findall(caplog.text)] == [EARLIER, LATER]  # ... and was stored second
    assert (LATER, "mix") in AHEAD.findall(caplog.text)
    assert [o.id for o in result.outcomes] == [s for s in plan.steps if s in result.selected]
    local = _manifests(data_runs / "local")
    for outcome in result.outcomes:
        _same_step(outcome.manifest, local[outcome.id])
    assert not list((tmp_path / "store").glob("work/*"))


def _export_failing_once_another_step_is_done():
    """export that waits until another step's work is finished in the store's work dir, then fails."""
    from recipec.ops.registry import OPERATIONS

    def run(ctx, inputs):
        import time

        deadline = time.monotonic() + 60
        while not list(ctx.work_dir.parent.glob("*/whole/outcome.pkl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise OperationError("injected failure")
        yield

    run.streams = True
    return {**OPERATIONS, "export": run}


def test_a_step_failing_while_another_ran_keeps_the_other_for_the_next_run(project, data_runs, tmp_path, caplog):
    store_dir = tmp_path / "store"
    plan = _without(project, data_runs, store_dir, {EARLIER, LATER})
    store = Store(store_dir)
    with pytest.raises(StepFailed) as failed:
        execute_ray(plan, store=store, recipe_dir=project, until=[EARLIER, LATER],
                    operations=_export_failing_once_another_step_is_done())
    assert str(failed.value) == f"step {EARLIER} (op `export`) failed: injected failure"  # as a local run says
    assert not {EARLIER, LATER} & set(_manifests(store_dir))
    assert len(list(store_dir.glob("work/*/whole/outcome.pkl"))) == 1  # the later step's work, finished
    caplog.set_level("INFO", logger="recipec.run")
    result = execute_ray(plan, store=store, recipe_dir=project, until=[EARLIER, LATER])
    assert f"step {LATER} (mix) on Ray: decided already" in caplog.text  # its work was kept, not done again
    local = _manifests(data_runs / "local")
    assert {o.id for o in result.outcomes if not o.cached} == {EARLIER, LATER}
    for outcome in result.outcomes:
        _same_step(outcome.manifest, local[outcome.id])
    assert not list(store_dir.glob("work/*"))


def _mix_failing_while_export_waits(events: Path) -> dict:
    """mix whose per-record pass fails (marking it in `events`), and export that waits for that mark."""
    from recipec.ops.registry import OPERATIONS

    export, mix = OPERATIONS["export"], OPERATIONS["mix"]

    def run_export(ctx, inputs):
        import time

        deadline = time.monotonic() + 60
        while "failed" not in events.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield from export(ctx, inputs)

    def per_record(ctx, inputs):
        with open(events, "a") as f:
            f.write("failed\n")
        raise OperationError("injected failure")

    def run_mix(ctx, inputs):
        yield from mix.decide(ctx, inputs, per_record(ctx, inputs))

    run_export.streams = getattr(export, "streams", False)
    run_mix.streams, run_mix.per_record, run_mix.combine, run_mix.decide = True, per_record, mix.combine, mix.decide
    return {**OPERATIONS, "export": run_export, "mix": run_mix}


def test_a_later_step_failing_first_fails_the_run_at_its_turn(project, data_runs, tmp_path):
    store_dir = tmp_path / "store"
    plan = _without(project, data_runs, store_dir, {EARLIER, LATER})
    store = Store(store_dir)
    events = tmp_path / "events"
    events.touch()
    with pytest.raises(StepFailed) as failed:
        execute_ray(plan, store=store, recipe_dir=project, until=[EARLIER, LATER],
                    operations=_mix_failing_while_export_waits(events))
    assert str(failed.value) == f"step {LATER} (op `mix`) failed: partition 0: injected failure"
    assert EARLIER in _manifests(store_dir) and LATER not in _manifests(store_dir)  # the one before it is stored
    result = execute_ray(plan, store=store, recipe_dir=project, until=[EARLIER, LATER])
    assert [o.id for o in result.outcomes if not o.cached] == [LATER]
    _same_step(result.outcomes[-1].manifest, _manifests(data_runs / "local")[LATER])


def _export_failing_while_mix_runs(events: Path) -> dict:
    """mix whose per-record pass writes its process id to `events` and then waits a minute, and export
    that fails once it sees it."""
    from recipec.ops.registry import OPERATIONS

    mix = OPERATIONS["mix"]

    def run_export(ctx, inputs):
        import time

        deadline = time.monotonic() + 60
        while "started" not in events.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise OperationError("injected failure")
        yield

    def per_record(ctx, inputs):
        import os
        import time

        with open(events, "a") as f:
            f.write(f"started {os.getpid()}\n")
        time.sleep(60)
        with open(events, "a") as f:
            f.write("ended\n")
        return mix.per_record(ctx, inputs)

    def run_mix(ctx, inputs):
        yield from mix.decide(ctx, inputs, per_record(ctx, inputs))

    run_export.streams = True
    run_mix.streams, run_mix.per_record, run_mix.combine, run_mix.decide = True, per_record, mix.combine, mix.decide
    return {**OPERATIONS, "export": run_export, "mix": run_mix}


def _gone(pid: int) -> bool:
    """Whether the process ends within half a minute."""
    import os
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_failing_step_cancels_the_steps_in_flight(project, data_runs, tmp_path):
    store_dir = tmp_path / "store"
    plan = _without(project, data_runs, store_dir, {EARLIER, LATER})
    events = tmp_path / "events"
    events.touch()
    with pytest.raises(StepFailed) as failed:
        execute_ray(plan, store=Store(store_dir), recipe_dir=project, until=[EARLIER, LATER],
                    operations=_export_failing_while_mix_runs(events))
    assert str(failed.value) == f"step {EARLIER} (op `export`) failed: injected failure"
    assert _gone(int(events.read_text().split()[1]))  # the mix's pass was not left running
    assert "ended" not in events.read_text() and not list(store_dir.glob("work/*/partitions/*.pkl"))
    result = execute_ray(plan, store=Store(store_dir), recipe_dir=project, until=[EARLIER, LATER])
    local = _manifests(data_runs / "local")
    assert {o.id for o in result.outcomes if not o.cached} == {EARLIER, LATER}
    for outcome in result.outcomes:
        _same_step(outcome.manifest, local[outcome.id])
