"""`recipec run`: exit codes, messages, the summary and the log; in-process with the fake operations
(patched in for the registry) and as a subprocess with the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipec.cli.main import main
from recipec.ops.base import OperationError
from recipec.runtime import executor
from recipec.runtime.lock import StoreLock

from test_runtime_fakes import (FAKE_OPS, Project, make_quickstart, out_snapshot, recipec_cli,
                                registry_operations)


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path / "project")


@pytest.fixture
def fake_registry(monkeypatch):
    operations = dict(FAKE_OPS)
    monkeypatch.setattr(executor, "load_operations", lambda: operations)
    return operations


def run_cli(project: Project, tmp_path: Path, *extra: str) -> int:
    return main(["run", str(project.recipe_path), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"),
                 *extra])


def test_a_run_prints_progress_a_summary_and_logs(project, tmp_path, fake_registry, capsys):
    assert run_cli(project, tmp_path, "--until", "s1", "--until", "s2", "--workers", "2") == 0
    captured = capsys.readouterr()
    assert "[1/9] ingest.a (ingest) running" in captured.err
    assert "[9/9] export.s2 (export) done in" in captured.err
    header = captured.out.splitlines()[0].split()
    assert header == ["step", "op", "in", "out", "dropped", "cached", "seconds"]
    assert "9 step(s), 9 run, 0 cached" in captured.out
    log = (tmp_path / "out/run.log").read_text()
    assert "step export.s2 (export) done" in log
    assert run_cli(project, tmp_path, "--until", "s1", "--until", "s2") == 0
    assert "9 step(s), 0 run, 9 cached" in capsys.readouterr().out
    assert json.loads((tmp_path / "out/report.json").read_text())["run"]["workers"] == executor.available_cores()


def test_a_failing_step_exits_1_with_its_id_and_the_log(project, tmp_path, fake_registry, capsys):
    def threshold(ctx, inputs):
        raise OperationError("no `loss` score in source b")
        yield

    fake_registry["threshold"] = threshold
    assert run_cli(project, tmp_path, "--until", "s1") == 1
    err = capsys.readouterr().err
    assert ("recipec run: step filter.processing.2.keep_loss (op `threshold`) failed: "
            "no `loss` score in source b") in err
    assert f"log: {tmp_path / 'out/run.log'}" in err
    assert "Traceback" not in err
    assert "no `loss` score in source b" in (tmp_path / "out/run.log").read_text()


def test_an_internal_error_keeps_its_traceback_in_the_log(project, tmp_path, fake_registry, capsys):
    fake_registry["mix"] = lambda ctx, inputs: iter([{}["missing"]])
    assert run_cli(project, tmp_path, "--until", "s1") == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "Traceback" not in err and "--debug" in err
    assert "Traceback" in (tmp_path / "out/run.log").read_text()
    assert run_cli(project, tmp_path, "--until", "s1", "--debug") == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_missing_operation_exits_2_before_running(project, tmp_path, fake_registry, capsys):
    assert run_cli(project, tmp_path) == 2
    err = capsys.readouterr().err
    assert "step `train.s1` needs op `train`, which this installation cannot run yet" in err
    assert not list((tmp_path / "store").glob("steps/*/*"))


def test_a_store_in_use_exits_2(project, tmp_path, fake_registry, capsys):
    with StoreLock(tmp_path / "store"):
        assert run_cli(project, tmp_path, "--until", "s1") == 2
    assert capsys.readouterr().err.strip() == (
        f"recipec run: store {tmp_path / 'store'} is in use by another recipec run (pid {os.getpid()})")


@pytest.mark.parametrize("args, message", [
    (["--until", "s3"], "no step or stage named `s3`"),
    (["--until", "expor.s1"], "did you mean `export.s1`?"),
    (["--until", "s1", "--only", "s2"], "--only and --until exclude each other"),
    (["--only", "export.s1"], "--only export.s1: its input(s) `mix.s1` are not in the store"),
])
def test_bad_selections_exit_2(project, tmp_path, fake_registry, capsys, args, message):
    assert run_cli(project, tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert "--only" in args or not (tmp_path / "out").exists()  # refused before anything was touched


def test_a_bad_recipe_exits_2_with_diagnostics(tmp_path, capsys):
    bad = tmp_path / "bad.recipe"
    bad.write_text('recipe "bad" { seed = 1 }\nstage s1 { mix { nowhere = all } }\n')
    assert main(["run", str(bad), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "error[" in err
    assert not (tmp_path / "store").exists()


def test_out_defaults_to_out_and_the_recipe_name(project, tmp_path, fake_registry, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(project.recipe_path), "--until", "s1", "-q"]) == 0
    assert (tmp_path / "out/rt/report.json").exists() and (tmp_path / ".recipec/store/steps").is_dir()


def test_the_store_can_come_from_the_environment(project, tmp_path, fake_registry, monkeypatch):
    monkeypatch.setenv("RECIPEC_STORE", str(tmp_path / "env-store"))
    assert main(["run", str(project.recipe_path), "--out", str(tmp_path / "out"), "--until", "s1", "-q"]) == 0
    assert (tmp_path / "env-store/steps").is_dir()


def test_the_command_module_imports_no_runtime():
    script = "import sys, recipec.cli.main as m; m.build_parser(); print(sorted(k for k in ('pyarrow', 'rich', 'torch', 'recipec.runtime.executor') if k in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---- with the real operations -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return make_quickstart(tmp_path_factory.mktemp("quickstart"))


def until_stages() -> list[str]:
    return ["--until", "s1", "--until", "s2"]


def test_the_quickstart_runs_then_reruns_as_a_no_op(quickstart, tmp_path):
    args = ["run", str(quickstart), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), *until_stages()]
    cold = recipec_cli(*args)
    assert cold.returncode == 0, cold.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert not any(s["cached"] for s in report["steps"])
    for step in report["steps"]:
        assert step["records_in"] == step["records_out"] + sum(step["dropped"].values()), step
    assert {s["name"] for s in report["stages"]} == {"s1", "s2"}
    assert all(s["realised"] is not None and s["outputs"] for s in report["stages"])
    assert (tmp_path / "out/rejects").is_dir()
    warm = recipec_cli(*args)
    assert warm.returncode == 0, warm.stderr
    assert all(s["cached"] for s in json.loads((tmp_path / "out/report.json").read_text())["steps"])


def test_the_quickstart_outputs_do_not_depend_on_workers(quickstart, tmp_path):
    snapshots = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        done = recipec_cli("run", str(quickstart), "--store", str(tmp_path / f"store{workers}"), "--out", str(out),
                           "--workers", str(workers), "-q", *until_stages())
        assert done.returncode == 0, done.stderr
        snapshots.append(out_snapshot(out))
    assert snapshots[0] == snapshots[1]


def test_the_quickstart_data_part_does_not_import_torch(quickstart, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from recipec.cli.main import main
        code = main(["run", {str(quickstart)!r}, "--store", {str(tmp_path / "store")!r},
                     "--out", {str(tmp_path / "out")!r}, "-q", "--until", "s1", "--until", "s2"])
        print(code, "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr


def test_the_quickstart_plan_names_what_an_installation_lacks(quickstart, tmp_path):
    """An installation without an op (here: training taken out) refuses before running anything."""
    from recipec.compiler import compile_or_raise
    from recipec.ops.registry import OPERATIONS
    from recipec.plan import build_plan
    from recipec.runtime.store import Store

    assert "train" in registry_operations()
    plan = build_plan(compile_or_raise(str(quickstart)))
    store = Store(tmp_path / "store")
    without = {op: run for op, run in OPERATIONS.items() if op != "train"}
    with pytest.raises(executor.RunError) as error:
        executor.execute(plan, store=store, recipe_dir=quickstart.parent, operations=without)
    message = str(error.value)
    assert "step `train.s1` needs op `train`, which this installation cannot run yet" in message
    assert "--data-only" in message and "nothing was run" in message
    assert not any(store.steps_dir.glob("*/*/manifest.json"))
