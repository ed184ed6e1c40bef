"""Request-level search: spec validation, selection on hand-made scores, scorers."""

from __future__ import annotations

import math

import pytest
import torch

from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.search.report import SearchReport
from guidance.search.scorers import Completion, ModelScorer, ScorerCatalog, VerifierScorer
from guidance.search.selection import select, selection_generator, selection_probabilities
from guidance.search.spec import BestOfN, Blockwise, SearchLimits, parse_search
from guidance.verifiers import get_verifier
from models.demo.paths import CHECKPOINTS_DIR
from models.demo.tokenizer import format_prompt
from models.runtime.sequence import SequenceScorer

LIMITS = SearchLimits(max_candidates=8, max_block_tokens=16)
SCORERS = ["demo-verifier", "rm", "value"]
PREFIX_SCORERS = ["rm", "value"]  # guide models: they score partial sequences too


def parse(entry):
    return parse_search(entry, SCORERS, LIMITS, prefix_scorers=PREFIX_SCORERS)


def pruned(**prune):
    return {"type": "best_of_n", "n": 8, "scorer": "demo-verifier",
            "prune": {"scorer": "value", "every": 16, "fraction": 0.5, **prune}}


# Spec

def test_valid_specs():
    best = parse({"type": "best_of_n", "n": 8, "scorer": "rm"})
    assert isinstance(best, BestOfN) and (best.n, best.temperature, best.candidates_per_pick) == (8, 0.0, 8)
    block = parse({"type": "blockwise", "candidates": 4, "block_tokens": 16, "scorer": "demo-verifier",
                   "temperature": 0.5})
    assert isinstance(block, Blockwise) and (block.candidates_per_pick, block.block_tokens) == (4, 16)
    assert best.prune is None
    prune = parse(pruned(min_keep=2)).prune
    assert (prune.scorer, prune.every, prune.fraction, prune.min_keep) == ("value", 16, 0.5, 2)
    assert parse(pruned()).prune.min_keep == 1


@pytest.mark.parametrize(("entry", "param"), [
    ([1], "search"),
    ({"n": 2, "scorer": "rm"}, "search.type"),
    ({"type": "mcts", "n": 2, "scorer": "rm"}, "search.type"),
    ({"type": "best_of_n", "scorer": "rm"}, "search.n"),
    ({"type": "best_of_n", "n": 0, "scorer": "rm"}, "search.n"),
    ({"type": "best_of_n", "n": 9, "scorer": "rm"}, "search.n"),
    ({"type": "best_of_n", "n": "many", "scorer": "rm"}, "search.n"),
    ({"type": "best_of_n", "n": 2, "scorer": "nope"}, "search.scorer"),
    ({"type": "best_of_n", "n": 2}, "search.scorer"),
    ({"type": "best_of_n", "n": 2, "scorer": "rm", "temperature": -1}, "search.temperature"),
    ({"type": "best_of_n", "n": 2, "scorer": "rm", "candidates": 3}, "search.candidates"),
    ({"type": "blockwise", "candidates": 9, "block_tokens": 4, "scorer": "rm"}, "search.candidates"),
    ({"type": "blockwise", "candidates": 2, "block_tokens": 17, "scorer": "rm"}, "search.block_tokens"),
    ({"type": "blockwise", "candidates": 2, "scorer": "rm"}, "search.block_tokens"),
    (pruned(scorer="demo-verifier"), "search.prune.scorer"),  # a verifier judges finished answers only
    (pruned(scorer="nope"), "search.prune.scorer"),
    (pruned(every=0), "search.prune.every"),
    (pruned(fraction=0), "search.prune.fraction"),
    (pruned(fraction=1), "search.prune.fraction"),
    (pruned(fraction=float("nan")), "search.prune.fraction"),
    (pruned(min_keep=0), "search.prune.min_keep"),
    (pruned(min_keep=9), "search.prune.min_keep"),
    (pruned(keep=2), "search.prune.keep"),
    ({**pruned(), "prune": 0.5}, "search.prune"),
    ({"type": "blockwise", "candidates": 2, "block_tokens": 4, "scorer": "rm",
      "prune": {"scorer": "value", "every": 4, "fraction": 0.5}}, "search.prune"),
])
def test_invalid_specs_name_the_field(entry, param):
    with pytest.raises(GuidanceError) as info:
        parse(entry)
    assert info.value.param == param


def test_unknown_scorer_lists_the_configured_ones():
    with pytest.raises(GuidanceError, match="configured: demo-verifier, rm, value"):
        parse({"type": "best_of_n", "n": 2, "scorer": "demo-value"})


# Selection

def test_argmax_and_ties_keep_the_first():
    assert select(torch.tensor([0.1, 0.9, 0.3]), 0.0) == 1
    assert select(torch.tensor([0.5, 0.9, 0.9, 0.2]), 0.0) == 1
    assert select(torch.tensor([1.0, 1.0, 1.0]), 0.0) == 0
    assert selection_probabilities(torch.tensor([0.5, 0.9, 0.9]), 0.0).tolist() == [0.0, 1.0, 0.0]


