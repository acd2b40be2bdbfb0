"""The vLLM engine: its pure helpers on data shaped like vLLM's outputs, its wiring against a stand-in
`vllm` module, and the real thing where vLLM imports."""

from __future__ import annotations

import hashlib
import math
import sys
import types
from dataclasses import dataclass, field

import pytest

from recipec.models.engine import Choice, Choose, Generate, Generation, Image, Loss, LossValue, Sampling
from recipec.models.logprobs import (align_mask, first_token_probs, image_token_ids, label_probs,
                                     loss_from_prompt_logprobs)
from recipec.models.vllm_engine import build_prompt, choice_plan, image_placeholder, sampling_kwargs, steps_from_vllm


@dataclass
class Logprob:  # the shape of vllm.sequence.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@pytest.fixture(scope="module")
def tiny_dir():
    from recipec.models import tiny

    return tiny.materialize("tiny://llava-onevision", tiny.default_cache())


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def picture(tmp_path, color="red"):
    from PIL import Image as PILImage

    path = tmp_path / f"{color}.png"
    PILImage.new("RGB", (40, 30), color).save(path)
    return Image(str(path), hashlib.sha256(path.read_bytes()).hexdigest())


# ---- pure helpers -------------------------------------------------------------------------------


def test_prompts_use_the_chat_template_and_the_familys_placeholder(tiny_dir, tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    assert image_placeholder(config, tokenizer) == "<image>" and image_token_ids(config) == {config.image_token_id}
    messages = [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "red"}]
    assert build_prompt(tokenizer, messages[:1], "<IMG>", True) == \
        "<|im_start|>user\n<IMG> what?<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(tokenizer, messages, "<image>", False).endswith("<|im_start|>assistant\nred<|im_end|>\n")

    class Qwen2VL:
        model_type = "qwen2_vl"
        vision_start_token_id, image_token_id, vision_end_token_id = 3, 510, 4

    assert image_placeholder(Qwen2VL(), tokenizer) == "<|vision_start|><image><|vision_end|>"


def test_sampling_settings():
    assert sampling_kwargs(Sampling(max_new_tokens=7, seed=3)) == {"max_tokens": 7, "seed": 3, "temperature": 0.0, "top_p": 1.0}
    assert sampling_kwargs(Sampling(temperature=0.7, top_p=0.9)) == {"max_tokens": 512, "seed": 0, "temperature": 0.7, "top_p": 0.9}


def test_choice_plans():
    assert choice_plan([[5, 6], [7]], [1], True) == {"structured": False, "max_tokens": 1, "logprob_token_ids": [5, 7]}
    shared = choice_plan([[5, 6], [5, 8, 9]], [1], True)
    assert shared == {"structured": True, "max_tokens": 4, "logprob_token_ids": [1, 5, 6, 8, 9]}
    assert choice_plan([[5, 6], [7]], [1], False) == {"structured": True, "max_tokens": 3, "logprob_token_ids": None}


def test_first_token_probabilities_renormalise_over_the_labels():
    step = {5: Logprob(math.log(0.5)), 7: Logprob(math.log(0.3)), 9: Logprob(math.log(0.1))}
    probs = first_token_probs(["yes", "no", "maybe", "never"], [5, 7, 9, 11], step)
    total = 0.9 + 1e-6
    assert probs == pytest.approx({"yes": 0.5 / total, "no": 0.3 / total, "maybe": 0.1 / total, "never": 1e-6 / total})


def test_sentencepiece_style_tokens_are_read_by_what_they_add():
    vocab = {1: "▁Object", 2: "▁counting", 3: "▁recognition", 4: "</s>"}

    def decode(ids):  # SentencePiece: "▁" is a space, a leading one is dropped
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip()

    logprobs = [{1: Logprob(math.log(0.9))},
                {2: Logprob(math.log(0.6)), 3: Logprob(math.log(0.3)), 4: Logprob(math.log(0.05))}]
    steps = steps_from_vllm([1, 2], logprobs, decode)
    assert [s.token for s in steps] == ["Object", " counting"]
    probs = label_probs(["Object counting", "Object recognition", "Scene"], steps)
    assert probs["Object counting"] / probs["Object recognition"] == pytest.approx(2.0)
    assert max(probs, key=probs.get) == "Object counting"


