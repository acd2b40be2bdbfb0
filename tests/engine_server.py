"""A small OpenAI-compatible server for tests, over a real in-process engine or a fake one.

`EngineServer(backend)` listens on 127.0.0.1 at a random port (`ThreadingHTTPServer`) and answers
`/v1/chat/completions` (generation; a choice when the body carries `structured_outputs` or
`guided_choice`; the prompt's logprobs with vLLM's `prompt_logprobs`) and `/v1/completions`
(`prompt_logprobs` over token-id prompts). The backend is anything with `generate(Generate)`,
`choose(Choose)`, `prompt_logprobs(ids)` and `chat_prompt_logprobs(messages, images)`:
`FakeBackend` (deterministic, instant) or `EngineBackend` (the transformers engine over a tiny
model). Images arrive as data URLs and go to the backend as `Image`s again.

Faults are injected per request: `server.inject("needle", ["500", "slow", ...])` gives each
attempt of a request whose body contains "needle" the next fault of the list, then normal
answers. Kinds: "500"/"503" (a 5xx), "slow" (answers after `slow_seconds`), "truncate" (a
Content-Length longer than the body, then the connection closes), "garbage" (200 with a body that
is not JSON), "drop" (closes the connection without an answer), "429" (Retry-After:
`retry_after`), "400" (a 400 with a message that quotes the request's Authorization header, to
check the client scrubs it), "401". `reject_fields` makes the server refuse those body fields
with a 400 naming them. The server counts every request it received (`count`, `by_needle`) and
keeps the Authorization headers it saw.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import socket
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from recipec.models.engine import (IMAGE_PLACEHOLDER, Choice, Choose, Generate, Generation, Image, RequestError,
                                   Sampling)


def fake_logprob(i: int, token: int) -> float:
    return -((i * 31 + token) % 50) / 10 - 0.05


class FakeBackend:
    """Deterministic answers from the request's text: no model, no time.

    With an `encoder` (the model's chat encoding) it also scores chat prompts, expanding each
    image to `image_tokens` tokens, as another server's image arithmetic might.
    """

    def __init__(self, encoder: Any = None, image_tokens: int = 3):
        self.encoder = encoder
        self.image_tokens = image_tokens

    def chat_ids(self, messages, images) -> list[int]:
        from recipec.models.multimodal import load_pil

        encoded = self.encoder.encode(messages, [load_pil(i) for i in images])
        image = self.encoder.tokenizer.convert_tokens_to_ids("<image>")
        out: list[int] = []
        for k, t in enumerate(encoded.input_ids):
            if t != image:
                out.append(t)
            elif k == 0 or encoded.input_ids[k - 1] != image:  # a new run of image tokens
                out.extend([t] * self.image_tokens)
        return out

    def chat_prompt_logprobs(self, messages, images) -> list[dict[int, tuple[float, int]] | None] | None:
        if self.encoder is None:
            return None
        ids = self.chat_ids(messages, images)
        return [None] + [{t: (fake_logprob(i, t), 1)} for i, t in enumerate(ids[1:], start=1)]

    def generate(self, request: Generate) -> Generation | RequestError:
        user = [m["content"] for m in request.messages if m["role"] == "user"][-1]
        words = f"seen {len(request.images)} image(s): {user}".split()
        limit = request.sampling.max_new_tokens
        text = " ".join(words[:limit])
        return Generation(text, "length" if len(words) > limit else "stop",
                          tokens_in=sum(len(m["content"].split()) for m in request.messages), tokens_out=min(len(words), limit))

    def choose(self, request: Choose) -> Choice | RequestError:
        text = " ".join(m["content"] for m in request.messages)
        weights = [1 + int(hashlib.sha256(f"{text}|{label}".encode()).hexdigest()[:4], 16) % 97 for label in request.labels]
        total = sum(weights)
        probs = {label: w / total for label, w in zip(request.labels, weights)}
        best = max(request.labels, key=lambda label: probs[label])
        return Choice(best, probs, tokens_in=len(text.split()))

    def prompt_logprobs(self, ids: list[int]) -> list[dict[int, float] | None]:
        return [None] + [{t: fake_logprob(i, t)} for i, t in enumerate(ids[1:], start=1)]


class EngineBackend:
    """The transformers engine behind the server: generation and choices as the engine gives them."""

    def __init__(self, engine: Any):
        self.engine = engine

    def generate(self, request: Generate):
        return self.engine.generate([request])[0]

    def choose(self, request: Choose):
        return self.engine.choose([request])[0]

    def prompt_logprobs(self, ids: list[int]) -> list[dict[int, float] | None]:
        torch = self.engine.torch
        with torch.inference_mode():
            logits = self.engine.model(input_ids=torch.tensor([ids], device=self.engine.device)).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        rows: list[dict[int, float] | None] = [None]
        for i, token in enumerate(ids[1:]):
            row = {token: float(logp[i, token])}
            best = int(logp[i].argmax())
            row.setdefault(best, float(logp[i, best]))
            rows.append(row)
        return rows

    def chat_prompt_logprobs(self, messages, images) -> list[dict[int, tuple[float, int]] | None] | None:
        from recipec.models.engine import Loss

        torch = self.engine.torch
        encoded = self.engine._encode(Loss(messages, images), generation_prompt=False)
        if isinstance(encoded, RequestError):
            return None
        inputs = self.engine._to_device(self.engine.encoder.collate([encoded], padding_side="right"))
        with torch.inference_mode():
            logits = self.engine.model(**inputs).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        rows: list[dict[int, tuple[float, int]] | None] = [None]
        for i, token in enumerate(encoded.input_ids[1:]):
            own = float(logp[i, token])
            row = {token: (own, int((logp[i] > logp[i, token]).sum()) + 1)}
            best = int(logp[i].argmax())
            row.setdefault(best, (float(logp[i, best]), 1))
            rows.append(row)
        return rows


class EngineServer:
    def __init__(self, backend: Any, *, slow_seconds: float = 1.0, retry_after: float = 0.05,
                 reject_fields: set[str] | None = None, prompt_logprobs: bool = True, logprobs: bool = True,
                 delay: float = 0.0):
        self.backend = backend
        self.delay = delay  # seconds every answer takes, to see requests overlap
        self.in_flight = 0
        self.most_in_flight = 0
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.reject_fields = set(reject_fields or ())
        self.serve_prompt_logprobs = prompt_logprobs
        self.serve_logprobs = logprobs
        self.count: Counter[str] = Counter()  # path -> requests received
        self.by_needle: Counter[str] = Counter()  # needle -> attempts received
        self.authorizations: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self._faults: list[tuple[str, list[Any]]] = []
        self._lock = threading.Lock()
        self._images = Path(tempfile.mkdtemp(prefix="engine-server-"))
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()  # headers and body go out in two writes: no Nagle delay between them
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:  # noqa: N802
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "EngineServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, needle: str, faults: list[Any]) -> None:
        with self._lock:
            self._faults.append((needle, list(faults)))

    @property
    def total(self) -> int:
        return sum(self.count.values())

    # ---- one request ----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        text = raw.decode("utf-8", errors="replace")
        fault = None
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self._answer(h, raw, text)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, h: BaseHTTPRequestHandler, raw: bytes, text: str) -> None:
        fault = None
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.count[h.path] += 1
            self.authorizations.append(h.headers.get("Authorization"))
            for needle, queue in self._faults:
                if needle in text:
                    self.by_needle[needle] += 1
                    if queue and fault is None:
                        fault = queue.pop(0)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(h, 400, {"error": {"message": "the body is not JSON"}})
        with self._lock:
            self.bodies.append(body)
        if fault is not None and self._fault(h, fault):
            return
        refused = sorted(self.reject_fields & set(body))
        if refused:
            return self._send(h, 400, {"error": {"message": f"Extra inputs are not permitted: {refused[0]}",
                                                 "type": "BadRequestError"}})
        if h.path == "/v1/chat/completions":
            return self._send(h, 200, self._chat(body))
        if h.path == "/v1/completions":
            return self._send(h, 200, self._completions(body))
        return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})

    def _fault(self, h: BaseHTTPRequestHandler, fault: str) -> bool:
        if fault in ("500", "503"):
            self._send(h, int(fault), {"error": {"message": "internal error (injected)"}})
        elif fault == "429":
            self._send(h, 429, {"error": {"message": "slow down"}}, {"Retry-After": f"{self.retry_after:g}"})
        elif fault == "400":
            self._send(h, 400, {"error": {"message": f"bad request; you sent {h.headers.get('Authorization')}"}})
        elif fault == "401":
            self._send(h, 401, {"error": {"message": "invalid api key"}})
        elif fault == "slow":
            time.sleep(self.slow_seconds)
            return False  # then answers, to a client that stopped waiting
        elif fault == "truncate":
            payload = json.dumps({"choices": [{"message": {"content": "x" * 50}}]}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload) + 100))
            h.end_headers()
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.close_connection = True
        elif fault == "garbage":
            payload = b'{"choices": [{"message": '
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        elif fault == "drop":
            h.close_connection = True
        else:
            raise ValueError(f"unknown fault {fault!r}")
        return True

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (a slow answer)
            h.close_connection = True

    # ---- the API --------------------------------------------------------------------------------

    def _request_parts(self, body: dict[str, Any]) -> tuple[tuple[dict[str, str], ...], tuple[Image, ...]]:
        messages, images = [], []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):
                text = ""
                for part in content:
                    if part["type"] == "text":
                        text += part["text"]
                    else:
                        url = part["image_url"]["url"]
                        raw = base64.b64decode(url.split(",", 1)[1])
                        digest = hashlib.sha256(raw).hexdigest()
                        path = self._images / f"{digest}.img"
                        path.write_bytes(raw)
                        images.append(Image(str(path), digest))
                        text += IMAGE_PLACEHOLDER
                content = text
            messages.append({"role": message["role"], "content": content})
        return tuple(messages), tuple(images)

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages, images = self._request_parts(body)
        if body.get("prompt_logprobs") is not None:  # vLLM's extension: score the prompt itself
            assert body.get("add_generation_prompt") is False
            rows = self.backend.chat_prompt_logprobs(messages, images) if self.serve_prompt_logprobs else None
            answer: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                                   "finish_reason": "length"}]}
            if rows is not None:
                answer["prompt_logprobs"] = [None if row is None else
                                             {str(t): {"logprob": lp, "rank": rank, "decoded_token": ""}
                                              for t, (lp, rank) in row.items()} for row in rows]
            return answer
        labels = (body.get("structured_outputs") or {}).get("choice") or body.get("guided_choice")
        if labels:
            result = self.backend.choose(Choose(messages, tuple(labels), images))
            if isinstance(result, RequestError):
                return {"choices": []}
            message = {"role": "assistant", "content": result.label}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            if body.get("logprobs") and self.serve_logprobs:
                ranked = sorted(result.probs.items(), key=lambda kv: -kv[1])[: body.get("top_logprobs") or 0]
                choice["logprobs"] = {"content": [{
                    "token": result.label, "logprob": math.log(result.probs[result.label]),
                    "top_logprobs": [{"token": label, "logprob": math.log(p)} for label, p in ranked]}]}
            return {"choices": [choice], "usage": {"prompt_tokens": result.tokens_in, "completion_tokens": 1}}
        sampling = Sampling(max_new_tokens=body.get("max_tokens") or 16, temperature=body.get("temperature") or 0.0,
                            top_p=body.get("top_p") or 1.0, seed=body.get("seed") or 0)
        result = self.backend.generate(Generate(messages, images, sampling))
        if isinstance(result, RequestError):
            return {"choices": []}
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason}
        if body.get("logprobs") and self.serve_logprobs:
            choice["logprobs"] = {"content": [{"token": result.text, "logprob": -0.1, "top_logprobs": []}]}
        return {"choices": [choice],
                "usage": {"prompt_tokens": result.tokens_in, "completion_tokens": result.tokens_out}}

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body["prompt"]
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
        if body.get("prompt_logprobs") is not None and self.serve_prompt_logprobs:
            rows = self.backend.prompt_logprobs(ids)
            choice["prompt_logprobs"] = [None if row is None else
                                         {str(t): {"logprob": lp, "rank": 1, "decoded_token": ""} for t, lp in row.items()}
                                         for row in rows]
        return {"choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": 1}}
