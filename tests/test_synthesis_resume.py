"""SIGKILL in the middle of answer generation, then run again: the finished requests come from the
request cache (a count proves none is sent twice) and the outputs are byte for byte those of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "quickstart" / "seed"
IMAGES = 6

RECIPE = """
recipe "resume" {
  seed = 5
}

model vlm {
  architecture = llava_onevision
  vision = "tiny://siglip"
  language = "tiny://qwen2"
}

model chat {
  ref = "tiny://llava-onevision"
}

source seed {
  format = llava_jsonl
  path = "seed/seed.jsonl"
  images = "seed/images"
  category = gpt4
  type = general
}

synthesize synthetic {
  from = [seed]
  model = chat
  questions_per_image = 2
  styles = [short, brief_reason, detailed_reason]
  max_new_tokens = 16
  temperature = 0.7
  keep relevance >= 0
  merge = per_image
}

stage s1 {
  train = [projector]
  lr = 1e-3
  batch = 4
  mix {
    synthetic = all
  }
}
"""


def project(folder: Path) -> Path:
    (folder / "seed" / "images").mkdir(parents=True)
    lines = (SEED / "seed.jsonl").read_text().splitlines()
    kept = []
    for line in lines:
        record = json.loads(line)
        image = SEED / "images" / str(record.get("image"))
        if record.get("image") and image.is_file() and len(kept) < IMAGES:
            shutil.copy(image, folder / "seed" / "images" / image.name)
            kept.append(line)
    (folder / "seed" / "seed.jsonl").write_text("\n".join(kept) + "\n")
    (folder / "resume.recipe").write_text(RECIPE)
    return folder / "resume.recipe"


def command(recipe: Path, store: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "recipec", "run", str(recipe), "--store", str(store), "--out", str(out),
            "--until", "export.s1", "--workers", "1"]


def answered(store: Path) -> int:
    try:
        with sqlite3.connect(store / "cache" / "requests.sqlite", timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.Error:
        return 0


def stage_files(out: Path) -> dict[str, bytes]:
    """The stage's exported files, but the LLaVA-NeXT YAML, which names this run's output folder."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "s1").rglob("*"))
            if p.is_file() and p.suffix != ".yaml"}


def test_killed_during_answers_resumes_without_resending(tmp_path, model_cache):
    recipe = project(tmp_path / "project")
    env = {**os.environ, "RECIPEC_MODEL_CACHE": str(model_cache)}

    subprocess.run(command(recipe, tmp_path / "ref-store", tmp_path / "ref-out"), check=True, env=env,
                   capture_output=True, timeout=600)
    reference = stage_files(tmp_path / "ref-out")
    ref_report = json.loads((tmp_path / "ref-out" / "report.json").read_text())
    ref_steps = {s["id"]: s for s in ref_report["steps"]}
    ref_usage = ref_steps["synthesize.synthetic.answers"]["models"]["tiny://llava-onevision"]
    assert ref_usage["requests"] == 3 * ref_steps["synthesize.synthetic.relevance"]["records_out"] > 0
    total = ref_usage["sent"]  # distinct requests (identical questions are asked once)

    store, out = tmp_path / "store", tmp_path / "out"
    log = open(tmp_path / "run.log", "wb")
    child = subprocess.Popen(command(recipe, store, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    before = None
    deadline = time.monotonic() + 600
    try:
        while child.poll() is None and time.monotonic() < deadline:
            if before is None and b"generate_answers) running" in (tmp_path / "run.log").read_bytes():
                before = answered(store)
            if before is not None and answered(store) > before:  # a chunk of answers is kept
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        child.wait()
        log.close()
    assert child.returncode == -signal.SIGKILL, "the run ended before a chunk of answers was kept"
    kept = answered(store) - before
    assert 0 < kept < total

    subprocess.run(command(recipe, store, out), check=True, env=env, capture_output=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    steps = {s["id"]: s for s in report["steps"]}
    assert steps["synthesize.synthetic.questions"]["cached"] and steps["synthesize.synthetic.relevance"]["cached"]
    usage = steps["synthesize.synthetic.answers"]["models"]["tiny://llava-onevision"]
    assert usage["sent"] == total - kept  # no finished request was sent again
    assert usage["requests"] == ref_usage["requests"]
    assert stage_files(out) == reference
    for step_id, step in steps.items():
        assert (step["records_out"], step["dropped"]) == (ref_steps[step_id]["records_out"], ref_steps[step_id]["dropped"])
