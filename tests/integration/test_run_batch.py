"""`alignserve run-batch`: a batch file of chat-arith requests run in-process (no HTTP) and against a running
server gives the same seeded outputs; bad lines are recorded and the rest run; an interrupted run resumes."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ALIGNSERVE, RunningServer
from workflows.prompt_file import chat_arith_prompts

pytestmark = pytest.mark.engine

GUIDED = [{"type": "qsharp", "model": "demo-value", "strength": 2.0}]


def batch_lines(count: int) -> list[str]:
    """Seeded chat-arith requests, every other one guided, plus the bad lines of a real file."""
    lines = []
    for i, prompt in enumerate(chat_arith_prompts("heldout")[:count]):
        body = {"model": "demo-base", "messages": list(prompt.messages), "max_tokens": 12, "seed": i,
                "temperature": 1.0, "cache": False, **({"guidance": GUIDED} if i % 2 else {})}
        lines.append(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    lines += [
        "{truncated",
        json.dumps({"custom_id": "q0", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
        json.dumps({"custom_id": "unknown-model", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "not-served", "prompt": "1+1="}}),
    ]
    return lines


def run(*args: str) -> subprocess.CompletedProcess:
    """`alignserve run-batch` one line at a time: a seeded request gives the same tokens and KL in both runs
    only when batched with the same neighbours (vLLM's CPU kernels are not batch-invariant in bfloat16)."""
    done = subprocess.run([str(ALIGNSERVE), "run-batch", "--concurrency", "1", *args], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def records(path) -> dict:
    """Records by custom_id (invalid lines without one by line number); each appears once."""
    out: dict = {}
    for text in path.read_text().splitlines():
        record = json.loads(text)
        key = record["custom_id"] if record["response"] is not None else ("line", record["error"]["line"])
        assert key not in out, key
        out[key] = record
    return out


def answers(by_id: dict) -> dict[str, tuple[str, float | None]]:
    return {key: (r["response"]["body"]["choices"][0]["message"]["content"],
                  r["response"]["body"]["choices"][0].get("guidance", {}).get("kl"))
            for key, r in by_id.items() if isinstance(key, str) and r["response"]["status_code"] == 200}


def test_in_process_and_remote_runs_agree_and_an_interrupted_run_resumes(tmp_path, server: RunningServer):
    count = 24
    batch = tmp_path / "requests.jsonl"
    batch.write_text("\n".join(batch_lines(count)) + "\n")

    local = tmp_path / "local.jsonl"
    summary = run("-i", str(batch), "-o", str(local)).stderr
    assert f"{count + 1} run (1 not 200), 2 invalid lines, 0 already" in summary, summary
    by_id = records(local)
    assert by_id["unknown-model"]["response"]["status_code"] == 404
    assert by_id["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_id[("line", count + 1)]["error"]["code"] == "invalid_json"
    assert by_id[("line", count + 2)]["error"]["code"] == "duplicate_custom_id"
    local_answers = answers(by_id)
    assert len(local_answers) == count
    assert all((kl is not None) == (int(key[1:]) % 2 == 1) for key, (_, kl) in local_answers.items())

    # The same file against the running server, interrupted after 10 records (the last one cut short).
    remote = tmp_path / "remote.jsonl"
    run("-i", str(batch), "-o", str(remote), "--url", server.base_url)
    kept = remote.read_text().splitlines()[:10]
    remote.write_text("\n".join(kept[:9]) + "\n" + kept[9][:20])
    resumed = run("-i", str(batch), "-o", str(remote), "--url", server.base_url).stderr
    # The two invalid lines come first, then responses: 9 whole records remain; the rest run again.
    assert f"{count + 1 - 7} run" in resumed and "0 invalid lines, 9 already in" in resumed, resumed
    remote_answers = answers(records(remote))
    assert set(records(remote)) == set(by_id)
    assert {k: text for k, (text, _) in remote_answers.items()} == {k: text for k, (text, _) in local_answers.items()}
    for key, (_, kl) in remote_answers.items():
        local_kl = local_answers[key][1]
        assert kl == local_kl if local_kl is None else kl == pytest.approx(local_kl, rel=1e-4, abs=1e-6)
