"""What a model-backed operation gets from `ctx.engine(model_use)`: one interface, several engines.

An engine answers batches of requests; it never raises for one bad request, it returns a
`RequestError` in that request's place (the operation turns it into a reject with its reason code).
Three kinds of request:

- `Generate`: images + chat messages -> text, with sampling settings and a seed.
- `Choose`: a constrained choice among given labels (a taxonomy level, `yes`/`no`, the scores
  1..10), with the probability of every label, never by parsing free text.
- `Loss`: the mean token loss over the assistant turns of a conversation (teacher-forced).

Messages are `{"role": "system"|"user"|"assistant", "content": str}`; a user message holds one
`<image>` placeholder per image it shows, in order (`IMAGE_PLACEHOLDER`); the engine expands each
into the model's own image tokens. Images travel as `Image` (a readable local path and the sha256
of its bytes, which is what request keys are made of).

`Engine.identity` names the model exactly (reference and revision, or a digest of its weights): it
goes into every request key of the request cache (`recipec.models.cache`), so a different model
never answers from another's cache, and a credential never does (engines keep keys out of it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, Sequence, Union

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Image:
    path: str  # absolute, readable
    sha256: str


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Generate:
    messages: tuple[dict[str, str], ...]
    images: tuple[Image, ...] = ()
    sampling: Sampling = Sampling()
    kind: Literal["generate"] = "generate"


@dataclass(frozen=True)
class Choose:
    messages: tuple[dict[str, str], ...]
    labels: tuple[str, ...]
    images: tuple[Image, ...] = ()
    kind: Literal["choose"] = "choose"


@dataclass(frozen=True)
class Loss:
    messages: tuple[dict[str, str], ...]  # with the assistant turns whose tokens are scored
    images: tuple[Image, ...] = ()
    kind: Literal["loss"] = "loss"


@dataclass(frozen=True)
class Tag:
    """Zero-shot multi-label tagging: one image against a tag vocabulary (image-text models)."""

    images: tuple[Image, ...]  # one image
    labels: tuple[str, ...]
    kind: Literal["tag"] = "tag"


Request = Union[Generate, Choose, Loss, Tag]


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["stop", "length"]  # "length": cut at max_new_tokens
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class Choice:
    label: str  # the most probable label
    probs: dict[str, float]  # every label, summing to 1
    tokens_in: int


@dataclass(frozen=True)
class LossValue:
    loss: float  # mean negative log-likelihood per assistant token
    tokens: int  # assistant tokens scored
    tokens_in: int


@dataclass(frozen=True)
class TagScores:
    scores: tuple[float, ...]  # a sigmoid probability per label, in the request's label order
    tokens_in: int = 0


@dataclass(frozen=True)
class RequestError:
    """One request could not be answered. `reason` is a stable reject code."""

    reason: str  # e.g. image_refused, prompt_too_long, http_400, engine_unavailable
    detail: str
    retryable: bool = False  # a transient failure: not kept in the request cache, asked again next run


# The reasons an engine gives a request it cannot answer (reject codes); `http_<status>` is a
# family (a server's 4xx, or a 5xx that outlasted the retries).
REQUEST_ERRORS = frozenset({
    "image_refused", "image_placeholders", "images_unsupported", "image_count", "image_changed", "image_unreadable",
    "too_long", "no_answer", "no_labels", "no_chat_template", "chat_template", "choice_unparseable", "content_filter",
    "loss_unsupported", "loss_alignment", "timeout", "connection_error", "bad_response", "unreachable",
    "engine_failure", "vllm_rejected",
})


Result = Union[Generation, Choice, LossValue, TagScores, RequestError]


class EngineError(Exception):
    """The engine as a whole cannot work (cannot load, server unreachable after retries)."""


class Engine(Protocol):
    identity: str

    def generate(self, requests: Sequence[Generate]) -> list[Generation | RequestError]: ...

    def choose(self, requests: Sequence[Choose]) -> list[Choice | RequestError]: ...

    def loss(self, requests: Sequence[Loss]) -> list[LossValue | RequestError]: ...

    def close(self) -> None: ...


def request_payload(request: Request) -> dict[str, Any]:
    """The request as plain JSON data, images by digest only (paths are not part of what is asked)."""
    data = asdict(request)
    data["images"] = [image.sha256 for image in request.images]
    return data


def result_to_json(result: Result) -> dict[str, Any]:
    return {"type": type(result).__name__, **asdict(result)}


_RESULT_TYPES = {cls.__name__: cls for cls in (Generation, Choice, LossValue, TagScores, RequestError)}


def result_from_json(data: dict[str, Any]) -> Result:
    data = dict(data)
    kind = _RESULT_TYPES[data.pop("type")]
    if kind is TagScores:
        data["scores"] = tuple(data["scores"])
    return kind(**data)


def image_count(messages: Sequence[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def check_images(request: Request) -> RequestError | None:
    """Placeholders and images must match one to one; a mismatch is the caller's mistake, reported."""
    found = image_count(request.messages)
    if found != len(request.images):
        return RequestError("image_placeholders", f"{found} {IMAGE_PLACEHOLDER} placeholder(s) for "
                                                  f"{len(request.images)} image(s)")
    return None


@dataclass
class Usage:
    """What an engine did, for progress and the report."""

    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, result: Result) -> None:
        self.requests += 1
        if isinstance(result, RequestError):
            self.errors[result.reason] = self.errors.get(result.reason, 0) + 1
            return
        self.tokens_in += result.tokens_in
        if isinstance(result, Generation):
            self.tokens_out += result.tokens_out
