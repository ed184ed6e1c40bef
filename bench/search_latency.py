"""Latency of best-of-N relative to best-of-1 (and a plain request) at concurrency 1, side by side.

    .venv/bin/python bench/search_latency.py [--requests 30] [--sizes 1 4 8] [--scorer demo-reward]
        [--record bench/results/search_latency.json]

Starts alignserve on the demo models and sends one request at a time (8 tokens at
temperature 1, cache off), cycling through the configurations so that every row sees
the same machine load; prints the median and p90 latency per row and each row's median
over best-of-1's.
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
from models.demo.task import held_out_problems  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="requests per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="best-of-N sizes")
    parser.add_argument("--scorer", default="demo-reward")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--record", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()

    rows = {"plain": None, **{f"best-of-{n}": {"type": "best_of_n", "n": n, "scorer": args.scorer}
                              for n in args.sizes}}
    prompts = [p.prompt for p in held_out_problems()[: args.requests]]
    latencies: dict[str, list[float]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        process, url, _ = start("alignserve", demo_base_dir(), 512, Path(tmp))
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                for i, prompt in enumerate(prompts):
                    for name, search in rows.items():
                        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": args.max_tokens,
                                "temperature": 1.0, "seed": i, "cache": False}
                        if search:
                            body["search"] = search
                        began = time.perf_counter()
                        client.post("/v1/completions", json=body).raise_for_status()
                        latencies[name].append(time.perf_counter() - began)
        finally:
            stop(process)

    reference = statistics.median(latencies[f"best-of-{args.sizes[0]}"])
    results = []
    print(f"concurrency 1, {args.requests} requests each, {args.max_tokens} tokens, scorer {args.scorer}")
    print(f"{'config':<12}{'median ms':>10}{'p90 ms':>9}{f'vs best-of-{args.sizes[0]}':>14}")
    for name, values in latencies.items():
        median, p90 = statistics.median(values), statistics.quantiles(values, n=10)[8]
        results.append({"config": name, "median_ms": round(median * 1e3, 1), "p90_ms": round(p90 * 1e3, 1),
                        "ratio": round(median / reference, 2)})
        print(f"{name:<12}{median * 1e3:>10.1f}{p90 * 1e3:>9.1f}{median / reference:>14.2f}")
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"requests": args.requests, "max_tokens": args.max_tokens,
                                           "scorer": args.scorer, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
