"""`alignserve eval` configurations: the --configs file's validation and the sweep built from flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows.evaluation.configs import BASE, ConfigError, EvalConfig, check_unique, read_config_file
from workflows.evaluation.metrics import SELECTION_NOT_ESTIMATED, selection_kl
from workflows.evaluation.runner import seeds_per_sample
from workflows.evaluation.sweep import (
    GuideModel,
    Sweep,
    budget_variants,
    parse_counts,
    parse_guide_model,
    parse_kl_budgets,
    parse_strengths,
    sweep_configs,
)


def write(tmp_path: Path, body) -> Path:
    path = tmp_path / "configs.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


GOOD = {"name": "q@4", "method": "qsharp", "strength": 4,
        "guidance": [{"type": "qsharp", "model": "v", "strength": 4}]}


def test_config_file_round_trip(tmp_path):
    bo = {"name": "bo8", "method": "best-of-n", "strength": None,
          "search": {"type": "best_of_n", "n": 8, "scorer": "v", "temperature": 0.5}}
    configs = read_config_file(write(tmp_path, [GOOD, bo]))
    assert configs[0] == EvalConfig("q@4", "qsharp", 4.0, guidance=({"type": "qsharp", "model": "v", "strength": 4},))
    assert configs[0].extension == {"guidance": [{"type": "qsharp", "model": "v", "strength": 4}]}
    assert configs[1].strength is None and configs[1].search_type == "best_of_n"
    assert configs[1].to_json() == bo


@pytest.mark.parametrize(("body", "message"), [
    ("[not json", "not json|Expecting value"),
    ({"name": "x"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    (["q"], r"\[0\]: must be an object"),
    ([{**GOOD, "top_k": 3}], r"\[0\]: unknown fields \['top_k'\]"),
    ([{**GOOD, "name": ""}], r"\[0\]\.name: must be a non-empty string"),
    ([{k: v for k, v in GOOD.items() if k != "method"}], r"\[0\]\.method: must be a non-empty string"),
    ([{**GOOD, "name": "base"}], r"\[0\]\.name: 'base' is reserved"),
    ([GOOD, {**GOOD, "strength": "4"}], r"\[1\]\.strength: must be a number or null"),
    ([{**GOOD, "strength": True}], r"\[0\]\.strength: must be a number or null"),
    ([{**GOOD, "guidance": {"type": "qsharp"}}], r"\[0\]\.guidance: must be a list of objects"),
    ([{"name": "n", "method": "m"}], r"\[0\]: give 'guidance' and/or 'search'"),
    ([{**GOOD, "search": ["best_of_n"]}], r"\[0\]\.search: must be an object"),
    ([{**GOOD, "search": {"type": "mcts", "n": 2}}], r"\[0\]\.search\.type: must be one of"),
    ([{**GOOD, "search": {"type": "best_of_n", "n": 0, "scorer": "v"}}], r"\[0\]\.search\.n: must be a positive"),
    ([{**GOOD, "search": {"type": "blockwise", "candidates": 4, "scorer": "v"}}],
     r"\[0\]\.search\.block_tokens: must be a positive integer, got None"),
    ([{**GOOD, "search": {"type": "best_of_n", "n": 2, "scorer": "v", "temperature": -1}}],
     r"\[0\]\.search\.temperature: must be a number >= 0"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as caught:
        read_config_file(path)
    assert str(caught.value).startswith(f"--configs {path}")


def test_missing_config_file_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--configs .*nope.json"):
        read_config_file(tmp_path / "nope.json")


def test_duplicate_names_are_refused():
    check_unique([BASE, EvalConfig("a", "m", 1.0, guidance=({},))])
    with pytest.raises(ConfigError, match="'a' is used twice"):
        check_unique([EvalConfig("a", "m", 1.0), EvalConfig("a", "m", 2.0)])


def test_flag_lists():
    assert parse_strengths("0.5,1,2") == (0.5, 1.0, 2.0)
    assert parse_counts("1,2,16") == (1, 2, 16)
    assert parse_guide_model("demo-value") == GuideModel("demo-value")
    assert parse_guide_model("demo-arm@0.25,1") == GuideModel("demo-arm", (0.25, 1.0))
    for bad, message in (("1,x", "'x' is not a number"), ("-1", "must be >= 0"), ("nan", "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            parse_strengths(bad)
    with pytest.raises(ValueError, match="'2.5' is not an integer"):
        parse_counts("1,2.5")
    with pytest.raises(ValueError, match="0 must be at least 1"):
        parse_counts("0")
    with pytest.raises(ValueError, match="give a guide-model name"):
        parse_guide_model("@1,2")


def test_sweep_from_flags():
    sweep = Sweep(guided={"qsharp": (GuideModel("v1"), GuideModel("v2", (8.0,))), "arm": (GuideModel("a"),)},
                  strengths=(1.0, 2.0), best_of_n=("verifier",), ns=(1, 4), blockwise=("p",),
                  block_candidates=(2, 4), block_tokens=3)
    configs = sweep_configs(sweep)
    assert [c.name for c in configs] == [
        "qsharp(v1)@1", "qsharp(v1)@2", "qsharp(v2)@8", "arm(a)@1", "arm(a)@2",
        "best-of-1(verifier)", "best-of-4(verifier)", "blockwise-2x3(p)", "blockwise-4x3(p)"]
    assert [c.method for c in configs] == ["qsharp(v1)"] * 2 + ["qsharp(v2)"] + ["arm(a)"] * 2 + \
        ["best-of-n(verifier)"] * 2 + ["blockwise(p)"] * 2
    assert [c.strength for c in configs] == [1.0, 2.0, 8.0, 1.0, 2.0, 1.0, 4.0, 2.0, 4.0]
    assert configs[2].extension == {"guidance": [{"type": "qsharp", "model": "v2", "strength": 8.0}]}
    assert configs[6].extension == {"search": {"type": "best_of_n", "n": 4, "scorer": "verifier"}}
    assert configs[8].extension == {"search": {"type": "blockwise", "candidates": 4, "block_tokens": 3,
                                               "scorer": "p"}}
    assert sweep_configs(Sweep()) == []


def test_sweep_pruned_and_gated_variants():
    prune = {"scorer": "v", "every": 8, "fraction": 0.5, "min_keep": 1}
    configs = sweep_configs(Sweep(guided={"qsharp": (GuideModel("v", (2.0,)),)}, best_of_n=("verifier",),
                                  ns=(1, 8), prune=prune, min_entropies=(0.5,)))
    assert [(c.name, c.method) for c in configs] == [
        ("qsharp(v)@2", "qsharp(v)"), ("qsharp(v)@2 H>=0.5", "qsharp(v) H>=0.5"),
        ("best-of-1(verifier)", "best-of-n(verifier)"), ("best-of-8(verifier)", "best-of-n(verifier)"),
        ("best-of-8(verifier) pruned(v)", "best-of-n(verifier) pruned(v)")]  # pruning best-of-1 is plain best-of-1
    assert configs[1].extension == {"guidance": [{"type": "qsharp", "model": "v", "strength": 2.0,
                                                  "min_entropy": 0.5}]}
    assert configs[4].extension == {"search": {"type": "best_of_n", "n": 8, "scorer": "verifier", "prune": prune}}


def test_parse_kl_budgets():
    assert parse_kl_budgets("0.25,0.5,1,2") == (0.25, 0.5, 1.0, 2.0)
    for bad, message in (("0.5,x", "'x' is not a number"), ("0", "budget 0 must be a finite number > 0"),
                         ("-1", "budget -1 must be"), ("inf", "budget inf must be"), ("nan", "budget nan must be"),
                         ("1,1.0", "budget 1.0 is given twice")):
        with pytest.raises(ValueError, match=message):
            parse_kl_budgets(bad)


def test_kl_budgets_run_every_per_step_method_at_each_budget_uncapped():
    guided = {m: (GuideModel(m[0]),) for m in ("qsharp", "cd", "arm", "genarm")}
    configs = sweep_configs(Sweep(guided=guided, kl_budgets=(0.5, 2.0), best_of_n=("verifier",), ns=(1, 4)))
    # Without given strengths the default grid is not run: only the budgets, then best-of-N as ever.
    assert [(c.name, c.method, c.strength, c.kl_budget) for c in configs] == [
        ("qsharp(q) max_kl=0.5", "qsharp(q) max_kl", None, 0.5), ("qsharp(q) max_kl=2", "qsharp(q) max_kl", None, 2.0),
        ("cd(c) max_kl=0.5", "cd(c) max_kl", None, 0.5), ("cd(c) max_kl=2", "cd(c) max_kl", None, 2.0),
        ("arm(a) max_kl=0.5", "arm(a) max_kl", None, 0.5), ("arm(a) max_kl=2", "arm(a) max_kl", None, 2.0),
        ("genarm(g) max_kl=0.5", "genarm(g) max_kl", None, 0.5), ("genarm(g) max_kl=2", "genarm(g) max_kl", None, 2.0),
        ("best-of-1(verifier)", "best-of-n(verifier)", 1.0, None),
        ("best-of-4(verifier)", "best-of-n(verifier)", 4.0, None)]
    assert configs[2].extension == {"guidance": [{"type": "cd", "model": "c", "max_kl": 0.5}]}  # the server's cap


def test_contrast_entries_name_the_expert_and_its_reference():
    """`--contrast EXPERT` pairs the expert with the reference `train expert` wrote beside it, unless
    --contrast-reference names another; budgets and strengths apply as to any per-step method."""
    configs = sweep_configs(Sweep(guided={"contrast": (GuideModel("expert", (1.0,)),)}, kl_budgets=(0.5,)))
    assert [(c.name, c.method) for c in configs] == [("contrast(expert)@1", "contrast(expert)"),
                                                     ("contrast(expert) max_kl=0.5", "contrast(expert) max_kl")]
    assert configs[0].extension == {"guidance": [{"type": "contrast", "model": "expert",
                                                  "reference": "expert-reference", "strength": 1.0}]}
    assert configs[1].extension == {"guidance": [{"type": "contrast", "model": "expert",
                                                  "reference": "expert-reference", "max_kl": 0.5}]}
    other = sweep_configs(Sweep(guided={"contrast": (GuideModel("tuned"),)}, kl_budgets=(1.0,),
                                contrast_reference="untuned"))
    assert other[0].extension["guidance"][0]["reference"] == "untuned"


def test_kl_budgets_keep_the_strengths_given_and_the_gates():
    configs = sweep_configs(Sweep(guided={"qsharp": (GuideModel("v", (4.0,)), GuideModel("w"))}, strengths=(1.0,),
                                  kl_budgets=(1.0,), min_entropies=(0.5,)))
    assert [c.name for c in configs] == [
        "qsharp(v)@4", "qsharp(v) max_kl=1", "qsharp(v)@4 H>=0.5", "qsharp(v) H>=0.5 max_kl=1",
        "qsharp(w)@1", "qsharp(w) max_kl=1", "qsharp(w)@1 H>=0.5", "qsharp(w) H>=0.5 max_kl=1"]
    assert configs[3].method == "qsharp(v) H>=0.5 max_kl"
    assert configs[3].extension == {"guidance": [{"type": "qsharp", "model": "v", "min_entropy": 0.5, "max_kl": 1.0}]}
    assert [c.name for c in sweep_configs(Sweep(guided={"cd": (GuideModel("p"),)}))] == [
        "cd(p)@0.5", "cd(p)@1", "cd(p)@2", "cd(p)@4", "cd(p)@8"]  # no budgets: the default grid


def test_budget_variants_of_a_file_configuration_keep_its_strengths_as_caps():
    composed = EvalConfig("mix", "q+cd", 4.0, guidance=({"type": "qsharp", "model": "v", "strength": 4.0},
                                                        {"type": "cd", "model": "p", "strength": 1.0}))
    variants = budget_variants(composed, (0.25, 1.0))
    assert [(c.name, c.method, c.strength, c.kl_budget) for c in variants] == [
        ("mix max_kl=0.25", "mix max_kl", 4.0, 0.25), ("mix max_kl=1", "mix max_kl", 4.0, 1.0)]
    assert variants[0].extension == {"guidance": [{"type": "qsharp", "model": "v", "strength": 4.0, "max_kl": 0.25},
                                                  {"type": "cd", "model": "p", "strength": 1.0, "max_kl": 0.25}]}
    searched = EvalConfig("q+bo", "q+bo", 4.0, guidance=composed.guidance[:1],
                          search={"type": "best_of_n", "n": 4, "scorer": "v"})
    budgeted = EvalConfig("own", "own", None, guidance=({"type": "cd", "model": "p", "strength": 1, "max_kl": 3},))
    per_token = EvalConfig("tok", "tok", None, guidance=({"type": "cd", "model": "p", "kl_per_token": 0.1},))
    assert budget_variants(searched, (1.0,)) == budget_variants(budgeted, (1.0,)) == []
    assert budget_variants(per_token, (1.0,)) == [] and budget_variants(BASE, (1.0,)) == []
    assert budgeted.kl_budget == 3.0 and per_token.kl_budget is None and BASE.kl_budget is None
    assert EvalConfig("m", "m", None, guidance=({"max_kl": 2}, {"max_kl": 0.5})).kl_budget == 0.5  # the tightest


def test_sweep_step_searches_at_each_budget():
    """Budget N: beam keeps N / E solutions of E expansions, DVTS runs N / E subtrees, particle filtering
    carries N particles; a budget that E does not divide has no beam or DVTS point."""
    sweep = Sweep(best_of_n=("prm",), ns=(2, 4, 8), step_search=("prm",), expansions=4, answers="math",
                  step_fields={"step_delimiter": "\n", "max_steps": 6, "aggregate": "min"})
    configs = {c.name: c for c in sweep_configs(sweep)}
    assert configs["beam-8(prm)"].search == {"type": "beam", "beam_width": 2, "expansions": 4, "scorer": "prm",
                                             "step_delimiter": "\n", "max_steps": 6, "aggregate": "min",
                                             "answers": "math"}
    assert configs["dvts-8(prm)"].search["n"] == 8 and configs["dvts-8(prm)"].search["beam_width"] == 4
    assert configs["particle_filter-2(prm)"].search["particles"] == 2
    assert "beam-2(prm)" not in configs and "dvts-2(prm)" not in configs
    assert configs["weighted-best-of-4(prm)"].search == {"type": "best_of_n", "n": 4, "scorer": "prm",
                                                         "answers": "math"}
    assert configs["beam-8(prm)"].method == "beam(prm)" and configs["beam-8(prm)"].strength == 8.0
    # Seeds: max_steps x candidates per step, so no two samples share an expansion's seed.
    assert [configs[name].candidates_per_step for name in ("beam-8(prm)", "dvts-8(prm)", "particle_filter-4(prm)")
            ] == [8, 8, 4]
    assert seeds_per_sample(configs["beam-8(prm)"], max_tokens=64) == 6 * 8
    assert selection_kl(configs["dvts-4(prm)"]) == (None, SELECTION_NOT_ESTIMATED)