def test_soft_selection_is_the_softmax_of_scores_over_temperature():
    scores = torch.tensor([0.0, 1.0, 2.0])
    expected = [math.exp(s / 0.5) for s in (0.0, 1.0, 2.0)]
    expected = [e / sum(expected) for e in expected]
    torch.testing.assert_close(selection_probabilities(scores, 0.5), torch.tensor(expected, dtype=torch.float64))


def test_soft_selection_tends_to_argmax_and_to_uniform():
    scores = torch.tensor([0.2, 0.8, 0.5, 0.8001])
    assert selection_probabilities(scores, 1e-6)[3] == pytest.approx(1.0)
    torch.testing.assert_close(selection_probabilities(scores, 1e6), torch.full((4,), 0.25, dtype=torch.float64))


def test_sampled_picks_follow_the_selection_distribution():
    scores = torch.tensor([0.0, 1.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([select(scores, 1.0, generator) for _ in range(20000)])
    frequencies = torch.bincount(draws, minlength=3).double() / len(draws)
    torch.testing.assert_close(frequencies, selection_probabilities(scores, 1.0), atol=0.015, rtol=0)


def test_selection_generator_is_reproducible_per_seed_pick_and_round():
    def draws(generator):
        return torch.rand(4, generator=generator).tolist()

    assert draws(selection_generator(7, 0)) == draws(selection_generator(7, 0))
    assert draws(selection_generator(7, 0)) != draws(selection_generator(7, 1))
    assert draws(selection_generator(7, 0, 1)) != draws(selection_generator(7, 0, 0))
    assert draws(selection_generator(None, 0)) != draws(selection_generator(None, 0))


@pytest.mark.parametrize("bad", [torch.tensor([]), torch.ones(2, 2)])
def test_selection_needs_a_vector_of_scores(bad):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        select(bad, 0.0)


def test_report_as_json():
    best = SearchReport(score=1.0, candidate_scores=(0.0, 1.0), selected=1, generated_tokens=12)
    assert best.as_dict() == {"score": 1.0, "candidate_scores": [0.0, 1.0], "selected": 1, "generated_tokens": 12}
    blocks = SearchReport(score=0.5, candidate_scores=((0.1, 0.5), (0.5, 0.2)), selected=(1, 0), generated_tokens=8)
    assert blocks.as_dict() == {"score": 0.5, "candidate_scores": [[0.1, 0.5], [0.5, 0.2]], "selected": [1, 0],
                                "generated_tokens": 8}


# Scorers

def demo_catalog() -> GuideCatalog:
    import json
    table = json.loads((CHECKPOINTS_DIR / "guides.json").read_text())
    return GuideCatalog.from_paths({name: CHECKPOINTS_DIR / path for name, path in table.items()})


def test_verifier_scorer_scores_text():
    scorer = VerifierScorer("demo-verifier", get_verifier("demo-verifier"))
    completions = [Completion("579", ()), Completion("578", ()), Completion(" 579 and more", ())]
    assert scorer.score("123+456=", [], completions) == [1.0, 0.0, 1.0]


def test_catalog_holds_verifiers_and_the_sequence_scoring_guide_models():
    scorers = ScorerCatalog.load(demo_catalog())
    # A Q-type value head (demo-value) scores next tokens, not sequences.
    # python-tests runs the reference's code: it is not offered to requests.
    assert scorers.names() == ["arith-first-line", "demo-arm", "demo-genarm", "demo-prefix", "demo-reference",
                               "demo-reward", "demo-value-hist", "demo-verifier", "exact", "json-schema", "math",
                               "regex"]
    assert scorers["demo-verifier"].describe() == {"name": "demo-verifier", "kind": "verifier",
                                                   "needs_reference": False}
    assert scorers["math"].describe() == {"name": "math", "kind": "verifier", "needs_reference": True}
    assert scorers.reference_names() == ["exact", "json-schema", "math", "regex"]
    assert scorers["demo-reward"].describe() == {"name": "demo-reward", "kind": "model", "head": "reward"}


@pytest.mark.parametrize("name", ["demo-reward", "demo-arm"])
def test_model_scorer_scores_prompt_plus_completion_in_one_call(name):
    from transformers import AutoTokenizer

    catalog = demo_catalog()
    scorer = ScorerCatalog.load(catalog)[name]
    assert isinstance(scorer, ModelScorer)
    tokenizer = AutoTokenizer.from_pretrained(catalog[name].path)
    prompt_ids = tokenizer.encode(format_prompt("123+456=", chat=False), add_special_tokens=False)
    completions = [Completion(text, tuple(tokenizer.encode(text + "</s>", add_special_tokens=False)))
                   for text in ("579", "578", "1000")]
    scores = scorer.score("123+456=", prompt_ids, completions)
    reference = SequenceScorer.load(catalog[name].path).score(
        [prompt_ids + list(c.token_ids) for c in completions], [len(prompt_ids)] * 3)
    assert scores == reference.tolist()
