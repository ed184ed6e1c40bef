"""Remote scorers through the real server and engine: best-of-N scored by a pooling server reached by URL
(tests.pooling_server, vLLM's /classify and /pooling shapes), and that server failing, hanging or going
away mid-request: a 502/503 naming the scorer within its timeout, and the server serving on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.demo.paths import demo_guides_file
from tests.conftest import RunningServer, start_server, stop_server
from tests.pooling_server import text_score
from workflows.server_process import free_port, stop_process

pytestmark = pytest.mark.engine

PROMPT = "234+567="
TIMEOUT_S = 2.0  # the scorers' timeout_s
RETRIES = 2


class PoolingServer:
    """tests.pooling_server on a fixed port, so that it can be restarted where the guide table points."""

    def __init__(self, log_path: Path) -> None:
        self.port, self.log_path = free_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.pooling_server", "--port", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the pooling server did not start: {self.log_path.read_text()[-2000:]}")

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.control("ok")

    def control(self, mode: str) -> None:
        httpx.post(f"{self.url}/control", json={"mode": mode}, timeout=5).raise_for_status()

    def calls(self) -> list[dict]:
        return httpx.get(f"{self.url}/calls", timeout=5).json()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=5)


@pytest.fixture(scope="module")
def pooling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolingServer]:
    server = PoolingServer(tmp_path_factory.mktemp("pooling") / "pooling.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_server(pooling: PoolingServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The demo model served with the demo guide models plus remote scorers: `rm` (/classify), `rm-pool`
    (/pooling, format text: the rendered text even for chat) and `rm-gone` (a port nothing listens on)."""
    work = tmp_path_factory.mktemp("remote-server")
    guides = {name: str((demo_guides_file().parent / path).resolve())
              for name, path in json.loads(demo_guides_file().read_text()).items()}
    common = {"timeout_s": TIMEOUT_S, "retries": RETRIES, "backoff_s": 0.05}
    guides |= {"rm": {"url": pooling.url, "model": "rm", **common},
               "rm-pool": {"url": pooling.url, "api": "pooling", "format": "text", **common},
               "rm-gone": {"url": f"http://127.0.0.1:{free_port()}", **common}}
    table = work / "guides.json"
    table.write_text(json.dumps(guides))
    running = start_server(work / "server.log", "--guide-models", str(table), "--scorer-timeout-s", "30")
    yield running
    stop_server(running)


def best_of(n: int, scorer: str) -> dict:
    return {"type": "best_of_n", "n": n, "scorer": scorer}


def complete(server: RunningServer, scorer: str, n: int = 4, seed: int = 5) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
        "model": "demo-base", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": seed,
        "cache": False, "search": best_of(n, scorer)})


def test_best_of_n_keeps_the_candidate_the_remote_scorer_scores_highest(remote_server, pooling):
    pooling.ensure_running()
    before = len(pooling.calls())
    response = complete(remote_server, "rm", n=4)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    report = choice["guidance"]
    calls = pooling.calls()[before:]
    assert len(calls) == 1 and calls[0]["api"] == "classify" and calls[0]["model"] == "rm"
    texts = calls[0]["input"]  # all candidates in one call: the prompt's text + each completion
    assert len(texts) == 4 and all(PROMPT in text for text in texts)
    assert report["candidate_scores"] == [text_score(text) for text in texts]
    assert report["selected"] == report["candidate_scores"].index(max(report["candidate_scores"]))
    assert texts[report["selected"]].endswith(choice["text"])


def test_chat_best_of_n_sends_the_conversation_as_messages(remote_server, pooling):
    pooling.ensure_running()
    before = len(pooling.calls())
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": PROMPT}]
    response = httpx.post(f"{remote_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": "demo-base", "messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 9,
        "cache": False, "search": best_of(3, "rm")})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    calls = pooling.calls()[before:]
    assert len(calls) == 3 and all(call["messages"][:2] == messages for call in calls)
    replies = [call["messages"][2]["content"] for call in calls]
    assert choice["message"]["content"] in replies
    assert choice["guidance"]["score"] == max(map(text_score, replies)) == text_score(choice["message"]["content"])


