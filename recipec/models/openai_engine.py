"""An OpenAI-compatible HTTP client engine: `vllm serve`, SGLang, TGI, hosted APIs.

Only the standard library (`http.client`), so that choosing this engine installs nothing.

- Concurrency is bounded by a thread pool of `max_concurrency` workers; each keeps one
  keep-alive connection.
- Every attempt has a timeout. Connection errors, timeouts, truncated or unparseable bodies, 5xx,
  408 and 429 are retried with exponential backoff and full jitter (429 waits at least its
  `Retry-After`). A request that exhausts its retries comes back as a `RequestError` with
  `retryable=True` (kept out of the request cache, asked again on the next run); a batch in which
  no request ever reached the server raises `EngineError` (the server is down, not the requests).
- Any other 4xx is the request's own fault: `RequestError("http_<code>", <the server's message>)`,
  never retried. 401, 403 and 404 concern every request alike (a bad key, a wrong URL or model
  name), so they raise `EngineError` rather than fill the cache with rejects.
- The API key comes from the environment variable the recipe names (`api_key_env`), is sent as a
  `Bearer` header and is never printed, logged, put in an error or in `identity` (server messages
  are scrubbed of it too).

The three requests:

- `generate`: `/v1/chat/completions` (temperature, top_p, max_tokens, seed); images become
  base64 data-URL `image_url` parts where their `<image>` placeholders stand.
- `choose`: the same endpoint, greedy, few tokens, with `logprobs` and `top_logprobs=20` and the
  labels as a structured-output choice: `structured_outputs: {"choice": ...}` (vLLM >= 0.12),
  `guided_choice` (older vLLM) or none (other servers), whichever the server accepts: a 400 that
  names the field moves to the next, once per engine. Label probabilities come from the logprobs
  (`label_probs`); without logprobs the answered label gets probability 1.
- `loss`: vLLM's `prompt_logprobs` (with `max_tokens=1`), over the assistant tokens that
  `recipec.models.multimodal.Encoder`'s mask marks. A text conversation goes to `/v1/completions`
  as the token ids the model's chat template gives here, so the server scores exactly those
  tokens. A conversation with images goes to `/v1/chat/completions` (with
  `add_generation_prompt: false`); the server's prompt tokens are read back from the rows and the
  mask is carried over with each run of image tokens collapsed (`align_mask`). Both need the
  model's tokenizer (and, for images, its image processor) here: a `tokenizer_dir`, a `tiny://`
  ref, a local model folder as `ref`, or a hub id in the local Hugging Face cache; without one, or against a server that returns no
  `prompt_logprobs` (anything but vLLM), each request gets `RequestError("loss_unsupported", ...)`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from recipec.models.engine import (IMAGE_PLACEHOLDER, Choice, Choose, EngineError, Generate, Generation, Loss,
                                   LossValue, RequestError, check_images)
from recipec.models.logprobs import (TOP_LOGPROBS, Step, align_mask, image_token_ids, label_probs,
                                     loss_from_prompt_logprobs, prompt_ids_from_rows)

log = logging.getLogger("recipec.models.openai")

CHOICE_FIELDS = ("structured_outputs", "guided_choice", None)  # tried in this order
ENGINE_WIDE = {401, 403, 404}


@dataclass(frozen=True)
class Settings:
    max_concurrency: int = 16
    timeout: float = 120.0  # seconds for one attempt (connect, send, and each read)
    max_retries: int = 5  # attempts after the first
    backoff_base: float = 0.5  # seconds; attempt n waits uniform(0, min(backoff_max, base * 2**n))
    backoff_max: float = 30.0
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    tokenizer_dir: str | None = None  # for loss: the model's tokenizer and chat template


class _Secret:
    """A credential that no repr, str or traceback shows."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass(frozen=True)
class _Local:
    tokenizer: Any
    encoder: Any
    image_ids: set[int]


class _Unreachable(Exception):
    pass


class _EngineWide(Exception):
    pass


@dataclass(frozen=True)
class _Failure:
    """One attempt that went wrong in a way worth another try."""

    reason: str  # timeout, connection_error, bad_response, http_5xx, http_429
    detail: str
    connected: bool  # the request reached the server
    retry_after: float | None = None


