"""The in-process transformers engine: CPU for tests and the quickstart, GPU in bf16.

Generation is batched: requests are sorted by prompt length and cut into batches of
`batch_size`, left-padded, and generated together with the KV cache and SDPA attention. A batch's
sampling seed derives from its requests, so the same requests give the same texts whatever else
ran. `choose` scores every label as a continuation of the prompt (teacher-forced, one batched
forward) and normalises over the labels: the probabilities a constrained decoder would give.
`loss` is the mean token loss over the assistant tokens, batched by length.

Weights load from safetensors only (`use_safetensors=True`), offline, with `trust_remote_code`
only when the recipe says so for that model.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from recipec.models.engine import (Choice, Choose, EngineError, Generate, Generation, Loss, LossValue, RequestError,
                                   check_images)
from recipec.models.multimodal import EncodeError, Encoder, image_adapter, load_pil

log = logging.getLogger("recipec.models")

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def resolve_model_dir(model_use: dict[str, Any], *, models_dir: Path | None, base_dir: Path | None = None) -> tuple[Path, str]:
    """(local directory of the model's files, its identity), without touching the network.

    `tiny://` builds the model under `models_dir`; a path is used as it is; a hub id comes from the
    Hugging Face cache (at the pinned revision, if the recipe pins one). The identity is the ref
    with the revision or the snapshot's commit, or a digest of the weights for a local directory.
    """
    from recipec.models import tiny

    ref = model_use["ref"]
    if tiny.is_tiny(ref):
        path = tiny.materialize(ref, models_dir)
        return path, f"{ref}@sha256:{weights_digest(path)}"
    local = Path(ref).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.is_dir():
        return local, f"{ref}@sha256:{weights_digest(local)}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise EngineError(f"cannot look up {ref!r} in the Hugging Face cache: {e}") from e
    try:
        # weights as safetensors, configs and tokenizer files; a model's code only when it may run
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        if model_use.get("trust_remote_code"):
            patterns.append("*.py")
        path = Path(snapshot_download(ref, revision=model_use.get("revision"), local_files_only=True,
                                      allow_patterns=patterns))
    except Exception as e:
        pinned = f" at revision {model_use['revision']!r}" if model_use.get("revision") else ""
        raise EngineError(f"model {ref!r}{pinned} is neither a local directory nor in the Hugging Face cache "
                          f"(offline; download it first, or point `ref` at a local directory)") from e
    return path, f"{ref}@{path.name}"


def weights_digest(folder: Path) -> str:
    """sha256 over the safetensors files of a folder (names and bytes), in name order."""
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{folder} holds no *.safetensors weights (pickled weights are never loaded)")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def quiet_torch(threads: int | None, device: str | None) -> tuple[Any, str]:
    """torch, and the device to use: transformers' progress bars and chatter off, threads set."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    return torch, device or ("cuda" if torch.cuda.is_available() else "cpu")


class TransformersEngine:
    def __init__(self, model_dir: Path, identity: str, *, dtype: str = "bfloat16", device: str | None = None,
                 trust_remote_code: bool = False, batch_size: int | None = None, max_length: int | None = None,
                 threads: int | None = None):
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        torch, self.device = quiet_torch(threads, device)
        self.torch = torch
        self.identity = identity
        # bf16 on a GPU; on a CPU float32, which is both faster there and exact for tests
        self.dtype = getattr(torch, DTYPES.get(dtype, "bfloat16")) if self.device != "cpu" else torch.float32
        self.batch_size = batch_size or (32 if self.device != "cpu" else 8)
        self.chunk_size = 2 * self.batch_size  # requests per call the ops make (and the cache keeps)
        self.forward_tokens = 65536 if self.device != "cpu" else 4096  # padded tokens per scoring forward
        try:
            self.config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            model_class = self._model_class(transformers)
            self.model = model_class.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, attn_implementation="sdpa")
        except (OSError, ValueError, KeyError) as e:
            raise EngineError(f"cannot load the model in {model_dir}: {e}") from e
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        self.encoder = Encoder(self.tokenizer, image_adapter(model_dir, self.model.config, self.tokenizer), max_length)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.tokenizer.eos_token_id)

    def _model_class(self, transformers: Any) -> Any:
        kind = self.config.model_type
        if kind == "llava_onevision":
            return transformers.LlavaOnevisionForConditionalGeneration
        if kind == "qwen2_vl":
            return transformers.Qwen2VLForConditionalGeneration
        if kind == "qwen2_5_vl":
            return transformers.Qwen2_5_VLForConditionalGeneration
        if hasattr(self.config, "vision_config"):
            return transformers.AutoModelForImageTextToText
        return transformers.AutoModelForCausalLM

    # ---- encoding -------------------------------------------------------------------------------

    def _encode(self, request: Any, generation_prompt: bool):
        problem = check_images(request)
        if problem is not None:
            return problem
        try:
            images = [load_pil(image) for image in request.images]
            return self.encoder.encode(request.messages, images, generation_prompt=generation_prompt)
        except EncodeError as e:
            return RequestError(e.reason, e.detail)

    def _batches(self, encoded: list[tuple[int, Any]], token_budget: int | None = None) -> list[list[tuple[int, Any]]]:
        """Cut (index, encoded) pairs into batches of similar length (little padding).

        Generation batches hold `batch_size` requests (the KV cache grows with them); a forward
        pass without generation (choices, loss) fills a padded-token budget instead."""
        ordered = sorted(encoded, key=lambda pair: (len(pair[1].input_ids), pair[0]))
        if token_budget is None:
            return [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        batches: list[list[tuple[int, Any]]] = []
        for pair in ordered:  # ascending length: the newest member is the longest
            if batches and (len(batches[-1]) + 1) * len(pair[1].input_ids) <= token_budget:
                batches[-1].append(pair)
            else:
                batches.append([pair])
        return batches

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in batch.items():
            if hasattr(value, "to"):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    # ---- the interface --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Generate]) -> list[Generation | RequestError]:
        torch = self.torch
        results: list[Any] = [None] * len(requests)
        encoded = []
        for index, request in enumerate(requests):
            e = self._encode(request, generation_prompt=True)
            if isinstance(e, RequestError):
                results[index] = e
            else:
                encoded.append((index, e))
        # requests with the same sampling settings generate together
        groups: dict[Any, list] = {}
        for index, e in encoded:
            groups.setdefault(requests[index].sampling, []).append((index, e))
        for sampling, members in groups.items():
            for batch in self._batches(members):
                inputs = self._to_device(self.encoder.collate([e for _, e in batch], padding_side="left"))
                width = inputs["input_ids"].shape[1]
                kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                                          "eos_token_id": sorted(i for i in self.eos_ids if i is not None)}
                if sampling.temperature > 0:
                    kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
                    torch.manual_seed(_batch_seed(sampling.seed, [requests[i] for i, _ in batch]))
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with torch.inference_mode():
                    output = self.model.generate(**inputs, **kwargs)
                for row, (index, e) in enumerate(batch):
                    new = output[row, width:].tolist()
                    ended = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
                    tokens = new if ended is None else new[:ended]
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    results[index] = Generation(text=text, finish_reason="length" if ended is None else "stop",
                                                tokens_in=len(e.input_ids), tokens_out=len(tokens) + (ended is not None))
        return results

    def choose(self, requests: Sequence[Choose]) -> list[Choice | RequestError]:
        """Each label's log-probability as the assistant's reply, normalised over the labels."""
        results: list[Any] = [None] * len(requests)
        rows = []  # (request index, label index, encoded prompt+label, label token count)
        for index, request in enumerate(requests):
            if not request.labels:
                results[index] = RequestError("no_labels", "a choice among no labels")
                continue
            prompt = self._encode(request, generation_prompt=True)
            if isinstance(prompt, RequestError):
                results[index] = prompt
                continue
            for k, label in enumerate(request.labels):
                # the label and the end of the turn: "1" must not win for being a prefix of "10"
                label_ids = self.tokenizer(label, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                full = type(prompt)(prompt.input_ids + label_ids, [False] * len(prompt.input_ids) + [True] * len(label_ids),
                                    prompt.vision, prompt.image_tokens)
                rows.append((index, k, full, len(prompt.input_ids)))
        scores = self._sequence_logprobs([(i, r[2]) for i, r in enumerate(rows)])
        per_request: dict[int, list[float]] = {}
        for (index, k, full, prompt_len), score in zip(rows, scores):
            per_request.setdefault(index, [0.0] * len(requests[index].labels))[k] = score
        for index, logps in per_request.items():
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            total = sum(weights)
            labels = requests[index].labels
            probs = {label: w / total for label, w in zip(labels, weights)}
            best = max(range(len(labels)), key=lambda k: (logps[k], -k))
            prompt_len = next(r[3] for r in rows if r[0] == index)
            results[index] = Choice(label=labels[best], probs=probs, tokens_in=prompt_len)
        return results

    def loss(self, requests: Sequence[Loss]) -> list[LossValue | RequestError]:
        results: list[Any] = [None] * len(requests)
        encoded = []
        for index, request in enumerate(requests):
            e = self._encode(request, generation_prompt=False)
            if isinstance(e, RequestError):
                results[index] = e
            elif not any(e.assistant_mask):
                results[index] = RequestError("no_answer", "the conversation has no assistant turn to score")
            else:
                encoded.append((index, e))
        sums = self._sequence_logprobs(encoded, mean=True)
        for (index, e), (mean_nll, count) in zip(encoded, sums):
            results[index] = LossValue(loss=mean_nll, tokens=count, tokens_in=len(e.input_ids))
        return results

    def _sequence_logprobs(self, encoded: list[tuple[int, Any]], mean: bool = False) -> list[Any]:
        """Per sequence: the summed log-probability of its masked tokens, or (mean NLL, count)."""
        torch = self.torch
        out: list[Any] = [None] * len(encoded)
        position = {id(e): k for k, (_, e) in enumerate(encoded)}
        for batch in self._batches(encoded, token_budget=self.forward_tokens):
            inputs = self._to_device(self.encoder.collate([e for _, e in batch], padding_side="right", labels=True))
            labels = inputs.pop("labels")
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:]
            valid = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
            totals = picked.sum(dim=1).tolist()
            counts = valid.sum(dim=1).tolist()
            for row, (_, e) in enumerate(batch):
                k = position[id(e)]
                out[k] = (-totals[row] / counts[row], int(counts[row])) if mean else totals[row]
        return out

    def close(self) -> None:
        self.model = None
        if self.device != "cpu":
            self.torch.cuda.empty_cache()


def _batch_seed(seed: int, requests: Sequence[Any]) -> int:
    from recipec.models.engine import request_payload

    digest = hashlib.sha256(str(seed).encode())
    for request in requests:
        digest.update(repr(request_payload(request)).encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)

