"""The worst days, on the real server: where a request is (debug dump, SIGUSR1, gauges), the engine core
killed under load, and SIGTERM while the engine is still starting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import ALIGNSERVE, RunningServer, metric_value, start_server, stop_server

pytestmark = pytest.mark.engine

DEBUG_KEY = "operator-secret"
# Long enough to be still running when looked at, on any machine: 16 guided choices of 480 tokens each (the
# demo's context is 512 tokens).
LONG = {"model": "demo-base", "prompt": "1+1=", "max_tokens": 480, "ignore_eos": True, "n": 16, "cache": False,
        "guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]}


@pytest.fixture
def own_server(tmp_path):
    server = start_server(tmp_path / "server.log", "--debug-key", DEBUG_KEY, "--api-keys", "client-key")
    yield server
    stop_server(server)


def engine_core(pid: int) -> psutil.Process:
    """vLLM's engine-core process among the server's descendants (it names itself VLLM::EngineCore)."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no engine core among the children of {pid}")


def in_background(server: RunningServer, body: dict, results: list, stream: bool = False) -> threading.Thread:
    """POST `body` from a thread; append (status, text, seconds when answered) to `results`."""
    def run() -> None:
        headers = {"Authorization": "Bearer client-key"}
        with httpx.Client(base_url=server.base_url, timeout=120, headers=headers) as client:
            if stream:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    text = "".join(response.iter_text())
                    results.append((response.status_code, text, time.monotonic()))
                return
            response = client.post("/v1/completions", json=body)
            results.append((response.status_code, response.text, time.monotonic()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def unfinished(server: RunningServer) -> int:
    return httpx.get(f"{server.base_url}/health", timeout=30).json()["unfinished_requests"]


def wait_running(server: RunningServer, at_least: int, results: list) -> None:
    deadline = time.monotonic() + 120
    while unfinished(server) < at_least:
        assert time.monotonic() < deadline and not results, f"{results}{server.log_tail()}"
        time.sleep(0.05)


def test_the_debug_dump_lists_an_in_flight_request_in_its_stage(own_server):
    results: list = []
    thread = in_background(own_server, LONG, results)
    url = f"{own_server.base_url}/debug/requests"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer client-key"}, timeout=30).status_code == 401
    # Polled on the dump itself: the engine's count of unfinished requests is not the server's own record.
    def in_engine(dump: dict) -> bool:
        return any(r["stage"] in ("running", "waiting_report") and r["engine_requests"] for r in dump["requests"])

    deadline = time.monotonic() + 120
    while not in_engine(dump := httpx.get(url, headers={"Authorization": f"Bearer {DEBUG_KEY}"}, timeout=30).json()):
        assert time.monotonic() < deadline and not results, f"{results}{own_server.log_tail()}"
        time.sleep(0.05)
    [request] = dump["requests"]
    assert request["endpoint"] == "text_completion" and not request["stream"]
    assert request["stage"] in ("running", "waiting_report"), request
    assert len(request["engine_requests"]) >= 1 and request["age_s"] > 0
    assert request["engine_holds"] or request["stage"] == "waiting_report"  # the watchdog reads vLLM's own table
    assert any("deltas" in frame for task in dump["tasks"] for frame in task["awaiting"]), dump["tasks"]
    exposition = httpx.get(f"{own_server.base_url}/metrics", timeout=30).text
    assert metric_value(exposition, "alignserve_requests_in_stage") == 1, (results, own_server.log_tail())
    assert metric_value(exposition, "alignserve_request_oldest_seconds", stage=request["stage"]) > 0
    os.kill(own_server.process.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "state dump:" not in own_server.log():
        assert time.monotonic() < deadline, own_server.log_tail()
        time.sleep(0.1)
    logged = json.loads(own_server.log().split("state dump: ", 1)[1].splitlines()[0])
    assert [r["id"] for r in logged["requests"]] == [request["id"]]
    thread.join(timeout=300)
    assert results[0][0] == 200


def test_engine_death_under_load_answers_every_request_with_503_and_exits_for_a_restart(own_server):
    # Found before the load starts, so that the kill follows the wait at once: a scan of the process tree
    # under load takes long enough for a request to end on a fast machine.
    core = engine_core(own_server.process.pid)
    descendants = psutil.Process(own_server.process.pid).children(recursive=True)
    results: list = []
    threads = [in_background(own_server, LONG, results, stream=i % 2 == 1) for i in range(4)]
    wait_running(own_server, 2 * LONG["n"], results)
    killed_at = time.monotonic()
    core.kill()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4, own_server.log_tail()
    early = [(status, text[-300:], killed_at - answered) for status, text, answered in results if answered <= killed_at]
    assert not early, f"answered before the kill (status, text, seconds before): {early}"
    for status, text, answered in results:
        assert answered - killed_at < 10, (answered - killed_at, own_server.log_tail())
        if text.startswith("data:"):  # streamed: the error event, then [DONE]
            events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
            assert status == 200 and events[-1] == "[DONE]", text[-500:]
            assert json.loads(events[-2])["error"]["code"] == "engine_dead", text[-500:]
        else:
            assert status == 503, text
            assert json.loads(text)["error"] == {
                "message": "The inference engine stopped unexpectedly; this server is restarting. Retry the request.",
                "type": "service_unavailable", "param": None, "code": "engine_dead"}
    exit_code = own_server.process.wait(timeout=max(1.0, 15 - (time.monotonic() - killed_at)))
    assert exit_code == 1, own_server.log_tail()
    assert time.monotonic() - killed_at < 15
    assert not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    log = own_server.log()
    assert "the engine died (the engine core exited)" in log, own_server.log_tail()
    assert "Internal server error" not in log


def test_sigterm_during_start_up_stops_the_server_and_its_engine_processes(tmp_path):
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(ALIGNSERVE), "serve", "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until vLLM's engine core is starting
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                engine_core(process.pid)
                break
            except (AssertionError, psutil.NoSuchProcess):
                time.sleep(0.1)
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert "Application startup complete" not in log_path.read_text()
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)  # the server alone, not its process group
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - sent < 10
        assert not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert "during start-up: stopping the engine processes" in log_path.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
