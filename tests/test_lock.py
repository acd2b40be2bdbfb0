"""`recipec lock` and `run --locked`: digests of sources, images, models and includes; drift is named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipec.cli.main import main

from observe_project import RECIPE, REPO


@pytest.fixture
def project(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples/make_quickstart_data.py"), "--out", str(tmp_path),
                    "--scale", "0.1"], check=True, capture_output=True)
    recipe = tmp_path / "observe.recipe"
    recipe.write_text(RECIPE)
    return recipe


def test_lock_is_small_stable_and_pins_every_source(project, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["lock", str(project), "--store", store]) == 0
    lock_file = Path(str(project) + ".lock")
    first = lock_file.read_bytes()
    lock = json.loads(first)
    assert sorted(lock["sources"]) == ["captions", "general", "text"]
    images = lock["sources"]["captions"]["images"]
    assert images["count"] > 0 and len(images["sha256"]) == 64
    assert lock["sources"]["captions"]["license"] == "cc0-1.0"
    assert lock["models"]["m.vision"]["ref"] == "tiny://siglip"
    assert len(first) < 8000
    assert main(["lock", str(project), "--store", store]) == 0
    assert lock_file.read_bytes() == first and "unchanged" in capsys.readouterr().out
    assert main(["lock", str(project), "--store", store, "--check"]) == 0


def test_run_locked_after_touching_one_image_fails_and_names_it(project, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["lock", str(project), "--store", store]) == 0
    image = sorted((tmp_path / "general" / "images").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF
    image.write_bytes(bytes(data))
    capsys.readouterr()
    code = main(["run", str(project), "--store", store, "--out", str(tmp_path / "out"), "--data-only", "-q", "--locked"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"source general: image general/images/{image.name}: changed" in err
    assert not (tmp_path / "out" / "report.json").exists()  # nothing ran
    assert main(["lock", str(project), "--store", store, "--check"]) == 1


def test_a_changed_data_file_and_a_missing_lock(project, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["run", str(project), "--store", store, "--locked", "--data-only", "-q"]) == 2
    assert "no lock file" in capsys.readouterr().err
    assert main(["lock", str(project), "--store", store]) == 0
    text = next((tmp_path / "text").glob("*.jsonl"))
    text.write_text(text.read_text() + "\n")
    assert main(["run", str(project), "--store", store, "--locked", "--data-only", "-q"]) == 2
    assert f"source text: data file text/{text.name}: changed" in capsys.readouterr().err


def test_diff_shows_what_changed_in_the_locks(project, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["lock", str(project), "--store", store]) == 0
    other = project.with_name("other.recipe")
    shutil.copy(project, other)
    assert main(["lock", str(other), "--store", store]) == 0
    assert main(["diff", str(project), str(other)]) == 0  # same meaning, same lock
    capsys.readouterr()
    data_file = next(p for p in (tmp_path / "captions").glob("*.jsonl"))
    data_file.write_bytes(data_file.read_bytes() + b"\n")
    assert main(["lock", str(other), "--store", store]) == 0
    capsys.readouterr()
    assert main(["diff", str(project), str(other)]) == 1  # the recipes mean the same; the data moved
    out = capsys.readouterr().out
    assert "equal in meaning" in out and "lock (1)" in out and f"captions/{data_file.name}: changed" in out
    assert main(["diff", str(project), str(other), "--json"]) == 1
    lock_lines = json.loads(capsys.readouterr().out)["lock"]
    assert len(lock_lines) == 1 and "source captions" in lock_lines[0]
    Path(str(other) + ".lock").unlink()
    assert main(["diff", str(project), str(other), "--markdown"]) == 1
    assert "the lock file is gone" in capsys.readouterr().out