def test_the_assistant_mask_survives_another_image_expansion():
    image = {99}
    encoded = [2, 10, 99, 99, 99, 99, 11, 2, 20, 21, 1]
    mask = [False] * 8 + [True, True, True]
    engine = [2, 10, 99, 99, 11, 2, 20, 21, 1]
    assert align_mask(encoded, mask, engine, image) == [False] * 6 + [True, True, True]
    assert align_mask(encoded, mask, [2, 10, 99, 12, 2, 20, 21, 1], image) is None
    rows = [None] + [{t: Logprob(-0.5 * (i % 3 + 1))} for i, t in enumerate(engine[1:], 1)]
    aligned = align_mask(encoded, mask, engine, image)
    assert loss_from_prompt_logprobs(engine, rows, aligned) == pytest.approx(((1.5 + 0.5 + 1.0) / 3, 3))


# ---- the engine against a stand-in vllm module ----------------------------------------------------


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    prompt_logprobs: list | None = None


@dataclass
class StructuredOutputsParams:
    choice: list[str] | None = None


class FakeSamplingParams:
    token_ids_supported = True

    def __init__(self, **kwargs):
        if "logprob_token_ids" in kwargs and not self.token_ids_supported:
            raise TypeError("unexpected keyword argument 'logprob_token_ids'")
        self.__dict__.update(kwargs)


def lp(i, t):
    return -((i * 7 + t) % 13) / 4 - 0.1


