"""Bring your own model, end to end on the real SmolLM2-135M-Instruct with a tiny budget: two
Q-sharp rounds of rollouts through the engine and training, then the server loads the result
and a guided chat request on the real model reports its KL."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ALIGNSERVE, start_server, stop_server
from workflows.prompt_file import chat_arith_prompts, write_prompts

pytestmark = [pytest.mark.engine, pytest.mark.real_model]


def test_train_two_rounds_then_serve_a_guided_chat(smollm2_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "train.jsonl"
    write_prompts(chat_arith_prompts("train")[:16], prompts)
    out = tmp_path / "guides"
    train = subprocess.run(
        [str(ALIGNSERVE), "train", "value", "--base", str(smollm2_dir), "--prompts", str(prompts),
         "--verifier", "arith-first-line", "--samples", "4", "--max-tokens", "12", "--max-model-len", "128",
         "--max-num-seqs", "64", "--rounds", "2", "--rollin-samples", "2", "--layers", "2",
         "--steps", "3", "--batch-size", "8", "--validation-fraction", "0.25", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-4000:]
    # vLLM logs to stdout too: read the cards the run wrote.
    cards = [json.loads((out / name / "guide_card.json").read_text()) for name in ("value-r1", "value-r2")]
    round1 = [json.loads(line) for line in (out / "rollouts-r1.jsonl").read_text().splitlines()]
    round2 = [json.loads(line) for line in (out / "rollouts-r2.jsonl").read_text().splitlines()]
    assert len(round1) == 16 * 4 and len(round2) == 16 * 2
    assert all(r["group"].startswith("r2/") for r in round2)
    assert cards[1]["rollouts"]["files"] == [str(out / "rollouts-r1.jsonl"), str(out / "rollouts-r2.jsonl")]
    assert cards[1]["backbone"]["layers"] == 2
    assert json.loads((out / "guides.json").read_text()) == {"value-r1": "value-r1", "value-r2": "value-r2"}

    server = start_server(tmp_path / "server.log", "--model", str(smollm2_dir), "--guide-models",
                          str(out / "guides.json"), "--max-model-len", "256")
    try:
        body = {"model": smollm2_dir.name, "max_tokens": 8, "temperature": 0.8, "seed": 3,
                "messages": [{"role": "user", "content": "What is 12+19? Answer with the number only."}],
                "guidance": [{"type": "qsharp", "model": "value-r2", "strength": 4.0}]}
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        report = response.json()["choices"][0]["guidance"]
        assert report["steps"] == response.json()["usage"]["completion_tokens"] > 0
        assert math.isfinite(report["kl"]) and report["kl"] > 0
    finally:
        stop_server(server)
