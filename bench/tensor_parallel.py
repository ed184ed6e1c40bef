"""Guided decoding under vLLM's tensor parallelism: tensor_parallel_size=N (default 2) against 1.

    .venv/bin/python -m bench.tensor_parallel --out docs/results/tensor-parallel/demo
    .venv/bin/python -m bench.tensor_parallel --model runs/smollm2/base \\
        --guide-models runs/smollm2/guides/guides.json --qsharp value-r2 value-q --cd prefix --arm arm \\
        --genarm genarm --scorer value-r2 --prompt-file runs/smollm2/prompts/heldout.jsonl --first 4 \\
        --max-tokens 16 --serve-args "--max-model-len 256 --max-num-seqs 128" --tensor-parallel-size 3 \\
        --out docs/results/tensor-parallel/smollm2

What it measures: under tensor parallelism every rank samples, each with its own copy of the guide
models, and feeds its own token to its next step, while vLLM returns one rank's samples
(docs/guidance.md, "Under tensor and pipeline parallelism"); the ranks must decide alike, and alike
with one worker. The bench serves the model with one worker, then with `--tensor-parallel-size`
workers (it must divide the model's attention heads: SmolLM2-135M has 9, so 3), and sends each, one
request at a time, the same greedy guided requests (qsharp with each value model, cd, arm, genarm;
seeded best-of-N over qsharp-guided samples, scored by `--scorer`), with `ignore_eos` so that every
completion runs `--max-tokens`. It compares tokens, KL reports and candidate scores and, where tokens
differ, gives the first differing token and the top two logprobs there (vLLM's raw logprobs: the
base model's, before guidance). Writes OUT/results.json and OUT/results.md (server logs:
OUT/tp1/server.log, OUT/tpN/server.log).

Why float32: vLLM on CPU runs a float32 checkpoint ("auto") in bfloat16. In float32 the split
matmuls of several workers (summed by an all-reduce) differ from one worker's only by float32
rounding, so a differing token is a near-tie or a bug, not bfloat16's three significant digits.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.servers import eager_flags
from bench.suite.machine import describe_machine
from models.demo.build import demo_base_dir
from workflows.prompt_file import PromptRecord, read_prompts
from workflows.server_process import alignserve_command, start_server

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ("234+567=", "81+19=")
TOP_LOGPROBS = 2  # the top two at a differing token tell a near-tie
BEST_OF_N = 3
BEST_OF_N_SEED = 2


@dataclass(frozen=True)
class Guides:
    """The guide model each case steers or scores with, by its name in the served guide table."""

    qsharp: tuple[str, ...] = ("demo-value",)
    cd: str = "demo-prefix"
    arm: str = "demo-arm"
    genarm: str = "demo-genarm"
    scorer: str = "demo-reward"


@dataclass(frozen=True)
class Case:
    """A named request extension: what a case adds to the greedy request."""

    name: str
    fields: dict[str, Any]


def cases(guides: Guides) -> list[Case]:
    """One case per guidance type (qsharp once per value model), then best-of-N."""
    qsharp = [{"type": "qsharp", "model": name, "strength": 4.0} for name in guides.qsharp]
    return [
        *(Case(f"qsharp[{entry['model']}]", {"guidance": [entry]}) for entry in qsharp),
        Case(f"cd[{guides.cd}]", {"guidance": [{"type": "cd", "model": guides.cd, "strength": 3.0, "top_k": 8}]}),
        Case(f"arm[{guides.arm}]", {"guidance": [{"type": "arm", "model": guides.arm, "strength": 2.0}]}),
        Case(f"genarm[{guides.genarm}]",
             {"guidance": [{"type": "genarm", "model": guides.genarm, "strength": 1.0}]}),
        # Seeded sampling of the candidates: every rank draws the same numbers.
        Case(f"best-of-{BEST_OF_N}[qsharp {qsharp[0]['model']}, scorer {guides.scorer}]",
             {"guidance": qsharp[:1], "search": {"type": "best_of_n", "n": BEST_OF_N, "scorer": guides.scorer},
              "temperature": 1.0, "seed": BEST_OF_N_SEED}),
    ]


@dataclass(frozen=True)
class Output:
    """One completion: its tokens, the top logprobs at each, and its guidance report."""

    text: str
    tokens: list[str]
    top_logprobs: list[list[tuple[str, float]]]  # per token, best first
    kl: float
    steps: int
    candidate_scores: list[float] | None = None


def shown_path(path: Path) -> str:
    """`path` relative to the repository where it lies inside, for reports that do not name this machine."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def prompt_records(prompts: Sequence[str]) -> list[PromptRecord]:
    return [PromptRecord(id=prompt, prompt=prompt) for prompt in prompts]