def load(model_use: dict[str, Any], *, workers: int, models_dir: Any = None) -> "OpenAIEngine":
    """The engine for a recipe's `engine = openai` model (`endpoint`, `api_key_env`)."""
    endpoint = model_use.get("endpoint")
    if not endpoint:
        raise EngineError(f"model {model_use['ref']!r} has engine = openai but no `endpoint` "
                          '(e.g. endpoint = "http://127.0.0.1:8000/v1")')
    known = {f for f in Settings.__dataclass_fields__}
    settings = Settings(**{k: model_use[k] for k in known if model_use.get(k) is not None})
    return OpenAIEngine(model_use["ref"], endpoint, revision=model_use.get("revision"),
                        api_key_env=model_use.get("api_key_env"), settings=settings, models_dir=models_dir)


class OpenAIEngine:
    def __init__(self, model: str, endpoint: str, *, revision: str | None = None, api_key_env: str | None = None,
                 settings: Settings = Settings(), models_dir: Any = None,
                 sleep: Callable[[float], None] = time.sleep):
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EngineError(f"endpoint {self._safe_url(endpoint)!r} is not an http(s) URL")
        if parts.username or parts.password or parts.query:
            raise EngineError("the endpoint may not carry credentials or a query; name an environment "
                              "variable with `api_key_env` instead")
        self.model = model
        self.revision = revision
        self.settings = settings
        self.models_dir = models_dir
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        base = parts.path.rstrip("/")
        self._base = base if base.endswith("/v1") else base + "/v1"
        self.endpoint = f"{parts.scheme}://{parts.netloc}{self._base}"
        # the model's name and pinned revision: the same model behind another URL answers the same
        self.identity = f"openai:{model}" + (f"@{revision}" if revision else "")
        self._key: _Secret | None = None
        if api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise EngineError(f"the environment variable {api_key_env} (api_key_env) is not set")
            self._key = _Secret(value)
        self._sleep = sleep
        self._rng = random.Random()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._connections: set[http.client.HTTPConnection] = set()  # the workers' keep-alive connections
        self._choice_field = 0  # index into CHOICE_FIELDS
        self._loss_unsupported: str | None = None
        self._local_model: Any = None  # _Local, or False when there is none

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.model!r}, endpoint={self.endpoint!r})"

    @staticmethod
    def _safe_url(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"

    # ---- the interface --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Generate]) -> list[Generation | RequestError]:
        return self._batch(requests, self._generate_one)

    def choose(self, requests: Sequence[Choose]) -> list[Choice | RequestError]:
        return self._batch(requests, self._choose_one)

    def loss(self, requests: Sequence[Loss]) -> list[LossValue | RequestError]:
        return self._batch(requests, self._loss_one)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.close()

    def _batch(self, requests: Sequence[Any], one: Callable[[Any], Any]) -> list[Any]:
        if not requests:
            return []
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(1, self.settings.max_concurrency),
                                                thread_name_prefix="recipec-http")
            pool = self._pool
        futures = [pool.submit(self._guarded, one, request) for request in requests]
        results = [f.result() for f in futures]  # every request finishes before anything is raised
        fatal = next((r for r in results if isinstance(r, _EngineWide)), None)
        if fatal is not None:
            raise EngineError(str(fatal))
        if all(isinstance(r, _Unreachable) for r in results):
            raise EngineError(f"the server at {self.endpoint} cannot be reached: {results[0]}")
        return [RequestError("unreachable", str(r), retryable=True) if isinstance(r, _Unreachable) else r
                for r in results]

    def _guarded(self, one: Callable[[Any], Any], request: Any) -> Any:
        try:
            return one(request)
        except (_Unreachable, _EngineWide) as e:
            return e
        except Exception as e:  # a bug here must not lose the other requests of the batch
            log.exception("the HTTP engine failed on a request")
            return RequestError("engine_failure", self._scrub(f"{type(e).__name__}: {e}"))

    # ---- generate -------------------------------------------------------------------------------

    def _generate_one(self, request: Generate) -> Generation | RequestError:
        messages = self._messages(request)
        if isinstance(messages, RequestError):
            return messages
        s = request.sampling
        body = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        data = self._post("/chat/completions", body)
        if isinstance(data, RequestError):
            return data
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            return RequestError("bad_response", "the response has no choices[0].message", retryable=True)
        if finish == "content_filter":
            return RequestError("content_filter", "the server withheld the answer (content filter)")
        usage = data.get("usage") or {}
        return Generation(text=text, finish_reason="length" if finish == "length" else "stop",
                          tokens_in=int(usage.get("prompt_tokens") or 0),
                          tokens_out=int(usage.get("completion_tokens") or 0))

    # ---- choose ---------------------------------------------------------------------------------

    def _choose_one(self, request: Choose) -> Choice | RequestError:
        if not request.labels:
            return RequestError("no_labels", "a choice among no labels")
        messages = self._messages(request)
        if isinstance(messages, RequestError):
            return messages
        labels = list(request.labels)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                "max_tokens": self._choice_tokens(labels), "logprobs": True,
                                "top_logprobs": TOP_LOGPROBS}
        while True:
            index = self._choice_field
            field = CHOICE_FIELDS[index]
            attempt = dict(body)
            if field == "structured_outputs":
                attempt[field] = {"choice": labels}
            elif field == "guided_choice":
                attempt[field] = labels
            data = self._post("/chat/completions", attempt)
            if (isinstance(data, RequestError) and data.reason == "http_400" and field is not None
                    and field in data.detail):
                with self._lock:  # one fallback for the whole engine, whichever thread sees it first
                    if self._choice_field == index:
                        self._choice_field = index + 1
                        log.info("the server refuses `%s`; choices go on with %s", field,
                                 CHOICE_FIELDS[index + 1] or "no constraint")
                continue
            break
        if isinstance(data, RequestError):
            return data
        try:
            choice = data["choices"][0]
            content = (choice["message"].get("content") or "").strip()
            steps = _steps((choice.get("logprobs") or {}).get("content"))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return RequestError("bad_response", "the response has no choices[0].message", retryable=True)
        tokens_in = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        if steps:
            probs = label_probs(labels, steps)
            best = max(range(len(labels)), key=lambda k: (probs[labels[k]], -k))
            return Choice(label=labels[best], probs=probs, tokens_in=tokens_in)
        if content in labels:
            return Choice(label=content, probs={label: float(label == content) for label in labels}, tokens_in=tokens_in)
        return RequestError("choice_unparseable", f"the server answered {content[:200]!r}, not one of the "
                                                  f"{len(labels)} labels, and sent no logprobs")

    def _choice_tokens(self, labels: list[str]) -> int:
        local = self._load_local() if self._local_model is not False else None
        if local is not None:
            return 1 + max(len(local.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
        return min(64, 1 + max(len(label) for label in labels))  # a token is at least one character

    # ---- loss -----------------------------------------------------------------------------------

    def _loss_one(self, request: Loss) -> LossValue | RequestError:
        problem = check_images(request)
        if problem is not None:
            return problem
        if self._loss_unsupported:
            return RequestError("loss_unsupported", self._loss_unsupported)
        local = self._load_local()
        if local is None:
            return RequestError("loss_unsupported", self._loss_unsupported or "no local tokenizer")
        from recipec.models.multimodal import EncodeError, load_pil

        try:
            encoded = local.encoder.encode(request.messages, [load_pil(image) for image in request.images])
        except EncodeError as e:
            return RequestError(e.reason, e.detail)
        if not any(encoded.assistant_mask):
            return RequestError("no_answer", "the conversation has no assistant turn to score")
        if request.images:
            # the completions endpoint takes no images: the chat endpoint scores the conversation
            # as its template renders it, without a generation prompt after the last turn
            messages = self._messages(request)
            if isinstance(messages, RequestError):
                return messages
            body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                                    "prompt_logprobs": 1, "add_generation_prompt": False}
            data = self._post("/chat/completions", body)
        else:  # token ids: the server scores exactly the tokens whose mask is known here
            body = {"model": self.model, "prompt": encoded.input_ids, "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 1}  # 1: the prompt's own token and the best other (0 is refused by some versions)
            data = self._post("/completions", body)
        if isinstance(data, RequestError):
            if data.reason in ("http_400", "http_422") and "prompt_logprobs" in data.detail:
                self._loss_unsupported = f"the server refuses prompt_logprobs: {data.detail}"
                return RequestError("loss_unsupported", self._loss_unsupported)
            return data
        try:
            rows = data.get("prompt_logprobs") if request.images else data["choices"][0].get("prompt_logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            return RequestError("bad_response", "the response has no choices[0]", retryable=True)
        if rows is None:
            self._loss_unsupported = "the server returns no prompt_logprobs (it is not vLLM, or too old)"
            return RequestError("loss_unsupported", self._loss_unsupported)
        try:
            if request.images:
                ids = prompt_ids_from_rows(rows, encoded.input_ids[0])
                mask = align_mask(encoded.input_ids, encoded.assistant_mask, ids, local.image_ids)
                if mask is None:
                    return RequestError("loss_alignment", "the server's prompt tokens differ from the chat encoding "
                                                          "here outside the image tokens (another chat template?)")
            else:
                ids, mask = encoded.input_ids, encoded.assistant_mask
            mean, count = loss_from_prompt_logprobs(ids, rows, mask)
        except ValueError as e:
            return RequestError("bad_response", str(e), retryable=True)
        return LossValue(loss=mean, tokens=count, tokens_in=len(ids))

    def _load_local(self) -> "_Local | None":
        """The model's tokenizer (and image processor) from a local folder, or None: loss is unsupported."""
        with self._lock:
            if self._local_model is not None:
                return self._local_model or None
            folder = self._tokenizer_folder()
            if folder is None:
                self._local_model = False
                self._loss_unsupported = ("loss needs the model's tokenizer here: set `tokenizer_dir`, or use a "
                                          "local model directory as `ref`")
                return None
            try:
                from transformers import AutoConfig, AutoTokenizer

                from recipec.models.multimodal import Encoder, image_adapter

                tokenizer = AutoTokenizer.from_pretrained(folder)
                if not getattr(tokenizer, "chat_template", None):
                    raise ValueError("it has no chat template")
                config = AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None
                images = (image_adapter(folder, config, tokenizer)
                          if config is not None and (folder / "preprocessor_config.json").is_file() else None)
                local = _Local(tokenizer, Encoder(tokenizer, images), image_token_ids(config))
            except Exception as e:
                self._local_model = False
                self._loss_unsupported = f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}"
                return None
            self._local_model = local
            return local

    def _tokenizer_folder(self) -> Path | None:
        if self.settings.tokenizer_dir:
            return Path(self.settings.tokenizer_dir)
        from recipec.models import tiny

        if tiny.is_tiny(self.model):
            return tiny.materialize(self.model, self.models_dir)
        local = Path(self.model).expanduser()
        if local.is_dir():
            return local if (local / "tokenizer_config.json").is_file() else None
        if "/" not in self.model:
            return None  # a hosted model's name (gpt-4o): there is no tokenizer to find
        try:  # the tokenizer files of a hub id from the local Hugging Face cache, never a download
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(self.model, revision=self.revision, local_files_only=True,
                                            allow_patterns=["*.json", "*.jinja", "*.txt", "*.model"]))
        except Exception:
            return None
        return folder if (folder / "tokenizer_config.json").is_file() else None

    # ---- messages and images --------------------------------------------------------------------

    def _messages(self, request: Generate | Choose) -> list[dict[str, Any]] | RequestError:
        problem = check_images(request)
        if problem is not None:
            return problem
        queue = list(request.images)
        out = []
        for message in request.messages:
            content = message["content"]
            if IMAGE_PLACEHOLDER not in content:
                out.append({"role": message["role"], "content": content})
                continue
            parts: list[dict[str, Any]] = []
            pieces = content.split(IMAGE_PLACEHOLDER)
            for k, piece in enumerate(pieces):
                if k:
                    url = _data_url(queue.pop(0))
                    if isinstance(url, RequestError):
                        return url
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": message["role"], "content": parts})
        return out

    # ---- HTTP -----------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | RequestError:
        """The decoded JSON answer, a RequestError, or raises _Unreachable / _EngineWide."""
        data = json.dumps(body).encode("utf-8")
        s = self.settings
        reached = False
        attempt = 0
        while True:
            outcome = self._attempt(self._base + path, data)
            if not isinstance(outcome, _Failure):
                return outcome
            reached = reached or outcome.connected
            if attempt >= s.max_retries:
                if not reached:
                    raise _Unreachable(f"{outcome.detail} ({attempt + 1} attempts)")
                return RequestError(outcome.reason, f"{outcome.detail} (gave up after {attempt + 1} attempts)",
                                    retryable=True)
            wait = self._rng.uniform(0, min(s.backoff_max, s.backoff_base * 2 ** attempt))
            if outcome.retry_after is not None:
                wait = max(wait, min(outcome.retry_after, s.retry_after_max))
            log.debug("POST %s: %s; attempt %d of %d in %.2fs", path, outcome.reason, attempt + 2,
                      s.max_retries + 1, wait)
            self._sleep(wait)
            attempt += 1

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.settings.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.add(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._connections.discard(conn)

    def _attempt(self, path: str, data: bytes) -> dict[str, Any] | RequestError | _Failure:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        for reuse in (True, False):
            conn = self._connection()
            reused = getattr(conn, "sock", None) is not None
            try:
                conn.request("POST", path, body=data, headers=headers)
            except (ConnectionRefusedError, socket.gaierror) as e:
                self._drop_connection()
                return _Failure("connection_error", f"cannot connect to {self.endpoint}: {_describe(e)}", False)
            except (TimeoutError, socket.timeout):
                self._drop_connection()
                return _Failure("timeout", f"connecting to {self.endpoint} timed out", False)
            except OSError as e:
                self._drop_connection()
                if reused and reuse:  # a keep-alive connection the server had closed: reconnect once
                    continue
                return _Failure("connection_error", f"sending to {self.endpoint} failed: {_describe(e)}", False)
            try:
                response = conn.getresponse()
                status = response.status
                retry_after = response.getheader("Retry-After")
                raw = response.read()
                if response.will_close:
                    self._drop_connection()
            except (TimeoutError, socket.timeout):
                self._drop_connection()
                return _Failure("timeout", f"no answer within {self.settings.timeout:g}s", True)
            except http.client.IncompleteRead as e:
                self._drop_connection()
                return _Failure("bad_response", f"truncated body ({len(e.partial)} bytes read)", True)
            except http.client.RemoteDisconnected as e:
                self._drop_connection()
                if reused and reuse:
                    continue
                return _Failure("connection_error", f"the server closed the connection: {_describe(e)}", True)
            except (http.client.HTTPException, OSError) as e:
                self._drop_connection()
                return _Failure("connection_error", f"reading the answer failed: {_describe(e)}", True)
            return self._interpret(status, retry_after, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    def _interpret(self, status: int, retry_after: str | None, raw: bytes) -> dict[str, Any] | RequestError | _Failure:
        if 200 <= status < 300:
            try:
                data = json.loads(raw)
            except ValueError:
                return _Failure("bad_response", f"unparseable JSON body ({len(raw)} bytes)", True)
            if not isinstance(data, dict):
                return _Failure("bad_response", "the JSON body is not an object", True)
            return data
        message = self._server_message(raw)
        if status in (408, 429) or status >= 500:
            return _Failure(f"http_{status}", f"HTTP {status}: {message}", True, _retry_after(retry_after))
        if status in ENGINE_WIDE:
            what = {401: "the API key was refused", 403: "access was refused",
                    404: "no such endpoint or model"}[status]
            raise _EngineWide(f"{self.endpoint} (model {self.model!r}): HTTP {status}, {what}: {message}")
        return RequestError(f"http_{status}", message)

    def _server_message(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            error = data.get("error", data)
            if isinstance(error, dict):
                text = str(error.get("message") or error.get("detail") or error)
            elif isinstance(error, str):
                text = error
            elif "detail" in data:
                text = str(data["detail"])
        return self._scrub(text.strip()[:1000]) or "(no message)"

    def _scrub(self, text: str) -> str:
        if self._key is not None and self._key.reveal() in text:
            text = text.replace(self._key.reveal(), "<redacted>")
        return text


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _data_url(image: Any) -> str | RequestError:
    try:
        raw = Path(image.path).read_bytes()
    except OSError as e:
        return RequestError("image_unreadable", f"{Path(image.path).name}: {e.strerror or e}")
    if hashlib.sha256(raw).hexdigest() != image.sha256:
        return RequestError("image_changed", f"{Path(image.path).name} no longer has the digest it was read with")
    return f"data:{_mime(raw)};base64," + base64.b64encode(raw).decode("ascii")


def _mime(raw: bytes) -> str:
    if raw.startswith(b"\x89PNG"):
        return "image/png"
    if raw.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    if raw.startswith(b"BM"):
        return "image/bmp"
    return "image/png"


def _steps(content: Any) -> list[Step]:
    """OpenAI chat `logprobs.content` -> steps (empty when absent)."""
    if not content:
        return []
    steps = []
    for entry in content:
        top = {}
        for alt in entry.get("top_logprobs") or ():
            lp = float(alt["logprob"])
            top[alt["token"]] = max(lp, top.get(alt["token"], -math.inf))
        lp = float(entry["logprob"])
        top.setdefault(entry["token"], lp)
        steps.append(Step(entry["token"], lp, top))
    return steps
