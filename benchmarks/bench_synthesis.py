"""Synthesis throughput: recipec's batched engine against one `model.generate` / forward per sample.

Same run, same model, same requests, greedy decoding: the batched engine (requests sorted by
length, left padding, KV cache, SDPA) against the plain transformers loop a script would write (one
`generate` call per sample; one forward per sample for loss). Both must give the same texts and
losses; the figures are samples/s, generated tokens/s and the ratio.

    python benchmarks/bench_synthesis.py                 # CPU, tiny://llava-onevision and tiny://qwen2-vl
    python benchmarks/bench_synthesis.py --full --device cuda --requests 256
        # GPU: LLaVA-OneVision with SigLIP so400m + Qwen2.5-1.5B and Qwen2-VL-2B for loss, random
        # weights built from the shipped configs, bf16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from recipec.models import tiny
from recipec.models.configs import resolve_config
from recipec.models.engine import Generate, Image, Loss, Sampling
from recipec.models.multimodal import load_pil
from recipec.models.transformers_engine import TransformersEngine, weights_digest


def make_images(folder: Path, n: int, side: int) -> list[Image]:
    rng = np.random.RandomState(0)
    out = []
    for k in range(n):
        w, h = int(side * rng.uniform(0.6, 1.6)), int(side * rng.uniform(0.6, 1.6))
        path = folder / f"img{k}.png"
        PILImage.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(path)
        out.append(Image(str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


QUESTIONS = ["What is shown in the picture?", "How many objects are there?", "Describe the scene in detail, please.",
             "What colour is the largest shape?", "Is there any text? What does it say?"]


def full_size_dir(folder: Path, kind: str) -> Path:
    """A random-weight full-size model from the shipped configs, saved like a hub snapshot."""
    import torch
    import transformers as tf

    out = folder / kind
    if (out / "config.json").exists():
        return out
    tokenizer = tiny.build_tokenizer(4096)
    if kind == "llava-onevision":
        vision = resolve_config("google/siglip-so400m-patch14-384").config
        text = resolve_config("Qwen/Qwen2.5-1.5B-Instruct").config
        tile = vision.get("vision_config", vision).get("image_size", 384)
        config = tf.LlavaOnevisionConfig(
            vision_config={**vision.get("vision_config", vision), "model_type": "siglip_vision_model"},
            text_config=text, vision_feature_layer=-2, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[tile * r, tile * c] for r in range(1, 7) for c in range(1, 7)],
            image_token_index=4094, video_token_index=4095)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = tf.LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16)
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)
        processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                    image_grid_pinpoints=config.image_grid_pinpoints)
    else:
        cfg = resolve_config("Qwen/Qwen2-VL-2B-Instruct").config
        cfg = {**cfg, "image_token_id": 4094, "video_token_id": 4095, "vision_start_token_id": 3, "vision_end_token_id": 4}
        config = tf.Qwen2VLConfig(**cfg)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = tf.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        processor = Qwen2VLImageProcessorPil()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def plain_generate(engine: TransformersEngine, requests: list[Generate]) -> tuple[list[str], int]:
    """One `generate` per sample, as a script would do it."""
    import torch

    texts, tokens = [], 0
    for request in requests:
        encoded = engine.encoder.encode(request.messages, [load_pil(i) for i in request.images], generation_prompt=True)
        inputs = engine._to_device(engine.encoder.collate([encoded], padding_side="left"))
        with torch.inference_mode():
            output = engine.model.generate(**inputs, max_new_tokens=request.sampling.max_new_tokens, do_sample=False,
                                           temperature=None, top_p=None, top_k=None,
                                           pad_token_id=engine.tokenizer.pad_token_id,
                                           eos_token_id=sorted(i for i in engine.eos_ids if i is not None))
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        ended = next((k for k, t in enumerate(new) if t in engine.eos_ids), None)
        kept = new if ended is None else new[:ended]
        texts.append(engine.tokenizer.decode(kept, skip_special_tokens=True))
        tokens += len(kept) + (ended is not None)
    return texts, tokens


def plain_loss(engine: TransformersEngine, requests: list[Loss]) -> list[float]:
    import torch

    out = []
    for request in requests:
        encoded = engine.encoder.encode(request.messages, [load_pil(i) for i in request.images])
        batch = engine._to_device(engine.encoder.collate([encoded], labels=True))
        with torch.inference_mode():
            out.append(engine.model(**batch).loss.float().item())
    return out


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full-size random-weight models from the shipped configs")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-synthesis-"))
    images = make_images(work, 16, 384 if args.full else 48)
    if args.full:
        vlm_dir, scorer_dir = full_size_dir(work, "llava-onevision"), full_size_dir(work, "qwen2-vl")
    else:
        vlm_dir = tiny.materialize("tiny://llava-onevision", work / "models")
        scorer_dir = tiny.materialize("tiny://qwen2-vl", work / "models")
    figures: dict[str, object] = {"mode": "full" if args.full else "tiny", "requests": args.requests,
                                  "max_new_tokens": args.max_new_tokens}

    engine = TransformersEngine(vlm_dir, f"bench@{weights_digest(vlm_dir)}", device=args.device,
                                batch_size=args.batch_size, threads=args.threads)
    requests = [Generate(({"role": "user", "content": f"<image>\n{QUESTIONS[k % len(QUESTIONS)]}"},),
                         (images[k % len(images)],), Sampling(args.max_new_tokens, 0.0)) for k in range(args.requests)]
    engine.generate(requests[:2])  # warm-up
    batched, batched_s = timed(lambda: engine.generate(requests))
    (plain_texts, plain_tokens), plain_s = timed(lambda: plain_generate(engine, requests))
    tokens = sum(g.tokens_out for g in batched)
    same = sum(g.text == t for g, t in zip(batched, plain_texts))
    figures["generate"] = {
        "device": engine.device, "batch_size": engine.batch_size,
        "engine": {"seconds": round(batched_s, 2), "samples_per_s": round(len(requests) / batched_s, 2),
                   "tokens_per_s": round(tokens / batched_s, 1)},
        "per_sample_generate": {"seconds": round(plain_s, 2), "samples_per_s": round(len(requests) / plain_s, 2),
                                "tokens_per_s": round(plain_tokens / plain_s, 1)},
        "speedup": round(plain_s / batched_s, 2), "identical_texts": f"{same}/{len(requests)}"}
    engine.close()

    scorer = TransformersEngine(scorer_dir, f"bench@{weights_digest(scorer_dir)}", device=args.device,
                                batch_size=args.batch_size, threads=args.threads)
    answers = ["Two.", "A red circle next to a blue square.", "Yes, the sign says OPEN in large letters.", "Green."]
    loss_requests = [Loss(({"role": "user", "content": f"<image>\n{QUESTIONS[k % len(QUESTIONS)]}"},
                           {"role": "assistant", "content": answers[k % len(answers)] * (1 + k % 3)}),
                          (images[k % len(images)],)) for k in range(args.requests * 2)]
    scorer.loss(loss_requests[:2])
    batched_loss, batched_loss_s = timed(lambda: scorer.loss(loss_requests))
    plain, plain_loss_s = timed(lambda: plain_loss(scorer, loss_requests))
    worst = max(abs(a.loss - b) for a, b in zip(batched_loss, plain))
    scored_tokens = sum(v.tokens_in for v in batched_loss)
    figures["loss"] = {
        "engine": {"seconds": round(batched_loss_s, 2), "samples_per_s": round(len(loss_requests) / batched_loss_s, 2),
                   "tokens_per_s": round(scored_tokens / batched_loss_s, 1)},
        "per_sample_forward": {"seconds": round(plain_loss_s, 2),
                               "samples_per_s": round(len(loss_requests) / plain_loss_s, 2)},
        "speedup": round(plain_loss_s / batched_loss_s, 2), "max_abs_difference": float(f"{worst:.2e}")}
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
