"""The --out folder: report.json, rejects/, the stages' exported files, and what a re-run rewrites."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recipec.ops.base import Chunk
from recipec.records import REJECT_SCHEMA
from recipec.runtime.report import RUN_SPECIFIC, deterministic_view

from test_runtime_fakes import FAKE_OPS, Project, run_project


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path / "project")


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def stat_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_report_lists_steps_and_stages(project, tmp_path):
    run_project(project, tmp_path / "store", tmp_path / "out")
    report = read_report(tmp_path / "out")
    assert report["recipe"] == "rt" and report["seed"] == 7 and len(report["fingerprint"]) == 64
    assert set(report) >= {"recipe", "fingerprint", "seed", "steps", "stages", "run"}
    for step in report["steps"]:
        assert set(step) >= {"id", "op", "key", "records_in", "records_out", "dropped", "seconds", "cached"}
        assert step["records_in"] == step["records_out"] + sum(step["dropped"].values())
    s1, s2 = report["stages"]
    assert s1["name"] == "s1" and s1["planned"]["by_source"] == {"a": 14}
    assert s1["realised"] == {"total": 10, "by_source": {"a": 10}, "by_data_type": {"general": 10},
                              "by_category": {"caption": 10}}
    assert s2["realised"]["by_source"] == {"a": 5, "b": 6}
    assert s2["realised"]["total"] == next(s["records_out"] for s in report["steps"] if s["id"] == "mix.s2")
    assert s1["outputs"] == ["s1/data.jsonl", "s1/meta/count.txt"]
    assert s1["image_folder"] == "s1/images" and s2["image_folder"] == "s2/images"
    link = tmp_path / "out/s2/images/a"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert sorted(p.name for p in link.iterdir()) == sorted(p.name for p in (project.root / "data/a/images").iterdir())
    assert not (tmp_path / "out/s2/images/b").exists()  # text only
    assert isinstance(s1["max_image_tokens"], int) and isinstance(s1["trainable_params"], int)
    assert (tmp_path / "out/s1/data.jsonl").read_bytes().count(b"\n") == 10
    assert (tmp_path / "out/s2/meta/count.txt").read_text() == "11\n"


def test_rejects_hold_every_dropped_record_with_its_reason(project, tmp_path):
    run_project(project, tmp_path / "store", tmp_path / "out")
    report = read_report(tmp_path / "out")
    for step in report["steps"]:
        path = tmp_path / "out" / f"rejects/{step['id']}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        assert (step["rejects"] is not None) == path.exists()
        by_reason: dict[str, int] = {}
        for line in lines:
            assert list(line) == REJECT_SCHEMA.names
            assert line["step"] == step["id"] and line["reason"] and line["detail"]
            by_reason[line["reason"]] = by_reason.get(line["reason"], 0) + 1
        skipped = {r: n for r, n in step["dropped"].items() if r not in by_reason}
        assert {**by_reason, **skipped} == step["dropped"]
        assert set(skipped) <= {"not_in_mix"}


def test_a_renamed_step_is_computed_under_its_new_name(project, tmp_path):
    """Ops see their step's id (and write it into provenance), so a renamed step is a new one."""
    run_project(project, tmp_path / "store", tmp_path / "out")
    project.recipe_path.write_text(project.recipe_path.read_text().replace("filter processing", "filter cleaning"))
    result = run_project(project, tmp_path / "store", tmp_path / "out2")
    assert {o.id for o in result.outcomes if o.cached} == {"ingest.a", "ingest.b", "collect"}
    lines = (tmp_path / "out2/rejects/filter.cleaning.1.dedup_exact.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["step"] == "filter.cleaning.1.dedup_exact" for line in lines)


def test_a_rerun_rewrites_nothing_but_the_report_and_repairs_what_was_touched(project, tmp_path):
    out = tmp_path / "out"
    run_project(project, tmp_path / "store", out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "report.json")
    before = {p: stat_of(p) for p in files}
    run_project(project, tmp_path / "store", out)
    assert {p: stat_of(p) for p in files} == before
    (out / "s1/data.jsonl").write_text("edited by hand\n")
    (out / "rejects/ingest.a.jsonl").unlink()
    run_project(project, tmp_path / "store", out)
    assert (out / "s1/data.jsonl").read_bytes().count(b"\n") == 10
    assert (out / "rejects/ingest.a.jsonl").exists()


def test_files_no_longer_produced_are_removed_and_others_left_alone(project, tmp_path):
    out = tmp_path / "out"
    run_project(project, tmp_path / "store", out)
    (out / "notes.txt").write_text("mine\n")
    (out / "s1/mine.txt").write_text("mine too\n")
    assert (out / "rejects/filter.processing.2.keep_loss.jsonl").exists()
    project.write_recipe(9.0)  # nothing above it: the step drops nothing
    run_project(project, tmp_path / "store", out, until=["s1"])
    assert not (out / "rejects/filter.processing.2.keep_loss.jsonl").exists()
    assert (out / "s2/data.jsonl").exists()  # not covered by a partial run: kept
    assert (out / "notes.txt").exists() and (out / "s1/mine.txt").exists()
    project.recipe_path.write_text(project.recipe_path.read_text().split("stage s2")[0])
    run_project(project, tmp_path / "store", out, until=["s1"])
    assert (out / "s2/data.jsonl").exists()
    train = {**FAKE_OPS, "train": lambda ctx, inputs: iter([Chunk(files={"checkpoint.txt": b"weights"})])}
    run_project(project, tmp_path / "store", out, until=(), operations=train)  # a full run: s2 is gone
    assert not (out / "s2").exists()
    assert (out / "notes.txt").exists() and (out / "s1/mine.txt").exists()


def test_deterministic_view_removes_only_run_details(project, tmp_path):
    run_project(project, tmp_path / "store", tmp_path / "out")
    report = read_report(tmp_path / "out")
    view = deterministic_view(report)
    assert "run" not in view and all(not set(RUN_SPECIFIC) & set(s) for s in view["steps"])
    assert view["stages"] == report["stages"] and [s["key"] for s in view["steps"]] == [s["key"] for s in report["steps"]]
