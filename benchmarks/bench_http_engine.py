"""The HTTP engine's own overhead: requests/s against the local OpenAI-compatible test server.

A server that answers at once shows what the client costs per request (JSON, HTTP, threads);
one that takes 20 ms per answer shows how close bounded concurrency gets to the ideal
`max_concurrency / 20 ms`. Same run, same requests for every setting.

    .venv/bin/python benchmarks/bench_http_engine.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine_server import EngineServer, FakeBackend  # noqa: E402

from recipec.models.engine import Generate, Sampling  # noqa: E402
from recipec.models.openai_engine import OpenAIEngine, Settings  # noqa: E402


def run(requests: list[Generate], concurrency: int, delay: float) -> tuple[float, int, int]:
    with EngineServer(FakeBackend(), delay=delay) as server:
        engine = OpenAIEngine("bench", server.url, settings=Settings(max_concurrency=concurrency))
        start = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - start
        engine.close()
    assert len(results) == len(requests) and server.total == len(requests)
    return len(requests) / seconds, server.total, server.most_in_flight


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    requests = [Generate(({"role": "user", "content": f"question {i}"},), sampling=Sampling(max_new_tokens=8))
                for i in range(args.requests)]
    print(f"{'concurrency':>11} {'answer':>7} {'req/s':>8} {'ideal':>7} {'overlap':>7}")
    for delay in (0.0, 0.02):
        for concurrency in (1, 4, 16):
            rate, _, most = run(requests if delay == 0 else requests[: args.requests // 2], concurrency, delay)
            ideal = f"{concurrency / delay:.0f}" if delay else "-"
            print(f"{concurrency:>11} {delay * 1000:>5.0f}ms {rate:>8.0f} {ideal:>7} {most:>7}")


if __name__ == "__main__":
    main()
