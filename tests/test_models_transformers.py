"""The transformers engine on tiny models of the real architectures: batching changes nothing,
choices are distributions over the labels, loss counts assistant tokens only, the cache sends
nothing twice."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image as PILImage  # noqa: E402

from recipec.models import tiny  # noqa: E402
from recipec.models.cache import CachedEngine, RequestCache  # noqa: E402
from recipec.models.engine import (Choice, Choose, Generate, Generation, Image, Loss, LossValue, RequestError,  # noqa: E402
                                   Sampling, Tag, TagScores)
from recipec.models.engines import load_engine  # noqa: E402
from recipec.models.multimodal import Encoder, image_adapter  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for k, (w, h) in enumerate([(70, 50), (40, 100), (64, 64)]):
        path = folder / f"{k}.png"
        PILImage.fromarray((np.random.RandomState(k).rand(h, w, 3) * 255).astype("uint8")).save(path)
        out.append(Image(str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out.append(Image(str(broken), hashlib.sha256(broken.read_bytes()).hexdigest()))
    return out


@pytest.fixture(scope="module")
def vlm(tiny_models):
    engine = load_engine({"ref": "tiny://llava-onevision"}, workers=1, models_dir=tiny_models)
    yield engine
    engine.close()


def ask(text, *imgs, tokens=16):
    return Generate(({"role": "user", "content": "<image>\n" * len(imgs) + text},), tuple(imgs), Sampling(tokens, 0.0))


def test_batched_generation_equals_one_request_at_a_time(vlm, images):
    requests = [ask("What is in the picture?", images[i % 3]) for i in range(5)] + [ask("Say something")]
    together = vlm.generate(requests)
    alone = [vlm.generate([r])[0] for r in requests]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(isinstance(g, Generation) and g.finish_reason in ("stop", "length") for g in together)
    assert together[0].tokens_in > together[5].tokens_in  # image tokens count as input


def test_generation_cut_at_max_tokens_says_so(vlm, images):
    [cut] = vlm.generate([ask("Describe the picture in detail", images[0], tokens=1)])
    assert cut.finish_reason == "length" and cut.tokens_out == 1


def test_bad_requests_become_errors_in_place(vlm, images):
    results = vlm.generate([ask("Fine", images[0]), ask("Broken image", images[3]),
                            Generate(({"role": "user", "content": "no placeholder"},), (images[0],))])
    assert isinstance(results[0], Generation)
    assert isinstance(results[1], RequestError) and results[1].reason == "image_refused"
    assert isinstance(results[2], RequestError) and results[2].reason == "image_placeholders"


def test_choose_is_a_distribution_over_the_given_labels(vlm, images):
    labels = tuple(str(n) for n in range(1, 11))
    [choice] = vlm.choose([Choose(({"role": "user", "content": "<image>\nRate it from 1 to 10."},), labels, (images[1],))])
    assert isinstance(choice, Choice)
    assert set(choice.probs) == set(labels) and choice.label in labels
    assert math.isclose(sum(choice.probs.values()), 1.0, rel_tol=1e-9)
    assert choice.probs[choice.label] == max(choice.probs.values())


def test_loss_is_the_mean_over_assistant_tokens_only(vlm, images, tiny_models):
    messages = ({"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A red square."})
    [value] = vlm.loss([Loss(messages, (images[2],))])
    assert isinstance(value, LossValue) and value.loss > 0
    # recompute by hand: the same encoder, one forward, cross-entropy over the masked tokens
    encoder = vlm.encoder
    encoded = encoder.encode(list(messages), [PILImage.open(images[2].path).convert("RGB")])
    assert value.tokens == sum(encoded.assistant_mask) == len(vlm.tokenizer("A red square.")["input_ids"]) + 1
    batch = encoder.collate([encoded], labels=True)
    with torch.no_grad():
        expected = vlm.model(**batch).loss.item()  # transformers' own shifted, masked mean
    assert value.loss == pytest.approx(expected, rel=1e-5)
    [none] = vlm.loss([Loss(({"role": "user", "content": "Hi"},))])
    assert isinstance(none, RequestError) and none.reason == "no_answer"


def test_qwen2_vl_scores_loss(tiny_models, images):
    engine = load_engine({"ref": "tiny://qwen2-vl"}, workers=1, models_dir=tiny_models)
    results = engine.loss([Loss(({"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Blue."}),
                                (images[0],)),
                           Loss(({"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "Yes."}))])
    assert all(isinstance(r, LossValue) and r.loss > 0 for r in results)


def test_siglip_tagger_scores_every_label(tiny_models, images):
    engine = load_engine({"ref": "tiny://siglip-tagger"}, workers=1, models_dir=tiny_models)
    labels = ("dog", "street", "red square")
    good, broken = engine.tag([Tag((images[0],), labels), Tag((images[3],), labels)])
    assert isinstance(good, TagScores) and len(good.scores) == 3 and all(0 <= p <= 1 for p in good.scores)
    assert isinstance(broken, RequestError) and broken.reason == "image_refused"


def test_ram_plus_is_refused_with_what_it_needs():
    from recipec.models.engine import EngineError

    with pytest.raises(EngineError, match="pickled weights.*safetensors"):
        load_engine({"ref": "xinyu1205/recognize-anything-plus-model"}, workers=1)


def test_a_model_missing_offline_is_a_clear_error(tmp_path):
    from recipec.models.engine import EngineError

    with pytest.raises(EngineError, match="neither a local directory nor in the Hugging Face cache"):
        load_engine({"ref": "nobody/no-such-model"}, workers=1, models_dir=tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path, tiny_models):
    source = tiny.materialize("tiny://qwen2", tiny_models)
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    from recipec.models.engine import EngineError

    with pytest.raises(EngineError, match="safetensors"):
        load_engine({"ref": str(folder)}, workers=1)


def test_tiny_builds_are_deterministic(tmp_path):
    a = tiny.materialize("tiny://siglip", tmp_path / "a", seed=3)
    b = tiny.materialize("tiny://siglip", tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert tiny.materialize("tiny://siglip", tmp_path / "a", seed=3) == a  # built once


def test_image_tokens_match_the_model_features(vlm, images):
    """The encoder's token count is exactly what the model fills, for every anyres budget."""
    for max_tiles in (1, 4, 9):
        encoder = Encoder(vlm.tokenizer, image_adapter(Path(vlm.model.name_or_path), vlm.model.config, vlm.tokenizer,
                                                       max_tiles=max_tiles))
        batch = [encoder.encode([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}],
                                [PILImage.open(img.path).convert("RGB")]) for img in images[:3]]
        with torch.no_grad():
            vlm.model(**encoder.collate(batch, labels=True))  # raises when tokens and features differ
    vlm.model.config.vision_aspect_ratio = "anyres_max_9"


