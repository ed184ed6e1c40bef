"""Accuracy bought and KL paid by each guidance and search on the demo task, through the real server.

    .venv/bin/python bench/demo_accuracy.py [--problems 200] [--configs base qsharp bo8-verifier ...]
        [--record bench/results/demo_accuracy.json]

Starts alignserve on the demo models and, for each configuration, answers the
first `problems` held-out problems at temperature 1 (seed i for problem i: pass@1)
and, for per-step guidance, greedily, scoring with `demo-verifier`. Prints pass@1,
greedy accuracy and the mean reported KL per completion and per token, with each
configuration's pass@1 beside the base's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import MODEL_NAME, start, stop  # noqa: E402
from guidance.verifiers import get_verifier  # noqa: E402
from models.demo.build import demo_base_dir  # noqa: E402
from models.demo.task import held_out_problems  # noqa: E402

GUIDANCE = {
    "qsharp": [{"type": "qsharp", "model": "demo-value", "strength": 4.0}],
    "qsharp-hist": [{"type": "qsharp", "model": "demo-value-hist", "strength": 4.0}],
    "cd": [{"type": "cd", "model": "demo-prefix", "strength": 4.0}],
    "arm": [{"type": "arm", "model": "demo-arm", "strength": 2.0}],
    "genarm": [{"type": "genarm", "model": "demo-genarm", "strength": 1.0}],
}

SEARCH = {
    "bo4-verifier": {"type": "best_of_n", "n": 4, "scorer": "demo-verifier"},
    "bo8-verifier": {"type": "best_of_n", "n": 8, "scorer": "demo-verifier"},
    "bo4-reward": {"type": "best_of_n", "n": 4, "scorer": "demo-reward"},
    "bo8-reward": {"type": "best_of_n", "n": 8, "scorer": "demo-reward"},
    "soft-bo8-reward": {"type": "best_of_n", "n": 8, "scorer": "demo-reward", "temperature": 1.0},
    "bo4-arm": {"type": "best_of_n", "n": 4, "scorer": "demo-arm"},
    "bo8-arm": {"type": "best_of_n", "n": 8, "scorer": "demo-arm"},
    "bo8-genarm": {"type": "best_of_n", "n": 8, "scorer": "demo-genarm"},
    "soft-bo8-arm": {"type": "best_of_n", "n": 8, "scorer": "demo-arm", "temperature": 1.0},
    "blockwise-prefix": {"type": "blockwise", "candidates": 4, "block_tokens": 2, "scorer": "demo-prefix"},
    "blockwise-arm": {"type": "blockwise", "candidates": 4, "block_tokens": 2, "scorer": "demo-arm"},
    "blockwise-reward": {"type": "blockwise", "candidates": 4, "block_tokens": 2, "scorer": "demo-reward"},
}
# name -> request extension fields
CONFIGS: dict[str, dict] = {
    "base": {},
    **{name: {"guidance": guidance} for name, guidance in GUIDANCE.items()},
    **{name: {"search": search} for name, search in SEARCH.items()},
    "qsharp+bo4-reward": {"guidance": GUIDANCE["qsharp"], "search": SEARCH["bo4-reward"]},
}


async def evaluate(url: str, prompts: list[str], extension: dict, temperature: float,
                   concurrency: int) -> tuple[float, list[float], list[int]]:
    verifier = get_verifier("demo-verifier")
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> tuple[float, float, int]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": temperature, "seed": i,
                "cache": False, **extension}
        async with gate:
            response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        report = choice.get("guidance", {"kl": 0.0, "steps": 0})
        return verifier(prompt, choice["text"]), report["kl"], report["steps"]

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        results = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))
    rewards, kls, steps = zip(*results)
    return statistics.mean(rewards), list(kls), list(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--record", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()

    prompts = [p.prompt for p in held_out_problems()[: args.problems]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        process, url, _ = start("alignserve", demo_base_dir(), 512, Path(tmp))
        try:
            for name in args.configs:
                extension = CONFIGS[name]
                pass_at_1, kls, steps = asyncio.run(evaluate(url, prompts, extension, 1.0, args.concurrency))
                # Greedy candidates are all alike: a search adds nothing there.
                greedy = None if "search" in extension else round(
                    asyncio.run(evaluate(url, prompts, extension, 0.0, args.concurrency))[0], 4)
                rows.append({"config": name, **extension, "pass_at_1": round(pass_at_1, 4),
                             "greedy_accuracy": greedy, "mean_kl": round(statistics.mean(kls), 4),
                             "kl_per_token": round(sum(kls) / max(1, sum(steps)), 4)})
        finally:
            stop(process)

    base = next((r["pass_at_1"] for r in rows if r["config"] == "base"), None)
    print(f"{args.problems} held-out demo problems; pass@1 at temperature 1 (seed i), greedy accuracy")
    print(f"{'config':<20}{'pass@1':>8}{'vs base':>9}{'greedy':>8}{'KL/compl.':>11}{'KL/token':>10}")
    for r in rows:
        delta = "" if base is None else f"{r['pass_at_1'] - base:+.3f}"
        greedy = "-" if r["greedy_accuracy"] is None else f"{r['greedy_accuracy']:.3f}"
        print(f"{r['config']:<20}{r['pass_at_1']:>8.3f}{delta:>9}{greedy:>8}"
              f"{r['mean_kl']:>11.3f}{r['kl_per_token']:>10.3f}")
    if args.record:
        args.record.write_text(json.dumps({"problems": args.problems, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