def prompt_label(record: PromptRecord) -> str:
    """The text a reader knows the prompt by: a chat's last message, else the prompt."""
    return record.messages[-1]["content"] if record.messages is not None else str(record.prompt)


def send(client: httpx.Client, model: str, record: PromptRecord, case: Case, max_tokens: int) -> Output:
    """Send `case` on `record` (chat prompts to /v1/chat/completions) and read its first choice."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "cache": False,
                            "ignore_eos": True, **case.fields}
    if record.messages is not None:
        path = "/v1/chat/completions"
        body |= {"messages": list(record.messages), "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    else:
        path = "/v1/completions"
        body |= {"prompt": record.prompt, "logprobs": TOP_LOGPROBS}
    response = client.post(path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{case.name} on {record.id!r}: HTTP {response.status_code}: {response.text[:1000]}")
    choice = response.json()["choices"][0]
    if record.messages is not None:
        entries = choice["logprobs"]["content"]
        text, tokens = choice["message"]["content"], [entry["token"] for entry in entries]
        tops = [[(top["token"], top["logprob"]) for top in entry["top_logprobs"]] for entry in entries]
    else:
        text, tokens = choice["text"], choice["logprobs"]["tokens"]
        tops = [list(top.items()) for top in choice["logprobs"]["top_logprobs"]]
    report = choice["guidance"]
    return Output(text=text, tokens=tokens, top_logprobs=[sorted(top, key=lambda t: -t[1]) for top in tops],
                  kl=report["kl"], steps=report["steps"], candidate_scores=report.get("candidate_scores"))


@dataclass
class Run:
    """What one server gave: seconds until healthy, and each (case name, prompt id)'s output."""

    tensor_parallel_size: int
    start_seconds: float
    outputs: dict[tuple[str, str], Output] = field(default_factory=dict)


def thread_binding(tensor_parallel_size: int) -> dict[str, str]:
    """One CPU core per worker, round robin over the usable cores: without a binding vLLM refuses several
    CPU workers ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"); one worker binds
    itself. Ignored on a GPU."""
    if tensor_parallel_size == 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(cores[rank % len(cores)])
                                                  for rank in range(tensor_parallel_size))}


def serve_and_send(tensor_parallel_size: int, model: Path, serve_flags: Sequence[str],
                   records: Sequence[PromptRecord], case_list: Sequence[Case], max_tokens: int,
                   log_path: Path) -> Run:
    """Serve `model` in float32 with `tensor_parallel_size` workers, send every case on every prompt,
    one request at a time (a batch of other requests would change the matmuls' shapes), and stop."""
    flags = ["--dtype", "float32", "--tensor-parallel-size", str(tensor_parallel_size), *eager_flags(),
             *serve_flags]
    with start_server(f"alignserve (tensor_parallel_size={tensor_parallel_size})",
                      lambda port: alignserve_command(model, port, flags), log_path,
                      env=thread_binding(tensor_parallel_size)) as server:
        run = Run(tensor_parallel_size, server.start_seconds)
        with httpx.Client(base_url=server.url, timeout=600) as client:
            served_name = client.get("/v1/models").json()["data"][0]["id"]
            for case in case_list:
                for record in records:
                    run.outputs[case.name, record.id] = send(client, served_name, record, case, max_tokens)
    return run


