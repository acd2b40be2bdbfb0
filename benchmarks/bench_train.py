"""Training throughput: recipec's train step against a plain loop, and the full-size model's MFU on a GPU.

CPU (default): the tiny LLaVA-OneVision (tiny://siglip + tiny://qwen2) on the same generated data, in
the same run: recipec's trainer (`recipec.train.trainer.train`: modality- and length-grouped micro
batches, logits only where the loss needs them) against a plain loop over micro batches of the same
size in random order, padded, with the model's own loss over full logits and the same optimizer.
Prints tokens/s of each, their ratio and the padding fraction of each.

    .venv/bin/python benchmarks/bench_train.py [--samples 192] [--steps 8] [--micro 8]

GPU (`--gpu`): the full-size Aquila-VL-2B architecture (SigLIP so400m/14-384 truncated at layer -2,
mlp2x_gelu, Qwen2.5-1.5B-Instruct; random weights from the shipped configs, fp32 master weights,
bf16 autocast, SDPA attention) on stage-2-shaped micro batches (one image at 2x2 anyres with
anyres_max_4: five 729-token tiles, plus text), through recipec's loss module, AdamW and clipping:
tokens/s and MFU (model FLOPs counting vision and language, `recipec.train.flops`).

    .venv/bin/python benchmarks/bench_train.py --gpu [--micro 4] [--steps 12] [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = ("red", "green", "blue", "yellow")


def make_data(folder: Path, samples: int, seed: int):
    """Images of varied sizes (1 to 4 anyres tiles) with answers of varied length; a fifth text-only."""
    import hashlib

    import pyarrow as pa
    from PIL import Image, ImageDraw

    from recipec import records

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        colour = rng.choice(COLOURS)
        answer = " ".join([f"the shape is {colour}"] * rng.randint(1, 12))
        images = []
        question = "What color is the shape?"
        if i % 5:
            w, h = rng.choice([(32, 32), (64, 32), (32, 64), (64, 64), (96, 32)])
            image = Image.new("RGB", (w, h), tuple(rng.randint(90, 160) for _ in range(3)))
            ImageDraw.Draw(image).ellipse((2, 2, w - 3, h - 3), fill={"red": (220, 30, 30), "green": (30, 180, 40),
                                                                    "blue": (30, 60, 220), "yellow": (230, 210, 20)}[colour])
            path = folder / f"{i:05d}.png"
            image.save(path)
            images = [{"path": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "width": w, "height": h}]
            question = "<image>\n" + question
        rows.append({"id": f"b{i}", "source": "bench", "origin": f"bench:{i}", "images": images,
                     "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                     "category": "comprehensive", "data_type": "general", "image_tags": [], "instruction_tags": [],
                     "scores": [], "provenance": [], "source_id": None})
    return pa.Table.from_pylist(rows, schema=records.SCHEMA)


STAGE = {"name": "bench", "model": "tiny_vlm", "train": ["vision", "projector", "language"], "image_size": 32,
         "grid": [2, 2], "max_tiles": 4, "lr": 1e-4, "part_lr": {}, "batch": 32, "micro_batch": 8, "epochs": 100.0,
         "warmup": 0.0, "schedule": "constant", "weight_decay": 0.0, "max_length": 1024, "after": None,
         "checkpoint_every": 0, "grad_clip": 1.0}
TINY = {"name": "tiny_vlm", "architecture": "llava_onevision", "vision": {"ref": "tiny://siglip"},
        "language": {"ref": "tiny://qwen2"}, "projector": "mlp2x_gelu", "vision_layer": -1, "tie_word_embeddings": None}


def cpu(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq
    import torch

    from recipec.models.multimodal import Encoder, LlavaOnevisionImages
    from recipec.train import data
    from recipec.train.model import configure_stage, freeze, from_towers
    from recipec.train.settings import StageSettings
    from recipec.train.trainer import FINAL, LOG, Job, train

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        table = make_data(tmp / "images", args.samples, seed=0)
        pq.write_table(table, tmp / "records.parquet")
        stage = {**STAGE, "micro_batch": args.micro, "batch": args.micro * 4}
        job = Job(step_id="train.bench", stage=stage, model=TINY, seed=0, roots={"bench": "images"},
                  recipe_dir=str(tmp), records=str(tmp / "records.parquet"), start=None, work_dir=str(tmp / "work"),
                  models_dir=str(tmp / "models"), threads=args.threads, max_steps=args.steps)
        warm = Job(**{**job.__dict__, "work_dir": str(tmp / "warm"), "max_steps": 1})
        train(warm)  # builds the tiny models, imports and warms up
        started = time.perf_counter()
        train(job)
        wall = time.perf_counter() - started
        log = [json.loads(line) for line in (tmp / "work" / FINAL / LOG).read_text().splitlines()]
        ours_tokens = sum(e["tokens"] for e in log)
        ours_time = sum(e["seconds"] for e in log)
        ours_padding = 1 - ours_tokens / sum(e["tokens"] / (1 - e["padding"]) for e in log)

        # the plain loop: same model build, micro batches in random order, padded, full logits
        settings = StageSettings.from_params(stage)
        torch.set_num_threads(args.threads)
        model, tokenizer, processor = from_towers(TINY, settings, seed=0, models_dir=tmp / "models", base_dir=tmp)
        configure_stage(model, processor, settings)
        freeze(model, settings.train)
        encoder = Encoder(tokenizer, LlavaOnevisionImages(processor, model.config, tokenizer, settings.tiles()),
                          settings.max_length)
        samples = data.prepare(table.to_pylist(), {"bench": "images"}, tmp, encoder).samples
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
        rng = random.Random(0)
        order = list(range(len(samples)))
        micro_batches = math.ceil(args.steps * stage["batch"] / args.micro)
        tokens = padded = 0
        model.train()
        plain_time = 0.0
        position = len(order)
        for _ in range(micro_batches):
            if position + args.micro > len(order):
                rng.shuffle(order)
                position = 0
            members = [samples[i] for i in order[position:position + args.micro]]
            position += args.micro
            began = time.perf_counter()
            batch, _, _ = data.encode(members, encoder)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            plain_time += time.perf_counter() - began
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        plain_padding = 1 - tokens / padded
        ours = ours_tokens / ours_time
        plain = tokens / plain_time
        print(f"cpu: {len(samples)} samples, {args.steps} steps of {stage['batch']} (micro batch {args.micro}), "
              f"{args.threads} thread(s); recipec wall {wall:.1f} s for the whole job")
        print(f"  recipec train step : {ours:10.0f} tokens/s   padding {ours_padding:6.1%}")
        print(f"  plain padded loop  : {plain:10.0f} tokens/s   padding {plain_padding:6.1%}")
        print(f"  ratio              : {ours / plain:10.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gpu(args: argparse.Namespace) -> None:
    import torch

    from recipec.models.configs import resolve_config
    from recipec.train.flops import Costs, peak_flops
    from recipec.train.model import freeze, llava_config
    from recipec.train.settings import StageSettings
    from recipec.train.trainer import _loss_module, _optimizer, _tiles

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device (or --device cpu --model tiny to try the code)")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.model == "tiny":
        vision, language, tile = resolve_config("tiny://siglip").config, resolve_config("tiny://qwen2").config, 32
    else:
        vision = resolve_config("google/siglip-so400m-patch14-384").config.get("vision_config")
        language, tile = resolve_config("Qwen/Qwen2.5-1.5B-Instruct").config, 384
    stage = {**STAGE, "image_size": tile, "grid": [2, 2], "max_tiles": 4, "lr": 1e-5, "micro_batch": args.micro,
             "batch": args.micro, "max_length": 8192, "gradient_checkpointing": args.checkpointing}
    settings = StageSettings.from_params(stage)
    architecture = {"vision_layer": -2, "projector": "mlp2x_gelu", "tie_word_embeddings": None}
    vocab = language["vocab_size"]
    config = llava_config({**vision, "model_type": "siglip_vision_model"}, language, architecture, settings,
                          vocab - 2, vocab - 1)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    import transformers as tf

    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlavaOnevisionForConditionalGeneration(config)
    model.config.image_grid_pinpoints = settings.pinpoints(tile)
    model.config.vision_aspect_ratio = settings.aspect_ratio()
    freeze(model, settings.train)
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    wrapper = _loss_module(model, tile, dummy_vision=False)
    optimizer, _, _ = _optimizer(model, settings)
    costs = Costs.of(model, settings.train)

    # one stage-2 sample: a 768x768 image (its base tile and 2x2 tiles of 729 tokens, a newline per
    # row of features: counted by the encoder's own arithmetic) and text
    from recipec.models.multimodal import LlavaOnevisionImages
    from recipec.train.model import image_processor_for

    class _Names:
        def convert_ids_to_tokens(self, _):
            return "<image>"

    counter = LlavaOnevisionImages(image_processor_for(None, tile, settings.pinpoints(tile)), model.config, _Names(),
                                   settings.tiles())
    image_tokens = counter.tokens_for(2 * tile, 2 * tile)
    text = args.text_tokens
    length = image_tokens + text
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab - 2, (args.micro, length), generator=g)
    ids[:, 8:8 + image_tokens] = config.image_token_index
    labels = ids.clone()
    labels[:, :8 + image_tokens + text // 4] = -100  # the answer: the last three quarters of the text
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(args.micro, 5, 3, tile, tile, generator=g),
             "image_sizes": torch.tensor([[2 * tile, 2 * tile]] * args.micro), "batch_num_images": torch.ones(args.micro, dtype=torch.long)}
    batch = {k: v.to(device) for k, v in batch.items()}
    label_tokens = int((labels[:, 1:] != -100).sum())
    flops = costs.micro_batch(_tiles(batch, model.config), [length] * args.micro, label_tokens)
    peak = peak_flops(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.steps):
        sync()
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ce, _ = wrapper(batch)
        (ce / label_tokens).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - began)
        print(f"  step {step + 1}: {times[-1]:.3f} s, loss {float(ce.detach()) / label_tokens:.3f}", flush=True)
    measured = times[args.warmup:]
    seconds = sum(measured) / len(measured)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu: {name}, {'Aquila-VL-2B' if args.model == 'aquila' else 'tiny'} architecture ({params / 1e6:,.1f}M parameters), "
          f"micro batch {args.micro} x {length} tokens ({image_tokens} image), gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}")
    print(f"  {args.micro * length / seconds:,.0f} tokens/s, {flops / seconds / 1e12:.1f} model TFLOP/s, "
          f"MFU {flops / seconds / peak:.1%}" if peak else "  (peak FLOPs of this GPU unknown: set RECIPEC_PEAK_TFLOPS)")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda", help="for --gpu (cpu with --model tiny checks the code)")
    parser.add_argument("--model", choices=("aquila", "tiny"), default="aquila", help="for --gpu")
    args = parser.parse_args()
    if args.gpu:
        args.micro = args.micro or 4
        args.steps = max(args.steps, args.warmup + 3)
        gpu(args)
    else:
        args.micro = args.micro or 8
        cpu(args)


if __name__ == "__main__":
    main()
