"""The server a soak runs against (bench/soak): how it is sized, started, watched and stopped.

`server_limits` sizes the engine queue and the guide-KV budget so that the mix never overflows
them and the faults still do; `Soak` holds the run's redis-server and alignserve (started with
the fault harness, bench/faults, on its PYTHONPATH), numbers the requests it sends, and records
each phase with the checks every phase gets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil

from bench.faults.sitecustomize import FAULTS_ENV, STALL_SCORER
from bench.servers import eager_flags
from bench.soak.checks import (Check, check_clean, check_memory, check_no_hung, check_replays, check_zero,
                               memory_growth_pct, metric_sum, replay_counts)
from bench.soak.report import Phase
from bench.soak.traffic import (MAX_TOKENS, SEARCH_CANDIDATES, Builder, Load, Offer, RequestRecord, RequestSpec, mix,
                                mixed_requests, offer_from_listing)
from guidance.kv_budget import GIB, blocks_for
from workflows.server_process import ServerProcess, start_server, stop_process

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
FAULTS_DIR = ROOT / "bench" / "faults"

MIN_NUM_SEQS = 16
SETTLE_S = 60.0  # how long the engine's counters may take to return to 0 after a phase
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
GUIDE_KV_HELD = "alignserve_guide_kv_blocks_held"
OPTIONAL_FLAGS = ("--request-timeout-s", "--scorer-timeout-s")


@dataclass(frozen=True)
class SoakPlan:
    """Sizes and time bounds of a run."""

    concurrency: tuple[int, ...]  # of the soak rounds; the faults run at the first
    minutes: float  # of soak rounds, after the warm-up
    requests_per_client: int  # requests per client in a round
    round_max_s: float
    request_timeout_s: float  # the server's request deadline (--request-timeout-s when it has one)
    scorer_timeout_s: float
    fault_load_s: float  # load around the Redis kill (killed at a quarter of it, restarted at half)
    max_model_len: int = 512
    # The base model's dtype (None: the server's default). Seeded replays are compared exactly, and in
    # bfloat16 two requests batched with different neighbours can break a near-tie between two tokens apart
    # (seen on the demo in CI and on SmolLM2): vLLM's CPU kernels are not batch-invariant.
    dtype: str | None = None


@dataclass(frozen=True)
class ServerLimits:
    max_num_seqs: int
    max_waiting_requests: int
    guide_kv_blocks: int  # per guide model at float32 (a narrower guide dtype buys more)
    guide_kv_gib: float | None  # None: no guide models, no budget


def server_limits(max_concurrency: int, prompt_tokens: int, max_model_len: int, block_bytes: int | None
                  ) -> ServerLimits:
    """Limits under which the mix at `max_concurrency` is never refused, and the faults still bite.

    The engine queue holds every engine request the mix can hold at once; the guide-KV budget every
    guided request (one engine request per guide model) at once. The budget must stay under the worst
    case of `max_num_seqs` sequences at `max_model_len` (at a 2-byte guide dtype it buys twice the
    blocks), or the server would not check it.
    """
    blocks = max_concurrency * blocks_for(prompt_tokens + MAX_TOKENS)
    max_num_seqs = max(MIN_NUM_SEQS, 2 * blocks // blocks_for(max_model_len) + 1)
    gib = None if block_bytes is None else (blocks + 0.5) * block_bytes / GIB
    return ServerLimits(max_num_seqs, max_concurrency * SEARCH_CANDIDATES, blocks, gib)


def server_flags(plan: SoakPlan, limits: ServerLimits, redis_url: str, options: set[str],
                 guide_models: Path | None) -> list[str]:
    """`alignserve serve` flags of a soak: Redis, the limits, eager mode on CPU, the timeouts it knows."""
    flags = ["--redis-url", redis_url, "--max-model-len", str(plan.max_model_len),
             "--max-num-seqs", str(limits.max_num_seqs), "--max-waiting-requests", str(limits.max_waiting_requests),
             *eager_flags()]
    if limits.guide_kv_gib is not None:
        flags += ["--guide-kv-cache-space-gib", repr(limits.guide_kv_gib)]
    if guide_models is not None:
        flags += ["--guide-models", str(guide_models)]
    if "--request-timeout-s" in options:
        flags += ["--request-timeout-s", f"{plan.request_timeout_s:g}"]
    if "--scorer-timeout-s" in options:
        flags += ["--scorer-timeout-s", f"{plan.scorer_timeout_s:g}"]
    if plan.dtype is not None:
        flags += ["--dtype", plan.dtype]
    return flags


def server_options() -> set[str]:
    """Which of OPTIONAL_FLAGS `alignserve serve --help` lists (settings newer than some servers)."""
    alignserve = Path(sys.executable).parent / "alignserve"
    text = subprocess.run([str(alignserve), "serve", "--help"], capture_output=True, text=True, timeout=300).stdout
    return {flag for flag in OPTIONAL_FLAGS if flag in text}


def soak_prompts(name: str, model_dir: Path) -> list[str]:
    """The demo task's own prompts for the demo model (it was trained on them), else the suite's."""
    if name == "demo":
        from models.demo.task import held_out_problems

        return [problem.prompt for problem in held_out_problems()]
    from bench.suite.workload import bench_prompts

    return bench_prompts(model_dir)


def prompt_token_bound(model_dir: Path, prompts: Sequence[str]) -> int:
    """The most tokens a soak prompt takes, as a completion prompt or as a chat message."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = list(prompts)
    if tokenizer.chat_template:
        texts += [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in prompts]
    return max(len(tokenizer(text)["input_ids"]) for text in texts)


