"""Log-probabilities -> what the engines answer: label probabilities, losses, aligned masks.

Pure functions over plain data shaped like the servers' and vLLM's outputs, shared by the HTTP
and the vLLM engines and tested without either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

FLOOR = 1e-6  # the probability given to a label whose token was not listed
TOP_LOGPROBS = 20
END_TOKENS = {"", "<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<end_of_turn>", "<|end|>"}


@dataclass(frozen=True)
class Step:
    """One generated token, its log-probability and the alternatives the server listed."""

    token: str
    logprob: float
    top: dict[str, float]


def label_probs(labels: Sequence[str], steps: Sequence[Step], floor: float = FLOOR) -> dict[str, float]:
    """Each label's probability from the logprobs of a generation, renormalised over the labels.

    A label is followed along the generated tokens while they spell it; where it leaves them it
    takes the listed alternative that continues it (the longest; labels leaving by the same token
    share its mass), or `floor` when none is listed. A label that is the whole generation gets the
    product of its tokens; one that ends early needs an end-of-turn token where it ends. Labels
    are compared as text, so this works without the model's tokenizer.
    """
    log_floor = math.log(floor)
    scores: dict[str, float] = {}
    claims: dict[tuple[int, str], list[tuple[str, float]]] = {}
    for label in labels:
        pos = 0
        prefix = 0.0
        score: float | None = None
        for k, step in enumerate(steps):
            rest = label[pos:]
            if not rest:
                end = [lp for t, lp in step.top.items() if t in END_TOKENS]
                score = prefix + (max(end) if end else log_floor)
                break
            token = step.token.lstrip() if pos == 0 else step.token
            if not token:
                prefix += step.logprob
                continue
            # the longest listed token that continues the label: labels are tokenised greedily
            norm = (lambda t: t.lstrip()) if pos == 0 else (lambda t: t)
            listed = [t for t in step.top if norm(t) and rest.startswith(norm(t))]
            best = max(listed, key=lambda t: (len(norm(t)), step.top[t]), default=None)
            if rest.startswith(token) and best is not None and len(norm(best)) == len(token):
                prefix += step.logprob  # the label goes on along the generated tokens
                pos += len(token)
                continue
            if best is not None:
                claims.setdefault((k, best), []).append((label, prefix + step.top[best]))
            else:
                score = prefix + log_floor
            break
        else:
            score = prefix if pos >= len(label) else prefix + log_floor
        if score is not None:
            scores[label] = score
    for claimants in claims.values():
        share = math.log(len(claimants))
        for label, lp in claimants:
            scores[label] = lp - share
    top = max(scores.values())
    weights = {label: math.exp(scores[label] - top) for label in labels}
    total = sum(weights.values())
    return {label: weights[label] / total for label in labels}


def loss_from_prompt_logprobs(token_ids: Sequence[int], rows: Sequence[Any], mask: Sequence[bool]) -> tuple[float, int]:
    """(mean NLL, count) over the masked tokens, from vLLM's `prompt_logprobs`.

    `rows[i]` is None for the first token, else a mapping token id -> logprob (vLLM's `Logprob`
    objects in process, `{"logprob": ...}` objects or plain numbers over HTTP, where ids are
    strings) that holds at least the prompt's own token `token_ids[i]`.
    """
    if len(rows) != len(token_ids) or len(mask) != len(token_ids):
        raise ValueError(f"prompt_logprobs for {len(rows)} tokens, the prompt has {len(token_ids)}")
    total = 0.0
    count = 0
    for i, (token, row, scored) in enumerate(zip(token_ids, rows, mask)):
        if not scored:
            continue
        if i == 0 or row is None:
            continue  # nothing predicts the first token
        entry = row.get(token, row.get(str(token))) if hasattr(row, "get") else None
        if entry is None:
            raise ValueError(f"prompt_logprobs at position {i} lack the prompt's own token {token}")
        value = getattr(entry, "logprob", entry)
        if isinstance(value, dict):
            value = value["logprob"]
        total += float(value)
        count += 1
    if count == 0:
        raise ValueError("no assistant token was scored")
    return -total / count, count


def logprob_value(entry: Any) -> float:
    value = getattr(entry, "logprob", entry)
    return float(value["logprob"] if isinstance(value, dict) else value)


def first_token_probs(labels: Sequence[str], first_ids: Sequence[int], step: Any, floor: float = FLOOR) -> dict[str, float]:
    """Labels with distinct first tokens: their probabilities from one step's logprobs, renormalised."""
    log_floor = math.log(floor)
    scores = [(logprob_value(step[t]) if t in step else log_floor) for t in first_ids]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return {label: w / total for label, w in zip(labels, weights)}


def image_token_ids(config: Any) -> set[int]:
    """The ids vLLM and the encoder repeat for an image's features."""
    ids = set()
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def align_mask(encoded_ids: Sequence[int], mask: Sequence[bool], engine_ids: Sequence[int],
               image_ids: set[int]) -> list[bool] | None:
    """The encoder's assistant mask carried over to another expansion of the same prompt.

    Both sequences must agree token for token once each run of image tokens is collapsed to one;
    image tokens are never scored. None when they do not agree.
    """
    def collapsed(ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            if t in image_ids and out and out[-1] == -1:
                continue
            out.append(-1 if t in image_ids else t)
        return out

    if collapsed(encoded_ids) != collapsed(engine_ids):
        return None
    text_mask = [m for t, m in zip(encoded_ids, mask) if t not in image_ids]
    out = []
    k = 0
    for t in engine_ids:
        if t in image_ids:
            out.append(False)
        else:
            out.append(text_mask[k])
            k += 1
    return out


def prompt_ids_from_rows(rows: Sequence[Any], first: int) -> list[int]:
    """The prompt's own token ids, read back from `prompt_logprobs` rows (each holds its token).

    With `prompt_logprobs=1` a row holds the prompt's token and, when that is not the most
    likely one, the most likely one too (rank 1): the prompt's token is the entry of the highest
    rank. The first row is None; `first` stands there.
    """
    ids = []
    for i, row in enumerate(rows):
        if row is None:
            if i:
                raise ValueError(f"prompt_logprobs row {i} is empty")
            ids.append(first)
            continue
        entries = list(row.items())
        if len(entries) == 1:
            ids.append(int(entries[0][0]))
            continue
        ranked = [(getattr(e, "rank", None) if not isinstance(e, dict) else e.get("rank"), k) for k, e in entries]
        if any(rank is None for rank, _ in ranked):
            raise ValueError(f"prompt_logprobs row {i} lists {len(entries)} tokens without ranks")
        ids.append(int(max(ranked)[1]))
    return ids
