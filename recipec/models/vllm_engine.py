"""The in-process vLLM engine (`vllm.LLM`), an optional extra: `pip install 'recipec[vllm]'`.

vLLM is imported only when an engine is built; everything else in this module (prompt building,
logprobs -> label probabilities, loss from `prompt_logprobs`, aligning the assistant mask) is
plain functions over plain data shaped like vLLM's outputs, tested without vLLM.

- Prompts: the conversation rendered by the model's own chat template (transformers'
  tokenizer from the model's folder), each `<image>` replaced by the family's placeholder that
  vLLM expands itself (LLaVA-OneVision's `<image>`, Qwen2-VL's
  `<|vision_start|><|image_pad|><|vision_end|>`), tokenised as the transformers engine does and
  sent as `{"prompt_token_ids": ..., "multi_modal_data": {"image": [PIL, ...]}}`.
- `generate`: `SamplingParams(temperature, top_p, max_tokens, seed)`.
- `choose`: when the labels' first tokens differ (yes/no, most taxonomy levels) one step with
  `logprob_token_ids` = those first tokens (vLLM >= 0.30) gives each label's probability
  directly. Otherwise the labels are a structured-output choice (`StructuredOutputsParams(choice=)`
  in new vLLM, `GuidedDecodingParams(choice=)` in older) and the logprobs of the generated tokens
  (of the labels' tokens with `logprob_token_ids`, else the top 20) give the probabilities
  (`recipec.models.openai_engine.label_probs`). vLLM's logprobs are the model's, before the
  constraint, so the probabilities are the model's own renormalised over the labels.
- `loss`: `prompt_logprobs=1` with `max_tokens=1`; the assistant tokens are those of
  `recipec.models.multimodal.Encoder`'s mask, carried over to vLLM's expanded prompt by aligning
  the two token sequences with each run of image tokens collapsed (`align_mask`).
- Weights load from safetensors only (`load_format="safetensors"`), `trust_remote_code` only
  where the recipe says so. The identity is `vllm:` and the transformers engine's identity for the
  same folder: the same weights, but another engine's numerics, so not the same cache entries.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from recipec.models.engine import (IMAGE_PLACEHOLDER, Choice, Choose, EngineError, Generate, Generation, Loss,
                                   LossValue, RequestError, Sampling, check_images)
from recipec.models.logprobs import (FLOOR, TOP_LOGPROBS, Step, logprob_value, align_mask, first_token_probs,
                                     image_token_ids, label_probs, loss_from_prompt_logprobs)

log = logging.getLogger("recipec.models.vllm")

MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on `logprob_token_ids`


def load(model_use: dict[str, Any], *, workers: int, models_dir: Any = None, base_dir: Any = None) -> "VllmEngine":
    """The engine for a recipe's `engine = vllm` model; it resolves like the transformers engine's."""
    from recipec.models.transformers_engine import resolve_model_dir

    path, identity = resolve_model_dir(model_use, models_dir=models_dir, base_dir=base_dir)
    return VllmEngine(path, f"vllm:{identity}", dtype=model_use.get("dtype", "bfloat16"),
                      trust_remote_code=bool(model_use.get("trust_remote_code")),
                      max_images=int(model_use.get("max_images") or 4),
                      max_model_len=model_use.get("max_model_len"),
                      gpu_memory_utilization=float(model_use.get("gpu_memory_utilization") or 0.85))


class VllmEngine:
    def __init__(self, model_dir: Path, identity: str, *, dtype: str = "bfloat16", trust_remote_code: bool = False,
                 max_images: int = 4, max_model_len: int | None = None, gpu_memory_utilization: float = 0.85):
        try:
            import vllm
        except ImportError as e:
            raise EngineError("engine = vllm needs vLLM: `pip install 'recipec[vllm]'` on a machine with a GPU") from e
        from transformers import AutoConfig, AutoTokenizer

        from recipec.models.multimodal import Encoder, image_adapter

        self.vllm = vllm
        self.identity = identity
        try:
            self.config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            kwargs: dict[str, Any] = dict(model=str(model_dir), tokenizer=str(model_dir), trust_remote_code=trust_remote_code,
                                          dtype=dtype, seed=0, load_format="safetensors",
                                          gpu_memory_utilization=gpu_memory_utilization)
            if max_model_len:
                kwargs["max_model_len"] = int(max_model_len)
            if hasattr(self.config, "vision_config"):
                kwargs["limit_mm_per_prompt"] = {"image": max_images}
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many kinds for a model it cannot serve
            raise EngineError(f"vLLM cannot load the model in {model_dir}: {type(e).__name__}: {e}") from e
        self.placeholder = image_placeholder(self.config, self.tokenizer)
        self.image_ids = image_token_ids(self.config)
        self.encoder = Encoder(self.tokenizer, image_adapter(model_dir, self.config, self.tokenizer))
        eos = {self.tokenizer.eos_token_id}
        try:
            from transformers import GenerationConfig

            extra = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except (OSError, ValueError):
            extra = None
        eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        self.eos_ids = sorted(i for i in eos if i is not None)
        self._token_ids_supported: bool | None = None

    # ---- the interface --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Generate]) -> list[Generation | RequestError]:
        prepared = [self._prompt(r, generation_prompt=True) for r in requests]
        params = [self._params(sampling_kwargs(r.sampling)) for r in requests]
        outputs = self._run(prepared, params)
        results: list[Generation | RequestError] = []
        for out in outputs:
            if isinstance(out, RequestError):
                results.append(out)
                continue
            completion = out.outputs[0]
            results.append(Generation(text=completion.text, finish_reason="length" if completion.finish_reason == "length"
                                      else "stop", tokens_in=len(out.prompt_token_ids),
                                      tokens_out=len(completion.token_ids)))
        return results

    def choose(self, requests: Sequence[Choose]) -> list[Choice | RequestError]:
        prepared, params, plans = [], [], []
        for request in requests:
            if not request.labels:
                prepared.append(RequestError("no_labels", "a choice among no labels"))
                params.append(None)
                plans.append(None)
                continue
            label_ids = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in request.labels]
            plan = choice_plan(label_ids, self.eos_ids, self._supports_token_ids())
            kwargs: dict[str, Any] = {"temperature": 0.0, "max_tokens": plan["max_tokens"], "seed": 0}
            if plan["logprob_token_ids"] is not None:
                kwargs["logprob_token_ids"] = plan["logprob_token_ids"]
            else:
                kwargs["logprobs"] = TOP_LOGPROBS
            if plan["structured"]:
                kwargs.update(structured_choice(request.labels))
            prepared.append(self._prompt(request, generation_prompt=True))
            params.append(self._params(kwargs))
            plans.append((plan, label_ids))
        outputs = self._run(prepared, params)
        results: list[Choice | RequestError] = []
        for request, out, plan in zip(requests, outputs, plans):
            if isinstance(out, RequestError):
                results.append(out)
                continue
            completion = out.outputs[0]
            labels = list(request.labels)
            if not completion.logprobs:
                text = completion.text.strip()
                if text not in labels:
                    results.append(RequestError("choice_unparseable", f"vLLM answered {text[:200]!r} and no logprobs"))
                    continue
                probs = {label: float(label == text) for label in labels}
            elif plan[0]["structured"]:
                probs = label_probs(labels, steps_from_vllm(completion.token_ids, completion.logprobs, self._decode))
            else:
                probs = first_token_probs(labels, [ids[0] for ids in plan[1]], completion.logprobs[0])
            best = max(range(len(labels)), key=lambda k: (probs[labels[k]], -k))
            results.append(Choice(label=labels[best], probs=probs, tokens_in=len(out.prompt_token_ids)))
        return results

    def loss(self, requests: Sequence[Loss]) -> list[LossValue | RequestError]:
        from recipec.models.multimodal import EncodeError, load_pil

        prepared, params, encoded = [], [], []
        for request in requests:
            prompt = self._prompt(request, generation_prompt=False)
            enc = None
            if not isinstance(prompt, RequestError):
                try:
                    enc = self.encoder.encode(request.messages, [load_pil(i) for i in request.images])
                except EncodeError as e:
                    prompt = RequestError(e.reason, e.detail)
            if enc is not None and not any(enc.assistant_mask):
                prompt = RequestError("no_answer", "the conversation has no assistant turn to score")
            prepared.append(prompt)
            params.append(self._params({"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 1}))
            encoded.append(enc)
        outputs = self._run(prepared, params)
        results: list[LossValue | RequestError] = []
        for out, enc in zip(outputs, encoded):
            if isinstance(out, RequestError):
                results.append(out)
                continue
            ids = list(out.prompt_token_ids)
            mask = align_mask(enc.input_ids, enc.assistant_mask, ids, self.image_ids)
            if mask is None:
                results.append(RequestError("loss_alignment", "vLLM's prompt tokens differ from the chat encoding "
                                                              "outside the image tokens"))
                continue
            try:
                mean, count = loss_from_prompt_logprobs(ids, out.prompt_logprobs, mask)
            except ValueError as e:
                results.append(RequestError("loss_unsupported", str(e)))
                continue
            results.append(LossValue(loss=mean, tokens=count, tokens_in=len(ids)))
        return results

    def close(self) -> None:
        self.llm = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # ---- helpers --------------------------------------------------------------------------------

    def _prompt(self, request: Any, generation_prompt: bool) -> dict[str, Any] | RequestError:
        from recipec.models.multimodal import EncodeError, load_pil

        problem = check_images(request)
        if problem is not None:
            return problem
        try:
            images = [load_pil(image) for image in request.images]
        except EncodeError as e:
            return RequestError(e.reason, e.detail)
        text = build_prompt(self.tokenizer, request.messages, self.placeholder, generation_prompt)
        prompt: dict[str, Any] = {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    def _params(self, kwargs: dict[str, Any]) -> Any:
        return self.vllm.SamplingParams(**kwargs)

    def _supports_token_ids(self) -> bool:
        if self._token_ids_supported is None:
            try:
                self.vllm.SamplingParams(max_tokens=1, logprob_token_ids=[0])
                self._token_ids_supported = True
            except TypeError:
                self._token_ids_supported = False
        return self._token_ids_supported

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """vLLM's outputs in order; a request vLLM refuses becomes its RequestError, not the batch's."""
        slots = [k for k, p in enumerate(prompts) if not isinstance(p, RequestError)]
        results: list[Any] = list(prompts)
        if not slots:
            return results
        batch = [prompts[k] for k in slots]
        try:
            outputs = self.llm.generate(batch, [params[k] for k in slots], use_tqdm=False)
        except (ValueError, TypeError) as e:
            if len(slots) == 1:
                results[slots[0]] = RequestError("vllm_rejected", f"{type(e).__name__}: {e}")
                return results
            log.info("vLLM refused a batch of %d (%s); asking one by one", len(slots), e)
            for k in slots:
                results[k] = self._run([prompts[k]], [params[k]])[0]
            return results
        except Exception as e:
            raise EngineError(f"vLLM failed: {type(e).__name__}: {e}") from e
        for k, out in zip(slots, outputs):
            results[k] = out
        return results


# ---- pure helpers (tested without vLLM) ---------------------------------------------------------------


def image_placeholder(config: Any, tokenizer: Any) -> str:
    """What vLLM expects in the prompt for one image of this model family (it expands it itself)."""
    model_type = getattr(config, "model_type", "")
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return "".join(tokenizer.convert_ids_to_tokens([config.vision_start_token_id, config.image_token_id,
                                                        config.vision_end_token_id]))
    index = getattr(config, "image_token_id", None)
    if index is None:
        index = getattr(config, "image_token_index", None)
    if index is not None:
        return tokenizer.convert_ids_to_tokens(index)
    return IMAGE_PLACEHOLDER


def build_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], placeholder: str, generation_prompt: bool) -> str:
    """The conversation through the model's chat template, each `<image>` as the family's placeholder."""
    rendered = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, placeholder)} for m in messages]
    return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=generation_prompt)


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_tokens": sampling.max_new_tokens, "seed": sampling.seed}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(temperature=0.0, top_p=1.0)  # greedy
    return kwargs


def structured_choice(labels: Sequence[str]) -> dict[str, Any]:
    """The SamplingParams keyword that constrains the output to one of `labels`, as this vLLM names it."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # newer vLLM (guided_decoding was removed in 0.12)
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams  # older vLLM

        return {"guided_decoding": GuidedDecodingParams(choice=list(labels))}
    return {"structured_outputs": StructuredOutputsParams(choice=list(labels))}


