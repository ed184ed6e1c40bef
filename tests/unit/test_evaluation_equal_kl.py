"""`alignserve eval --kl-budgets` reports on hand-made samples and rows: pass@1's standard error, the budget
check, the table of pass@1 at equal KL, the frontier plot's points and the files that carry them."""

from __future__ import annotations

import json
import math

import pytest

from workflows.evaluation.configs import BASE, EvalConfig
from workflows.evaluation.equal_kl import equal_kl_table, frontiers, markdown_equal_kl
from workflows.evaluation.metrics import ResultRow, over_budget, pass_at_1_stderr, summarize
from workflows.evaluation.plot import plot_frontier
from workflows.evaluation.reports import RunInfo, markdown_report, write_json
from workflows.evaluation.samples import Sample

BOUND = "log N - (N-1)/N bound"


def sample(prompt: int, j: int, reward: float, kl: float = 0.0) -> Sample:
    return Sample(prompt_index=prompt, prompt_id=str(prompt), sample=j, seed=j, text="", reward=reward,
                  answer=None, kl=kl, steps=4, completion_tokens=4)


def row(config: str, method: str, pass_at_1: float, stderr: float | None, mean_kl: float | None,
        kl_source: str = "reported", strength: float | None = None, kl_budget: float | None = None,
        over: int | None = None) -> ResultRow:
    return ResultRow(config=config, method=method, strength=strength, prompts=4, samples_per_prompt=2,
                     pass_at_1=pass_at_1, pass_at_1_stderr=stderr, maj_at_k=None, mean_kl=mean_kl,
                     kl_source=kl_source, kl_per_token=None, reported_kl=0.0, kl_complete=mean_kl is not None,
                     kl_budget=kl_budget, over_budget=over, tokens=64, tokens_counted="all generated",
                     seconds=1.0, generated_tokens_per_sample=8.0, steered_fraction=None)


ROWS = [
    row("base", "base", 0.5, 0.1, 0.0),
    row("qsharp(v) max_kl=0.5", "qsharp(v) max_kl", 0.6, 0.05, 0.45, kl_budget=0.5, over=0),
    row("qsharp(v) max_kl=1", "qsharp(v) max_kl", 0.7, 0.06, 0.9, kl_budget=1.0, over=1),
    row("qsharp(v)@4", "qsharp(v)", 0.75, 0.07, 0.8, strength=4.0),
    row("best-of-1(s)", "best-of-n(s)", 0.5, 0.1, 0.0, BOUND, strength=1.0),
    row("best-of-2(s)", "best-of-n(s)", 0.55, 0.04, math.log(2) - 1 / 2, BOUND, strength=2.0),
    row("best-of-4(s)", "best-of-n(s)", 0.65, 0.03, math.log(4) - 3 / 4, BOUND, strength=4.0),
    row("blockwise-4x4(p)", "blockwise(p)", 0.8, 0.05, None, "selection KL not estimated", strength=4.0),
    row("q+bo4 max_kl=0.5", "q+bo4 max_kl", 0.9, 0.02, 0.9, f"reported + {BOUND}", strength=4.0, kl_budget=0.5,
        over=0),
]


def test_pass_at_1_stderr_is_over_prompts_of_their_mean_reward():
    samples = [sample(0, 0, 1.0), sample(0, 1, 1.0), sample(1, 0, 1.0), sample(1, 1, 0.0),
               sample(2, 0, 0.0), sample(2, 1, 0.0), sample(3, 0, 0.0), sample(3, 1, 1.0)]
    # Prompt means 1, 0.5, 0, 0.5 around 0.5: sqrt((0.25 + 0 + 0.25 + 0) / 3 / 4).
    assert pass_at_1_stderr(samples) == pytest.approx(math.sqrt(0.5 / 3 / 4))
    assert pass_at_1_stderr([sample(0, 0, 1.0), sample(0, 1, 0.0)]) is None  # one prompt


def test_over_budget_counts_responses_past_the_relative_tolerance():
    samples = [sample(0, 0, 1.0, kl=0.5), sample(0, 1, 1.0, kl=0.5 * (1 + 1e-6)),
               sample(1, 0, 1.0, kl=0.5 * (1 + 3e-6)), sample(1, 1, 1.0, kl=0.7), sample(2, 0, 0.0, kl=0.0)]
    assert over_budget(samples, 0.5) == 2
    budgeted = EvalConfig("q max_kl=0.5", "q max_kl", guidance=({"type": "qsharp", "model": "v", "max_kl": 0.5},))
    summary = summarize(budgeted, samples, 1.0, with_majority=False)
    assert (summary.kl_budget, summary.over_budget) == (0.5, 2)
    plain = summarize(BASE, samples[:2], 1.0, with_majority=False)
    assert (plain.kl_budget, plain.over_budget, plain.pass_at_1_stderr) == (None, None, None)


