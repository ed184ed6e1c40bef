"""`alignserve eval` requests against httpx's mock transport: bodies, seeds, errors, and a whole run's files."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
from dataclasses import replace

import httpx
import pytest

from guidance.verifiers import get_verifier
from workflows.evaluation import runner as runner_module
from workflows.evaluation.configs import BASE, EvalConfig
from workflows.evaluation.pipeline import RESULT_FILES, evaluate
from workflows.evaluation.reports import RunInfo
from workflows.evaluation.runner import (EvalRequestError, Runner, SamplingSettings, request, sample_seed,
                                         verifier_prompt)
from workflows.prompt_file import PromptRecord

CHAT = PromptRecord(id="c", messages=({"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Add: 2+3="}))
TEXT = PromptRecord(id="t", prompt="12+30=")
SETTINGS = SamplingSettings(model="m", samples=3, temperature=0.8, top_p=0.9, max_tokens=8, seed=100)
QSHARP = EvalConfig("q@2", "qsharp", 2.0, guidance=({"type": "qsharp", "model": "v", "strength": 2.0},))
BO4 = EvalConfig("bo4", "best-of-n(v)", 4.0, search={"type": "best_of_n", "n": 4, "scorer": "v"})
BLOCKWISE = EvalConfig("bw", "blockwise(p)", 2.0, search={"type": "blockwise", "candidates": 2, "block_tokens": 3,
                                                          "scorer": "p"})


class FakeServer:
    """Answers "5" to chat and "42" to completions, with a KL report when guided; records requests."""

    def __init__(self, status: int = 200, rate_limited: int = 0) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.status, self.rate_limited = status, rate_limited

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.url.path, body))
        if self.rate_limited:
            self.rate_limited -= 1
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "busy"}})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "Unknown guide model 'v'",
                                                               "type": "invalid_request_error",
                                                               "param": "guidance[0].model", "code": None}})
        choice = {"index": 0, "finish_reason": "stop"}
        if "guidance" in body or "search" in body:
            choice["guidance"] = {"kl": 0.5 if "guidance" in body else 0.0, "steps": 2}
        if "messages" in body:
            choice["message"] = {"role": "assistant", "content": "5"}
        else:
            choice["text"] = "42"
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 2}})


class FailingOn(FakeServer):
    """Answers like FakeServer, except requests searching by ``search_type`` after the first (the
    pre-run check): HTTP 500."""

    def __init__(self, search_type: str) -> None:
        super().__init__()
        self.search_type, self.seen = search_type, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("search", {}).get("type") == self.search_type:
            self.seen += 1
            if self.seen > 1:
                return httpx.Response(500, json={"error": {"message": "boom"}})
        return super().__call__(request)


def run_samples(server: FakeServer, config: EvalConfig, records=(CHAT, TEXT)):
    async def go():
        async with httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(server)) as client:
            runner = Runner(client, records, SETTINGS, get_verifier("demo-verifier"), concurrency=2)
            return [await runner.sample(config, i, j) for i in range(len(records)) for j in range(SETTINGS.samples)]

    return asyncio.run(go())


def test_verifier_prompt_joins_chat_contents():
    assert verifier_prompt(CHAT) == "Be brief.\nAdd: 2+3="
    assert verifier_prompt(TEXT) == "12+30="


def test_seeds_are_common_random_numbers():
    # seed + (i*K + j) * S: S = 1 plain, N for best-of-N, ceil(max_tokens / block) * candidates for blockwise.
    assert [sample_seed(SETTINGS, BASE, i, j) for i in range(2) for j in range(3)] == [100, 101, 102, 103, 104, 105]
    assert [sample_seed(SETTINGS, QSHARP, 1, j) for j in range(3)] == [103, 104, 105]
    assert [sample_seed(SETTINGS, BO4, 1, j) for j in range(3)] == [112, 116, 120]
    assert sample_seed(SETTINGS, BLOCKWISE, 1, 2) == 100 + 5 * math.ceil(8 / 3) * 2
    bo1 = EvalConfig("bo1", "b", 1.0, search={"type": "best_of_n", "n": 1, "scorer": "v"})
    assert sample_seed(SETTINGS, bo1, 1, 2) == sample_seed(SETTINGS, BASE, 1, 2)  # best-of-1 is the base


def test_requests_and_samples():
    server = FakeServer()
    samples = run_samples(server, QSHARP)
    paths = [path for path, _ in server.requests]
    assert paths == ["/v1/chat/completions"] * 3 + ["/v1/completions"] * 3
    chat_body, text_body = server.requests[0][1], server.requests[3][1]
    assert chat_body == {"model": "m", "n": 1, "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 100,
                         "cache": False, "guidance": [{"type": "qsharp", "model": "v", "strength": 2.0}],
                         "messages": list(CHAT.messages)}
    assert text_body["prompt"] == "12+30=" and text_body["seed"] == 103
    assert [(s.reward, s.answer, s.kl, s.steps, s.completion_tokens) for s in samples[:1] + samples[3:4]] == [
        (1.0, 5, 0.5, 2, 2), (1.0, 42, 0.5, 2, 2)]
    base = run_samples(FakeServer(), BASE)
    assert base[0].kl == 0.0 and base[0].steps == 0  # no guidance object: nothing was steered


def test_stop_strings_go_with_every_request():
    body = request(TEXT, BO4, replace(SETTINGS, stop=("\ndef", "\n#")), seed=1)[1]
    assert body["stop"] == ["\ndef", "\n#"] and body["search"]["n"] == 4
    assert "stop" not in request(TEXT, BO4, SETTINGS, seed=1)[1]  # none given: the server's default


def test_failed_request_names_config_prompt_and_sample():
    with pytest.raises(EvalRequestError) as caught:
        run_samples(FakeServer(status=400), QSHARP, records=(TEXT,))
    message = str(caught.value)
    assert "config 'q@2'" in message and "prompt 't'" in message and "sample 0" in message
    assert "HTTP 400" in message and "Unknown guide model" in message and "guidance[0].model" in message


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(runner_module, "TRANSPORT_BACKOFF_S", 0.0)


def test_transport_error_names_config_and_prompt(no_backoff):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(EvalRequestError, match=r"config 'base', prompt 't'.*ConnectError on each of 3 attempts"):
        run_samples(refuse, BASE, records=(TEXT,))


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError])
def test_a_broken_connection_is_retried_and_logged(no_backoff, caplog, error):
    """The server closing an idle kept-alive connection as it is reused must not end the run."""
    server, broken = FakeServer(), [2]

    def flaky(request: httpx.Request) -> httpx.Response:
        if broken[0]:
            broken[0] -= 1
            raise error("Server disconnected without sending a response.")
        return server(request)

    with caplog.at_level(logging.WARNING, logger=runner_module.__name__):
        assert [s.text for s in run_samples(flaky, BASE, records=(TEXT,))] == ["42"] * 3
    assert len(server.requests) == 3
    assert [r.getMessage().split(";")[1] for r in caplog.records] == [" retry 1 of 2", " retry 2 of 2"]
    assert all("config 'base', prompt 't'" in r.getMessage() and error.__name__ in r.getMessage()
               for r in caplog.records)


def test_a_timeout_is_not_retried(no_backoff):
    attempts = []

    def slow(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ReadTimeout("timed out")

    with pytest.raises(EvalRequestError, match=r"ReadTimeout: timed out"):
        run_samples(slow, BASE, records=(TEXT,))
    assert len(attempts) == 1


def test_rate_limited_requests_are_retried():
    server = FakeServer(rate_limited=2)
    assert len(run_samples(server, BASE, records=(TEXT,))) == 3
    assert len(server.requests) == 5


def test_a_whole_run_writes_every_file(tmp_path):
    server = FakeServer()
    info = RunInfo(command="alignserve eval ...", model="m", server="fake", prompts_file="p.jsonl", prompts=2,
                   verifier="demo-verifier", samples=3, temperature=0.8, top_p=0.9, max_tokens=8, seed=100)
    rows = asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE, QSHARP, BO4, BLOCKWISE], SETTINGS, info,
                                tmp_path, progress=False, transport=httpx.MockTransport(server)))
    assert len(server.requests) == 4 + 4 * 6  # one check per configuration, then 2 prompts x 3 samples each
    assert [r.config for r in rows] == ["base", "q@2", "bo4", "bw"]
    assert all(r.pass_at_1 == 1.0 and r.maj_at_k == 1.0 for r in rows)
    assert [r.mean_kl for r in rows] == [0.0, 0.5, pytest.approx(math.log(4) - 0.75), None]
    for name in RESULT_FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["config"] for row in table] == ["base", "q@2", "bo4", "bw"] and table[3]["mean_kl"] == ""
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["run"]["seed"] == 100 and body["configs"][2]["search"]["n"] == 4
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 4 * 6


def test_a_resumed_run_reuses_finished_configurations_and_runs_the_rest(tmp_path):
    info = RunInfo(command="alignserve eval ...", model="m", server="fake", prompts_file="p.jsonl", prompts=2,
                   verifier="demo-verifier", samples=3, temperature=0.8, top_p=0.9, max_tokens=8, seed=100)
    first = asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE, QSHARP], SETTINGS, info, tmp_path,
                                 progress=False, transport=httpx.MockTransport(FakeServer())))
    server = FakeServer()
    changed = EvalConfig("q@2", "qsharp", 2.0, guidance=({"type": "qsharp", "model": "v", "strength": 3.0},))
    rows = asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE, changed, BO4], SETTINGS, info, tmp_path,
                                progress=False, transport=httpx.MockTransport(server), resume=True))
    # base is reused; q@2 asks for another request now, so it runs again, as does the new bo4.
    assert len(server.requests) == 2 + 2 * 6
    assert rows[0] == first[0] and [r.config for r in rows] == ["base", "q@2", "bo4"]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3 * 6
    # A run that fails after reusing results still keeps them on disk (q@2 is no longer asked for).
    with pytest.raises(EvalRequestError):
        asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE, BO4, BLOCKWISE], SETTINGS, info, tmp_path,
                             progress=False, transport=httpx.MockTransport(FailingOn("blockwise")), resume=True))
    assert [row["config"] for row in json.loads((tmp_path / "results.json").read_text())["results"]] == ["base",
                                                                                                         "bo4"]
    other = RunInfo(**{**vars(info), "seed": 7})
    with pytest.raises(ValueError, match="seed=100"):
        asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE], SETTINGS, other, tmp_path, progress=False,
                             transport=httpx.MockTransport(FakeServer()), resume=True))
    stopped = RunInfo(**{**vars(info), "stop": ("\ndef",)})  # other stop strings sample differently
    with pytest.raises(ValueError, match=r"stop=\[\]"):
        asyncio.run(evaluate("http://test", [CHAT, TEXT], [BASE], SETTINGS, stopped, tmp_path, progress=False,
                             transport=httpx.MockTransport(FakeServer()), resume=True))


def test_the_prompts_answer_is_the_reference_of_the_verifier_and_of_a_search(tmp_path):
    """`--verifier math` reads each prompt's answer; a search request carries it as search.reference."""
    answered = (PromptRecord(id="a", prompt="12+30=", answer="42"), PromptRecord(id="b", prompt="1+1=", answer=3))
    server = FakeServer()
    info = RunInfo(command="alignserve eval ...", model="m", server="fake", prompts_file="p.jsonl", prompts=2,
                   verifier="math", samples=3, temperature=0.8, top_p=0.9, max_tokens=8, seed=100)
    given = EvalConfig("bo2-own", "best-of-n(v)", 2.0, search={"type": "best_of_n", "n": 2, "scorer": "v",
                                                               "reference": "mine"})
    rows = asyncio.run(evaluate("http://test", answered, [BASE, BO4, given], SETTINGS, info, tmp_path,
                                progress=False, transport=httpx.MockTransport(server)))
    assert [r.pass_at_1 for r in rows] == [0.5] * 3  # "42" is right for prompt a, wrong for b
    searched = [body["search"] for _, body in server.requests if body.get("search", {}).get("n") == 4]
    assert {s["reference"] for s in searched} == {"42", 3}
    own = [body["search"]["reference"] for _, body in server.requests if body.get("search", {}).get("n") == 2]
    assert set(own) == {"mine"}  # a configuration's own reference is kept
