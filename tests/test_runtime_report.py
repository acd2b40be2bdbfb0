"""The --out folder: report.json, rejects/, the stages' exported files, and what a re-run rewrites."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from recipec.cli.main import main
from recipec.ops.base import Chunk, OperationError
from recipec.records import REJECT_SCHEMA
from recipec.runtime import executor
from recipec.runtime.executor import execute
from recipec.runtime.report import RUN_SPECIFIC, deterministic_view, write_outputs
from recipec.runtime.store import Store

from test_runtime_fakes import DATA_STEPS, FAKE_OPS, Project, run_project


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
    assert s1["outputs"] == ["s1/data.jsonl", "s1/meta/count.txt", "s1/images.sha256"]
    assert s1["image_folder"] == "s1/images" and s2["image_folder"] == "s2/images"
    assert report["status"] == "partial" and report["failed_step"] is None and report["stale"] == []
    folder = tmp_path / "out/s2/images"
    assert not (folder / "a").is_symlink()  # never a link to a whole source root
    listed = [line.split("  ")[1] for line in (tmp_path / "out/s2/images.sha256").read_text().splitlines()]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()) == listed
    assert 0 < len(listed) < len(list((project.root / "data/a/images").iterdir()))  # only what s2 uses
    for name in listed:
        link = folder / name
        assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
        assert link.resolve().parent == (project.root / "data/a/images").resolve()
    assert not (folder / "b").exists()  # text only
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
    renamed = {o.id for o in result.outcomes if o.id.startswith("filter.")}
    assert renamed and all(i.startswith("filter.cleaning.") for i in renamed)
    assert not any(o.cached for o in result.outcomes if o.id in renamed)
    # the renamed filter's output has the same content, so what follows it stays cached (early cutoff)
    assert {o.id for o in result.outcomes if o.cached} == {o.id for o in result.outcomes} - renamed
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
    assert (out / "s2/data.jsonl").exists()  # a partial run removes nothing outside what it ran...
    assert "no stage `s2` any more" in (out / "s2/STALE.txt").read_text()  # ...but marks it stale
    assert read_report(out)["stale"] == [{"stage": "s2", "folder": "s2", "reason": (
        "the recipe has no stage `s2` any more; a full run removes this folder")}]
    assert not (out / "s1/STALE.txt").exists()
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


def test_a_partial_run_marks_a_changed_stage_stale_until_it_is_exported_again(project, tmp_path):
    out = tmp_path / "out"
    run_project(project, tmp_path / "store", out)
    assert not (out / "s2/STALE.txt").exists()
    project.write_recipe(1.0)  # the loss threshold feeds both stages
    run_project(project, tmp_path / "store", out, until=["s1"])
    assert "changed what stage `s2` exports" in (out / "s2/STALE.txt").read_text()
    assert [s["stage"] for s in read_report(out)["stale"]] == ["s2"]
    run_project(project, tmp_path / "store", out, until=["s2"])
    assert not (out / "s2/STALE.txt").exists() and read_report(out)["stale"] == []
    project.write_recipe(2.0)
    run_project(project, tmp_path / "store", out, until=["s1"])
    assert (out / "s2/STALE.txt").exists()
    project.write_recipe(1.0)  # back to what s2 was exported with: current again
    run_project(project, tmp_path / "store", out, until=["s1"])
    assert not (out / "s2/STALE.txt").exists()


def test_an_old_whole_root_link_is_replaced_without_writing_into_the_data(project, tmp_path):
    out = tmp_path / "out"
    run_project(project, tmp_path / "store", out)
    images = project.root / "data/a/images"
    before = sorted(p.name for p in images.iterdir())
    shutil.rmtree(out / "s1/images")
    (out / "s1/images").mkdir()
    (out / "s1/images/a").symlink_to(images, target_is_directory=True)  # what an earlier version made
    index = next((tmp_path / "store/outputs").iterdir())
    data = json.loads(index.read_text())
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("s1/images")}
    data["files"]["s1/images/a"] = [f"link:{os.readlink(out / 's1/images/a')}", 0, 0, 0]
    index.write_text(json.dumps(data))
    run_project(project, tmp_path / "store", out)
    assert sorted(p.name for p in images.iterdir()) == before and not (out / "s1/images/a").is_symlink()
    assert all(p.is_symlink() for p in (out / "s1/images/a").iterdir())


@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_copied_image_folders_survive_a_move(project, tmp_path, mode):
    project.recipe_path.write_text(project.recipe_path.read_text().replace(
        'recipe "rt" { seed = 7 }', f'recipe "rt" {{\n  seed = 7\n  export {{\n    images = {mode}\n  }}\n}}'))
    out = tmp_path / "out"
    run_project(project, tmp_path / "store", out)
    listed = (out / "s1/images.sha256").read_text().splitlines()
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    for line in listed:
        sha, name = line.split("  ")
        path = moved / "s1/images" / name
        assert not path.is_symlink() and hashlib.sha256(path.read_bytes()).hexdigest() == sha
    if mode == "hardlink":
        name = listed[0].split("  ")[1].removeprefix("a/")
        assert (moved / "s1/images/a" / name).stat().st_ino == (project.root / "data/a/images" / name).stat().st_ino


def test_an_image_gone_before_the_outputs_fails_them_by_name(project, tmp_path):
    from recipec.runtime.report import OutputError

    st = Store(tmp_path / "store")
    with st.locked():
        result = execute(project.plan(), store=st, recipe_dir=project.root, operations=FAKE_OPS, until=DATA_STEPS)
        (project.root / "data/a/images/img00.png").unlink()
        with pytest.raises(OutputError, match="a/img00.png"):
            write_outputs(result, st, tmp_path / "out")


@pytest.fixture
def fake_registry(monkeypatch):
    operations = dict(FAKE_OPS)
    monkeypatch.setattr(executor, "load_operations", lambda: operations)
    return operations


def test_a_failed_run_still_writes_the_report_and_the_stages_it_finished(project, tmp_path, fake_registry, capsys):
    calls = []

    def mix(ctx, inputs):
        calls.append(ctx.params["stage"])
        if ctx.params["stage"] == "s2":
            raise OperationError("no room for s2")
        yield from FAKE_OPS["mix"](ctx, inputs)

    fake_registry["mix"] = mix
    out = tmp_path / "out"
    code = main(["run", str(project.recipe_path), "--store", str(tmp_path / "store"), "--out", str(out), "-q",
                 "--until", "s1", "--until", "s2"])
    assert code == 1 and calls == ["s1", "s2"]
    assert "report.json are in" in capsys.readouterr().err
    report = read_report(out)
    assert report["status"] == "failed"
    assert report["failed_step"] == {"id": "mix.s2", "op": "mix", "message": "no room for s2"}
    assert [s["id"] for s in report["steps"]][-1] == "export.s1"
    for step in report["steps"]:
        assert step["records_in"] == step["records_out"] + sum(step["dropped"].values())
    s1, s2 = report["stages"]
    assert s1["outputs"] and (out / "s1/data.jsonl").exists() and s2["outputs"] is None
    assert (out / "rejects/ingest.a.jsonl").exists()