class CountingEngine:
    identity = "counting@1"

    def __init__(self):
        self.sent = []

    def generate(self, requests):
        self.sent.extend(requests)
        return [Generation(f"answer {r.messages[0]['content']}", "stop", 3, 2) if "down" not in r.messages[0]["content"]
                else RequestError("http_503", "unavailable", retryable=True) for r in requests]


def test_the_request_cache_never_sends_a_finished_request_twice(tmp_path):
    inner = CountingEngine()
    engine = CachedEngine(inner, RequestCache(tmp_path / "requests.sqlite"))
    requests = [Generate(({"role": "user", "content": f"q{i}"},)) for i in range(4)] + \
               [Generate(({"role": "user", "content": "q0"},)), Generate(({"role": "user", "content": "down"},))]
    first = engine.generate(requests)
    assert len(inner.sent) == 5  # the duplicate is asked once
    again = CachedEngine(inner, RequestCache(tmp_path / "requests.sqlite"))  # a new run on the same store
    second = again.generate(requests)
    assert second == first
    assert len(inner.sent) == 6  # only the retryable failure is asked again
    assert again.counts.as_dict()["cached"] == 5 and again.counts.sent == 1
    other = CachedEngine(type("Other", (CountingEngine,), {"identity": "other@2"})(), RequestCache(tmp_path / "requests.sqlite"))
    other.generate(requests[:1])
    assert other.counts.sent == 1  # another model never answers from this one's cache


def test_a_hub_id_resolves_from_the_local_hf_cache_at_its_pinned_revision(tmp_path, tiny_models, monkeypatch):
    from recipec.models.engine import EngineError
    from recipec.models.transformers_engine import resolve_model_dir

    source = tiny.materialize("tiny://qwen2", tiny_models)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-chat" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny-chat" / "refs").mkdir()
    (cache / "models--acme--tiny-chat" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    path, identity = resolve_model_dir({"ref": "acme/tiny-chat"}, models_dir=None)
    assert path == snapshot and identity == f"acme/tiny-chat@{commit}"
    pinned, _ = resolve_model_dir({"ref": "acme/tiny-chat", "revision": commit}, models_dir=None)
    assert pinned == snapshot
    with pytest.raises(EngineError, match="at revision 'v2'"):
        resolve_model_dir({"ref": "acme/tiny-chat", "revision": "v2"}, models_dir=None)
    engine = load_engine({"ref": "acme/tiny-chat"}, workers=1)
    [answer] = engine.generate([Generate(({"role": "user", "content": "Hello"},), (), Sampling(8, 0.0))])
    assert isinstance(answer, Generation)


def test_a_1x1_grid_shows_the_base_tile_alone(vlm, images, tiny_models):
    """LLaVA's `square` mode: with only the [tile, tile] pinpoint, an image is its base tile and a
    newline, which is what plan counts (tokens per tile, + the newline HF adds)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from recipec.models.multimodal import LlavaOnevisionImages

    config = vlm.model.config
    saved = (config.image_grid_pinpoints, config.vision_aspect_ratio)
    tile = config.vision_config.image_size
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(tiny.materialize("tiny://llava-onevision", tiny_models))
    processor.image_grid_pinpoints = config.image_grid_pinpoints = [[tile, tile]]
    try:
        adapter = LlavaOnevisionImages(processor, config, vlm.tokenizer, max_tiles=1)
        encoder = Encoder(vlm.tokenizer, adapter)
        one = [encoder.encode([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}],
                              [PILImage.open(img.path).convert("RGB")]) for img in images[:3]]
        assert [e.image_tokens for e in one] == [(tile // config.vision_config.patch_size) ** 2 + 1] * 3
        with torch.no_grad():
            vlm.model(**encoder.collate(one, labels=True))  # raises when tokens and features differ
    finally:
        config.image_grid_pinpoints, config.vision_aspect_ratio = saved
