"""The executor in-process, with the fake operations of test_runtime_fakes injected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipec.ops.base import Chunk, OperationError
from recipec.runtime.executor import RunError, StepFailed, select
from recipec.runtime.store import Store, cached_steps

from test_runtime_fakes import DATA_STEPS, FAKE_OPS, Project, out_snapshot, run_project

TESTS = Path(__file__).parent


def manifests(store: Path) -> dict[str, int]:
    """Every manifest in a store, by path, with its mtime: what a later run must not touch."""
    return {str(p): p.stat().st_mtime_ns for p in store.glob("steps/*/*/manifest.json")}


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path / "project")


def test_a_second_run_runs_nothing_and_writes_nothing(project, tmp_path):
    first = run_project(project, tmp_path / "store", tmp_path / "out")
    assert not any(o.cached for o in first.outcomes)
    before = manifests(tmp_path / "store")
    second = run_project(project, tmp_path / "store", tmp_path / "out")
    assert all(o.cached for o in second.outcomes)
    assert [(o.id, o.key, o.records_out, o.dropped) for o in first.outcomes] == \
           [(o.id, o.key, o.records_out, o.dropped) for o in second.outcomes]
    assert manifests(tmp_path / "store") == before


def test_every_step_keeps_the_conservation_law_in_the_report(project, tmp_path):
    for threshold in (0.5, 1.0, 2.0, 9.0):
        project.write_recipe(threshold)
        run_project(project, tmp_path / "store", tmp_path / "out")
        report = json.loads((tmp_path / "out/report.json").read_text())
        assert [s["id"] for s in report["steps"]] == [s for s in project.plan().steps if s in
                                                      {*project.plan().upstream("export.s1"), *project.plan().upstream("export.s2")}]
        for step in report["steps"]:
            assert step["records_in"] == step["records_out"] + sum(step["dropped"].values()), step


def test_changing_a_threshold_reruns_that_step_and_what_depends_on_it(project, tmp_path):
    run_project(project, tmp_path / "store")
    project.write_recipe(1.0)
    plan = project.plan()
    result = run_project(project, tmp_path / "store")
    ran = {o.id for o in result.outcomes if not o.cached}
    threshold_step = "filter.processing.2.keep_loss"
    assert ran == plan.downstream({threshold_step}) & set(result.selected)
    assert {"ingest.a", "ingest.b", "collect", "filter.processing.1.dedup_exact"}.isdisjoint(ran)
    project.write_recipe(2.0)  # back: everything is in the store already
    assert all(o.cached for o in run_project(project, tmp_path / "store").outcomes)


def test_a_changed_data_file_reruns_its_ingest_and_downstream(project, tmp_path):
    run_project(project, tmp_path / "store")
    path = project.root / "data/b/text.jsonl"
    path.write_text(path.read_text().replace("What is 3 + 1?", "What is 3 plus 1?"))
    result = run_project(project, tmp_path / "store")
    ran = {o.id for o in result.outcomes if not o.cached}
    assert "ingest.b" in ran and "ingest.a" not in ran and "collect" in ran


def test_a_changed_image_folder_reruns_its_ingest(project, tmp_path):
    run_project(project, tmp_path / "store")
    image = project.root / "data/a/images/img03.png"
    image.write_bytes(b"other pixels")
    result = run_project(project, tmp_path / "store")
    assert {o.id for o in result.outcomes if not o.cached} >= {"ingest.a", "collect"}
    assert next(o for o in result.outcomes if o.id == "ingest.b").cached


def test_unchanged_data_files_are_not_hashed_again(project, tmp_path):
    data = [project.root / "data/a/part-0.jsonl", project.root / "data/a/part-1.jsonl", project.root / "data/b/text.jsonl"]
    for path in data:  # older than the racy window: their digests may be trusted from the cache
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    run_project(project, tmp_path / "store")
    digests = Store(tmp_path / "store").file_digests()
    plan = project.plan()
    from recipec.runtime.store import DataDigests, plan_keys

    plan_keys(plan, plan.steps, project.root, DataDigests(digests))
    assert digests.hashed == 0


def test_a_step_is_shared_by_every_recipe_that_asks_for_it(project, tmp_path):
    run_project(project, tmp_path / "store")
    other = project.root / "other.recipe"
    other.write_text(project.recipe_path.read_text().replace('recipe "rt"', 'recipe "rt-other"')
                     .replace("a = 5", "a = 4"))
    project.recipe_path = other
    result = run_project(project, tmp_path / "store")
    ran = {o.id for o in result.outcomes if not o.cached}
    assert ran == {"mix.s2", "export.s2"}


def test_a_missing_operation_stops_the_run_before_anything_runs(project, tmp_path):
    with pytest.raises(RunError) as error:
        run_project(project, tmp_path / "store", until=())
    message = str(error.value)
    assert "step `train.s1` needs op `train`, which this installation cannot run yet" in message
    assert "step `train.s2` needs op `train`" in message
    assert "with --data-only" in message
    assert manifests(tmp_path / "store") == {}


def test_a_missing_operation_is_fine_when_its_step_is_cached(project, tmp_path):
    run_project(project, tmp_path / "store")
    operations = {k: v for k, v in FAKE_OPS.items() if k != "ingest"}
    result = run_project(project, tmp_path / "store", operations=operations)
    assert all(o.cached for o in result.outcomes)


def test_until_accepts_steps_and_stage_names(project, tmp_path):
    plan = project.plan()
    assert select(plan, until=["s1"]) == [s for s in plan.steps if s in plan.upstream("export.s1")]
    assert select(plan, until=["collect"]) == ["ingest.a", "ingest.b", "collect"]
    assert select(plan, only="mix.s2") == ["mix.s2"]
    with pytest.raises(RunError, match="did you mean `collect`"):
        select(plan, until=["colect"])
    with pytest.raises(RunError, match="exclude each other"):
        select(plan, until=["s1"], only="s2")


def test_data_only_runs_every_step_that_needs_no_model(project, tmp_path):
    from recipec.plan import MODEL_OPS

    plan = project.plan()
    chosen = select(plan, data_only=True)
    assert chosen and all(plan.steps[s].op not in MODEL_OPS for s in chosen)
    assert {s for s in plan.steps if plan.steps[s].op == "export"} <= set(chosen)
    assert set(chosen) == {s for s in plan.steps if plan.steps[s].op != "train"}
    result = run_project(project, tmp_path / "store", until=(), data_only=True)
    assert not result.full and [o.id for o in result.outcomes] == chosen


def test_only_runs_one_step_whose_inputs_are_stored(project, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(RunError, match=r"--only mix.s1: its input\(s\) `filter.processing.2.keep_loss` are not in"):
        run_project(project, store, until=(), only="mix.s1")
    run_project(project, store, until=["filter.processing.2.keep_loss"])
    with pytest.raises(RunError, match=r"`mix.s1` are not in"):
        run_project(project, store, until=(), only="s1")  # a stage name: its export step
    result = run_project(project, store, until=(), only="mix.s1")
    assert [(o.id, o.cached) for o in result.outcomes] == [("mix.s1", False)]
    result = run_project(project, store, tmp_path / "out", until=(), only="s1")
    assert [(o.id, o.cached) for o in result.outcomes] == [("export.s1", False)]
    assert (tmp_path / "out/s1/data.jsonl").exists()


def test_outputs_are_identical_for_any_number_of_workers(project, tmp_path):
    snapshots = []
    for workers in (1, 2, 5):
        run_project(project, tmp_path / f"store{workers}", tmp_path / f"out{workers}", workers=workers)
        snapshots.append(out_snapshot(tmp_path / f"out{workers}"))
    assert snapshots[0] == snapshots[1] == snapshots[2]
    stores = [{p.relative_to(tmp_path / f"store{w}").as_posix(): p.read_bytes()
               for p in sorted((tmp_path / f"store{w}/steps").rglob("*")) if p.is_file() and p.name != "manifest.json"}
              for w in (1, 2, 5)]
    assert stores[0] == stores[1] == stores[2]


def test_a_failing_operation_fails_its_step_and_keeps_the_finished_ones(project, tmp_path):
    def broken(ctx, inputs):
        yield Chunk(records=inputs[0].slice(0, 1), consumed=1)
        raise OperationError("the loss column is missing")

    operations = {**FAKE_OPS, "threshold": broken}
    with pytest.raises(StepFailed) as error:
        run_project(project, tmp_path / "store", operations=operations)
    assert error.value.step_id == "filter.processing.2.keep_loss"
    assert error.value.message == "the loss column is missing" and not error.value.internal
    assert len(manifests(tmp_path / "store")) == 4  # ingest x2, collect, dedup
    result = run_project(project, tmp_path / "store")
    assert [o.id for o in result.outcomes if not o.cached][0] == "filter.processing.2.keep_loss"
    assert not any((tmp_path / "store/tmp").iterdir())


def test_an_internal_error_is_reported_as_such(project, tmp_path):
    def buggy(ctx, inputs):
        return iter([1 / 0])

    with pytest.raises(StepFailed) as error:
        run_project(project, tmp_path / "store", operations={**FAKE_OPS, "collect": buggy})
    assert error.value.internal and "ZeroDivisionError" in error.value.message


@pytest.mark.parametrize("op, message", [
    (lambda ctx, inputs: iter([Chunk(records=inputs[0], consumed=inputs[0].num_rows + 1)]), "conservation law"),
    (lambda ctx, inputs: iter([Chunk(records=inputs[0].slice(1), consumed=inputs[0].num_rows - 1)]),
     "accounted for"),
    (lambda ctx, inputs: iter([Chunk(records=inputs[0].slice(1), consumed=inputs[0].num_rows)]), "conservation law"),
    (lambda ctx, inputs: iter(["not a chunk"]), "not a Chunk"),
])
def test_an_operation_that_loses_records_fails(project, tmp_path, op, message):
    with pytest.raises(StepFailed, match=message) as error:
        run_project(project, tmp_path / "store", operations={**FAKE_OPS, "dedup_exact": op})
    assert error.value.internal
    assert not list((tmp_path / "store").glob("steps/*/*/manifest.json")) or \
        all(json.loads(Path(p).read_text())["op"] != "dedup_exact" for p in manifests(tmp_path / "store"))


def test_a_damaged_step_is_computed_again(project, tmp_path):
    result = run_project(project, tmp_path / "store")
    store = Store(tmp_path / "store")
    dedup = next(o for o in result.outcomes if o.id == "filter.processing.1.dedup_exact")
    shard = store.path(dedup.key, dedup.manifest["records"][0]["name"])
    shard.unlink()
    again = run_project(project, tmp_path / "store")
    assert {o.id for o in again.outcomes if not o.cached} == {"filter.processing.1.dedup_exact"}
    # a flipped byte keeps the size: only --verify sees it
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert all(o.cached for o in run_project(project, tmp_path / "store").outcomes)
    again = run_project(project, tmp_path / "store", verify=True)
    assert {o.id for o in again.outcomes if not o.cached} == {"filter.processing.1.dedup_exact"}


def test_model_ops_get_an_engine_and_data_ops_do_not(project, tmp_path):
    seen = {}

    def train(ctx, inputs):
        seen[ctx.step_id] = ctx.engine({"ref": "tiny://llava-onevision"})
        yield Chunk(consumed=sum(t.num_rows for t in inputs), skipped={"trained_on": sum(t.num_rows for t in inputs)},
                    files={"checkpoint.txt": b"weights"})

    def no_engine(ctx, inputs):
        assert ctx.engine is None
        yield from FAKE_OPS["collect"](ctx, inputs)

    loads = []

    def engines(model_use, *, workers, **_):
        loads.append(model_use["ref"])
        return f"engine for {model_use['ref']}"

    result = run_project(project, tmp_path / "store", operations={**FAKE_OPS, "collect": no_engine, "train": train},
                         until=(), engines=engines)
    assert seen == {"train.s1": "engine for tiny://llava-onevision", "train.s2": "engine for tiny://llava-onevision"}
    assert loads == ["tiny://llava-onevision"]  # one engine, shared by consecutive steps
    assert {o.id for o in result.outcomes} >= {"train.s1", "train.s2"}


def test_cached_steps_for_recipec_plan(project, tmp_path):
    run_project(project, tmp_path / "store", until=["collect"])
    plan = project.plan()
    assert cached_steps(plan, Store(tmp_path / "store"), project.root) == {"ingest.a", "ingest.b", "collect"}
    assert cached_steps(plan, str(tmp_path / "store"), project.root) == {"ingest.a", "ingest.b", "collect"}
    assert cached_steps(plan, str(tmp_path / "elsewhere"), project.root) == set()
    assert not (tmp_path / "elsewhere").exists()  # looking creates nothing


def test_a_cached_run_imports_neither_pyarrow_nor_torch(project, tmp_path):
    run_project(project, tmp_path / "store", tmp_path / "out")
    script = textwrap.dedent(f"""
        import sys
        from recipec.compiler import compile_or_raise
        from recipec.plan import build_plan
        from recipec.runtime.executor import execute
        from recipec.runtime.report import write_outputs
        from recipec.runtime.store import Store
        store = Store({str(tmp_path / "store")!r})
        plan = build_plan(compile_or_raise({str(project.recipe_path)!r}))
        with store.locked():
            result = execute(plan, store=store, recipe_dir={str(project.root)!r},
                             operations=dict.fromkeys({sorted(FAKE_OPS)!r}), until={list(DATA_STEPS)!r})
            write_outputs(result, store, {str(tmp_path / "out")!r})
        assert all(o.cached for o in result.outcomes)
        print(sorted(m for m in ("pyarrow", "torch", "rich") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_run_that_computes_data_steps_does_not_import_torch(project, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_runtime_fakes import Project, run_project
        project = Project.__new__(Project)
        project.root = __import__("pathlib").Path({str(project.root)!r})
        project.recipe_path = project.root / "rt.recipe"
        result = run_project(project, project.root.parent / "store")
        assert not any(o.cached for o in result.outcomes)
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_early_cutoff_a_threshold_moved_where_no_record_sits_recomputes_only_that_step(project, tmp_path):
    run_project(project, tmp_path / "store")
    project.write_recipe(2.1)  # no loss lies between 2.0 and 2.1: the filter keeps the same records
    plan = project.plan()
    threshold_step = "filter.processing.2.keep_loss"
    from recipec.runtime.store import cache_status

    status = cache_status(plan, tmp_path / "store", project.root)
    assert status[threshold_step] == "runs" and status["ingest.a"] == "cached"
    downstream = (plan.downstream({threshold_step}) - {threshold_step}) & set(DATA_STEPS_SELECTED(plan))
    assert downstream and all(status[s] == "may stay cached" for s in downstream)
    result = run_project(project, tmp_path / "store")
    ran = {o.id for o in result.outcomes if not o.cached}
    assert ran == {threshold_step}


def DATA_STEPS_SELECTED(plan):
    return select(plan, DATA_STEPS)


def test_plan_says_which_steps_may_stay_cached(project, tmp_path):
    run_project(project, tmp_path / "store")
    project.write_recipe(2.1)
    done = subprocess.run([sys.executable, "-m", "recipec", "plan", str(project.recipe_path), "--json",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = {s["id"]: s for s in json.loads(done.stdout)["steps"]}
    assert steps["filter.processing.2.keep_loss"]["cached"] is False
    assert "may_stay_cached" not in steps["filter.processing.2.keep_loss"]
    assert steps["collect"]["cached"] is True
    assert any(s.get("may_stay_cached") for s in steps.values())
