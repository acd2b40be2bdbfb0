"""The README's main job: `recipec run examples/quickstart.recipe` runs every step of the plan, with
no flag (tagging, mapping, synthesis, judges, loss, processing, mixing, export and the four
training stages on tiny models), and a second run finds every step cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.recipe"


def test_the_whole_quickstart_runs_then_finds_everything_cached(tmp_path, model_cache):
    env = {**os.environ, "RECIPEC_MODEL_CACHE": str(model_cache)}
    command = [sys.executable, "-m", "recipec", "run", str(QUICKSTART), "--store", str(tmp_path / "store"),
               "--out", str(tmp_path / "out"), "-q"]
    cold = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert cold.returncode == 0, cold.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    steps = {s["id"]: s for s in report["steps"]}
    plan = json.loads(subprocess.run([sys.executable, "-m", "recipec", "plan", str(QUICKSTART), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert set(steps) == {s["id"] for s in plan["steps"]}  # every step ran, none was left out
    for step in steps.values():
        assert step["records_in"] == step["records_out"] + sum(step["dropped"].values()), step["id"]
    models = {ref for s in steps.values() for ref in s.get("models", {})}
    assert models >= {"tiny://siglip-tagger", "tiny://llava-onevision", "tiny://qwen2-vl"}
    usage = steps["synthesize.synthetic.questions"]["models"]["tiny://llava-onevision"]
    assert usage["engine"] == "transformers" and usage["sent"] > 0 and usage["tokens_out"] > 0
    assert steps["tag_images.seed_tags"]["records_out"] == steps["ingest.seed"]["records_out"]
    assert steps["synthesize.synthetic.questions"]["records_out"] > 0
    assert {"train.s1", "train.s2a", "train.s2b", "train.s3"} <= set(steps)

    warm = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert warm.returncode == 0, warm.stderr
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(s["cached"] for s in again["steps"])
