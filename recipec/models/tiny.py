"""`tiny://` models: small random-weight models of the real architectures, built on the spot.

Tests and the quickstart run every model-backed step on a CPU with no model hub. A `tiny://NAME`
reference resolves to a directory laid out exactly like a hub snapshot (config.json, safetensors
weights, tokenizer files, preprocessor_config.json), so the engines load it through the same
`from_pretrained` code as real weights. It is built once, deterministically from the config and a
seed, and kept under the model cache (by default the run's store, `<store>/models/`).

The tokenizer is a byte-level BPE trained here on a fixed, seeded corpus, with the ChatML specials
of Qwen2 at fixed ids: 0 `<|endoftext|>` (padding), 1 `<|im_end|>` (end of a turn), 2
`<|im_start|>`, 3 `<|vision_start|>`, 4 `<|vision_end|>`, and `<image>`, `<video>` as the last two ids
of the vocabulary, where the tiny configs put their image and video token ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from recipec.models.configs import TINY_SCHEME, ModelConfigError, resolve_config

BUILD_VERSION = 2  # bump when a build changes for the same config and seed
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>"]
MEDIA = ["<image>", "<video>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The corpus the tiny tokenizer learns from: everyday words of image descriptions and questions.
_WORDS = """
a an the this that these those is are was were be been has have had do does did can could will would
what which who where when why how many much color colour shape size number count text word letter
red green blue yellow orange purple pink black white gray grey brown gold silver dark light bright
circle square triangle rectangle star line dot stripe grid pattern round flat tall short long small
large big tiny huge left right top bottom middle center above below near far next behind front
image picture photo chart table graph diagram document page screen sign label title caption figure
person people man woman child dog cat bird car bus tree sky road water house room street food
one two three four five six seven eight nine ten zero first second third last more less most least
yes no not only also and or but because so then first answer question reason explain describe show
shows showing look looks see seen write written read reads say says value values total sum average
object objects scene scenes action actions walking running sitting standing holding eating playing
in on at of to for with from by about into over under between inside outside across through
""".split()


def is_tiny(ref: str) -> bool:
    return ref.startswith(TINY_SCHEME)


def default_cache() -> Path:
    return Path(os.environ.get("RECIPEC_MODEL_CACHE", Path.home() / ".cache" / "recipec" / "models"))


def materialize(ref: str, cache: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """The directory of `tiny://NAME`, built there first if it is not yet (atomically)."""
    config = resolve_config(ref).config
    name = ref[len(TINY_SCHEME):]
    digest = hashlib.sha256(json.dumps({"config": config, "seed": seed, "build": BUILD_VERSION},
                                       sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else default_cache()
    target = root / "tiny" / f"{name}-{digest}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root / "tiny"))
    try:
        _build(name, config, seed, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- the tokenizer ------------------------------------------------------------------------------


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return out


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A Qwen2-style byte-level BPE tokenizer of exactly `vocab_size` ids (see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = vocab_size - len(MEDIA)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=trained, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    filler = 0
    while tokenizer.get_vocab_size() < trained:  # a small corpus can run out of merges
        tokenizer.add_special_tokens([f"<|reserved_{filler}|>"])
        filler += 1
    tokenizer.add_special_tokens(MEDIA)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ModelConfigError(f"tiny tokenizer: built {tokenizer.get_vocab_size()} ids, wanted {vocab_size}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=4096, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---- the models ---------------------------------------------------------------------------------


def _learn_turn_taking(model: Any, tokenizer: Any, seed: int, steps: int = 100) -> None:
    """A few seconds of training on short ChatML exchanges of the corpus' words.

    A random-weight language model almost never ends its turn, so every generation would run
    to `max_new_tokens`. After this it answers in a few words and closes the turn, as a chat
    model does, which lets the synthesis steps produce usable (if meaningless) text.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical builds whatever the machine's core count
    rng = random.Random(seed + 1)
    corpus = [line for line in _corpus(seed + 2, lines=512) if len(line) < 40]
    texts = []
    for _ in range(256):
        reply = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8)))
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": rng.choice(corpus)}, {"role": "assistant", "content": reply}], tokenize=False))
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    tokenizer.padding_side = "left"
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    language = model.get_decoder() if hasattr(model, "get_decoder") else model
    head = model.get_output_embeddings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (16,), generator=generator)
        ids, mask, target = batch["input_ids"][rows], batch["attention_mask"][rows], labels[rows]
        hidden = language(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.set_num_threads(threads)


def _build(name: str, config: dict[str, Any], seed: int, out: Path) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    image_processor = None
    if name == "llava-onevision":
        cfg = tf.LlavaOnevisionConfig(**config)
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        tile = config["vision_config"]["image_size"]
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": tile, "width": tile}, image_grid_pinpoints=config["image_grid_pinpoints"])
        vocab = config["text_config"]["vocab_size"]
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**config))
        vocab = config["vocab_size"]
    elif name == "qwen2-vl":
        model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(**config))
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        vision = config["vision_config"]
        unit = vision["patch_size"] * vision["spatial_merge_size"]
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
            temporal_patch_size=vision["temporal_patch_size"],
            size={"shortest_edge": unit * unit, "longest_edge": 16 * unit * unit})
        vocab = config["vocab_size"]
    elif name == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**config))
        vocab = None
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
        image_processor = SiglipImageProcessorPil(size={"height": config["image_size"], "width": config["image_size"]})
    elif name == "siglip-tagger":
        model = tf.SiglipModel(tf.SiglipConfig(**config))
        vocab = config["text_config"]["vocab_size"]
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
        size = config["vision_config"]["image_size"]
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    else:  # pragma: no cover - resolve_config knows the names
        raise ModelConfigError(f"no builder for tiny://{name}")
    tokenizer = build_tokenizer(vocab, seed) if vocab is not None else None
    if name in ("llava-onevision", "qwen2", "qwen2-vl"):
        _learn_turn_taking(model, tokenizer, seed)
    if name == "siglip-tagger":
        # random towers give cosines near 0; with SigLIP's initial bias of -10 no tag would ever
        # pass a threshold. A zero bias and a steep scale spread the probabilities over (0, 1).
        with torch.no_grad():
            model.logit_bias.zero_()
            model.logit_scale.fill_(math.log(40.0))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        if name == "siglip-tagger":  # SigLIP's text tower pads to its fixed length on the right
            tokenizer.padding_side = "right"
            tokenizer.model_max_length = config["text_config"]["max_position_embeddings"]
        tokenizer.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    (out / "recipec-tiny.json").write_text(json.dumps({"ref": TINY_SCHEME + name, "seed": seed,
                                                        "build": BUILD_VERSION}, sort_keys=True) + "\n")
