"""`alignserve run-batch` both ways on one batch file: in-process (no HTTP) and with `--url` against
`alignserve serve` started with the same engine flags; seeded guided chat-arith requests must give the
same outputs.

    python -m bench.run_batch_parity --model runs/smollm2/base --guide-models runs/smollm2/guides/guides.json \\
        --guide value-r1 --out bench/results/run_batch/smollm2

Writes requests.jsonl, local.jsonl, remote.jsonl, results.json and results.md to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import allocator_env
from guidance.verifiers import resolve_verifier
from server.machine import has_bf16_instructions, vector_flags
from workflows.prompt_file import chat_arith_prompts
from workflows.server_process import alignserve_command, start_server, stop_process

ALIGNSERVE = Path(sys.executable).parent / "alignserve"
SERVED_NAME = "base"


def batch_lines(count: int, guide: str, strength: float, max_tokens: int) -> list[tuple[str, dict, str]]:
    """(custom_id, batch line, reference answer) for the first `count` chat-arith problems (held-out first),
    each guided and seeded with its index."""
    prompts = (chat_arith_prompts("heldout") + chat_arith_prompts("train"))[:count]
    lines = []
    for i, prompt in enumerate(prompts):
        body = {"model": SERVED_NAME, "messages": list(prompt.messages), "max_tokens": max_tokens, "seed": i,
                "temperature": 0.8, "top_p": 0.9, "cache": False,
                "guidance": [{"type": "qsharp", "model": guide, "strength": strength}]}
        line = {"custom_id": f"{prompt.id}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append((prompt.id, line, prompt.answer))
    return lines


def run_batch(batch: Path, output: Path, flags: list[str]) -> tuple[float, str]:
    """Run `alignserve run-batch`; (wall seconds, its summary line)."""
    output.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run([str(ALIGNSERVE), "run-batch", "-i", str(batch), "-o", str(output), *flags],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run-batch failed ({done.returncode}): {done.stderr[-3000:]}")
    summary = [line for line in done.stderr.splitlines() if line.startswith("run-batch:")]
    return time.monotonic() - started, summary[-1] if summary else ""


def answers(path: Path) -> dict[str, dict]:
    """custom_id -> {text, kl, status} of every record in a run-batch output file."""
    out = {}
    for text in path.read_text().splitlines():
        record = json.loads(text)
        response = record["response"]
        if response is None or response["status_code"] != 200:
            out[record["custom_id"]] = {"status": None if response is None else response["status_code"]}
            continue
        choice = response["body"]["choices"][0]
        out[record["custom_id"]] = {"status": 200, "text": choice["message"]["content"],
                                    "kl": choice.get("guidance", {}).get("kl")}
    return out


def compare(ids: list[str], local: dict[str, dict], remote: dict[str, dict]) -> dict:
    """How many lines answered 200 both ways with the same text, how many also with the same KL (to 1e-4
    relative: the sum is taken in another order), and the largest relative KL difference at equal text."""
    both = [cid for cid in ids if local.get(cid, {}).get("status") == 200 and remote.get(cid, {}).get("status") == 200]
    same_text = [cid for cid in both if local[cid]["text"] == remote[cid]["text"]]
    kl_gap = {cid: abs(local[cid]["kl"] - remote[cid]["kl"]) / max(abs(local[cid]["kl"]), 1e-9) for cid in same_text}
    return {"same_text": len(same_text),
            "same_text_and_kl": sum(math.isclose(local[c]["kl"], remote[c]["kl"], rel_tol=1e-4, abs_tol=1e-6)
                                    for c in same_text),
            "max_relative_kl_difference": round(max(kl_gap.values(), default=0.0), 6),
            "different_text": [cid for cid in ids if cid not in same_text]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run_batch_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--guide-models", type=Path, required=True)
    parser.add_argument("--guide", required=True, help="the Q-sharp value model every request is guided by")
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dtype", default="float32",
                        help="float32 by default: vLLM's CPU kernels are not batch-invariant in bfloat16, and the "
                             "two runs batch requests with different neighbours")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    lines = batch_lines(args.count, args.guide, args.strength, args.max_tokens)
    batch = args.out / "requests.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for _, line, _ in lines))
    engine = ["--served-model-name", SERVED_NAME, "--guide-models", str(args.guide_models), "--dtype", args.dtype,
              "--max-model-len", str(args.max_model_len), "--enforce-eager"]

    local_s, local_summary = run_batch(batch, args.out / "local.jsonl",
                                       ["--model", str(args.model), "--concurrency", str(args.concurrency), *engine])
    server = start_server("alignserve", lambda port: alignserve_command(args.model, port, engine),
                          args.out / "server.log", env=allocator_env())
    try:
        remote_s, remote_summary = run_batch(batch, args.out / "remote.jsonl",
                                             ["--url", server.url, "--concurrency", str(args.concurrency)])
    finally:
        stop_process(server.process)

    local, remote = answers(args.out / "local.jsonl"), answers(args.out / "remote.jsonl")
    verifier = resolve_verifier("math")
    ids = [cid for cid, _, _ in lines]
    comparison = compare(ids, local, remote)
    ok = [cid for cid in ids if local.get(cid, {}).get("status") == 200]
    correct = sum(verifier(line["body"]["messages"][-1]["content"], local[cid]["text"], answer)
                  for cid, line, answer in lines if cid in ok)
    result = {
        "requests": len(lines), "guide": args.guide, "strength": args.strength, "dtype": args.dtype,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "in_process": {"seconds": round(local_s, 1), "summary": local_summary},
        "url": {"seconds": round(remote_s, 1), "summary": remote_summary},
        "answered_200": len(ok), **comparison,
        "math_verifier_pass_rate": round(correct / max(len(ok), 1), 3),
        "cpu": {"vector_flags": vector_flags(),
                "bf16_instructions": has_bf16_instructions()},
        "command": "python -m bench.run_batch_parity " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(
        f"# run-batch in-process and against a server\n\n```\n{result['command']}\n```\n\n"
        f"| way | seconds | summary |\n|---|---|---|\n"
        f"| in-process | {result['in_process']['seconds']} | {local_summary} |\n"
        f"| --url | {result['url']['seconds']} | {remote_summary} |\n\n"
        f"{comparison['same_text']} of {len(lines)} seeded guided requests gave the same text both ways, "
        f"{comparison['same_text_and_kl']} also the same KL to 1e-4 (largest relative KL difference "
        f"{comparison['max_relative_kl_difference']}); {args.dtype}, concurrency {args.concurrency}. "
        f"Pass rate by `--verifier math` against each line's answer: {result['math_verifier_pass_rate']}.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
