"""`bench.tensor_parallel`'s pure parts on hand-made outputs: the comparison and results.md."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from bench.tensor_parallel import Output, compare, render_markdown


def output(tokens: list[str], kl: float, scores: list[float] | None = None) -> Output:
    return Output(text="".join(tokens), tokens=tokens, top_logprobs=[[(t, -0.1), ("x", -0.3)] for t in tokens],
                  kl=kl, steps=len(tokens), candidate_scores=scores)


def test_equal_outputs_differ_only_in_kl_and_scores():
    comparison = compare(output(["1", "9", "0"], 0.5, [1.0, 2.0]), output(["1", "9", "0"], 0.5000025, [1.0, 2.5]))
    assert comparison.equal and comparison.first_divergence is None
    assert comparison.kl_abs_diff == pytest.approx(2.5e-6)
    assert comparison.score_abs_diff == pytest.approx(0.5)


def test_first_divergence_is_the_first_differing_token():
    comparison = compare(output(["1", "9", "0", "0"], 0.5), output(["1", "9", "1", "0"], 0.75))
    assert not comparison.equal and comparison.first_divergence == 2
    assert comparison.kl_abs_diff == pytest.approx(0.25)
    assert comparison.score_abs_diff is None


def test_a_shorter_output_diverges_where_it_ends():
    comparison = compare(output(["1", "9"], 0.5), output(["1", "9", "0"], 0.5))
    assert not comparison.equal and comparison.first_divergence == 2


def row(case: str, prompt: str, one: Output, two: Output) -> dict:
    request = {"guidance": [{"type": case.split("[")[0], "model": "m"}]}
    return {"case": case, "prompt": prompt, "prompt_id": prompt, "request": request, **asdict(compare(one, two)),
            "outputs": {"1": asdict(one), "2": asdict(two)}}


RESULTS = {
    "date": "2026-12-05", "command": "python -m bench.tensor_parallel --out x",
    "machine": {"cpu": "Test CPU", "usable_cpus": 2, "memory_gib": 8.0, "gpu": None, "vllm": "0.32.0",
                "torch": "2.13.0+cpu"},
    "setup": {"model": "runs/m", "guide_models": "runs/m/guides.json", "max_tokens": 3, "serve_flags": []},
    "tensor_parallel_size": 2, "thread_binding": "0|1", "start_seconds": {"1": 40.04, "2": 55.0},
    "wall_seconds": 120.4,
    "rows": [
        row("qsharp[v]", "1+1=", output(["2", "|", "\n"], 0.401175), output(["2", "|", "\n"], 0.401173)),
        row("qsharp[v]", "2+2=", output(["4"], 0.1), output(["4"], 0.1)),
        row("best-of-3[v, r]", "1+1=", output(["2", "a", "b"], 0.3, [7.5, 1.25, 7.5]),
            output(["2", "a", "b"], 0.3, [7.5, 1.2500003, 7.5])),
        row("arm[a]", "What is 1+1?", output(["2", "a", "b"], 1.0), output(["2", "c", "b"], 1.5)),
    ],
}


def test_results_table_has_a_row_per_case_and_prompt():
    markdown = render_markdown(RESULTS)
    assert markdown.startswith("# Guidance with tensor_parallel_size=2 against 1 (runs/m)\n")
    assert "`--dtype float32`, `VLLM_CPU_OMP_THREADS_BIND='0|1'` for TP=2." in markdown
    assert "Engine start (until healthy): TP=1: 40.0 s, TP=2: 55.0 s; the whole run 120 s." in markdown
    assert "Command: `python -m bench.tensor_parallel --out x`" in markdown
    # Each case's request once, however many prompts it ran on.
    assert markdown.count('- qsharp[v]: `{"guidance": [{"type": "qsharp", "model": "m"}]}`') == 1
    assert "**3 of 4 completions equal token for token; largest KL abs diff 5.0e-01; largest candidate score " \
           "abs diff 3.0e-07.**" in markdown
    assert "| case | prompt | tokens TP=1 | tokens TP=2 | equal | KL TP=1 | KL TP=2 | abs diff |" in markdown
    # Pipes and newlines of the tokens do not break the table.
    assert "| qsharp[v] | `1+1=` | `2\\|\\n` | `2\\|\\n` | True | 0.401175 | 0.401173 | 2.0e-06 |" in markdown
    assert "| arm[a] | `What is 1+1?` | `2ab` | `2cb` | False (from token 1) | 1.000000 | 1.500000 | 5.0e-01 |" \
           in markdown
    assert "- best-of-3[v, r], `1+1=`: TP=1 [7.5, 1.25, 7.5], TP=2 [7.5, 1.2500003, 7.5] " \
           "(largest abs diff 3.0e-07)" in markdown


def test_a_divergence_shows_the_top_two_logprobs_there():
    markdown = render_markdown(RESULTS)
    assert ("- arm[a], `What is 1+1?`, token 1: TP=1 `a`, top two `a` -0.100000, `x` -0.300000 (gap 2.00e-01); "
            "TP=2 `c`, top two `c` -0.100000, `x` -0.300000 (gap 2.00e-01)") in markdown