def choice_plan(label_ids: Sequence[Sequence[int]], eos_ids: Sequence[int], token_ids_supported: bool) -> dict[str, Any]:
    """How to ask for a choice: one step over distinct first tokens, or a constrained generation."""
    firsts = [ids[0] if ids else None for ids in label_ids]
    if token_ids_supported and None not in firsts and len(set(firsts)) == len(firsts) \
            and len(firsts) <= MAX_LOGPROB_TOKEN_IDS:
        return {"structured": False, "max_tokens": 1, "logprob_token_ids": sorted(set(firsts))}
    every = sorted({t for ids in label_ids for t in ids} | set(eos_ids))
    listed = every if token_ids_supported and len(every) <= MAX_LOGPROB_TOKEN_IDS else None
    return {"structured": True, "max_tokens": 1 + max(len(ids) for ids in label_ids), "logprob_token_ids": listed}


def steps_from_vllm(token_ids: Sequence[int], logprobs: Sequence[Any], decode: Callable[[Sequence[int]], str]) -> list[Step]:
    """vLLM's per-token logprobs (dicts id -> Logprob) as text steps for `label_probs`.

    Each token's text is what it adds to the decoded prefix, so tokenisers that mark spaces inside
    tokens (SentencePiece) give the same text as byte-level BPE.
    """
    steps = []
    prefix: list[int] = []
    prefix_text = ""
    for token, row in zip(token_ids, logprobs):
        def piece(t: int) -> str:
            text = decode(prefix + [t])
            return text[len(prefix_text):] if text.startswith(prefix_text) else text
        top: dict[str, float] = {}
        for alt, entry in (row or {}).items():
            text = piece(alt)
            top[text] = max(logprob_value(entry), top.get(text, -math.inf))
        own = piece(token)
        lp = logprob_value(row[token]) if row and token in row else top.get(own, math.log(FLOOR))
        top.setdefault(own, lp)
        steps.append(Step(own, lp, top))
        prefix.append(token)
        prefix_text = decode(prefix)
    return steps