def guide_block_bytes(guides_file: Path) -> int | None:
    """The largest KV block of the per-step guide models in `guides_file` at float32 (None: there are none);
    its scorers served by URL hold no guide KV."""
    import torch

    from guidance.catalog import GuideCatalog
    from guidance.kv_budget import GUIDE_KV_BLOCK_SIZE, guide_kv_plans

    plans = guide_kv_plans(GuideCatalog.from_table(guides_file), torch.float32, None, 1, GUIDE_KV_BLOCK_SIZE)
    return max((plan.block_bytes for plan in plans), default=None)


def engine_core(pid: int) -> psutil.Process | None:
    """vLLM's engine-core process among the children of `pid` (named `VLLM::EngineCore` by setproctitle)."""
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    return None


def sample_memory(pid: int) -> dict:
    """RSS in MiB of the server process and of all its children (summed, and by process name)."""
    server = psutil.Process(pid)
    by_name: Counter[str] = Counter()
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            by_name[child.name()] += child.memory_info().rss / 2**20
    return {"server_mib": round(server.memory_info().rss / 2**20, 1), "children_mib": round(sum(by_name.values()), 1),
            "by_process": {name: round(mib, 1) for name, mib in sorted(by_name.items())}}


def settle(read: Callable[[], float], timeout_s: float = SETTLE_S) -> float | None:
    """Poll `read` until it gives 0 or the time runs out; its last value (None: the server did not answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = read()
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Soak:
    """A run: the Redis and alignserve it started, the server's offer, and the phases so far."""

    def __init__(self, plan: SoakPlan, out: Path, redis: RedisServer, command: Callable[[int], list[str]],
                 prompts: Sequence[str], limits: ServerLimits) -> None:
        self.plan, self.out, self.redis, self.command = plan, out, redis, command
        self.prompts, self.limits = list(prompts), limits
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS_DIR), os.environ.get("PYTHONPATH")])),
                    FAULTS_ENV: STALL_SCORER}
        self.server: ServerProcess | None = None
        self.server_name = ""
        self.starts: dict[str, float] = {}  # seconds each start took to answer /health
        self.stops: dict[str, dict] = {}  # how each server ended
        self.offer: Offer | None = None
        self.builders: dict[str, Builder] = {}
        self.phases: list[Phase] = []
        self.baseline: dict | None = None  # memory after the server's first phase
        self._next = 0

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def timeout_s(self) -> float:
        """Each client request's deadline: the server's request deadline + 30 s."""
        return self.plan.request_timeout_s + 30.0

    def start(self, name: str) -> None:
        self.server = start_server(name, self.command, self.out / f"server-{name}.log", env=self.env,
                                   timeout_s=START_TIMEOUT_S)
        self.server_name, self.starts[name], self.baseline = name, round(self.server.start_seconds, 1), None
        model = httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"]
        self.offer = offer_from_listing(model, httpx.get(f"{self.url}/v1/guidance", timeout=30).json())
        self.builders = mix(self.offer)

    def stop(self) -> None:
        """Stop the server if it runs (SIGTERM, SIGKILL after STOP_TIMEOUT_S) and end whatever is left
        of its process group; records how it ended."""
        if self.server is None:
            return
        began, running = time.monotonic(), self.server.process.poll() is None
        stop_process(self.server.process, STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.server.process.pid, signal.SIGKILL)
        self.stops[self.server_name] = {"stopped_by_soak": running, "stop_s": round(time.monotonic() - began, 1),
                                        "exit_code": self.server.process.returncode}
        self.server = None

    def requests(self, count: int) -> Iterator[RequestSpec]:
        """`count` mixed requests never sent before (new prompts and seeds)."""
        first, self._next = self._next, self._next + count
        return mixed_requests(self.builders, self.prompts, first, count)

    def load(self, specs: Iterable[RequestSpec], concurrency: int, duration_s: float) -> Load:
        """A load on the server, each request bounded by the run's client deadline."""
        return Load(self.url, specs, concurrency, self.timeout_s, duration_s)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def settled(self) -> dict[str, float | None]:
        """The engine's unfinished requests and the guide-KV blocks held, once back to 0 (or SETTLE_S on)."""
        return {"unfinished_requests": settle(lambda: httpx.get(f"{self.url}/health", timeout=30)
                                              .json()["unfinished_requests"]),
                "guide_kv_blocks_held": settle(lambda: metric_sum(self.metrics(), GUIDE_KV_HELD))}

    def finish(self, name: str, concurrency: int, began: float, records: list[RequestRecord],
               checks: Sequence[Check] = (), facts: dict | None = None) -> Phase:
        """Record a phase: `checks`, then those every phase gets; memory against the server's first phase."""
        seconds, settled = time.monotonic() - began, self.settled()
        phase = Phase(name, self.server_name, concurrency, round(seconds, 2), records,
                      [check_no_hung(records), check_clean(records), check_replays(replay_counts(records)), *checks,
                       check_zero("unfinished engine requests", settled["unfinished_requests"]),
                       check_zero("guide-KV blocks held", settled["guide_kv_blocks_held"])],
                      began, sample_memory(self.server.process.pid), settled=settled, facts=facts or {})
        if self.baseline is None:
            self.baseline = phase.memory
        else:
            phase.memory_growth_pct = memory_growth_pct(self.baseline, phase.memory)
            phase.checks.append(check_memory(phase.memory_growth_pct))
        return self.record(phase)

    def record(self, phase: Phase) -> Phase:
        """Keep `phase` and print its line of progress."""
        self.phases.append(phase)
        print(phase.line(), flush=True)
        return phase
