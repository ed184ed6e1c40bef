"""`alignserve eval` report writers on hand-made rows: CSV, markdown, JSON, the plot."""

from __future__ import annotations

import csv
import json

from workflows.evaluation.configs import BASE, EvalConfig
from workflows.evaluation.metrics import ResultRow
from workflows.evaluation.plot import plot_pass_vs_compute, plot_reward_vs_kl
from workflows.evaluation.reports import CSV_COLUMNS, RunInfo, markdown_report, markdown_table, write_csv, write_json


def row(config: str, method: str, strength, pass_at_1: float, mean_kl, kl_source: str = "reported",
        complete: bool = True, counted: str = "all generated", stderr: float | None = 0.125,
        kl_budget: float | None = None, over_budget: int | None = None) -> ResultRow:
    return ResultRow(config=config, method=method, strength=strength, prompts=4, samples_per_prompt=2,
                     pass_at_1=pass_at_1, pass_at_1_stderr=stderr, maj_at_k=None if method == "bw" else 0.5,
                     mean_kl=mean_kl, kl_source=kl_source, kl_per_token=None if mean_kl is None else mean_kl / 8,
                     reported_kl=mean_kl or 0.0, kl_complete=complete, kl_budget=kl_budget,
                     over_budget=over_budget, tokens=64, tokens_counted=counted,
                     seconds=1.25, generated_tokens_per_sample=8.0 * (strength or 1) if counted != "all generated"
                     else 8.0, steered_fraction=0.75 if method == "qsharp" else None)


ROWS = [
    row("base", "base", None, 0.5, 0.0),
    row("q@1", "qsharp", 1.0, 0.6, 0.1),
    row("q@4", "qsharp", 4.0, 0.75, 0.4),
    row("bo4", "best-of-n", 4.0, 0.875, 0.6363, "log N - (N-1)/N bound", counted="kept candidates only"),
    row("bw", "bw", 4.0, 0.7, None, "selection KL not estimated", complete=False, counted="kept candidates only"),
]
INFO = RunInfo(command="alignserve eval --url http://x --prompts p.jsonl --verifier demo-verifier --out o",
               model="demo-base", server="the server at http://x", prompts_file="p.jsonl", prompts=4,
               verifier="demo-verifier", samples=2, temperature=0.8, top_p=0.9, max_tokens=8, seed=7)


def test_csv_has_every_column_and_empty_cells_for_none(tmp_path):
    write_csv(ROWS, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as handle:
        reader = csv.DictReader(handle)
        table = list(reader)
    assert reader.fieldnames == CSV_COLUMNS
    assert table[0]["strength"] == "" and table[0]["mean_kl"] == "0.0"
    assert table[3]["kl_source"] == "log N - (N-1)/N bound" and table[3]["tokens_counted"] == "kept candidates only"
    assert table[4]["mean_kl"] == "" and table[4]["maj_at_k"] == ""


def test_markdown_table_rows():
    lines = markdown_table(ROWS).splitlines()
    assert lines[0] == ("| config | method | strength | pass@1 | maj@k | mean KL | KL source | KL/token | tokens "
                        "| generated/sample | steered | seconds |")
    assert lines[2] == "| base | base |  | 0.500 | 0.500 | 0.000 | reported | 0.0000 | 64 | 8.0 | n/a | 1.2 |"
    assert lines[3] == "| q@1 | qsharp | 1 | 0.600 | 0.500 | 0.100 | reported | 0.0125 | 64 | 8.0 | 0.75 | 1.2 |"
    assert lines[5] == ("| bo4 | best-of-n | 4 | 0.875 | 0.500 | 0.636 | log N - (N-1)/N bound | 0.0795 | 64 "
                        "| 32.0 | n/a | 1.2 |")
    assert lines[6] == "| bw | bw | 4 | 0.700 | n/a | n/a | selection KL not estimated | n/a | 64 | 32.0 | n/a | 1.2 |"


def test_markdown_report_header_and_notes():
    text = markdown_report(ROWS, INFO)
    assert INFO.command in text
    for fact in ("`demo-base`", "`p.jsonl` (4 prompts)", "verifier `demo-verifier`", "K): 2", "temperature 0.8",
                 "top_p 0.9", "max_tokens 8", "seed 7"):
        assert fact in text
    assert "- reported: the server's `guidance.kl`" in text
    assert "- log N - (N-1)/N bound: best-of-N" in text
    assert "- selection KL not estimated: blockwise" in text
    assert "log N bound:" not in text  # no soft best-of-N in this run
    assert "kept completions only" in text
    plain = markdown_report(ROWS[:3], INFO)
    assert "- log N - (N-1)/N bound" not in plain and "kept completions" not in plain


def test_json(tmp_path):
    configs = [BASE, EvalConfig("q@1", "qsharp", 1.0, guidance=({"type": "qsharp", "model": "v", "strength": 1},))]
    write_json(ROWS[:2], configs, INFO, tmp_path / "r.json")
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["run"]["command"] == INFO.command and body["run"]["top_p"] == 0.9
    assert body["configs"][1]["guidance"][0]["model"] == "v"
    assert body["results"][1]["pass_at_1"] == 0.6 and body["results"][0]["strength"] is None


def test_plots_write_pngs(tmp_path):
    plot_reward_vs_kl(ROWS, tmp_path / "p.png", "title")
    plot_pass_vs_compute(ROWS, tmp_path / "c.png", "title")
    assert (tmp_path / "p.png").read_bytes()[:4] == (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