class FakeLLM:
    """Answers like vLLM would in shape; expands each image token to 3 (not the encoder's count)."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        self.image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.prompts: list[dict] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        out = []
        for prompt, p in zip(prompts, params):
            self.prompts.append(prompt)
            ids = [x for t in prompt["prompt_token_ids"] for x in ([t] * 3 if t == self.image_id else [t])]
            if getattr(p, "prompt_logprobs", None):
                rows = [None] + [{t: Logprob(lp(i, t))} for i, t in enumerate(ids[1:], 1)]
                out.append(RequestOutput(ids, [Completion("", [7], "length")], rows))
            elif getattr(p, "structured_outputs", None):
                labels = p.structured_outputs.choice
                label = labels[len(ids) % len(labels)]
                tokens = self.tokenizer(label, add_special_tokens=False)["input_ids"]
                listed = getattr(p, "logprob_token_ids", None) or list(range(20))
                steps = [{t: Logprob(lp(k, t)) for t in set(listed) | {tok}} for k, tok in enumerate(tokens)]
                out.append(RequestOutput(ids, [Completion(label, tokens, "stop", steps)]))
            elif getattr(p, "logprob_token_ids", None):
                first = p.logprob_token_ids[0]
                out.append(RequestOutput(ids, [Completion("", [first], "length",
                                                          [{t: Logprob(lp(0, t)) for t in p.logprob_token_ids}])]))
            else:
                n = min(p.max_tokens, 4)
                out.append(RequestOutput(ids, [Completion("ok " * n, [5] * n, "length" if p.max_tokens <= 4 else "stop")]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = StructuredOutputsParams
    module.sampling_params = sampling
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    FakeLLM.instances.clear()
    FakeSamplingParams.token_ids_supported = True
    return module


def test_the_engine_loads_safetensors_only_and_trusts_no_code_unasked(fake_vllm, tiny_dir):
    from recipec.models import vllm_engine

    engine = vllm_engine.load({"ref": "tiny://llava-onevision", "engine": "vllm"}, workers=1, models_dir=tiny_dir.parent.parent)
    kwargs = FakeLLM.instances[-1].kwargs
    assert kwargs["load_format"] == "safetensors" and kwargs["trust_remote_code"] is False
    assert kwargs["limit_mm_per_prompt"] == {"image": 4} and kwargs["model"] == str(tiny_dir)
    assert engine.identity.startswith("vllm:tiny://llava-onevision@")


def test_generate_sends_chat_tokens_and_pil_images(fake_vllm, tiny_dir, tokenizer, tmp_path):
    from recipec.models.vllm_engine import VllmEngine

    engine = VllmEngine(tiny_dir, "vllm:tiny")
    request = Generate(({"role": "user", "content": "<image> what color?"},), images=(picture(tmp_path),),
                       sampling=Sampling(max_new_tokens=3))
    [result] = engine.generate([request])
    assert result == Generation("ok ok ok ", "length", tokens_in=result.tokens_in, tokens_out=3)
    [prompt] = FakeLLM.instances[-1].prompts
    expected = tokenizer(build_prompt(tokenizer, request.messages, "<image>", True), add_special_tokens=False)["input_ids"]
    assert prompt["prompt_token_ids"] == expected
    [image] = prompt["multi_modal_data"]["image"]
    assert image.size == (40, 30) and image.mode == "RGB"
    bad = Generate(({"role": "user", "content": "no image here"},), images=(picture(tmp_path),))
    assert engine.generate([bad])[0].reason == "image_placeholders"


@pytest.mark.parametrize("token_ids_supported", [True, False])
def test_choose_reads_the_models_probabilities(fake_vllm, tiny_dir, tokenizer, token_ids_supported):
    from recipec.models.vllm_engine import VllmEngine

    FakeSamplingParams.token_ids_supported = token_ids_supported
    engine = VllmEngine(tiny_dir, "vllm:tiny")
    yes_no = Choose(({"role": "user", "content": "is it red?"},), ("yes", "no", "maybe"))
    shared = Choose(({"role": "user", "content": "which task?"},), ("Object counting", "Object recognition"))
    first, second = engine.choose([yes_no, shared])
    assert isinstance(first, Choice) and isinstance(second, Choice)
    assert sum(first.probs.values()) == pytest.approx(1) and sum(second.probs.values()) == pytest.approx(1)
    assert len(FakeLLM.instances[-1].prompts) == 2  # one batch, one prompt per request
    if token_ids_supported:  # yes/no/maybe start with distinct tokens: one step over them
        firsts = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in yes_no.labels]
        expected = {label: math.exp(lp(0, t)) for label, t in zip(yes_no.labels, firsts)}
        total = sum(expected.values())
        assert first.probs == pytest.approx({k: v / total for k, v in expected.items()})
        assert first.label == max(expected, key=expected.get)
    assert second.label in shared.labels


def test_loss_scores_exactly_the_assistant_tokens(fake_vllm, tiny_dir, tmp_path):
    from recipec.models.vllm_engine import VllmEngine

    engine = VllmEngine(tiny_dir, "vllm:tiny")
    request = Loss(({"role": "user", "content": "<image> what color?"}, {"role": "assistant", "content": "red circle"}),
                   images=(picture(tmp_path),))
    no_answer = Loss(({"role": "user", "content": "hello"},))
    [result, missing] = engine.loss([request, no_answer])
    assert missing.reason == "no_answer"
    assert isinstance(result, LossValue)
    from recipec.models.multimodal import load_pil

    encoded = engine.encoder.encode(request.messages, [load_pil(request.images[0])])
    answer = [t for t, m in zip(encoded.input_ids, encoded.assistant_mask) if m]
    assert result.tokens == len(answer)
    # the fake expands the image to 3 tokens, not the encoder's count: the mask must follow
    fake = FakeLLM.instances[-1]
    ids = fake.generate([fake.prompts[-1]], [FakeSamplingParams(prompt_logprobs=1)])[0].prompt_token_ids
    assert len(ids) < len(encoded.input_ids)
    scored = [i for i, m in enumerate(align_mask(encoded.input_ids, encoded.assistant_mask, ids, engine.image_ids)) if m]
    assert [ids[i] for i in scored] == answer
    assert result.loss == pytest.approx(-sum(lp(i, ids[i]) for i in scored) / len(answer))


# ---- the real vLLM --------------------------------------------------------------------------------


def test_real_vllm_against_the_transformers_engine():
    pytest.importorskip("vllm", reason="vLLM is an optional extra (recipec[vllm]); it is not installed here")
    from recipec.models import tiny
    from recipec.models.transformers_engine import TransformersEngine
    from recipec.models.vllm_engine import VllmEngine

    # a text model: vLLM's image models need torchvision, which its CPU build runs without
    model_dir = tiny.materialize("tiny://qwen2", tiny.default_cache())
    engine = VllmEngine(model_dir, "vllm:tiny", dtype="float32")
    local = TransformersEngine(model_dir, "tiny", dtype="float32")
    gen = Generate(({"role": "user", "content": "what color is the sky?"},), sampling=Sampling(max_new_tokens=8))
    loss = Loss(({"role": "user", "content": "what color?"}, {"role": "assistant", "content": "blue sky"}))
    pick = Choose(({"role": "user", "content": "is it red?"},), ("yes", "no"))
    assert engine.generate([gen])[0].text == local.generate([gen])[0].text
    assert engine.loss([loss])[0].loss == pytest.approx(local.loss([loss])[0].loss, rel=1e-3)
    assert engine.choose([pick])[0].label == local.choose([pick])[0].label
