"""Latency of step-level search against best-of-N at the same budget, one request at a time.

    python -m bench.step_search_latency --model runs/steps/base --guide-models runs/steps/guides/guides.json \\
        --scorer prm --prompts runs/steps/heldout.jsonl [--budget 8] [--requests 8]
    python -m bench.step_search_latency --url http://127.0.0.1:8000 --scorer demo-prefix ...

The same seeded chat requests (the prompt file's first `--requests` prompts) run one at a time, rotating
best-of-B, beam (B / 4 kept solutions x 4 expansions), DVTS (B / 4 subtrees of 4) and particle filtering
(B particles), all scored by `--scorer`. The report gives each one's median end-to-end latency and
generated tokens, and each step-level search's latency as a multiple of best-of-B's (the issue's target:
at most 2x at B = 8). Run on one machine, nothing else running: a request's latency is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.suite.machine import describe_machine
from workflows.prompt_file import read_prompts
from workflows.server_process import alignserve_command, start_server

EXPANSIONS = 4


def searches(budget: int, scorer: str, delimiter: str) -> dict[str, dict]:
    """best_of_n and the three step-level searches at `budget` candidates per step."""
    steps = {"scorer": scorer, "step_delimiter": delimiter}
    return {"best_of_n": {"type": "best_of_n", "n": budget, "scorer": scorer},
            "beam": {"type": "beam", "beam_width": budget // EXPANSIONS, "expansions": EXPANSIONS, **steps},
            "dvts": {"type": "dvts", "n": budget, "beam_width": EXPANSIONS, **steps},
            "particle_filter": {"type": "particle_filter", "particles": budget, **steps}}


def timed(client: httpx.Client, model: str, messages: list[dict], search: dict, max_tokens: int,
          seed: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one seeded searched chat completion, bypassing the response cache."""
    began = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9,
        "seed": seed, "cache": False, "search": search})
    seconds = time.perf_counter() - began
    response.raise_for_status()
    return seconds, response.json()["choices"][0]["guidance"]["generated_tokens"]


def measure(url: str, args: argparse.Namespace) -> dict:
    prompts = read_prompts(args.prompts)[:args.requests]
    kinds = searches(args.budget, args.scorer, args.step_delimiter)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    tokens: dict[str, list[int]] = {kind: [] for kind in kinds}
    with httpx.Client(base_url=url, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i, record in enumerate(prompts):
            for kind, search in kinds.items():  # rotated per prompt: drift on a shared machine hits each alike
                took, generated = timed(client, model, [dict(m) for m in record.messages], search,
                                        args.max_tokens, args.seed + i)
                seconds[kind].append(took)
                tokens[kind].append(generated)
    median = {kind: statistics.median(values) for kind, values in seconds.items()}
    return {"budget": args.budget, "scorer": args.scorer, "requests": len(prompts), "max_tokens": args.max_tokens,
            "machine": describe_machine(),
            "median_seconds": median,
            "median_generated_tokens": {kind: statistics.median(values) for kind, values in tokens.items()},
            "latency_vs_best_of_n": {kind: median[kind] / median["best_of_n"] for kind in kinds if kind != "best_of_n"},
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="base model directory: start alignserve serve on it")
    where.add_argument("--url", help="a running alignserve server")
    parser.add_argument("--guide-models", type=Path, help="guide-model table (with --model)")
    parser.add_argument("--serve-args", default="--max-model-len 320", help="more alignserve serve flags")
    parser.add_argument("--scorer", required=True, help="the step scorer (a PRM or a prefix scorer)")
    parser.add_argument("--prompts", type=Path, required=True, help="chat prompt file")
    parser.add_argument("--budget", type=int, default=8, help="candidates per step, a multiple of 4 [default: 8]")
    parser.add_argument("--requests", type=int, default=8, help="prompts, one request each per search [default: 8]")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--step-delimiter", default="\n\n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_search_latency.json"))
    args = parser.parse_args()
    if args.budget % EXPANSIONS:
        parser.error(f"--budget must be a multiple of {EXPANSIONS}")
    if args.url is not None:
        report = measure(args.url.rstrip("/"), args)
    else:
        flags = args.serve_args.split() + (["--guide-models", str(args.guide_models)] if args.guide_models else [])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with start_server("alignserve serve", lambda port: alignserve_command(args.model, port, flags),
                          args.out.with_suffix(".server.log")) as server:
            report = measure(server.url, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
