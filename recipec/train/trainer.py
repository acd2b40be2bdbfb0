"""The training loop of one stage: one process (CPU or one GPU), or one rank of a torchrun job with FSDP.

`train(job)` does the whole stage and leaves in `<work_dir>/final/` the full checkpoint
(`checkpoint/`), the per-step log (`train_log.jsonl`) and `result.json`; a second call with the same
job finds that and returns at once. Intermediate checkpoints go to `<work_dir>/checkpoints/` every
`checkpoint_every` optimizer steps; a job started again after a kill resumes from the newest one.

What one optimizer step is: the global batch of `data.schedule`; each micro batch's loss is the
summed token cross-entropy over its assistant tokens divided by the assistant tokens of the whole
global batch, so gradient accumulation and any number of devices give the gradient of one big
batch. Then gradient clipping (`grad_clip`, the norm over every trainable parameter), AdamW (decay
on weight matrices only, one learning rate per model part), and the scheduler (`transformers`'
warmup + cosine, linear or constant). Logits are computed only where the loss needs them.

Determinism: fixed seed, fixed thread count, `torch.use_deterministic_algorithms` on CPU, every
step fixed up front; a resumed run restores weights, optimizer, scheduler and RNG states and the
step index, so on CPU its final weights are bit-identical to an uninterrupted run's.

Precision: fp32 on CPU; on GPU the weights stay fp32 and compute runs in bf16 (autocast, or FSDP's
mixed-precision policy across several GPUs). Checkpoints hold the fp32 weights.

Several devices (WORLD_SIZE > 1, set by torchrun): `torch.distributed` with FSDP2 (`fully_shard`
on every transformer layer and on the whole), each rank taking every world-th micro batch of a
step. A rank whose micro batch has no image still runs the vision tower on a blank tile (with a
zero weight in the loss), as LLaVA does, so every rank runs the same sharded modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from recipec.train import checkpoint, data
from recipec.train.settings import StageSettings

log = logging.getLogger("recipec.train")

FINAL, RESULT, LOG, JOB = "final", "result.json", "train_log.jsonl", "job.json"


@dataclass
class Job:
    """Everything one stage's training needs, as JSON (what torchrun workers read from job.json)."""

    step_id: str
    stage: dict[str, Any]  # the IR stage (plan params)
    model: dict[str, Any]  # the IR architecture
    seed: int
    roots: dict[str, str | None]  # data set -> image folder, relative to recipe_dir
    recipe_dir: str
    records: str  # the stage's export as Parquet
    start: str | None  # the previous stage's checkpoint folder; None: build from the towers
    work_dir: str
    models_dir: str | None = None
    threads: int = 1
    random_init: bool = False  # benchmarks: towers' shapes only, no weights
    max_steps: int | None = None  # benchmarks: stop early (no final checkpoint is the stage's then)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))

    def digest(self) -> str:
        """What the weights depend on: not where the files are, nor the thread count."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("work_dir", "models_dir", "records", "recipe_dir", "start", "threads")}
        fields["records_sha256"] = _sha256(Path(self.records))
        # the previous stage's checkpoint by its store key (its folder is <store>/steps/<xx>/<key>/files/checkpoint)
        fields["start"] = Path(self.start).parent.parent.name if self.start else None
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TrainError(Exception):
    """The stage cannot be trained (bad settings, unusable model or data); the message says why."""


# ---- processes and devices ----------------------------------------------------------------------


class _Dist:
    def __init__(self) -> None:
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        self.on = self.world > 1
        if self.on and not torch.distributed.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.on:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, items: list[Any]) -> list[Any]:
        if not self.on:
            return items
        import torch

        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, items)
        return [x for part in out for x in part]

    def barrier(self) -> None:
        if self.on:
            import torch

            torch.distributed.barrier()


def _deterministic(threads: int, device: Any) -> Callable[[], None]:
    import torch

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    def restore() -> None:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])

    return restore


# ---- the model as the loop sees it ---------------------------------------------------------------


def _loss_module(model: Any, tile: int, dummy_vision: bool) -> Any:
    import torch

    class LossModel(torch.nn.Module):
        """Summed cross-entropy over the assistant tokens of a micro batch, through the model's own
        forward (logits only at the positions the loss needs)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any]) -> tuple[Any, Any]:
            labels = batch["labels"]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            blank = None
            if dummy_vision and "pixel_values" not in batch:  # before the language model, as a real image runs
                from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

                tiles = image_size_to_num_patches([tile, tile], self.model.config.image_grid_pinpoints, tile)
                pixels = torch.zeros(1, tiles, 3, tile, tile, device=labels.device,
                                     dtype=next(self.model.parameters()).dtype)
                features = self.model.model.get_image_features(
                    pixels, torch.tensor([[tile, tile]], device=labels.device), vision_feature_layer=-1,
                    vision_feature_select_strategy="full", batch_num_images=torch.tensor([1]))
                blank = sum(f.float().sum() for f in features.pooler_output)
            out = self.model(**inputs, logits_to_keep=keep, use_cache=False)
            targets = labels[:, 1:][keep[:, :-1]]
            loss = torch.nn.functional.cross_entropy(out.logits.float(), targets, reduction="sum")
            if blank is not None:
                loss = loss + 0.0 * blank
            return loss, targets.numel()

    return LossModel()


