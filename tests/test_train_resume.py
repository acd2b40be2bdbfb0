"""A stage killed with SIGKILL resumes from its last intermediate checkpoint and ends bit-identical."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from recipec.train.trainer import FINAL, JOB, Job, train  # noqa: E402
from tests import train_toy as toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def job(root: Path, work: str, models: Path) -> Job:
    stage = toy.stage("s2", ["vision", "projector", "language"], 1e-3, batch=8, micro_batch=4, epochs=2.0,
                      warmup=0.2, weight_decay=0.1, part_lr={"vision": 2e-4}, checkpoint_every=2)
    return Job(step_id="train.s2", stage=stage, model=toy.ARCHITECTURE, seed=5, roots={"toy": "images"},
               recipe_dir=str(root), records=str(root / "records.parquet"), start=None, work_dir=str(root / work),
               models_dir=str(models), threads=1)


def test_sigkill_mid_stage_then_resume_ends_with_the_uninterrupted_weights(tmp_path, caplog, tiny_models):
    import pyarrow.parquet as pq

    pq.write_table(toy.records(tmp_path / "images", 24, seed=3, text_only=4), tmp_path / "records.parquet")
    killed = job(tmp_path, "killed", tiny_models)
    work = Path(killed.work_dir)
    work.mkdir()
    (work / JOB).write_text(killed.to_json())
    command = [sys.executable, "-m", "recipec.train.launch", str(work / JOB)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = work / "checkpoints" / "step-0000002" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert first.exists() and not (work / FINAL).exists()  # killed mid-stage, after a checkpoint

    with caplog.at_level(logging.INFO, logger="recipec.train"):
        train(killed)  # the same job again, here: it resumes from the killed run's last checkpoint
    assert "resuming stage s2 at step" in caplog.text

    straight = job(tmp_path, "straight", tiny_models)
    result = train(straight)
    done = json.loads((work / FINAL / "result.json").read_text())
    assert done["steps"] == result["steps"] == 7  # 28 samples x 2 epochs / 8
    weights = lambda w: (Path(w) / FINAL / "checkpoint" / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(killed.work_dir) == weights(straight.work_dir)
    log = [json.loads(line) for line in (work / FINAL / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 8))
    straight_log = [json.loads(line) for line in (Path(straight.work_dir) / FINAL / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log] == [e["loss"] for e in straight_log]
    assert [e["grad_norm"] for e in log] == [e["grad_norm"] for e in straight_log]
    # only the newest intermediate checkpoint keeps the optimizer state
    kept = sorted(p.parent.name for p in (work / "checkpoints").glob("step-*/optimizer.safetensors"))
    assert kept == ["step-0000006"]


def test_a_finished_job_is_not_trained_again(tmp_path, tiny_models):
    import pyarrow.parquet as pq

    pq.write_table(toy.records(tmp_path / "images", 8, seed=4), tmp_path / "records.parquet")
    once = job(tmp_path, "work", tiny_models)
    once.stage = {**once.stage, "epochs": 1.0}
    first = train(once)
    stamp = (Path(once.work_dir) / FINAL / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    assert train(once) == first
    assert (Path(once.work_dir) / FINAL / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.skipif(not os.environ.get("RECIPEC_TEST_FSDP"), reason="two torchrun ranks on CPU (gloo): set RECIPEC_TEST_FSDP=1")
def test_fsdp_over_two_ranks_matches_one_process(tmp_path, tiny_models):
    import pyarrow.parquet as pq
    import torch
    import transformers as tf

    pq.write_table(toy.records(tmp_path / "images", 12, seed=3, text_only=4), tmp_path / "records.parquet")
    jobs = {}
    for name in ("fsdp", "single"):
        jobs[name] = job(tmp_path, name, tiny_models)
        jobs[name].stage = {**jobs[name].stage, "epochs": 1.0, "checkpoint_every": 1}
    work = Path(jobs["fsdp"].work_dir)
    work.mkdir()
    (work / JOB).write_text(jobs["fsdp"].to_json())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "recipec.train.launch", str(work / JOB)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    train(jobs["single"])
    weights = {n: tf.LlavaOnevisionForConditionalGeneration.from_pretrained(Path(j.work_dir) / FINAL / "checkpoint")
               .state_dict() for n, j in jobs.items()}
    assert max((weights["fsdp"][k] - weights["single"][k]).abs().max().item() for k in weights["single"]) < 1e-5
    assert json.loads((work / FINAL / "result.json").read_text())["world"] == 2
