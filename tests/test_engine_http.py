"""The OpenAI-compatible HTTP engine against a real local server, with faults injected."""

from __future__ import annotations

import hashlib
import logging
import math
import socket

import pytest

from engine_server import EngineBackend, EngineServer, FakeBackend, fake_logprob
from recipec.models.engine import Choice, Choose, EngineError, Generate, Generation, Image, Loss, LossValue, RequestError, Sampling
from recipec.models.logprobs import Step, label_probs, loss_from_prompt_logprobs
from recipec.models.openai_engine import OpenAIEngine, Settings, load

KEY = "sk-test-0123456789abcdef"
# short waits, but a timeout well above what a loaded machine takes to answer (slow faults take 1 s)
FAST = Settings(max_concurrency=4, timeout=0.6, max_retries=3, backoff_base=0.001, backoff_max=0.005,
                retry_after_max=0.1)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("RECIPEC_TEST_API_KEY", KEY)
    return "RECIPEC_TEST_API_KEY"


@pytest.fixture
def server():
    with EngineServer(FakeBackend()) as s:
        yield s


@pytest.fixture(scope="module")
def tiny_dir():
    from recipec.models import tiny

    # built deterministically and kept by its digest: the shared model cache serves every run
    return tiny.materialize("tiny://llava-onevision", tiny.default_cache())


def engine(server, key=None, **settings):
    s = Settings(**{**FAST.__dict__, **settings})
    return OpenAIEngine("test-model", server.url, revision="r1", api_key_env=key, settings=s)


def ask(text, max_new_tokens=32):
    return Generate(({"role": "user", "content": text},), sampling=Sampling(max_new_tokens=max_new_tokens))


def image(tmp_path, name, color):
    from PIL import Image as PILImage

    path = tmp_path / f"{name}.png"
    PILImage.new("RGB", (32, 24), color).save(path)
    return Image(str(path), hashlib.sha256(path.read_bytes()).hexdigest())


# ---- generate -----------------------------------------------------------------------------------


def test_generate_answers_every_request_once_in_order(server, key):
    requests = [ask(f"question {i}") for i in range(6)] + [ask("a long question of many words", max_new_tokens=3)]
    e = engine(server, key)
    results = e.generate(requests)
    fake = FakeBackend()
    assert results == [fake.generate(r) for r in requests]
    assert results[-1].finish_reason == "length"
    assert server.count == {"/v1/chat/completions": 7}
    assert server.authorizations == [f"Bearer {KEY}"] * 7
    body = server.bodies[0]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == ("test-model", 32, 0.0, 1.0, 0)
    e.close()


