"""Streaming throughput of alignserve (unguided and guided) beside vLLM's own OpenAI server.

    .venv/bin/python bench/serving_throughput.py [--concurrency 32] [--tokens 64] [--rounds 3]
        [--guidance qsharp cd arm genarm] [--record bench/results/FILE.json]

Starts each server in turn on a free port (they would fight for the same cores
side by side; `alignserve-bare` is alignserve with no guide models configured, to
isolate what configuring them costs unguided requests), waits until it is healthy, warms it up, then sends `rounds` waves
of `concurrency` concurrent streaming completions of exactly `tokens` tokens
(`ignore_eos`). On alignserve the same load runs unguided and with each named
guidance (demo guide models), the loads taking turns wave by wave. Prints start
time, output tokens/s and time to first token per row, and ratios to alignserve
unguided and to vLLM. Machines are shared and noisy: compare the ratios, not the
absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import MODEL_NAME, start, stop  # noqa: E402
from models.demo.build import demo_base_dir  # noqa: E402
from models.demo.task import sample_problems  # noqa: E402

GUIDANCE = {
    "qsharp": [{"type": "qsharp", "model": "demo-value", "strength": 4.0}],
    "qsharp-hist": [{"type": "qsharp", "model": "demo-value-hist", "strength": 4.0}],
    "cd": [{"type": "cd", "model": "demo-prefix", "strength": 4.0}],
    "arm": [{"type": "arm", "model": "demo-arm", "strength": 2.0}],
    "genarm": [{"type": "genarm", "model": "demo-genarm", "strength": 1.0}],
}


@dataclass
class Result:
    server: str
    start_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    failed: int


async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int, guidance: list | None) -> tuple[float, int]:
    """Time to first token (s) and output tokens of one streamed completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if guidance:
        body["guidance"] = guidance
    began = time.perf_counter()
    ttft, generated = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - began
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, generated


async def wave(url: str, prompts: list[str], tokens: int, guidance: list | None) -> tuple[int, float, list[float], int]:
    """One wave of concurrent streams: (output tokens, seconds, TTFTs, failed streams)."""
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        began = time.perf_counter()
        outcomes = await asyncio.gather(*(one_stream(client, p, tokens, guidance) for p in prompts),
                                        return_exceptions=True)
        seconds = time.perf_counter() - began
    done = [o for o in outcomes if not isinstance(o, BaseException) and o[1] == tokens]
    return sum(o[1] for o in done), seconds, [o[0] for o in done], len(outcomes) - len(done)


def measure(kind: str, args: argparse.Namespace, prompts: list[str], log_dir: Path) -> list[Result]:
    """Rows for one server: unguided and (alignserve only) each requested guidance.

    The loads take turns wave by wave, so a drift in the machine's speed touches every row alike.
    """
    flags: list[str] = []
    if kind == "alignserve-bare":
        # The same server with no guide models: no logits processor, vLLM's async scheduling on.
        (log_dir / "no-guides.json").write_text("{}")
        flags = ["--guide-models", str(log_dir / "no-guides.json")]
    process, url, start_s = start("vllm" if kind == "vllm" else "alignserve", args.model, args.max_model_len,
                                  log_dir, flags)
    loads = [(kind, None)]
    if kind == "alignserve":
        loads += [(f"alignserve[{name}]", GUIDANCE[name]) for name in args.guidance]
    totals = {name: [0, 0.0, [], 0] for name, _ in loads}  # tokens, seconds, TTFTs, failed
    try:
        for _, guidance in loads:  # warm-up
            asyncio.run(wave(url, prompts[: args.concurrency], 4, guidance))
        for r in range(args.rounds):
            for name, guidance in loads:
                tokens, seconds, ttfts, failed = asyncio.run(
                    wave(url, prompts[r * args.concurrency:(r + 1) * args.concurrency], args.tokens, guidance))
                total = totals[name]
                total[0] += tokens
                total[1] += seconds
                total[2] += ttfts
                total[3] += failed
    finally:
        stop(process)
    rows = []
    for name, (tokens, seconds, ttfts, failed) in totals.items():
        quantiles = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else [0.0] * 9
        median = statistics.median(ttfts) if ttfts else 0.0
        rows.append(Result(name, round(start_s, 1), round(tokens / seconds, 1), round(median * 1e3, 1),
                           round(quantiles[8] * 1e3, 1), failed))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo_base_dir(), help="model directory [demo model]")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="waves of `concurrency` requests")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--servers", nargs="+", default=["alignserve", "vllm"],
                        choices=["alignserve", "alignserve-bare", "vllm"],
                        help="alignserve-bare: alignserve without guide models")
    parser.add_argument("--guidance", nargs="*", default=[], choices=sorted(GUIDANCE),
                        help="guided loads to run on alignserve after the unguided one")
    parser.add_argument("--record", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()

    prompts = [p.prompt for p in sample_problems(args.concurrency * args.rounds, seed=777)]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results = [row for kind in args.servers for row in measure(kind, args, prompts, Path(tmp))]

    by_name = {r.server: r for r in results}
    ratios = {}
    for r in results:
        if (r.server.startswith("alignserve[") or r.server == "alignserve-bare") and "alignserve" in by_name:
            ratios[f"{r.server} / alignserve tokens_per_s"] = round(r.tokens_per_s / by_name["alignserve"].tokens_per_s, 3)
        if r.server != "vllm" and "vllm" in by_name:
            ratios[f"{r.server} / vllm tokens_per_s"] = round(r.tokens_per_s / by_name["vllm"].tokens_per_s, 3)
    print(f"{args.concurrency} concurrent streams x {args.tokens} tokens x {args.rounds} rounds")
    print(f"{'server':<24}{'start s':>9}{'tok/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}{'failed':>8}")
    for r in results:
        print(f"{r.server:<24}{r.start_s:>9}{r.tokens_per_s:>10}{r.ttft_p50_ms:>13}{r.ttft_p90_ms:>13}{r.failed:>8}")
    for name, ratio in ratios.items():
        print(f"{name}: x{ratio}")
    if args.record:
        args.record.write_text(json.dumps({
            "setup": {"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
                      "model": str(args.model), "cpus": os.cpu_count()},
            "results": [asdict(r) for r in results], "ratios": ratios}, indent=2) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
