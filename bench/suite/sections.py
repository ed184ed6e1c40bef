"""The suite's measurements, one function per section, each returning JSON-ready rows.

Every section runs against servers the caller started (`bench.suite.cli`); loads that are
compared take turns in one run on one machine, so a ratio never mixes two runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import LoadResult, load
from bench.suite.workload import GuidedLoad, Workload

ROOT = Path(__file__).resolve().parents[2]
UNGUIDED = "unguided"

Log = Callable[[str], None]


def _row(result: LoadResult, **labels) -> dict:
    return {**labels, **result.summary()}


def ours_load(url: str, work: Workload, concurrency: int, requests: int, tokens: int, extra: dict | None = None,
              stream: bool = True) -> LoadResult:
    return load(url, work.served_name, work.prompts_for(requests), concurrency, tokens, extra, stream)


def warm_up(url: str, work: Workload, concurrency: int, loads: Sequence[GuidedLoad] = ()) -> None:
    """Untimed waves at `concurrency`, unguided and with each of `loads`: a server's first requests
    (and a guide model's) pay one-off costs that no measured load should carry."""
    for extra in (None, *(load.body() for load in loads)):
        ours_load(url, work, concurrency, concurrency, 8, extra)


def vllm_bench_serve(url: str, work: Workload, concurrency: int, requests: int, tokens: int,
                     input_len: int) -> dict:
    """vLLM's own load generator (`vllm bench serve`, random prompts of `input_len` tokens) against
    `url`; its saved result's throughput, TTFT and ITL (p50, p99)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as out:
        command = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", "openai",
                   "--endpoint", "/v1/completions", "--base-url", url, "--model", work.served_name,
                   "--tokenizer", str(work.model_dir), "--dataset-name", "random",
                   "--random-input-len", str(input_len), "--random-output-len", str(tokens),
                   "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--ignore-eos",
                   "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99", "--seed", "0",
                   "--disable-tqdm", "--save-result", "--result-dir", out, "--result-filename", "result.json"]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=3600)
        if run.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        result = json.loads((Path(out) / "result.json").read_text())
    return {"concurrency": concurrency, "requests": result["completed"] + result.get("failed", 0),
            "failed": result.get("failed", 0), "tokens_per_s": round(result["output_throughput"], 2),
            "ttft_ms": {"p50": round(result["p50_ttft_ms"], 2), "p99": round(result["p99_ttft_ms"], 2)},
            "itl_ms": {"p50": round(result["p50_itl_ms"], 2), "p99": round(result["p99_itl_ms"], 2)},
            "latency_ms": {"p50": round(result["p50_e2el_ms"], 2), "p99": round(result["p99_e2el_ms"], 2)}}


def passthrough(server: str, url: str, work: Workload, levels: Sequence[int], requests_per_client: int,
                tokens: int, input_len: int, log: Log) -> list[dict]:
    """Unguided load on one server, by our load generator and by vLLM's, at each concurrency."""
    rows = []
    for concurrency in levels:
        requests = concurrency * requests_per_client
        log(f"passthrough {server} c={concurrency}")
        rows.append(_row(ours_load(url, work, concurrency, requests, tokens), server=server, generator="ours"))
        rows.append({"server": server, "generator": "vllm bench serve",
                     **vllm_bench_serve(url, work, concurrency, requests, tokens, input_len)})
    return rows


def guidance_overhead(url: str, work: Workload, levels: Sequence[int], requests_per_client: int, tokens: int,
                      log: Log) -> list[dict]:
    """Each guided load against unguided, at each concurrency; the loads of one level take turns."""
    rows = []
    for concurrency in levels:
        requests = concurrency * requests_per_client
        log(f"overhead c={concurrency}: {UNGUIDED}")
        unguided = ours_load(url, work, concurrency, requests, tokens)
        rows.append(_row(unguided, load=UNGUIDED, ratio=1.0, bound=1.0))
        for guided in work.loads:
            log(f"overhead c={concurrency}: {guided.label}")
            result = ours_load(url, work, concurrency, requests, tokens, guided.body())
            ratio = result.tokens_per_s / unguided.tokens_per_s
            rows.append(_row(result, load=guided.label, ratio=round(ratio, 3), bound=round(guided.bound.ratio, 3),
                             of_bound=round(ratio / guided.bound.ratio, 3)))
    return rows


def length_scaling(url: str, work: Workload, guided: GuidedLoad, lengths: Sequence[int], concurrency: int,
                   requests: int, log: Log) -> list[dict]:
    """Unguided and `guided` tokens/s at each generated length."""
    rows = []
    for tokens in lengths:
        log(f"length {tokens}")
        unguided = ours_load(url, work, concurrency, requests, tokens)
        result = ours_load(url, work, concurrency, requests, tokens, guided.body())
        rows.append(_row(unguided, tokens=tokens, load=UNGUIDED))
        rows.append(_row(result, tokens=tokens, load=guided.label,
                         ratio=round(result.tokens_per_s / unguided.tokens_per_s, 3)))
    return rows


def best_of_n(url: str, work: Workload, ns: Sequence[int], requests: int, throughput_concurrency: int,
              tokens: int, log: Log) -> list[dict]:
    """Best-of-N by the workload's scorer: latency at concurrency 1 and throughput at
    `throughput_concurrency`, per N (not streamed: the answer is chosen at the end)."""
    rows = []
    for concurrency in (1, throughput_concurrency):
        for n in ns:
            log(f"best-of-{n} c={concurrency}")
            search = {"search": {"type": "best_of_n", "n": n, "scorer": work.scorer}}
            count = requests if concurrency == 1 else concurrency * max(1, requests // 2)
            result = ours_load(url, work, concurrency, count, tokens, search, stream=False)
            rows.append(_row(result, n=n))
    return rows


def hf_baseline(work: Workload, guided: GuidedLoad, levels: Sequence[int], requests_per_client: int, tokens: int,
                threads: int, dtype: str, log: Log) -> list[dict]:
    """Hugging Face `generate`, unguided and with the Q-sharp-style logits processor running
    `guided`'s guide model, batched per call (batch = concurrency), on the same prompts, with both
    models in `dtype` (the one the server ran)."""
    import torch

    from bench.hf_qsharp import measure_hf
    from bench.suite.workload import STRENGTH

    rows = []
    for concurrency in levels:
        prompts = work.prompts_for(concurrency * requests_per_client)
        for label, directory in ((UNGUIDED, None), (guided.label, guided.guide_dir)):
            log(f"hf c={concurrency}: {label}")
            measured = measure_hf(work.model_dir, directory, prompts, batch_size=concurrency, max_tokens=tokens,
                                  strength=STRENGTH, top_k=guided.top_k, temperature=1.0, seed=0, threads=threads,
                                  dtype=getattr(torch, dtype))
            rows.append({"implementation": "hf generate", "load": label, "concurrency": concurrency,
                         "requests": len(prompts), "output_tokens": measured.output_tokens,
                         "seconds": round(measured.seconds, 3), "tokens_per_s": round(measured.tokens_per_s, 2)})
    return rows
