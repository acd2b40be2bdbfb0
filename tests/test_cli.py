"""The command line as a user meets it: exit codes, diagnostics on stderr, JSON contracts, no torch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

AQUILA = str(ROOT / "recipes" / "aquila-vl-2b.recipe")


def recipec(*args, cwd=ROOT, env=None):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "recipec", *args], cwd=cwd, capture_output=True, text=True, env=environment)


def test_check_clean_recipes_exits_zero():
    result = recipec("check", *map(str, sorted((ROOT / "recipes").glob("*.recipe"))), str(ROOT / "examples" / "quickstart.recipe"))
    assert result.returncode == 0, result.stderr
    assert "0 error(s)" in result.stdout


def test_check_reports_every_error_with_position_caret_and_hint(tmp_path):
    bad = tmp_path / "bad.recipe"
    bad.write_text('recipe "t" { seed = 1 }\nsource a {\n  fromat = llava_jsonl\n  type = genral\n  path = "a"\n  format = parquet\n}\n')
    result = recipec("check", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert f"{bad}:3:3: error[E102]: unknown key `fromat` in source `a`" in lines
    assert f"{bad}:4:10: error[E203]: `type`: unknown data type `genral`" in lines
    assert "  = hint: did you mean `format`?" in lines
    assert "  = hint: did you mean `general`?" in lines
    caret_line = lines[lines.index("3 |   fromat = llava_jsonl") + 1]
    assert caret_line == "  |   ^^^^^^"


def test_check_syntax_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.recipe"
    bad.write_text('recipe "t" {\n  seed 42\n}\n')
    result = recipec("check", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad}:2:8: error[E002]")
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    result = recipec("check", str(tmp_path / "nope.recipe"))
    assert result.returncode == 2  # an input error, not a problem in a recipe
    assert "error[E402]: cannot read recipe" in result.stderr


def test_fmt_check_and_rewrite(tmp_path):
    messy = tmp_path / "m.recipe"
    messy.write_text('recipe "m"{seed=1}\n')
    assert recipec("fmt", "--check", str(messy)).returncode == 1
    assert messy.read_text() == 'recipe "m"{seed=1}\n'
    assert recipec("fmt", str(messy)).returncode == 0
    assert messy.read_text() == 'recipe "m" {\n  seed = 1\n}\n'
    assert recipec("fmt", "--check", str(messy)).returncode == 0


def test_fmt_on_a_syntax_error_reports_it(tmp_path):
    bad = tmp_path / "b.recipe"
    bad.write_text("x = [\n")
    result = recipec("fmt", str(bad))
    assert result.returncode == 2 and "error[E" in result.stderr and "Traceback" not in result.stderr
    assert bad.read_text() == "x = [\n"


def test_plan_json_contract():
    result = recipec("plan", AQUILA, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["recipe"] == "aquila-vl-2b"
    for step in data["steps"]:
        assert {"id", "op", "inputs", "fingerprint"} <= set(step)
    ids = [s["id"] for s in data["steps"]]
    for step in data["steps"]:  # dependency order
        assert all(ids.index(i) < ids.index(step["id"]) for i in step["inputs"])
    stage = data["stages"][0]
    assert {"name", "samples", "mixture", "max_image_tokens", "trainable_params", "total_params", "lr",
            "batch_size", "epochs"} <= set(stage)
    assert stage["max_image_tokens"] == 729 and stage["mixture"] == {"emu2_caption": 10_000_000}


def test_plan_terminal_tables():
    result = recipec("plan", AQUILA, env={"COLUMNS": "160"})
    assert result.returncode == 0
    assert "s2a" in result.stdout and "5×729" in result.stdout and "4.13M" in result.stdout


@pytest.mark.parametrize("command", [["check"], ["fmt", "--check"], ["plan", "--json"]])
def test_fast_commands_never_import_torch(command):
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['recipec', *{command!r}, {AQUILA!r}]\n"
        "try:\n    runpy.run_module('recipec', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_command_prints_help():
    result = recipec()
    assert result.returncode == 2 and "check" in result.stdout


def test_plan_marks_what_a_run_would_find_cached(tmp_path):
    quickstart = str(ROOT / "examples" / "quickstart.recipe")
    store = str(tmp_path / "store")
    before = json.loads(recipec("plan", quickstart, "--json", "--store", store).stdout)
    assert not any(s["cached"] for s in before["steps"])
    ran = recipec("run", quickstart, "--data-only", "-q", "--store", store, "--out", str(tmp_path / "out"))
    assert ran.returncode == 0, ran.stderr
    after = json.loads(recipec("plan", quickstart, "--json", "--store", store).stdout)
    cached = {s["id"] for s in after["steps"] if s["cached"]}
    blocked: set[str] = set()  # steps that load a model, and everything after them
    for s in after["steps"]:
        if s["uses_model"] or blocked.intersection(s["inputs"]):
            blocked.add(s["id"])
    assert cached == {s["id"] for s in after["steps"]} - blocked
    assert {s["id"] for s in after["steps"] if s["op"] == "ingest"} <= cached
