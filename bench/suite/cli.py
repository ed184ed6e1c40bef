"""`alignserve bench`: the side-by-side benchmark suite, written to a results directory.

    alignserve bench [--model DIR --guide-models FILE] [--out bench/results/suite-NAME] [--smoke]

Starts alignserve (unguided, each guide model's module, the length sweep and best-of-N run on
it), then vLLM's own OpenAI server on the same model and settings (the passthrough comparison,
with our load generator and with `vllm bench serve`), one after the other on this machine, then
runs the Hugging Face `generate` baseline in this process. Writes `results.json` (with the
machine), `report.md` (tables and the targets) and PNG plots into `--out`. `--smoke` runs every
section at a size that takes a couple of minutes on the demo model (CI runs it); its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("passthrough", "overhead", "length", "best-of-n", "hf")
SMOKE = {"concurrency": [1, 2], "tokens": 8, "requests_per_client": 1, "lengths": [8, 16], "length_concurrency": 2,
         "length_requests": 2, "best_of_n": [1, 2], "best_of_n_concurrency": 2, "best_of_n_requests": 2}


# A 1B-class guide: Llama-3.2-1B's shape (16 layers, 8 KV heads of 64).
ONE_B_GUIDE = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
               "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
               "max_position_embeddings": 131072}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    from models.demo.build import demo_base_dir
    from models.demo.paths import demo_guides_file

    bench = commands.add_parser("bench", help="the side-by-side benchmark suite (bench/results/)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--model", type=Path, default=demo_base_dir(), help="base model directory [the demo model]")
    bench.add_argument("--guide-models", type=Path, default=demo_guides_file(),
                       help="guide-model table (JSON name -> directory) [the demo guides]")
    bench.add_argument("--served-model-name", help="model id sent [demo-base for the demo, else the directory name]")
    bench.add_argument("--out", type=Path, help="results directory [bench/results/suite-<model directory name>]")
    bench.add_argument("--sections", type=_names, default=list(SECTIONS),
                       help=f"comma-separated, of {','.join(SECTIONS)} [all]")
    bench.add_argument("--guides", type=_names,
                       help="guide models measured, comma-separated [one per module and head shape]")
    bench.add_argument("--scorer", help="best-of-N scorer [a reward head, else the first V-type value model]")
    bench.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="client counts [1,8,32]")
    bench.add_argument("--tokens", type=int, default=64, help="generated tokens per request [64]")
    bench.add_argument("--requests-per-client", type=int, default=2,
                       help="requests per load = concurrency x this [2]")
    bench.add_argument("--lengths", type=_ints, default=[64, 256, 1024],
                       help="generated tokens of the length sweep; lengths past the model's context are "
                            "skipped [64,256,1024]")
    bench.add_argument("--length-concurrency", type=int, default=4, help="clients in the length sweep [4]")
    bench.add_argument("--length-requests", type=int, default=4, help="requests per length and load [4]")
    bench.add_argument("--best-of-n", type=_ints, default=[1, 4, 8, 16], help="N of the best-of-N section [1,4,8,16]")
    bench.add_argument("--best-of-n-concurrency", type=int, default=8,
                       help="clients of the best-of-N throughput load [8]")
    bench.add_argument("--best-of-n-requests", type=int, default=4, help="requests per N at concurrency 1 [4]")
    bench.add_argument("--hf-threads", type=int, default=1, help="torch threads of the HF baseline [1]")
    bench.add_argument("--kv-cache-space-gib", type=int, default=2, help="base model KV cache on CPU, both servers [2]")
    bench.add_argument("--guide-kv-cache-space-gib", type=float, default=1.0,
                       help="alignserve's KV budget per guide model [1.0]")
    bench.add_argument("--smoke", action="store_true", help="every section at a tiny size (CI); figures mean nothing")
    bench.set_defaults(run=run_bench)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _context(work, lengths: list[int], tokens: int, model_dir: Path) -> tuple[int, list[int]]:
    """max_model_len for both servers (longest prompt + longest generation) and the lengths that fit."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    longest_prompt = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in work.prompts) + 2
    limit = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    fitting = [n for n in lengths if longest_prompt + n <= limit]
    needed = longest_prompt + max([tokens, *fitting])
    return min(limit, -(-needed // 16) * 16), fitting


def _input_len(work, model_dir: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return round(sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in work.prompts) / len(work.prompts))


def engine_dtype(log: Path) -> str:
    """The dtype alignserve's engine runs the base model in, from its start-up line (server.engine)."""
    found = re.search(r"engine started in .*dtype=(\w+)", log.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no 'engine started' line with the dtype in {log}")
    return found.group(1)


def _guide_kv_lines(log: Path) -> list[str]:
    """The guide-KV plan alignserve printed at start-up (guidance.kv_budget.GuideKVPlan)."""
    return [line.split("guide model ", 1)[1] for line in log.read_text(errors="replace").splitlines()
            if "guide model " in line and "KV cache" in line]


def one_b_guide_plan(budget_gib: float) -> dict:
    """The guide KV memory of a 1B-class guide (Llama-3.2-1B's shape, bfloat16) for 256 sequences at
    max_model_len 8192, under `budget_gib`: what the server would print at start-up."""
    import torch

    from guidance.kv_budget import GIB, guide_kv_plan
    from models.runtime.config import DecoderConfig

    plan = guide_kv_plan("1B-class", DecoderConfig.from_dict(ONE_B_GUIDE), torch.bfloat16, budget_gib, max_num_seqs=256, max_model_len=8192)
    return {"line": plan.describe(), "gib": plan.blocks * plan.block_bytes / GIB, "budget_gib": budget_gib}


def run_bench(args: argparse.Namespace) -> int:
    from bench.servers import start, stop
    from bench.suite import sections
    from bench.suite.machine import describe_machine
    from bench.suite.report import markdown, plots, targets
    from bench.suite.workload import build_workload
    from models.demo.build import demo_base_dir

    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    model_dir = args.model.resolve()
    served = args.served_model_name or ("demo-base" if model_dir == demo_base_dir().resolve() else model_dir.name)
    out = args.out or ROOT / "bench" / "results" / f"suite-{model_dir.name}"
    out.mkdir(parents=True, exist_ok=True)
    work = build_workload(model_dir, args.guide_models.resolve(), served, args.guides, args.scorer)
    max_model_len, lengths = _context(work, args.lengths, args.tokens, model_dir)
    skipped = sorted(set(args.lengths) - set(lengths))
    if skipped:
        _log(f"length sweep: {skipped} tokens do not fit the model's context; skipped")
    results: dict = {
        "setup": {"command": "alignserve bench " + shlex.join(sys.argv[2:]), "model": str(model_dir),
                  "guide_models": str(args.guide_models), "max_model_len": max_model_len,
                  "tokens": args.tokens, "concurrency": args.concurrency,
                  "requests_per_client": args.requests_per_client, "length_concurrency": args.length_concurrency,
                  "scorer": work.scorer, "hf_threads": args.hf_threads,
                  "loads": {load.label: load.bound.describe() for load in work.loads}},
        "machine": describe_machine(),
    }
    chosen = set(args.sections)
    log_dir = out / "logs"
    # The response cache off: vLLM has none, and the loads repeat seeded requests.
    server_flags = ["--guide-models", str(work.guides_file), "--guide-kv-cache-space-gib",
                    f"{args.guide_kv_cache_space_gib:g}", "--kv-cache-space-gib", str(args.kv_cache_space_gib),
                    "--cache", "off"]
    if chosen & {"passthrough", "overhead", "length", "best-of-n"}:
        process, url, start_s = start("alignserve", model_dir, max_model_len, log_dir, server_flags, served,
                                      args.kv_cache_space_gib)
        _log(f"alignserve healthy after {start_s:.1f} s")
        try:
            sections.warm_up(url, work, max(args.concurrency), work.loads)
            if "passthrough" in chosen:
                results["passthrough"] = sections.passthrough(
                    "alignserve", url, work, args.concurrency, args.requests_per_client, args.tokens,
                    _input_len(work, model_dir), _log)
            if "overhead" in chosen:
                results["overhead"] = sections.guidance_overhead(url, work, args.concurrency,
                                                                 args.requests_per_client, args.tokens, _log)
            if "length" in chosen and lengths:
                results["length"] = sections.length_scaling(url, work, work.loads[0], lengths,
                                                            args.length_concurrency, args.length_requests, _log)
            if "best-of-n" in chosen:
                results["best_of_n"] = sections.best_of_n(url, work, args.best_of_n, args.best_of_n_requests,
                                                          args.best_of_n_concurrency, args.tokens, _log)
        finally:
            stop(process)
        results["guide_kv"] = {"startup": _guide_kv_lines(log_dir / "alignserve.log"),
                               "one_b_guide": one_b_guide_plan(args.guide_kv_cache_space_gib)}
        results["setup"]["dtype"] = engine_dtype(log_dir / "alignserve.log")
    if "passthrough" in chosen:
        process, url, start_s = start("vllm", model_dir, max_model_len, log_dir, (), served, args.kv_cache_space_gib)
        _log(f"vllm healthy after {start_s:.1f} s")
        try:
            sections.warm_up(url, work, max(args.concurrency))
            results["passthrough"] += sections.passthrough("vllm", url, work, args.concurrency,
                                                           args.requests_per_client, args.tokens,
                                                           _input_len(work, model_dir), _log)
        finally:
            stop(process)
    if "hf" in chosen:
        results["hf"] = sections.hf_baseline(work, work.loads[0], args.concurrency, args.requests_per_client,
                                             args.tokens, args.hf_threads, results["setup"].get("dtype", "float32"),
                                             _log)
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(markdown(results) + "\n")
    written = plots(results, out)
    _log(f"wrote {out / 'results.json'}, {out / 'report.md'} and {len(written)} plots")
    print(markdown(results))
    failed = sum(r.get("failed", 0) for key in ("passthrough", "overhead", "length", "best_of_n")
                 for r in results.get(key, []))
    return 1 if failed else 0
