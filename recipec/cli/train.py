"""`recipec train FILE STAGE --emit torchrun|slurm`: the launch script of one training stage.

    recipec train FILE STAGE --emit torchrun|slurm [--store DIR] [--gpus N] [--nodes N] [-o SCRIPT]

The stage's inputs (its export and the previous stage's checkpoint) must be in the store already
(`recipec run FILE --until export.STAGE`, and the previous stage trained). The command writes the
stage's training job into the step's work folder of the store and prints (or writes to SCRIPT) a
bash script that trains it under torchrun with FSDP, on this node's GPUs (`torchrun`) or on
`--nodes` nodes of a Slurm cluster (`slurm`, an sbatch script; the store must be on a file system
every node sees), then takes the trained stage into the store with `recipec run --only
train.STAGE`, which finds the finished job and does not train again. A run killed on the cluster
resumes from its last intermediate checkpoint when the script is started again.

Exit codes: 0 written; 2 the recipe has errors, no such stage, or its inputs are not in the store.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from recipec.cli.common import compile_reporting

EXIT_OK, EXIT_ERROR = 0, 2


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("stage", metavar="STAGE", help="a stage name (or its step id, train.STAGE)")
    parser.add_argument("--emit", choices=("torchrun", "slurm"), required=True, help="the kind of launch script")
    parser.add_argument("--store", metavar="DIR", help="the step store (default $RECIPEC_STORE, else .recipec/store)")
    parser.add_argument("--gpus", metavar="N", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--nodes", metavar="N", type=int, default=1, help="nodes, for --emit slurm (default 1)")
    parser.add_argument("-o", "--output", metavar="SCRIPT", help="write the script here (default: stdout)")


def _error(message: str) -> int:
    print(f"recipec train: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    compiled = compile_reporting(args.file)
    if not compiled.ok:
        return EXIT_ERROR
    from recipec.cli.run import DEFAULT_STORE
    from recipec.plan import build_plan
    from recipec.runtime.store import DataDigests, Store, plan_keys

    plan = build_plan(compiled.recipe)
    step_id = args.stage if args.stage.startswith("train.") else f"train.{args.stage}"
    if step_id not in plan.steps:
        stages = ", ".join(s.name for s in compiled.recipe.stages) or "none"
        return _error(f"recipe {compiled.recipe.name} has no stage `{args.stage}` (its stages: {stages})")
    if args.gpus < 1 or args.nodes < 1:
        return _error("--gpus and --nodes must be at least 1")
    step = plan.steps[step_id]
    store_root = Path(args.store or os.environ.get("RECIPEC_STORE") or DEFAULT_STORE).absolute()
    store = Store(store_root)
    recipe_dir = Path(args.file).parent.absolute()
    with store.locked():
        files = store.file_digests()
        keys = plan_keys(plan, [step_id], recipe_dir, DataDigests(files), store)
        absent = [i for i in step.inputs if store.done(keys[i]) is None]
        if absent:
            hint = " ".join(f"--until {i}" for i in absent)
            return _error(f"the input(s) {', '.join(f'`{i}`' for i in absent)} of {step_id} are not in the store "
                          f"{store_root}; run `recipec run {args.file} {hint}` first")
        from recipec.runtime.executor import available_cores
        from recipec.train.launch import make_job
        from recipec.train.trainer import JOB

        table = store.read_records(keys[step.inputs[0]])
        job = make_job(step_id, step.params, table=table, input_dirs=[store.step_dir(keys[i]) for i in step.inputs],
                       work_dir=store.work_dir(keys[step_id]), models_dir=store.models_dir, recipe_dir=recipe_dir,
                       threads=available_cores())
    job_path = Path(job.work_dir) / JOB
    script = emit(args.emit, job_path=job_path, recipe=Path(args.file).absolute(), store=store_root, step_id=step_id,
                  name=f"{compiled.recipe.name}-{step.params['stage']['name']}", gpus=args.gpus, nodes=args.nodes)
    if args.output:
        Path(args.output).write_text(script, encoding="utf-8")
        os.chmod(args.output, 0o755)
        print(f"wrote {args.output}: trains {step_id} from {job_path}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return EXIT_OK


def emit(kind: str, *, job_path: Path, recipe: Path, store: Path, step_id: str, name: str, gpus: int,
         nodes: int) -> str:
    python = shlex.quote(sys.executable)
    q = shlex.quote
    commit = f"\"$PYTHON\" -m recipec run {q(str(recipe))} --store {q(str(store))} --only {q(step_id)} --quiet"
    if kind == "torchrun":
        return "\n".join([
            "#!/usr/bin/env bash",
            f"# Trains {step_id} of {recipe.name} on this node's GPUs (torchrun, FSDP), then stores it.",
            "# Started again after a crash, it resumes from the stage's last intermediate checkpoint.",
            "set -euo pipefail",
            f"PYTHON=${{PYTHON:-{python}}}",
            f"GPUS=${{GPUS:-{gpus}}}",
            f"\"$PYTHON\" -m torch.distributed.run --standalone --nproc_per_node=\"$GPUS\" -m recipec.train.launch {q(str(job_path))}",
            commit,
            "",
        ])
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={job_path.parent}/slurm-%j.out",
        f"# Trains {step_id} of {recipe.name} on {nodes} node(s) x {gpus} GPU(s) (torchrun, FSDP), then stores it.",
        "# The store must be on a file system every node sees. Submitted again after a crash, it resumes",
        "# from the stage's last intermediate checkpoint.",
        "set -euo pipefail",
        f"PYTHON=${{PYTHON:-{python}}}",
        "head=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        f"srun \"$PYTHON\" -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc_per_node={gpus} "
        "--rdzv_id=\"$SLURM_JOB_ID\" --rdzv_backend=c10d --rdzv_endpoint=\"$head:29500\" "
        f"-m recipec.train.launch {q(str(job_path))}",
        commit,
        "",
    ])