def test_images_travel_as_data_urls_where_their_placeholders_stand(server, tmp_path):
    red, blue = image(tmp_path, "red", "red"), image(tmp_path, "blue", "blue")
    request = Generate(({"role": "system", "content": "be brief"},
                        {"role": "user", "content": "<image> left, <image> right?"}), images=(red, blue))
    [result] = engine(server).generate([request])
    assert isinstance(result, Generation) and result.text.startswith("seen 2 image(s)")
    parts = server.bodies[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert server.bodies[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert server.authorizations == [None]  # no key named, none sent


def test_image_problems_are_the_requests_own(server, tmp_path):
    red = image(tmp_path, "red", "red")
    changed = Image(red.path, "0" * 64)
    missing = Image(str(tmp_path / "gone.png"), "0" * 64)
    results = engine(server).generate([
        Generate(({"role": "user", "content": "<image>"},), images=(changed,)),
        Generate(({"role": "user", "content": "<image>"},), images=(missing,)),
        Generate(({"role": "user", "content": "no placeholder"},), images=(red,)),
    ])
    assert [r.reason for r in results] == ["image_changed", "image_unreadable", "image_placeholders"]
    assert server.total == 0


def test_transient_faults_are_retried_and_nothing_is_lost_or_counted_twice(server, key, caplog):
    faults = {"q-500": ["500", "503"], "q-slow": ["slow"], "q-trunc": ["truncate"], "q-garbage": ["garbage"],
              "q-drop": ["drop"], "q-429": ["429", "429"]}
    for needle, kinds in faults.items():
        server.inject(needle, kinds)
    requests = [ask(needle) for needle in faults] + [ask("q-clean")]
    caplog.set_level(logging.DEBUG)
    results = engine(server, key).generate(requests)
    assert results == [FakeBackend().generate(r) for r in requests]
    for needle, kinds in faults.items():
        assert server.by_needle[needle] == len(kinds) + 1, needle
    assert server.total == len(requests) + sum(len(k) for k in faults.values())
    assert KEY not in caplog.text


def test_retries_run_out_into_a_retryable_error(server):
    server.inject("q-down", ["503"] * 10)
    server.inject("q-slow", ["slow"] * 10)
    results = engine(server, max_retries=1).generate([ask("q-down"), ask("q-fine"), ask("q-slow")])
    assert isinstance(results[1], Generation)
    assert (results[0].reason, results[0].retryable) == ("http_503", True)
    assert "internal error (injected)" in results[0].detail and "2 attempts" in results[0].detail
    assert (results[2].reason, results[2].retryable) == ("timeout", True)
    assert server.by_needle["q-down"] == 2 and server.by_needle["q-slow"] == 2


def test_a_4xx_is_a_clear_error_and_never_retried(server, key):
    server.inject("q-bad", ["400"])
    e = engine(server, key)
    bad, good = e.generate([ask("q-bad"), ask("q-good")])
    assert isinstance(bad, RequestError) and (bad.reason, bad.retryable) == ("http_400", False)
    assert "bad request" in bad.detail
    assert KEY not in bad.detail and "<redacted>" in bad.detail  # the server echoed the header
    assert isinstance(good, Generation)
    assert server.by_needle["q-bad"] == 1 and server.total == 2


def test_a_refused_key_stops_the_engine_without_showing_it(server, key):
    server.inject("q", ["401"] * 5)
    e = engine(server, key)
    with pytest.raises(EngineError) as info:
        e.generate([ask("q one"), ask("q two")])
    assert "401" in str(info.value) and KEY not in str(info.value)
    assert server.total == 2


def test_a_refused_connection_is_an_engine_error_after_the_retries():
    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = OpenAIEngine("m", f"http://127.0.0.1:{port}", settings=FAST)
    with pytest.raises(EngineError, match="cannot be reached"):
        e.generate([ask("anyone?"), ask("hello?")])


def test_the_key_stays_out_of_identity_repr_logs_and_errors(server, key, caplog):
    caplog.set_level(logging.DEBUG)
    server.inject("q", ["500", "400"])
    e = engine(server, key)
    results = e.generate([ask("q")])
    assert e.identity == "openai:test-model@r1"
    for text in (e.identity, repr(e), str(e.__dict__), caplog.text, repr(results)):
        assert KEY not in text
    assert server.authorizations == [f"Bearer {KEY}"] * 2


def test_a_missing_key_variable_is_named_not_guessed(monkeypatch, server):
    monkeypatch.delenv("RECIPEC_NO_SUCH_KEY", raising=False)
    with pytest.raises(EngineError, match="RECIPEC_NO_SUCH_KEY"):
        load({"ref": "m", "engine": "openai", "endpoint": server.url, "api_key_env": "RECIPEC_NO_SUCH_KEY"},
             workers=1, models_dir=None)
    with pytest.raises(EngineError, match="endpoint"):
        load({"ref": "m", "engine": "openai"}, workers=1, models_dir=None)


def test_load_reads_the_model_use(server, key):
    e = load({"ref": "org/model", "revision": "abc", "engine": "openai", "endpoint": server.url.removesuffix("/v1"),
              "api_key_env": key}, workers=2, models_dir=None)
    assert e.identity == "openai:org/model@abc" and e.endpoint == server.url
    assert isinstance(e.generate([ask("hi")])[0], Generation)
    assert server.authorizations == [f"Bearer {KEY}"]


# ---- choose -------------------------------------------------------------------------------------


def choice(text, labels=("yes", "no")):
    return Choose(({"role": "user", "content": text},), tuple(labels))


def test_choose_derives_probabilities_from_logprobs(server):
    labels = [str(k) for k in range(1, 11)]
    requests = [choice(f"score {i}", labels) for i in range(4)]
    results = engine(server).choose(requests)
    for request, result in zip(requests, results):
        expected = FakeBackend().choose(request)
        assert result.label == expected.label
        assert sum(result.probs.values()) == pytest.approx(1)
        assert result.probs == pytest.approx(expected.probs, rel=1e-9)  # 10 labels, 20 listed: exact
    assert server.bodies[0]["structured_outputs"] == {"choice": labels}
    assert server.bodies[0]["logprobs"] is True and server.bodies[0]["top_logprobs"] == 20
    assert server.total == 4


def test_choose_falls_back_to_guided_choice_once(server):
    server.reject_fields = {"structured_outputs"}
    e = engine(server, max_concurrency=1)
    results = e.choose([choice(f"q{i}") for i in range(3)])
    assert all(isinstance(r, Choice) for r in results)
    assert server.total == 4  # one refusal, then three answers
    assert "guided_choice" in server.bodies[-1] and "structured_outputs" not in server.bodies[-1]


def test_choose_without_constraint_or_logprobs(server):
    server.reject_fields = {"structured_outputs", "guided_choice"}
    server.serve_logprobs = False
    [result] = engine(server, max_concurrency=1).choose([choice("q")])
    assert isinstance(result, RequestError) and result.reason == "choice_unparseable"
    assert server.total == 3


def test_choose_without_logprobs_gives_the_answered_label_all_the_mass(server):
    server.serve_logprobs = False
    request = choice("q", ("cat", "dog", "bird"))
    [result] = engine(server).choose([request])
    assert result.label == FakeBackend().choose(request).label
    assert result.probs[result.label] == 1 and sum(result.probs.values()) == 1


def test_label_probs_follow_shared_first_tokens():
    # digits tokenised one by one: "1" then "0"; the model said "10"
    steps = [Step("1", math.log(0.6), {"1": math.log(0.6), "2": math.log(0.3), "9": math.log(0.05)}),
             Step("0", math.log(0.5), {"0": math.log(0.5), "<|im_end|>": math.log(0.4), "5": math.log(0.1)})]
    probs = label_probs([str(k) for k in range(1, 11)], steps)
    raw = {"10": 0.6 * 0.5, "1": 0.6 * 0.4, "2": 0.3, "9": 0.05}
    total = sum(raw.values()) + 6 * 1e-6  # 3..8 unlisted
    for label in ("10", "1", "2", "9"):
        assert probs[label] == pytest.approx(raw[label] / total)
    assert probs["5"] == pytest.approx(1e-6 / total)  # not listed: the floor
    assert max(probs, key=probs.get) == "10"


def test_label_probs_share_a_token_two_labels_leave_by():
    steps = [Step("yes", math.log(0.7), {"yes": math.log(0.7), "n": math.log(0.2)})]
    probs = label_probs(["yes", "no", "never"], steps)
    assert probs["no"] == pytest.approx(probs["never"]) and probs["yes"] == pytest.approx(0.7 / 0.9)


# ---- loss ---------------------------------------------------------------------------------------


def conversation(answer="red circle"):
    return Loss(({"role": "user", "content": "what is it?"}, {"role": "assistant", "content": answer}))


def test_loss_scores_the_assistant_tokens_from_prompt_logprobs(server, tiny_dir):
    from transformers import AutoTokenizer

    from recipec.models.multimodal import Encoder

    e = engine(server, tokenizer_dir=str(tiny_dir))
    requests = [conversation(), conversation("two blue squares")]
    results = e.loss(requests)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for request, result in zip(requests, results):
        encoded = Encoder(tok, None).encode(request.messages)
        rows = FakeBackend().prompt_logprobs(encoded.input_ids)
        scored = [rows[i][t] for i, (t, m) in enumerate(zip(encoded.input_ids, encoded.assistant_mask)) if m]
        assert isinstance(result, LossValue)
        assert result.loss == pytest.approx(-sum(scored) / len(scored)) and result.tokens == len(scored)
    sent = {tuple(body["prompt"]) for body in server.bodies}
    assert sent == {tuple(Encoder(tok, None).encode(r.messages).input_ids) for r in requests}
    assert all(body["prompt_logprobs"] == 1 for body in server.bodies)
    assert server.count == {"/v1/completions": 2}


def test_loss_is_unsupported_without_a_tokenizer_or_server_support(server, tiny_dir, tmp_path):
    assert [r.reason for r in engine(server).loss([conversation()] * 2)] == ["loss_unsupported"] * 2
    uncached = OpenAIEngine("org/not-in-the-cache", server.url, settings=FAST).loss([conversation()])[0]
    assert uncached.reason == "loss_unsupported" and "tokenizer" in uncached.detail
    assert server.total == 0
    with_image = Loss(({"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "red"}),
                      images=(image(tmp_path, "red", "red"),))
    # this server's chat endpoint returns no prompt_logprobs (FakeBackend without an encoder)
    assert engine(server, tokenizer_dir=str(tiny_dir)).loss([with_image])[0].reason == "loss_unsupported"
    assert server.total == 1
    server.serve_prompt_logprobs = False
    results = engine(server, tokenizer_dir=str(tiny_dir), max_concurrency=1).loss([conversation()] * 3)
    assert [r.reason for r in results] == ["loss_unsupported"] * 3
    assert server.total == 2  # found out once, not asked again


def test_loss_with_images_goes_through_the_chat_endpoint(tiny_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from recipec.models.logprobs import align_mask
    from recipec.models.multimodal import Encoder, image_adapter, load_pil

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    encoder = Encoder(tok, image_adapter(tiny_dir, AutoConfig.from_pretrained(tiny_dir), tok))
    backend = FakeBackend(encoder, image_tokens=3)  # the server expands an image to 3 tokens, not as here
    request = Loss(({"role": "user", "content": "<image> what is it?"}, {"role": "assistant", "content": "a red square"}),
                   images=(image(tmp_path, "red", "red"),))
    with EngineServer(backend) as server:
        [result] = engine(server, tokenizer_dir=str(tiny_dir)).loss([request])
        body = server.bodies[0]
    assert server.count == {"/v1/chat/completions": 1}
    assert body["add_generation_prompt"] is False and body["prompt_logprobs"] == 1
    assert body["messages"][0]["content"][0]["type"] == "image_url"
    encoded = encoder.encode(request.messages, [load_pil(request.images[0])])
    ids = backend.chat_ids(request.messages, request.images)
    mask = align_mask(encoded.input_ids, encoded.assistant_mask, ids, {tok.convert_tokens_to_ids("<image>")})
    scored = [fake_logprob(i, t) for i, (t, m) in enumerate(zip(ids, mask)) if m]
    assert scored and isinstance(result, LossValue)
    assert result.tokens == len(scored) == sum(encoded.assistant_mask)
    assert result.loss == pytest.approx(-sum(scored) / len(scored))


def test_prompt_ids_are_read_back_from_ranked_rows():
    from recipec.models.logprobs import prompt_ids_from_rows

    rows = [None, {"7": {"logprob": -0.1, "rank": 1}}, {"9": {"logprob": -2.0, "rank": 4}, "3": {"logprob": -0.2, "rank": 1}}]
    assert prompt_ids_from_rows(rows, 5) == [5, 7, 9]
    with pytest.raises(ValueError):
        prompt_ids_from_rows([None, {"1": -0.1, "2": -0.5}], 5)


def test_loss_from_prompt_logprobs_reads_every_shape():
    class Logprob:  # vLLM's in-process objects
        def __init__(self, logprob):
            self.logprob = logprob

    ids = [5, 6, 7]
    mask = [False, True, True]
    assert loss_from_prompt_logprobs(ids, [None, {6: Logprob(-1.0)}, {7: Logprob(-3.0), 1: Logprob(-0.1)}], mask) == (2.0, 2)
    assert loss_from_prompt_logprobs(ids, [None, {"6": {"logprob": -1.0}}, {"7": -3.0}], mask) == (2.0, 2)
    with pytest.raises(ValueError):
        loss_from_prompt_logprobs(ids, [None, {9: -1.0}, {7: -3.0}], mask)
    with pytest.raises(ValueError):
        loss_from_prompt_logprobs(ids, [None, {6: -1.0}], mask)


# ---- the real transformers engine behind the server ---------------------------------------------


def test_the_real_engine_answers_the_same_through_http(tiny_dir, tmp_path):
    from recipec.models.transformers_engine import TransformersEngine

    local = TransformersEngine(tiny_dir, "tiny", dtype="float32", threads=1)
    picture = image(tmp_path, "red", "red")
    gen = Generate(({"role": "user", "content": "<image> what color?"},), images=(picture,),
                   sampling=Sampling(max_new_tokens=6))
    pick = Choose(({"role": "user", "content": "<image> is it red?"},), ("yes", "no", "maybe"), images=(picture,))
    scored = Loss(({"role": "user", "content": "<image> what color?"}, {"role": "assistant", "content": "red"}),
                  images=(picture,))
    with EngineServer(EngineBackend(local)) as server:
        e = OpenAIEngine("tiny://llava-onevision", server.url, settings=Settings(**{**FAST.__dict__, "timeout": 30.0}))
        [remote_gen] = e.generate([gen])
        [remote_pick] = e.choose([pick])
        [remote_loss] = OpenAIEngine("tiny://llava-onevision", server.url, settings=Settings(
            **{**FAST.__dict__, "timeout": 30.0, "tokenizer_dir": str(tiny_dir)})).loss([scored])
    [local_gen] = local.generate([gen])
    [local_pick] = local.choose([pick])
    [local_loss] = local.loss([scored])
    assert isinstance(remote_loss, LossValue) and remote_loss.tokens == local_loss.tokens
    assert remote_loss.loss == pytest.approx(local_loss.loss, rel=1e-5)
    assert remote_gen.text == local_gen.text and remote_gen.finish_reason == local_gen.finish_reason
    assert remote_pick.label == local_pick.label
    assert remote_pick.probs == pytest.approx(local_pick.probs, rel=1e-6)
    local.close()


# ---- the recipe names the variable, never the key -----------------------------------------------


def test_a_recipe_names_the_key_variable(tmp_path):
    from recipec.compiler import compile_file
    from recipec.ir import canonical_json

    def compiled(value):
        path = tmp_path / "t.recipe"
        path.write_text('recipe "t" {}\nmodel tagger {\n  ref = "gpt-4o"\n  engine = openai\n'
                        f'  endpoint = "https://api.example.com/v1"\n  api_key_env = "{value}"\n}}\n', encoding="utf-8")
        return compile_file(str(path))

    good = compiled("OPENAI_API_KEY")
    assert good.ok, [d.header() for d in good.diagnostics]
    use = good.recipe.model_refs["tagger"]
    assert use.api_key_env == "OPENAI_API_KEY" and '"api_key_env":"OPENAI_API_KEY"' in canonical_json(use)
    bad = compiled("sk-live-abc123")
    assert [d.code for d in bad.diagnostics if d.is_error] == ["E201"]
    assert "environment variable" in bad.diagnostics[0].message
    from recipec.ir import ModelUse

    assert "api_key_env" not in canonical_json(ModelUse(ref="m"))  # unset: fingerprints as before


def test_concurrency_is_bounded():
    with EngineServer(FakeBackend(), delay=0.03) as server:
        results = OpenAIEngine("m", server.url, settings=Settings(**{**FAST.__dict__, "max_concurrency": 3})).generate(
            [ask(f"q{i}") for i in range(12)])
    assert all(isinstance(r, Generation) for r in results) and server.total == 12
    assert 1 <= server.most_in_flight <= 3


def test_backoff_grows_with_jitter_and_429_waits_its_retry_after(server):
    waits: list[float] = []
    settings = Settings(**{**FAST.__dict__, "backoff_base": 0.01, "backoff_max": 0.03, "retry_after_max": 0.2,
                           "max_concurrency": 1})
    e = OpenAIEngine("m", server.url, settings=settings, sleep=waits.append)
    server.inject("q-5xx", ["503", "503", "503"])
    assert isinstance(e.generate([ask("q-5xx")])[0], Generation)
    assert len(waits) == 3 and all(0 <= w <= bound for w, bound in zip(waits, (0.01, 0.02, 0.03)))
    waits.clear()
    server.retry_after = 0.15
    server.inject("q-429", ["429"])
    assert isinstance(e.generate([ask("q-429")])[0], Generation)
    assert waits == [pytest.approx(0.15)]
    waits.clear()
    server.retry_after = 3600  # a server asking for an hour gets the configured most
    server.inject("q-hour", ["429"])
    e.generate([ask("q-hour")])
    assert waits == [pytest.approx(0.2)]


def test_a_wrong_path_stops_the_engine(server):
    with pytest.raises(EngineError, match="404"):
        OpenAIEngine("m", server.url + "/nowhere", settings=FAST).generate([ask("q")])


def test_close_closes_the_connections_and_the_engine_still_works_after(server):
    e = engine(server)
    e.generate([ask(f"q{i}") for i in range(8)])
    assert e._connections
    e.close()
    assert not e._connections
    assert isinstance(e.generate([ask("again")])[0], Generation)
    e.close()
