"""A remote scorer against a real vLLM pooling server (CPU build, ``--runner pooling``): the demo's reward
guide model exported as a sequence classifier, scoring best-of-N for alignserve by URL as it scores
embedded and as transformers' own class scores the export in alignserve's process (less the head's bias,
which the classifier has not): one reward model three ways."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest

from bench.remote_scorer import EMBEDDED, HF, REMOTE, best_of_n, guide_table, start_pooling_server
from models.demo.paths import demo_guides_file
from models.export_classifier import export_classifier
from tests.conftest import RunningServer, start_server, stop_server
from workflows.server_process import ServerProcess

pytestmark = pytest.mark.engine

CHAT = "rm-vllm-chat"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    work = tmp_path_factory.mktemp("vllm-rm")
    return work, export_classifier(demo_guides_file().parent / EMBEDDED, work / "rm")


@pytest.fixture(scope="module")
def vllm_pooling(exported) -> Iterator[ServerProcess]:
    work, _ = exported
    with start_pooling_server(work / "rm", work / "pooling.log") as server:
        yield server


@pytest.fixture(scope="module")
def rm_server(exported, vllm_pooling: ServerProcess) -> Iterator[RunningServer]:
    work, _ = exported
    table = guide_table(work, vllm_pooling.url)
    entries = json.loads(table.read_text())
    entries[CHAT] = {**entries[REMOTE], "format": "messages"}  # the conversation, rendered by vLLM
    table.write_text(json.dumps(entries))
    running = start_server(work / "server.log", "--guide-models", str(table))
    yield running
    stop_server(running)


def test_vllm_classify_gives_the_raw_reward_and_sigmoid_with_activation(vllm_pooling):
    texts = ["234+567=801", "234+567=9"]
    raw = httpx.post(f"{vllm_pooling.url}/classify", timeout=60,
                     json={"model": "rm", "input": texts, "use_activation": False}).json()["data"]
    activated = httpx.post(f"{vllm_pooling.url}/classify", timeout=60,
                           json={"model": "rm", "input": texts}).json()["data"]
    for plain, squashed in zip(raw, activated):
        assert squashed["probs"][0] == pytest.approx(1 / (1 + math.exp(-plain["probs"][0])), rel=1e-4)


@pytest.mark.parametrize("scorer", [REMOTE, HF])
def test_best_of_n_scored_by_vllm_or_transformers_keeps_what_the_embedded_model_keeps(rm_server, exported, scorer):
    _, card = exported
    with httpx.Client(base_url=rm_server.base_url, timeout=300) as client:
        for seed in (3, 4):
            _, embedded = best_of_n(client, EMBEDDED, 8, seed)
            _, other = best_of_n(client, scorer, 8, seed)
            ours, theirs = embedded["choices"][0]["guidance"], other["choices"][0]["guidance"]
            assert [s - card["dropped_bias"] for s in ours["candidate_scores"]] == \
                pytest.approx(theirs["candidate_scores"], abs=1e-3)
            assert len(set(theirs["candidate_scores"])) > 1  # distinct candidates, not one score repeated
            assert theirs["selected"] == ours["selected"]
            assert other["choices"][0]["text"] == embedded["choices"][0]["text"]


def test_chat_best_of_n_scored_by_vllm_on_the_conversation(rm_server, vllm_pooling):
    messages = [{"role": "user", "content": "234+567="}]
    response = httpx.post(f"{rm_server.base_url}/v1/chat/completions", timeout=300, json={
        "model": "demo-base", "messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 2, "cache": False,
        "search": {"type": "best_of_n", "n": 4, "scorer": CHAT}})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    direct = httpx.post(f"{vllm_pooling.url}/classify", timeout=60, json={
        "model": "rm", "use_activation": False,
        "messages": [*messages, {"role": "assistant", "content": choice["message"]["content"]}]}).json()
    assert choice["guidance"]["score"] == pytest.approx(direct["data"][0]["probs"][0], abs=1e-4)
    assert choice["guidance"]["score"] == max(choice["guidance"]["candidate_scores"])