@dataclass(frozen=True)
class Comparison:
    equal: bool
    first_divergence: int | None  # index of the first differing token (or the shorter length)
    kl_abs_diff: float
    score_abs_diff: float | None  # the largest over the candidates


def compare(one: Output, two: Output) -> Comparison:
    """Tokens as the server spells them, the KL reports, and best-of-N's candidate scores."""
    first = next((i for i, (a, b) in enumerate(zip(one.tokens, two.tokens)) if a != b), None)
    if first is None and len(one.tokens) != len(two.tokens):
        first = min(len(one.tokens), len(two.tokens))
    scores = None
    if one.candidate_scores is not None and two.candidate_scores is not None:
        scores = max(abs(a - b) for a, b in zip(one.candidate_scores, two.candidate_scores, strict=True))
    return Comparison(equal=first is None, first_divergence=first, kl_abs_diff=abs(one.kl - two.kl),
                      score_abs_diff=scores)


def results_of(one: Run, parallel: Run, records: Sequence[PromptRecord], case_list: Sequence[Case]) -> list[dict]:
    """One row per case and prompt: both outputs, by tensor_parallel_size, and their comparison
    (results.json's `rows`)."""
    rows = []
    for case in case_list:
        for record in records:
            outputs = [run.outputs[case.name, record.id] for run in (one, parallel)]
            rows.append({"case": case.name, "prompt": prompt_label(record), "prompt_id": record.id,
                         "request": case.fields, **asdict(compare(*outputs)),
                         "outputs": {str(run.tensor_parallel_size): asdict(output)
                                     for run, output in zip((one, parallel), outputs)}})
    return rows


def _code(text: str) -> str:
    """Text as a code span in a table cell."""
    return "`" + text.replace("\n", "\\n").replace("|", "\\|") + "`"


def _top_two(top: list[list[Any]]) -> str:
    shown = ", ".join(f"{_code(token)} {logprob:.6f}" for token, logprob in top[:2])
    return shown + (f" (gap {top[0][1] - top[1][1]:.2e})" if len(top) >= 2 else "")


