"""Zero-shot image tagging with SigLIP: a sigmoid probability per tag of a vocabulary.

SigLIP is trained with a per-pair sigmoid loss, so `sigmoid(logit_scale * cos + logit_bias)` is a
calibrated, independent probability for each (image, text) pair: multi-label tagging needs no
softmax over the vocabulary. Tag texts are embedded once per vocabulary ("a photo of {tag}.").

RAM++ (the Infinity-MM tagger) is not on PyPI and ships pickled weights, which recipec never loads;
`model = ram_plus` is refused with what it would take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from recipec.models.engine import EngineError, RequestError, Tag, TagScores
from recipec.models.multimodal import EncodeError, load_pil

PROMPT = "a photo of {}."


class SiglipTagger:
    def __init__(self, model_dir: Path, identity: str, *, device: str | None = None, batch_size: int = 32,
                 threads: int | None = None):
        from transformers import AutoTokenizer, SiglipModel
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        from recipec.models.transformers_engine import quiet_torch

        self.torch, self.device = quiet_torch(threads, device)
        self.identity = identity
        self.batch_size = batch_size
        try:
            self.model = SiglipModel.from_pretrained(model_dir, use_safetensors=True).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.processor = SiglipImageProcessorPil.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load the SigLIP tagger in {model_dir}: {e}") from e
        self._text: dict[tuple[str, ...], Any] = {}

    def _text_features(self, labels: tuple[str, ...]) -> Any:
        if labels not in self._text:
            torch = self.torch
            chunks = []
            for start in range(0, len(labels), 256):
                texts = [PROMPT.format(label) for label in labels[start:start + 256]]
                tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                        max_length=self.model.config.text_config.max_position_embeddings,
                                        return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    features = self.model.get_text_features(input_ids=tokens["input_ids"])
                features = getattr(features, "pooler_output", features)
                chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
            self._text = {labels: torch.cat(chunks)}  # one vocabulary at a time
        return self._text[labels]

    def tag(self, requests: Sequence[Tag]) -> list[TagScores | RequestError]:
        torch = self.torch
        results: list[Any] = [None] * len(requests)
        by_vocabulary: dict[tuple[str, ...], list[tuple[int, Any]]] = {}
        for index, request in enumerate(requests):
            if len(request.images) != 1:
                results[index] = RequestError("image_count", f"tagging takes one image, not {len(request.images)}")
                continue
            try:
                by_vocabulary.setdefault(request.labels, []).append((index, load_pil(request.images[0])))
            except EncodeError as e:
                results[index] = RequestError(e.reason, e.detail)
        scale = self.model.logit_scale.exp().float()
        bias = self.model.logit_bias.float()
        for labels, items in by_vocabulary.items():
            text = self._text_features(labels)
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                pixels = self.processor([img for _, img in batch], return_tensors="pt")["pixel_values"].to(self.device)
                with torch.inference_mode():
                    features = self.model.get_image_features(pixel_values=pixels)
                features = getattr(features, "pooler_output", features)
                image = torch.nn.functional.normalize(features.float(), dim=-1)
                probs = torch.sigmoid(image @ text.T * scale + bias)
                for row, (index, _) in enumerate(batch):
                    results[index] = TagScores(tuple(round(float(p), 6) for p in probs[row].tolist()))
        return results

    def close(self) -> None:
        self.model = None


def refuse_ram_plus(ref: str) -> EngineError:
    return EngineError(
        f"model {ref!r} is RAM++, which is not installable from PyPI and ships pickled weights that recipec "
        "never loads. Convert its weights to safetensors with its own code and a local tokenizer, or tag "
        "with a SigLIP model (`model = \"google/siglip-so400m-patch14-384\"`, or `tiny://siglip-tagger` to try it)")