def test_equal_kl_table_cells_best_of_n_choice_left_out_methods_and_budget_check():
    table = equal_kl_table(ROWS)
    assert table.budgets == (0.5, 1.0)  # from the comparable budgeted rows
    assert (table.base.config, table.base.pass_at_1, table.base.mean_kl) == ("base", 0.5, 0.0)
    assert [(m.method, m.kind) for m in table.methods] == [("qsharp(v) max_kl", "budget"),
                                                          ("best-of-n(s)", "best-of-n")]
    qsharp, best_of_n = table.methods
    assert [(c.config, c.pass_at_1, c.pass_at_1_stderr, c.mean_kl, c.over_budget) for c in qsharp.cells] == [
        ("qsharp(v) max_kl=0.5", 0.6, 0.05, 0.45, 0), ("qsharp(v) max_kl=1", 0.7, 0.06, 0.9, 1)]
    # The largest N whose bound fits: 0.193 <= 0.5 < 0.636 <= 1.
    assert [(c.config, c.strength) for c in best_of_n.cells] == [("best-of-2(s)", 2.0), ("best-of-4(s)", 4.0)]
    assert table.left_out == ("qsharp(v)", "blockwise(p)", "q+bo4 max_kl")
    assert (table.budgeted_responses, table.over_budget, table.over_budget_configs) == (24, 1, ("qsharp(v) max_kl=1",))
    assert equal_kl_table([r for r in ROWS if r.kl_budget is None]) is None


def test_equal_kl_table_leaves_a_cell_empty_when_no_n_fits():
    rows = [row("q max_kl=0.1", "q max_kl", 0.6, 0.05, 0.09, kl_budget=0.1, over=0), ROWS[5], ROWS[6]]
    table = equal_kl_table(rows)
    assert table.base is None and table.methods[1].cells == (None,)
    assert "| best-of-n(s) | none fits |" in markdown_equal_kl(table)


def test_markdown_equal_kl_table():
    lines = markdown_equal_kl(equal_kl_table(ROWS)).splitlines()
    assert lines[:7] == [
        "## pass@1 at equal KL", "",
        "| method | KL <= 0.5 | KL <= 1 |", "|---|---|---|",
        "| base | 0.500 ± 0.100 (KL 0.000) | 0.500 ± 0.100 (KL 0.000) |",
        "| qsharp(v) max_kl | 0.600 ± 0.050 (KL 0.450) | 0.700 ± 0.060 (KL 0.900) |",
        "| best-of-n(s) | 0.550 ± 0.040 (KL 0.193, N=2) | 0.650 ± 0.030 (KL 0.636, N=4) |"]
    text = "\n".join(lines)
    assert "standard error of the mean over prompts of each prompt's mean reward" in text
    assert "- not comparable at equal KL, left out: `qsharp(v)`, `blockwise(p)`, `q+bo4 max_kl`" in text
    assert ("- budget check: 1 of 24 budgeted responses reported a KL over their `max_kl` (relative tolerance "
            "1e-06): `qsharp(v) max_kl=1`.") in text


def test_frontiers_start_at_the_base_and_follow_kl(tmp_path):
    table = equal_kl_table(ROWS)
    curves = frontiers(table, ROWS)
    assert {method: [(c.config, c.mean_kl, c.pass_at_1) for c in points] for method, points in curves.items()} == {
        "qsharp(v) max_kl": [("base", 0.0, 0.5), ("qsharp(v) max_kl=0.5", 0.45, 0.6), ("qsharp(v) max_kl=1", 0.9, 0.7)],
        # Every N at its own KL; best-of-1 is the base's point already.
        "best-of-n(s)": [("best-of-1(s)", 0.0, 0.5), ("best-of-2(s)", math.log(2) - 0.5, 0.55),
                         ("best-of-4(s)", math.log(4) - 0.75, 0.65)]}
    plot_frontier(table, ROWS, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without_best_of_1 = [r for r in ROWS if r.config != "best-of-1(s)"]
    table = equal_kl_table(without_best_of_1)
    assert [c.config for c in frontiers(table, without_best_of_1)["best-of-n(s)"]] == [
        "base", "best-of-2(s)", "best-of-4(s)"]
    plot_frontier(table, without_best_of_1, tmp_path / "g.png", "title")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_md_and_json_carry_the_equal_kl_table(tmp_path):
    info = RunInfo(command="alignserve eval", model="demo-base", server="x", prompts_file="p.jsonl", prompts=4,
                   verifier="demo-verifier", samples=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=0)
    assert markdown_report(ROWS, info).endswith(markdown_equal_kl(equal_kl_table(ROWS)))
    assert "pass@1 at equal KL" not in markdown_report(ROWS[:1], info)
    write_json(ROWS, [BASE], info, tmp_path / "r.json")
    body = json.loads((tmp_path / "r.json").read_text())["equal_kl"]
    assert body["budgets"] == [0.5, 1.0] and body["over_budget"] == 1
    assert body["methods"][0]["cells"][1] == {"config": "qsharp(v) max_kl=1", "strength": None, "pass_at_1": 0.7,
                                              "pass_at_1_stderr": 0.06, "mean_kl": 0.9, "over_budget": 1}
    write_json(ROWS[:1], [BASE], info, tmp_path / "plain.json")
    assert json.loads((tmp_path / "plain.json").read_text())["equal_kl"] is None
