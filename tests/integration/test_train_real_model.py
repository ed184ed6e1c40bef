"""Bring your own model, end to end on the real SmolLM2-135M-Instruct with a tiny budget: two
Q-sharp rounds of rollouts through the engine and training (the `smollm2_guides` fixture), then
the server loads the result and a guided chat request on the real model reports its KL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.real_model]


def test_two_rounds_of_rollouts_and_training(smollm2_guides: Path) -> None:
    out = smollm2_guides
    cards = [json.loads((out / name / "guide_card.json").read_text()) for name in ("value-r1", "value-r2")]
    round1 = [json.loads(line) for line in (out / "rollouts-r1.jsonl").read_text().splitlines()]
    round2 = [json.loads(line) for line in (out / "rollouts-r2.jsonl").read_text().splitlines()]
    assert len(round1) == 16 * 4 and len(round2) == 16 * 2
    assert all(r["group"].startswith("r2/") for r in round2)
    assert cards[1]["rollouts"]["files"] == [str(out / "rollouts-r1.jsonl"), str(out / "rollouts-r2.jsonl")]
    assert cards[1]["backbone"]["layers"] == 2
    assert json.loads((out / "guides.json").read_text()) == {"value-r1": "value-r1", "value-r2": "value-r2"}


def test_the_server_serves_a_guided_chat_with_the_trained_model(smollm2_dir: Path, smollm2_server) -> None:
    body = {"model": smollm2_dir.name, "max_tokens": 8, "temperature": 0.8, "seed": 3,
            "messages": [{"role": "user", "content": "What is 12+19? Answer with the number only."}],
            "guidance": [{"type": "qsharp", "model": "value-r2", "strength": 4.0}]}
    response = httpx.post(f"{smollm2_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    report = response.json()["choices"][0]["guidance"]
    assert report["steps"] == response.json()["usage"]["completion_tokens"] > 0
    assert math.isfinite(report["kl"]) and report["kl"] > 0
