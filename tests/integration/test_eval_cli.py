"""`alignserve eval` through the real CLI against the session's real server (demo model and guide models)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from guidance.verifiers import get_verifier
from models.demo.task import held_out_problems
from workflows.prompt_file import PromptRecord, write_prompts

pytestmark = pytest.mark.engine

ALIGNSERVE = Path(sys.executable).parent / "alignserve"
PROBLEMS = held_out_problems()[:4]


def run_eval(server, tmp_path: Path, *flags: str, verifier: str = "demo-verifier",
             answers: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    prompts = tmp_path / "prompts.jsonl"
    write_prompts([PromptRecord(id=p.prompt, prompt=p.prompt, answer=p.answer if answers else None)
                   for p in PROBLEMS], prompts)
    out = tmp_path / "out"
    result = subprocess.run(
        [str(ALIGNSERVE), "eval", "--url", server.base_url, "--prompts", str(prompts), "--verifier", verifier,
         "--samples", "2", "--max-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--seed", "11",
         "--out", str(out), *flags],
        capture_output=True, text=True, timeout=600)
    return result, out


def test_eval_writes_table_csv_json_and_plot(server, tmp_path):
    result, out = run_eval(server, tmp_path, "--qsharp", "demo-value@4", "--best-of-n", "demo-verifier",
                           "--n", "1,2")
    assert result.returncode == 0, result.stderr[-4000:]

    rows = {r["config"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(rows) == ["base", "qsharp(demo-value)@4", "best-of-1(demo-verifier)", "best-of-2(demo-verifier)"]
    for r in rows.values():
        assert 0.0 <= r["pass_at_1"] <= 1.0 and 0.0 <= r["maj_at_k"] <= 1.0
        assert (r["prompts"], r["samples_per_prompt"]) == (4, 2) and r["tokens"] > 0 and r["seconds"] > 0
    base, guided = rows["base"], rows["qsharp(demo-value)@4"]
    assert base["mean_kl"] == 0.0 and base["kl_source"] == "reported"
    assert guided["mean_kl"] > 0 and guided["kl_per_token"] > 0 and guided["kl_source"] == "reported"
    bo2 = rows["best-of-2(demo-verifier)"]
    assert bo2["kl_source"] == "log N - (N-1)/N bound" and bo2["mean_kl"] == pytest.approx(math.log(2) - 0.5)
    assert bo2["tokens_counted"] == "kept candidates only"

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 4 * 2
    by_config: dict[str, list[dict]] = {}
    for s in samples:
        by_config.setdefault(s["config"], []).append(s)
    assert [s["seed"] for s in by_config["base"]] == list(range(11, 19))
    assert [s["seed"] for s in by_config["qsharp(demo-value)@4"]] == list(range(11, 19))
    # Common random numbers: best-of-1 gets the base's seeds, so it is the base, sample for sample.
    assert [s["text"] for s in by_config["best-of-1(demo-verifier)"]] == [s["text"] for s in by_config["base"]]

    with (out / "results.csv").open() as handle:
        assert [r["config"] for r in csv.DictReader(handle)] == list(rows)
    table = (out / "results.md").read_text()
    assert "alignserve eval --url" in table and "| config | method | strength | pass@1 | maj@k |" in table
    assert "| qsharp(demo-value)@4 | qsharp(demo-value) | 4 |" in table
    assert table in result.stdout
    assert (out / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_by_math_reads_each_prompts_answer_here_and_in_the_servers_search(server, tmp_path):
    result, out = run_eval(server, tmp_path, "--best-of-n", "math", "--n", "1,4", verifier="math", answers=True)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {r["config"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(rows) == ["base", "best-of-1(math)", "best-of-4(math)"]
    math_verifier = get_verifier("math")
    for sample in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        problem = PROBLEMS[sample["prompt_index"]]
        assert sample["reward"] == math_verifier(problem.prompt, sample["text"], problem.answer), sample
        if sample["config"] == "best-of-4(math)":  # the server scored the kept candidate against the same answer
            assert sample["score"] == sample["reward"], sample
    assert rows["best-of-4(math)"]["pass_at_1"] >= rows["base"]["pass_at_1"]


def test_eval_refuses_a_configuration_the_server_rejects_before_the_run(server, tmp_path):
    result, out = run_eval(server, tmp_path, "--qsharp", "no-such-guide@1")
    assert result.returncode == 1
    assert "config 'qsharp(no-such-guide)@1'" in result.stderr and "HTTP 4" in result.stderr
    assert not (out / "results.csv").exists()


def test_eval_at_kl_budgets_tables_pass_at_1_at_equal_kl_within_every_budget(server, tmp_path):
    result, out = run_eval(server, tmp_path, "--qsharp", "demo-value", "--kl-budgets", "0.1,0.5",
                           "--best-of-n", "demo-verifier", "--n", "1,2")
    assert result.returncode == 0, result.stderr[-4000:]

    body = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in body["results"]}
    # --kl-budgets replaces the default strength grid: the guide model runs at the budgets only.
    assert list(rows) == ["base", "qsharp(demo-value) max_kl=0.1", "qsharp(demo-value) max_kl=0.5",
                          "best-of-1(demo-verifier)", "best-of-2(demo-verifier)"]
    configs = {c["name"]: c for c in body["configs"]}
    assert configs["qsharp(demo-value) max_kl=0.5"]["guidance"] == [
        {"type": "qsharp", "model": "demo-value", "max_kl": 0.5}]
    for budget in (0.1, 0.5):
        row = rows[f"qsharp(demo-value) max_kl={budget:g}"]
        assert row["kl_budget"] == budget and row["over_budget"] == 0
        assert 0 < row["mean_kl"] <= budget and row["pass_at_1_stderr"] is not None
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        if "max_kl" in s["config"]:
            assert s["kl"] <= float(s["config"].rsplit("=", 1)[1]) * (1 + 1e-6), s

    table = body["equal_kl"]
    assert table["budgets"] == [0.1, 0.5] and table["over_budget"] == 0 and table["budgeted_responses"] == 16
    methods = {m["method"]: m for m in table["methods"]}
    assert list(methods) == ["qsharp(demo-value) max_kl", "best-of-n(demo-verifier)"]
    # KL of best-of-2 is log 2 - 1/2 = 0.193: over 0.1 (best-of-1 stands there), within 0.5.
    assert [c["config"] for c in methods["best-of-n(demo-verifier)"]["cells"]] == [
        "best-of-1(demo-verifier)", "best-of-2(demo-verifier)"]
    report = (out / "results.md").read_text()
    assert "## pass@1 at equal KL" in report and "| method | KL <= 0.1 | KL <= 0.5 |" in report
    assert "- budget check: 0 of 16 budgeted responses reported a KL over their `max_kl`" in report
    assert (out / "reward_kl_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
