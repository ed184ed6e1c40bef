"""The response cache's effect on the latency of a repeated request, memory and Redis backends side by side.

    .venv/bin/python bench/cache_latency.py [--prompts 20] [--max-tokens 64] [--record bench/results/cache_latency.json]

Starts alignserve on the demo model twice (in-memory cache; Redis cache against a
redis-server this script starts on a free port) and sends each of `prompts` distinct
deterministic requests (temperature 0, `max_tokens` tokens, EOS ignored) twice, one at a
time: the first is a miss (generated), the second a hit. Prints the median latencies and
the miss / hit ratio per backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import MODEL_NAME, start, stop  # noqa: E402
from models.demo.build import demo_base_dir  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def measure(url: str, prompts: list[str], max_tokens: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {"miss": [], "hit": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for prompt in prompts:
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            for outcome in ("miss", "hit"):
                began = time.perf_counter()
                client.post("/v1/completions", json=body).raise_for_status()
                latencies[outcome].append(time.perf_counter() - began)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--record", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()
    # A prefix of the run's start time keeps the prompts new to a Redis that outlives a run.
    prompts = [f"{int(time.time()) % 997 + i}+{i}=" for i in range(args.prompts)]
    rows = []
    redis_server = RedisServer().start()
    try:
        for backend, flags in (("memory", []), ("redis", ["--redis-url", redis_server.url])):
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                process, url, _ = start("alignserve", demo_base_dir(), 512, Path(tmp), flags)
                try:
                    latencies = measure(url, prompts, args.max_tokens)
                finally:
                    stop(process)
            miss, hit = statistics.median(latencies["miss"]), statistics.median(latencies["hit"])
            rows.append({"backend": backend, "miss_ms": round(miss * 1e3, 2), "hit_ms": round(hit * 1e3, 2),
                         "speedup": round(miss / hit, 1)})
    finally:
        redis_server.kill()

    print(f"{args.prompts} repeated deterministic requests of {args.max_tokens} tokens, one at a time (medians)")
    print(f"{'backend':<9}{'miss ms':>10}{'hit ms':>9}{'miss/hit':>10}")
    for r in rows:
        print(f"{r['backend']:<9}{r['miss_ms']:>10.2f}{r['hit_ms']:>9.2f}{r['speedup']:>10.1f}")
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"prompts": args.prompts, "max_tokens": args.max_tokens,
                                           "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
