"""The request cache: every finished model request, kept in the store, never asked twice.

A request's key is the sha256 of the engine's identity (model ref and revision, or a digest of
its weights) and the request itself (rendered messages, image digests, labels, sampling settings
and seed). Answers are written in one SQLite transaction per batch, so a run killed at any moment
keeps every batch it finished, and the next run sends only what is missing. A failure marked
`retryable` (a server that stayed down) is not kept: the next run asks again.

`CachedEngine` wraps any engine with the same interface and counts what it answered from the
cache and what it sent, which the report shows per step.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recipec.models.engine import RequestError, Result, request_payload, result_from_json, result_to_json


def request_key(identity: str, request: Any) -> str:
    payload = {"model": identity, "request": request_payload(request)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                part = unique[start:start + 500]
                rows = self._db.execute(f"SELECT key, result FROM answers WHERE key IN ({','.join('?' * len(part))})", part)
                found.update((k, result_from_json(json.loads(v))) for k, v in rows)
        return found

    def put_many(self, items: Sequence[tuple[str, Result]]) -> None:
        rows = [(k, json.dumps(result_to_json(r), sort_keys=True, ensure_ascii=False)) for k, r in items]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO answers (key, result) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._db.close()


@dataclass
class Counts:
    sent: int = 0  # requests the engine answered in this run
    cached: int = 0  # requests answered from the cache
    repeated: int = 0  # requests asked again within one call (identical prompts), answered once
    tokens_in: int = 0
    tokens_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.sent + self.cached + self.repeated, "sent": self.sent, "cached": self.cached,
                "repeated": self.repeated,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "errors": dict(sorted(self.errors.items()))}


class CachedEngine:
    def __init__(self, engine: Any, cache: RequestCache):
        self.engine = engine
        self.cache = cache
        self.identity = engine.identity
        self.chunk_size = getattr(engine, "chunk_size", None)
        self.counts = Counts()

    def generate(self, requests):
        return self._ask("generate", requests)

    def choose(self, requests):
        return self._ask("choose", requests)

    def loss(self, requests):
        return self._ask("loss", requests)

    def tag(self, requests):
        return self._ask("tag", requests)

    def _ask(self, method: str, requests: Sequence[Any]) -> list[Result]:
        keys = [request_key(self.identity, r) for r in requests]
        known = self.cache.get_many(keys)
        missing: dict[str, Any] = {}
        for key, request in zip(keys, requests):
            if key not in known and key not in missing:
                missing[key] = request
        self.counts.cached += sum(1 for k in keys if k in known)
        if missing:
            if not hasattr(self.engine, method):
                raise AttributeError(f"the engine of {self.identity} cannot {method}")
            answers = getattr(self.engine, method)(list(missing.values()))
            if len(answers) != len(missing):
                raise RuntimeError(f"the engine answered {len(answers)} of {len(missing)} requests")
            fresh = dict(zip(missing, answers))
            self.cache.put_many([(k, r) for k, r in fresh.items() if not (isinstance(r, RequestError) and r.retryable)])
            known.update(fresh)
            self.counts.sent += len(missing)
            self.counts.repeated += sum(1 for k in keys if k in missing) - len(missing)
        results = [known[k] for k in keys]
        for key, result in zip(keys, results):
            if isinstance(result, RequestError):
                self.counts.errors[result.reason] = self.counts.errors.get(result.reason, 0) + 1
            elif key in missing:
                self.counts.tokens_in += getattr(result, "tokens_in", 0)
                self.counts.tokens_out += getattr(result, "tokens_out", 0)
        return results

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()
