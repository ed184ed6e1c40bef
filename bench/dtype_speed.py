"""bfloat16 against float32 on this CPU, for the matmul shape that dominates a SmolLM2 step.

The default dtype (server.machine.resolve_dtype) is bfloat16 only where the CPU has bfloat16
instructions; this measures whether that rule picks the faster dtype here. Both dtypes run the same
`torch.nn.functional.linear` (rows x in_features @ in_features x out_features, one thread by default),
alternating, best of several repeats:

    .venv/bin/python -m bench.dtype_speed [--rows 256 --in-features 576 --out-features 1536] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.suite.machine import describe_machine


def linear_seconds(rows: int, in_features: int, out_features: int, dtype: torch.dtype, repeats: int) -> float:
    """Best time of one linear over `repeats` calls (after one warm-up call)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    F.linear(x, weight)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        F.linear(x, weight)
        best = min(best, time.perf_counter() - began)
    return best


def measure(rows: int, in_features: int, out_features: int, threads: int, rounds: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    flops = 2 * rows * in_features * out_features
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    for _ in range(rounds):  # alternate, so that a noisy moment hits both
        for name in best:
            best[name] = min(best[name], linear_seconds(rows, in_features, out_features, getattr(torch, name), repeats))
    machine = describe_machine()
    faster = min(best, key=best.get)
    return {
        "shape": [rows, in_features, out_features],
        "threads": threads,
        "seconds": best,
        "gflop_per_s": {name: flops / seconds / 1e9 for name, seconds in best.items()},
        "bfloat16_over_float32_time": best["bfloat16"] / best["float32"],
        "faster": faster,
        "default_dtype": machine["default_dtype"],
        # "auto" left to vLLM is the model's own dtype, bfloat16 for SmolLM2 and most checkpoints.
        "rule_picks_faster": (machine["default_dtype"] == "float32") == (faster == "float32"),
        "machine": machine,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dtype_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.rows, args.in_features, args.out_features, args.threads, args.rounds, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
