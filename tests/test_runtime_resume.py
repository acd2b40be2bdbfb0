"""Kill a run with SIGKILL at several points, run it again: nothing finished is recomputed, and the
outputs are byte for byte those of an uninterrupted run in a fresh store.

Two ways in: a child process running the executor with the fake operations, slowed down so that
the kill can land inside a step; and `recipec run` itself over the quickstart data with the real
operations (skipped while `recipec.ops.registry` does not exist).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from test_runtime_fakes import Project, make_quickstart, out_snapshot, run_project

FAKES = Path(__file__).with_name("test_runtime_fakes.py")


def manifests(store: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in store.glob("steps/*/*/manifest.json")}


def mid_step(store: Path) -> bool:
    """A step has written a shard or more and is not finished."""
    return any(store.glob("tmp/*/shard-00001.parquet"))


def run_and_kill(command: list[str], condition: Callable[[], bool], timeout: float = 120) -> bool:
    """Start `command`; SIGKILL it as soon as `condition()` holds. False if it finished first."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while child.poll() is None:
            if condition():
                child.send_signal(signal.SIGKILL)
                child.wait()
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command} ran for more than {timeout} s")
            time.sleep(0.002)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, child.stderr.read().decode()
    return False


def check_resumed(store: Path, out: Path, finished_before: dict[str, int], reference: dict[str, bytes]) -> None:
    report = json.loads((out / "report.json").read_text())
    for step in report["steps"]:
        if step["key"] in finished_before:
            assert step["cached"], f"{step['id']} was finished before the kill and was computed again"
    after = manifests(store)
    assert {k: after[k] for k in finished_before} == finished_before  # finished steps untouched
    assert out_snapshot(out) == reference
    assert not any((store / "tmp").glob("*/*"))


# ---- with the fake operations -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    project = Project(root / "project")
    run_project(project, root / "reference-store", root / "reference-out", workers=1)
    return project, out_snapshot(root / "reference-out")


KILL_POINTS = {
    "after the first step": lambda store: len(manifests(store)) >= 1,
    "in the middle of the first step": mid_step,
    "after four steps": lambda store: len(manifests(store)) >= 4,
    "in the middle of a later step": lambda store: len(manifests(store)) >= 2 and mid_step(store),
    "after the last step": lambda store: len(manifests(store)) >= 9,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_sigkill_with_fake_operations(fake_project, tmp_path, point):
    project, reference = fake_project
    store, out = tmp_path / "store", tmp_path / "out"
    command = [sys.executable, str(FAKES), str(project.root), str(store), str(out)]
    killed = run_and_kill(command + ["0.05", "2"], lambda: KILL_POINTS[point](store))
    assert killed or point == "after the last step"
    finished = manifests(store)
    assert len(finished) < 9 or point == "after the last step"
    done = subprocess.run(command + ["0", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check_resumed(store, out, finished, reference)


def test_killed_twice_in_a_row(fake_project, tmp_path):
    project, reference = fake_project
    store, out = tmp_path / "store", tmp_path / "out"
    command = [sys.executable, str(FAKES), str(project.root), str(store), str(out), "0.05", "1"]
    assert run_and_kill(command, lambda: mid_step(store))
    first = manifests(store)
    assert run_and_kill(command, lambda: len(manifests(store)) > len(first) and mid_step(store))
    finished = manifests(store)
    assert {k: finished[k] for k in first} == first
    assert subprocess.run(command[:-2] + ["0", "1"], capture_output=True).returncode == 0
    check_resumed(store, out, finished, reference)


# ---- through `recipec run` and the real operations ----------------------------------------------


def test_resume_after_sigkill_through_the_cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-cli")
    recipe = make_quickstart(root / "data")

    def command(store: Path, out: Path, workers: int) -> list[str]:
        until = [arg for stage in ("s1", "s2") for arg in ("--until", stage)]
        return [sys.executable, "-m", "recipec", "run", str(recipe), "--store", str(store), "--out", str(out),
                "--workers", str(workers), "--quiet", *until]

    reference_run = subprocess.run(command(root / "ref-store", root / "ref-out", 1), capture_output=True, text=True)
    assert reference_run.returncode == 0, reference_run.stderr
    reference = out_snapshot(root / "ref-out")
    steps = len(json.loads((root / "ref-out/report.json").read_text())["steps"])

    points = [lambda s: len(manifests(s)) >= 1, lambda s: mid_step(s) or len(manifests(s)) >= 3,
              lambda s: len(manifests(s)) >= steps // 2, lambda s: len(manifests(s)) >= steps - 2]
    interrupted = 0
    for i, point in enumerate(points):
        store, out = root / f"store{i}", root / f"out{i}"
        interrupted += run_and_kill(command(store, out, 2), lambda: point(store))
        finished = manifests(store)
        done = subprocess.run(command(store, out, 2), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        check_resumed(store, out, finished, reference)
    assert interrupted >= 2, "the runs finished before they could be killed: too little data to test resuming"