def test_pooling_api_with_format_text(remote_server, pooling):
    pooling.ensure_running()
    before = len(pooling.calls())
    response = httpx.post(f"{remote_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": "demo-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
        "temperature": 1.0, "seed": 9, "cache": False, "search": best_of(3, "rm-pool")})
    assert response.status_code == 200, response.text
    calls = pooling.calls()[before:]
    assert len(calls) == 1 and calls[0]["api"] == "pooling" and len(calls[0]["input"]) == 3
    assert calls[0]["add_special_tokens"] is False
    assert all(PROMPT in text for text in calls[0]["input"])  # the base model's rendering of the chat


def test_guidance_lists_remote_scorers_with_host_and_no_secrets(remote_server, pooling):
    scorers = {s["name"]: s for s in httpx.get(f"{remote_server.base_url}/v1/guidance").json()["search"]["scorers"]}
    assert scorers["rm"] == {"name": "rm", "kind": "remote", "host": f"127.0.0.1:{pooling.port}", "api": "classify",
                             "model": "rm", "format": "messages"}
    assert scorers["demo-reward"]["kind"] == "model"


def assert_scorer_error(response: httpx.Response, status: int, code: str, scorer: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and f"'{scorer}'" in error["message"], error


def test_a_failing_scorer_is_retried_then_503_naming_it_and_the_server_serves_on(remote_server, pooling):
    pooling.ensure_running()
    pooling.control("error")
    before = len(pooling.calls())
    retried = remote_server.metric("alignserve_remote_scorer_attempts_total", scorer="rm", outcome="retried")
    response = complete(remote_server, "rm")
    assert_scorer_error(response, 503, "scorer_unavailable", "rm")
    assert "HTTP 500" in response.json()["error"]["message"] and pooling.url in response.json()["error"]["message"]
    assert len(pooling.calls()) - before == RETRIES + 1
    assert remote_server.metric("alignserve_remote_scorer_attempts_total", scorer="rm",
                                outcome="retried") - retried == RETRIES
    assert remote_server.metric("alignserve_scorer_calls_total", scorer="rm", outcome="unavailable") >= 1
    pooling.control("ok")
    assert complete(remote_server, "rm").status_code == 200


def test_a_scorer_that_never_answers_ends_in_its_timeout(remote_server, pooling):
    pooling.ensure_running()
    pooling.control("hang")
    began = time.monotonic()
    response = complete(remote_server, "rm")
    elapsed = time.monotonic() - began
    assert_scorer_error(response, 503, "scorer_timeout", "rm")
    assert elapsed < 30, elapsed  # one attempt's timeout_s plus generation, not --scorer-timeout-s
    assert complete(remote_server, "demo-reward").status_code == 200


def test_the_scorer_going_away_mid_request_is_a_503_and_the_server_serves_on(remote_server, pooling):
    pooling.ensure_running()
    pooling.control("exit")
    began = time.monotonic()
    response = complete(remote_server, "rm")
    elapsed = time.monotonic() - began
    assert pooling.process is not None and pooling.process.wait(timeout=10) is not None  # it did go away
    assert_scorer_error(response, 503, "scorer_unavailable", "rm")
    assert elapsed < 30, elapsed
    pooling.ensure_running()  # back at the same URL: the next request is scored again
    assert complete(remote_server, "rm").status_code == 200


def test_an_unreachable_scorer_streams_an_error_event_naming_it(remote_server):
    response = complete(remote_server, "rm-gone")
    assert_scorer_error(response, 503, "scorer_unavailable", "rm-gone")
    with httpx.stream("POST", f"{remote_server.base_url}/v1/completions", timeout=120, json={
            "model": "demo-base", "prompt": PROMPT, "max_tokens": 8, "stream": True, "cache": False,
            "search": best_of(2, "rm-gone")}) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "scorer_unavailable" and "'rm-gone'" in error["message"]