def _shard(module: Any, bf16: bool) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for sub in list(module.modules()):
        if type(sub).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def _optimizer(model: Any, settings: StageSettings) -> tuple[Any, list[str], dict[int, str]]:
    import torch

    from recipec.train.model import part_of

    groups: dict[tuple[str, bool], list[Any]] = {}
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names[id(param)] = name
        decay = param.ndim >= 2 and "norm" not in name
        groups.setdefault((part_of(name), decay), []).append(param)
    if not groups:
        raise TrainError(f"stage `{settings.name}` trains nothing")
    order = sorted(groups, key=lambda k: (("vision", "projector", "language").index(k[0]), not k[1]))
    param_groups = [{"params": groups[k], "lr": settings.lr_of(k[0]),
                     "weight_decay": settings.weight_decay if k[1] else 0.0} for k in order]
    optimizer = torch.optim.AdamW(param_groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    return optimizer, [k[0] for k in order], names


def _scheduler(optimizer: Any, settings: StageSettings, steps: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(settings.warmup * steps) if settings.warmup < 1 else int(settings.warmup)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[settings.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(steps, 1))


def _tiles(batch: dict[str, Any], config: Any) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if "image_sizes" not in batch:
        return 0
    numbers = batch["batch_num_images"].tolist()
    sizes = batch["image_sizes"]
    tiles, i = 0, 0
    for n in numbers:
        for _ in range(n):
            tiles += image_size_to_num_patches(sizes[i], config.image_grid_pinpoints, config.vision_config.image_size) \
                if n == 1 else 1
            i += 1
    return tiles


# ---- the stage ----------------------------------------------------------------------------------


def train(job: Job, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    import torch

    work = Path(job.work_dir)
    final = work / FINAL
    digest = job.digest()
    if (final / RESULT).is_file():
        result = json.loads((final / RESULT).read_text(encoding="utf-8"))
        if result.get("job") == digest and all((final / n).is_file() for n in result.get("files", [])):
            return result
    shutil.rmtree(final, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    dist = _Dist()
    restore = _deterministic(job.threads, dist.device)
    try:
        return _train(job, digest, dist, progress)
    finally:
        restore()
        if dist.on and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(job: Job, digest: str, dist: _Dist, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from recipec.models.multimodal import Encoder, LlavaOnevisionImages
    from recipec.train import model as build
    from recipec.train.flops import Costs, peak_flops
    from recipec.train.settings import SettingsError

    settings = StageSettings.from_params(job.stage)
    work = Path(job.work_dir)
    final = work / FINAL
    ckpt_dir = work / "checkpoints"
    log_path = work / LOG
    try:
        micro, accumulation = settings.geometry(dist.world)
        if job.start:
            model, tokenizer, processor = build.from_checkpoint(Path(job.start), settings)
        else:
            model, tokenizer, processor = build.from_towers(
                job.model, settings, seed=job.seed, models_dir=Path(job.models_dir) if job.models_dir else None,
                base_dir=Path(job.recipe_dir), random_init=job.random_init)
    except (SettingsError, build.ModelBuildError) as e:
        raise TrainError(str(e)) from e
    build.configure_stage(model, processor, settings)
    part_params = build.freeze(model, settings.train)
    encoder = Encoder(tokenizer, LlavaOnevisionImages(processor, model.config, tokenizer, settings.tiles()),
                      settings.max_length)
    rows = pq.read_table(job.records).to_pylist()
    prepared = data.prepare(rows, job.roots, Path(job.recipe_dir), encoder)
    samples = prepared.samples
    if not samples:
        reasons = sorted({r.reason for r in prepared.rejects})
        raise TrainError(f"stage `{settings.name}` has no sample to train: all {len(rows)} record(s) were refused "
                         f"({', '.join(reasons) or 'no records'}); see the rejects")
    steps = data.schedule(samples, settings.batch, micro, settings.epochs)
    if job.max_steps is not None:
        steps = steps[:job.max_steps]
    tile = int(model.config.vision_config.image_size)
    costs = Costs.of(model, settings.train)
    cuda = dist.device.type == "cuda"

    model.to(dist.device)
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    wrapper = _loss_module(model, tile, dummy_vision=dist.on)
    if dist.on:
        _shard(wrapper, bf16=cuda)
    optimizer, group_parts, names = _optimizer(model, settings)
    scheduler = _scheduler(optimizer, settings, len(steps))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    start, rejects = 0, list(prepared.rejects)
    latest = checkpoint.latest(ckpt_dir)
    if latest is not None:
        weights, optim, rng, state = checkpoint.load(latest)
        if state.get("job") != digest:
            log.warning("intermediate checkpoints in %s belong to another job; starting over", ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            weights = {f"model.{k}": v for k, v in weights.items()}
            if dist.on:
                set_model_state_dict(wrapper, weights, options=StateDictOptions(
                    full_state_dict=True, broadcast_from_rank0=True, strict=False))
                set_optimizer_state_dict(wrapper, optimizer, {"state": {
                    f"model.{k}": v for k, v in checkpoint.optimizer_state(optim).items()},
                    "param_groups": state["param_groups"]}, options=StateDictOptions(
                    full_state_dict=True, broadcast_from_rank0=True, strict=False))  # unused weights have no state
            else:
                missing = trainable - {k[len("model."):] for k in weights}
                if missing:
                    raise TrainError(f"checkpoint {latest} lacks trainable tensor(s) {sorted(missing)[:3]}")
                wrapper.load_state_dict(weights, strict=False)
                saved = checkpoint.optimizer_state(optim)
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        fields = saved.get(names[id(param)])
                        if fields:
                            optimizer.state[param] = {k: (v if k == "step" else v.to(param.device)) for k, v in fields.items()}
            scheduler.load_state_dict(state["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr  # what the scheduler set after the checkpoint's step
            checkpoint.restore_rng(rng, state.get("python_rng"))
            start = state["step"]
            rejects = [data.Reject(**r) for r in state["rejects"]]
            log.info("resuming stage %s at step %d of %d from %s", settings.name, start, len(steps), latest)
    if dist.main:
        kept = []
        if start and log_path.is_file():
            kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    peak = peak_flops(dist.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not dist.on else None
    first_loss = last_loss = None
    per_rank = max((math.ceil(len(s.micro_batches) / dist.world) for s in steps), default=0)
    for index in range(start, len(steps)):
        step = steps[index]
        began = time.perf_counter()
        mine = step.micro_batches[dist.rank::dist.world]
        rounds = math.ceil(len(step.micro_batches) / dist.world) if dist.on else len(mine)
        loss_sum = tokens = padded = flops = 0.0
        step_rejects: list[Any] = []
        for r in range(rounds):
            members = mine[r] if r < len(mine) else []
            batch, kept, bad = data.encode([samples[i] for i in members], encoder) if members else (None, [], [])
            step_rejects.extend(bad)
            weight = 1.0
            if batch is None:
                if not dist.on:
                    continue
                batch = _blank_batch(tokenizer)  # every rank runs every round (FSDP collectives)
                weight = 0.0
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            if dist.on:
                wrapper.set_requires_gradient_sync(r == rounds - 1)
            if autocast is not None:
                with autocast:
                    ce, _ = wrapper(batch)
            else:
                ce, _ = wrapper(batch)
            (ce * (weight * dist.world / max(step.label_tokens, 1))).backward()
            if weight:
                loss_sum += float(ce.detach())
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                tokens += sum(lengths)
                padded += batch["attention_mask"].numel()
                labelled = int((batch["labels"][:, 1:] != -100).sum())
                flops += costs.micro_batch(_tiles(batch, model.config), lengths, labelled)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip if settings.grad_clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lrs = {}
        for part, group in zip(group_parts, optimizer.param_groups):
            lrs.setdefault(part, group["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_rejects = dist.gather(step_rejects)
        rejects.extend(step_rejects)
        loss_sum, tokens, padded, flops = dist.sum([loss_sum, tokens, padded, flops])
        seconds = time.perf_counter() - began
        loss = loss_sum / max(step.label_tokens, 1)
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        entry = {"step": index + 1, "steps": len(steps), "epoch": round((index + 1) * settings.batch / max(len(samples), 1), 6),
                 "samples": step.samples, "loss": loss, "lr": lrs, "grad_norm": norm, "tokens": int(tokens),
                 "label_tokens": step.label_tokens, "padding": round(1 - tokens / padded, 6) if padded else 0.0,
                 "seconds": round(seconds, 6), "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
                 "flops": flops, "mfu": round(flops / seconds / (peak * dist.world), 6) if peak and seconds else None}
        if dist.main:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
        if progress is not None and dist.main:
            progress(index + 1, len(steps))
        done = index + 1
        if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < len(steps):
            model_state = get_model_state_dict(wrapper, options=full)
            optim_state = get_optimizer_state_dict(wrapper, optimizer, options=full)
            if dist.main:
                strip = len("model.")
                checkpoint.save(ckpt_dir, done, trainable={k[strip:]: v for k, v in model_state.items() if k[strip:] in trainable},
                                optimizer=checkpoint.optimizer_tensors(
                                    {"state": {k[strip:]: v for k, v in optim_state["state"].items()}}),
                                rng=checkpoint.rng_tensors(), state={
                                    "job": digest, "step": done, "scheduler": scheduler.state_dict(),
                                    "python_rng": checkpoint.python_rng(), "param_groups": optim_state["param_groups"],
                                    "rejects": [dataclasses.asdict(r) for r in rejects], "loss": loss})
            dist.barrier()

    model_state = get_model_state_dict(wrapper, options=full) if dist.on else None
    result: dict[str, Any] = {}
    if dist.main:
        tmp = work / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if dist.on:
            model_state = {k[len("model."):]: v for k, v in model_state.items()}
        if settings.gradient_checkpointing:
            model.activation_checkpointing_disable()
        checkpoint.save_final(model, tokenizer, processor, tmp / "checkpoint", state_dict=model_state)
        shutil.copyfile(log_path, tmp / LOG)
        seen, _ = data.total_steps(len(samples), settings.batch, settings.epochs)
        trained_ids = {samples[i].id for s in steps for mb in s.micro_batches for i in mb}
        unique: dict[str, Any] = {}
        for r in rejects:  # a sample refused in the loop comes up again in every epoch
            unique.setdefault(r.id or f"#{len(unique)}", r)
        rejects = list(unique.values())
        rejected_ids = {r.id for r in rejects}
        result = {
            "job": digest, "stage": settings.name, "train": list(settings.train), "steps": len(steps), "world": dist.world, "micro_batch": micro,
            "accumulation": accumulation, "batch": settings.batch, "samples": len(samples),
            "samples_seen": seen, "records": len(rows), "trained": len(trained_ids - rejected_ids),
            "rejects": [dataclasses.asdict(r) for r in rejects], "params": part_params,
            "trainable_params": sum(v for k, v in part_params.items() if k in settings.train),
            "first_loss": first_loss, "last_loss": last_loss, "threads": job.threads,
            "device": str(dist.device), "max_sample_tokens": max((s.length for s in samples), default=0),
            "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
        }
        checkpoint._write_json(tmp / RESULT, result)
        os.rename(tmp, final)
    dist.barrier()
    return result


def _blank_batch(tokenizer: Any) -> dict[str, Any]:
    import torch

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else 0
    return {"input_ids": torch.tensor([[eos, eos]]), "attention_mask": torch.tensor([[1, 1]]),
            "labels": torch.tensor([[-100, -100]])}
