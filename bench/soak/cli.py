"""A soak and fault run of alignserve, bounded in time: mixed load with faults injected while it runs.

    python -m bench.soak [--model demo|DIR] [--guide-models FILE] [--minutes M] [--concurrency 32,64]
                         [--out DIR] [--ci]

Starts a redis-server (free port, no persistence) and `alignserve serve` on 127.0.0.1 with the
Redis cache, a small engine (`--max-num-seqs`, `--max-waiting-requests`) and guide-KV budget sized
so that the mixed load fits and the faults below bite, the fault harness (bench/faults) on its
PYTHONPATH, and `--request-timeout-s` / `--scorer-timeout-s` when `serve --help` lists them. Then:

- warm-up, then soak rounds for --minutes: the mix at each concurrency in turn. The mix is
  completions and chat, streamed and not, unguided, each guidance module the server lists with a
  guide model of its own, two entries composed, structured output with guidance, best-of-N, pruned
  best-of-N, blockwise, cached replays (a seeded request twice with caching on: the second must be
  identical), seeded replays with `"cache": false` (must be identical too), and clients that leave
  a stream after a few chunks;
- redis: Redis killed mid-load and restarted on its port; every request must still succeed;
- guide-kv: guided requests that fill most of the guide-KV budget, beside the mix: clean 429s;
- burst: more engine requests at once than --max-num-seqs + --max-waiting-requests: 429 with
  Retry-After for the excess, 200 for the rest;
- engine-kill: the engine core SIGKILLed under load: every request in flight answers within 10 s
  (503 `engine_dead`, or a stream's `engine_dead` error event and `data: [DONE]`), /health answers
  503 and the server exits non-zero within 15 s; it is then restarted (as a supervisor would) and
  must serve within its normal start time (twice the first start + 10 s: the machine may be busy),
  then the mix again (restarted);
- stalled-scorer: a best-of-N whose scorer hangs ends 503 `scorer_timeout` within the scorer
  timeout and a few seconds, and requests after it are served.

After each phase: every request ended cleanly (200, a 4xx or 503 with the OpenAI error envelope;
never a 500; none hung past the server's request deadline + 30 s), the engine's unfinished request
count and the guide-KV blocks held return to 0, replays matched, and the RSS of the server and its
children has not grown over 25% since the server's first phase. Throughput (completion tokens/s)
per phase, and over the soak rounds in their first vs last 5 minutes (halves of a shorter soak).
Writes `results.json` and `report.md` to --out (default bench/results/soak/<model>-<minutes>min),
with the machine (bench.suite.machine); exit code 1 when a check failed, 2 when the run itself
broke. `--ci`: the demo model, a few minutes in all (CI runs it: tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from bench.soak.checks import throughput_windows
from bench.soak.phases import (burst_phase, engine_kill_phase, guide_kv_phase, mixed_phase, redis_phase,
                               restarted_phase, soak_rounds, stall_phase)
from bench.soak.report import failed_checks, phase_summary, write_results
from bench.soak.server import (ROOT, Soak, SoakPlan, guide_block_bytes, prompt_token_bound, server_flags,
                               server_limits, server_options, soak_prompts)
from bench.suite.cli import _ints  # the suite's --concurrency parser
from workflows.server_process import alignserve_command

FULL = SoakPlan(concurrency=(32, 64, 128), minutes=30.0, requests_per_client=4, round_max_s=180.0,
                request_timeout_s=120.0, scorer_timeout_s=10.0, fault_load_s=20.0)
CI = SoakPlan(concurrency=(32, 64), minutes=0.75, requests_per_client=2, round_max_s=60.0,
              request_timeout_s=60.0, scorer_timeout_s=5.0, fault_load_s=8.0, dtype="float32")


def run_phases(soak: Soak) -> None:
    soak.start("main")
    mixed_phase(soak, "warm-up", soak.plan.concurrency[0])
    soak_rounds(soak)
    redis_phase(soak)
    guide_kv_phase(soak)
    burst_phase(soak)
    engine_kill_phase(soak)
    restarted_phase(soak)
    stall_phase(soak)


def results(soak: Soak, machine: dict, flags: Sequence[str], options: set[str], began: float,
            error: str | None) -> dict:
    rounds = [p for p in soak.phases if p.name.startswith("soak-")]
    windows = throughput_windows([r for p in rounds for r in p.records], rounds[0].began,
                                 rounds[-1].began + rounds[-1].seconds) if rounds else {}
    phases = [phase_summary(p) for p in soak.phases]
    failed = failed_checks(phases)
    return {"plan": asdict(soak.plan), "machine": machine, "server_flags": list(flags),
            "server_options": sorted(options), "limits": asdict(soak.limits), "starts_s": soak.starts,
            "stops": soak.stops, "offer": None if soak.offer is None else asdict(soak.offer), "phases": phases,
            "soak_throughput": windows, "failed_checks": failed, "error": error,
            "passed": not failed and error is None, "wall_s": round(time.monotonic() - began, 1)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="base model directory, or demo [demo]")
    parser.add_argument("--guide-models", type=Path, help="guide-model table [the demo guides for the demo model]")
    parser.add_argument("--minutes", type=float,
                        help=f"soak rounds after the warm-up [{FULL.minutes:g}; --ci: {CI.minutes:g}]")
    parser.add_argument("--concurrency", type=_ints,
                        help="client counts of the soak rounds; the faults run at the first [32,64,128; --ci: 32,64]")
    parser.add_argument("--out", type=Path, help="results directory [bench/results/soak/<model>-<minutes>min]")
    parser.add_argument("--ci", action="store_true", help="the short form: demo model, a few minutes in all")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> SoakPlan:
    base = CI if args.ci else FULL
    return replace(base, minutes=base.minutes if args.minutes is None else args.minutes,
                   concurrency=tuple(args.concurrency or base.concurrency))


def model_paths(args: argparse.Namespace) -> tuple[str, Path, Path | None]:
    """(name, model directory, guide-model table: None when the server loads none)."""
    from models.demo.build import demo_base_dir
    from models.demo.paths import demo_guides_file

    if args.ci or args.model == "demo":
        return "demo", demo_base_dir(), args.guide_models or demo_guides_file()
    model = Path(args.model)
    return model.name, model, args.guide_models


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the servers


def main(argv: Sequence[str] | None = None) -> int:
    from bench.suite.machine import describe_machine
    from tests.redis_server import RedisServer

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    plan = plan_from(args)
    name, model_dir, guides = model_paths(args)
    out = args.out or ROOT / "bench" / "results" / "soak" / (f"{name}-ci" if args.ci else f"{name}-{plan.minutes:g}min")
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    options = server_options()
    prompts = soak_prompts(name, model_dir)
    limits = server_limits(max(plan.concurrency), prompt_token_bound(model_dir, prompts), plan.max_model_len,
                           None if guides is None else guide_block_bytes(guides))
    redis = RedisServer().start()
    flags = server_flags(plan, limits, redis.url, options, args.guide_models)
    soak = Soak(plan, out, redis, lambda port: alignserve_command(model_dir, port, flags), prompts, limits)
    error = None
    try:
        run_phases(soak)
    except Exception:
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    finally:
        soak.stop()
        redis.kill()
    result = results(soak, describe_machine(), flags, options, began, error)
    write_results(out, result)
    print(f"[soak] {'passed' if result['passed'] else 'FAILED'} in {result['wall_s']:.0f} s; {out / 'report.md'}")
    return 2 if error else 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