def render_markdown(results: dict[str, Any]) -> str:
    """results.md from results.json's content."""
    rows, machine, setup = results["rows"], results["machine"], results["setup"]
    n = results["tensor_parallel_size"]
    sizes = ("1", str(n))
    equal = sum(row["equal"] for row in rows)
    starts = ", ".join(f"TP={tp}: {s:.1f} s" for tp, s in results["start_seconds"].items())
    binding = f", `VLLM_CPU_OMP_THREADS_BIND='{results['thread_binding']}'` for TP={n}" \
        if results["thread_binding"] else ""
    scored = [row for row in rows if row["score_abs_diff"] is not None]
    lines = [
        f"# Guidance with tensor_parallel_size={n} against 1 ({setup['model']})", "",
        f"Measured {results['date']} on {machine['cpu']} ({machine['usable_cpus']} usable CPUs, "
        f"{machine['memory_gib']} GiB, GPU: {machine['gpu'] or 'none'}), vLLM {machine['vllm']}, torch "
        f"{machine['torch']}; `--dtype float32`{binding}. Guide table: "
        f"{setup['guide_models'] or 'the demo guide models'}. Greedy, {setup['max_tokens']} tokens with "
        f"`ignore_eos`, one request at a time; best-of-N: {BEST_OF_N} candidates at temperature 1, seed "
        f"{BEST_OF_N_SEED}. Engine start (until healthy): {starts}; the whole run {results['wall_seconds']:.0f} s.",
        "", f"Command: `{results['command']}`", "",
        "Each case adds to the request:", "",
        *dict.fromkeys(f"- {row['case']}: `{json.dumps(row['request'])}`" for row in rows), "",
        f"**{equal} of {len(rows)} completions equal token for token; largest KL abs diff "
        f"{max(row['kl_abs_diff'] for row in rows):.1e}"
        + (f"; largest candidate score abs diff {max(row['score_abs_diff'] for row in scored):.1e}" if scored
           else "") + ".**", "",
        f"| case | prompt | tokens TP=1 | tokens TP={n} | equal | KL TP=1 | KL TP={n} | abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        one, many = (row["outputs"][size] for size in sizes)
        same = "True" if row["equal"] else f"False (from token {row['first_divergence']})"
        lines.append(f"| {row['case']} | {_code(row['prompt'])} | {_code(''.join(one['tokens']))} | "
                     f"{_code(''.join(many['tokens']))} | {same} | {one['kl']:.6f} | {many['kl']:.6f} | "
                     f"{row['kl_abs_diff']:.1e} |")
    if scored:
        lines += ["", "Best-of-N candidate scores:", ""]
        for row in scored:
            shown = ", ".join(f"TP={size} {row['outputs'][size]['candidate_scores']}" for size in sizes)
            lines.append(f"- {row['case']}, {_code(row['prompt'])}: {shown} "
                         f"(largest abs diff {row['score_abs_diff']:.1e})")
    differing = [row for row in rows if not row["equal"]]
    if differing:
        lines += ["", "Where tokens differ: the first differing token and the top two logprobs there "
                  "(vLLM's raw logprobs, the base model's before guidance):", ""]
        for row in differing:
            i = row["first_divergence"]
            sides = "; ".join(
                f"TP={size} {_code(output['tokens'][i])}, top two {_top_two(output['top_logprobs'][i])}"
                for size, output in ((size, row["outputs"][size]) for size in sizes) if i < len(output["tokens"]))
            lines.append(f"- {row['case']}, {_code(row['prompt'])}, token {i}: {sides}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Guides()
    parser.add_argument("--model", type=Path, default=demo_base_dir(), help="base model [default: the demo's]")
    parser.add_argument("--guide-models", type=Path, help="guide table [default: the demo guide models]")
    parser.add_argument("--qsharp", nargs="+", default=list(default.qsharp),
                        help="value models, a qsharp case each; the first also guides best-of-N")
    parser.add_argument("--cd", default=default.cd, help="prefix scorer of the cd case")
    parser.add_argument("--arm", default=default.arm)
    parser.add_argument("--genarm", default=default.genarm)
    parser.add_argument("--scorer", default=default.scorer, help="scorer of the best-of-N candidates")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", nargs="+", default=list(DEMO_PROMPTS), help="completion prompts")
    prompts.add_argument("--prompt-file", type=Path, help="JSON Lines prompt file (workflows/prompt_file.py)")
    parser.add_argument("--first", type=int, help="only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--serve-args", default="", help="more `alignserve serve` flags, one string")
    parser.add_argument("--tensor-parallel-size", type=int, default=2, help="workers compared with one")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    args = parser.parse_args()

    began = time.perf_counter()
    records = (read_prompts(args.prompt_file) if args.prompt_file else prompt_records(args.prompts))[:args.first]
    case_list = cases(Guides(tuple(args.qsharp), args.cd, args.arm, args.genarm, args.scorer))
    serve_flags = shlex.split(args.serve_args) + (["--guide-models", str(args.guide_models)]
                                                  if args.guide_models else [])
    # One server at a time: two would share, and slow, the CPU cores.
    one, parallel = (serve_and_send(tp, args.model, serve_flags, records, case_list, args.max_tokens,
                                    args.out / f"tp{tp}" / "server.log")
                     for tp in (1, args.tensor_parallel_size))
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.tensor_parallel " + shlex.join(sys.argv[1:]),
        "machine": describe_machine(),
        "setup": {"model": shown_path(args.model),
                  "guide_models": args.guide_models and shown_path(args.guide_models),
                  "max_tokens": args.max_tokens, "serve_flags": serve_flags},
        "tensor_parallel_size": args.tensor_parallel_size,
        "thread_binding": thread_binding(args.tensor_parallel_size).get("VLLM_CPU_OMP_THREADS_BIND"),
        "start_seconds": {str(run.tensor_parallel_size): round(run.start_seconds, 1) for run in (one, parallel)},
        "wall_seconds": round(time.perf_counter() - began, 1),
        "rows": results_of(one, parallel, records, case_list),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
