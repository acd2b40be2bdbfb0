"""How a stage's training is started: in this process, under torchrun, or from a cluster script.

`make_job` turns a `train.<stage>` step (its params, its inputs' stored folders, its work folder)
into a `trainer.Job` and writes it, with the stage's records as Parquet, into the work folder.
`run_job` trains it here on one device (CPU or one GPU) or, when this machine has several GPUs,
under `torchrun --standalone --nproc_per_node=<GPUs>` running this module on every rank. A job
whose `final/` is already complete is not trained again: that is how a stage trained by a cluster
script (`recipec train --emit`) is taken into the store by `recipec run`.

    python -m recipec.train.launch JOB.json     # one rank of a torchrun job
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from recipec.train.trainer import FINAL, JOB, RESULT, Job, TrainError, train

log = logging.getLogger("recipec.train")


def devices() -> int:
    """GPUs to train on: $RECIPEC_TRAIN_DEVICES, else every visible GPU (0 on a CPU machine)."""
    if os.environ.get("RECIPEC_TRAIN_DEVICES"):
        return int(os.environ["RECIPEC_TRAIN_DEVICES"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_job(step_id: str, params: Mapping[str, Any], *, table: Any, input_dirs: Sequence[Path], work_dir: Path,
             models_dir: Path | None, recipe_dir: Path, threads: int) -> Job:
    import pyarrow.parquet as pq

    work_dir.mkdir(parents=True, exist_ok=True)
    records = work_dir / "records.parquet"
    tmp = work_dir / ".records.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, records)
    start = None
    if len(input_dirs) > 1:
        start = Path(input_dirs[1]) / "files" / "checkpoint"
        if not (start / "config.json").is_file():
            raise TrainError(f"the previous stage's output {input_dirs[1]} holds no checkpoint")
    job = Job(step_id=step_id, stage=dict(params["stage"]), model=dict(params["model"]), seed=int(params.get("seed", 0)),
              roots=dict(params.get("roots") or {}), recipe_dir=str(Path(recipe_dir).absolute()), records=str(records),
              start=str(start) if start else None, work_dir=str(work_dir),
              models_dir=str(models_dir) if models_dir else None, threads=max(1, threads))
    (work_dir / JOB).write_text(job.to_json(), encoding="utf-8")
    return job


def run_job(job: Job, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    import json

    final = Path(job.work_dir) / FINAL
    n = devices()
    if n > 1 and not (final / RESULT).is_file():
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "recipec.train.launch", str(Path(job.work_dir) / JOB)]
        log.info("training %s on %d GPUs: %s", job.step_id, n, " ".join(command))
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            raise TrainError(f"torchrun exited with status {done.returncode} (its ranks' output is above)")
        result = json.loads((final / RESULT).read_text(encoding="utf-8"))
        if result.get("job") != job.digest():
            raise TrainError(f"{final} holds the result of another job")
        return result
    return train(job, progress)


def handoff(job: Job) -> dict[str, Path]:
    """The files of a finished job by their name in the step's output, as hard links (or copies)
    that the store may move, so the work folder stays whole until the step is committed."""
    work = Path(job.work_dir)
    final = work / FINAL
    out = work / ".handoff"
    shutil.rmtree(out, ignore_errors=True)
    files: dict[str, Path] = {}

    def add(name: str, source: Path) -> None:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        files[name] = target

    for path in sorted(final.rglob("*")):
        if path.is_file() and path.name != RESULT:
            add(str(path.relative_to(final)), path)
    checkpoints = work / "checkpoints"
    if checkpoints.is_dir():
        for folder in sorted(checkpoints.glob("step-*")):
            for name in ("trainable.safetensors", "state.json"):
                if (folder / name).is_file():
                    add(f"checkpoints/{folder.name}/{name}", folder / name)
    return files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m recipec.train.launch JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    job = Job.from_json(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        train(job)
    except TrainError as e:
        print(f"recipec train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
