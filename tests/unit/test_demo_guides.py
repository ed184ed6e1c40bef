"""The demo guide-model build: a tiny build from the committed base, loaded the way the server loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from guidance.catalog import GuideCatalog
from guidance.loading import check_tokenizers
from models.demo.build import demo_base_dir
from models.demo.evaluate import sample_completions
from models.demo.guided_eval import GuidedConfig, evaluate_guidance
from models.demo.guides import GUIDES, REFERENCE_GUIDE, GuideBuildConfig, build_guides
from models.demo.paths import GUIDES_FILE
from models.demo.sampling import completion_ids, generate
from models.demo.task import held_out_problems
from models.demo.tokenizer import format_prompt
from models.runtime import SequenceScorer, load_guide_model, load_head
from models.runtime.loader import load_decoder
from models.training.loop import FitConfig
from models.training.objectives import GuideTrainee, last_token_mask, sequence_scores
from models.training.rollouts import Rollouts, preference_pairs

TINY = GuideBuildConfig(problems=48, samples_per_problem=4, validation_fraction=0.25,
                        value_fit=FitConfig(steps=3, batch_size=16), preference_fit=FitConfig(steps=3, batch_size=16),
                        sequence_reward_fit=FitConfig(steps=3, batch_size=16))
EXPECTED_HEADS = {
    "demo-value": ("bernoulli", "q"),
    "demo-value-hist": ("histogram", "v"),
    "demo-prefix": ("expected", "v"),
    "demo-arm": ("arm", "q"),
    "demo-genarm": ("lm", "q"),
    "demo-reward": ("reward", "v"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("guides")
    return root, build_guides(demo_base_dir(), root, seed=0, progress=False, config=TINY)


def guide_paths(root: Path) -> dict[str, Path]:
    table = json.loads((root / GUIDES_FILE).read_text())
    return {name: root / path for name, path in table.items()}


def test_every_guide_kind_is_built_and_loads(built):
    root, _ = built
    paths = guide_paths(root)
    assert set(paths) - {REFERENCE_GUIDE} == set(EXPECTED_HEADS) == {spec.name for spec in GUIDES}
    for name, (head_type, scoring) in EXPECTED_HEADS.items():
        model = load_guide_model(paths[name])
        assert (model.head.type, model.scoring) == (head_type, scoring), name


def test_the_table_serves_the_base_itself_as_an_lm_guide(built):
    """demo-reference, contrast's reference, is the base checkpoint: its own LM head, nothing trained."""
    root, _ = built
    path = guide_paths(root)[REFERENCE_GUIDE]
    assert path.resolve() == demo_base_dir().resolve()
    model = load_guide_model(path)
    assert (model.head.type, model.scoring) == ("lm", "q")
    base = LlamaForCausalLM.from_pretrained(demo_base_dir(), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(model.score_next(model.backbone.forward(ids)[:, -1]), base(ids).logits[:, -1],
                                   atol=1e-4, rtol=1e-4)


def test_guides_table_is_accepted_by_the_catalog_and_tokenizer_check(built):
    root, _ = built
    catalog = GuideCatalog.from_paths(guide_paths(root))
    assert catalog.names() == sorted([*EXPECTED_HEADS, REFERENCE_GUIDE])
    assert catalog["demo-value-hist"].atoms == (0.0, 0.25, 0.5, 0.75, 1.0)
    check_tokenizers(demo_base_dir(), catalog)  # raises if a guide lacks the base's tokenizer


def test_card_reports_rollouts_and_every_model(built):
    _, card = built
    assert card["rollouts"]["count"] == TINY.problems * TINY.samples_per_problem
    assert 0.0 < card["rollouts"]["base_pass_at_1"] < 1.0
    assert set(card["guides"]) == set(EXPECTED_HEADS)
    for entry in card["guides"].values():
        assert entry["fit"]["steps"] == 3 and entry["train_loss"] == entry["train_loss"]  # not NaN
        assert 0.0 <= entry["validation"]["accuracy"] <= 1.0


def test_same_seed_gives_identical_weights(built, tmp_path):
    root, _ = built
    build_guides(demo_base_dir(), tmp_path, seed=0, progress=False, config=TINY)
    for name in EXPECTED_HEADS:
        for file in ("head.safetensors", "model.safetensors"):
            first, second = load_file(root / name / file), load_file(tmp_path / name / file)
            assert first.keys() == second.keys()
            assert all(torch.equal(first[k], second[k]) for k in first), f"{name}/{file} differs"


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADS))
def test_training_scores_match_the_runtime_scores(built, name):
    """The score a guide is trained on for (x_<t, x_t) is the one the runtime serves for that pair."""
    root, _ = built
    path = guide_paths(root)[name]
    decoder = load_decoder(path)
    head = load_head(path, decoder.config.hidden_size, decoder.config.vocab_size)
    trainee = GuideTrainee(decoder, head, trainable_layers=1)
    guide = load_guide_model(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    ids = torch.tensor([tokenizer("<s>12+345=357</s>", add_special_tokens=False)["input_ids"]])
    every_next = torch.arange(ids.shape[1]) > 0  # (x_<t, x_t) for t = 1..T-1
    with torch.no_grad():
        trained = trainee.token_scores(ids, trainee.features(ids), every_next[None])
    guide.setup_cache(1, ids.shape[1])
    slot = guide.cache.allocate()
    for t in range(1, ids.shape[1]):
        hidden = guide.prefill([slot], [ids[0, t - 1 : t]])  # the cache now holds x_<t
        if guide.scoring == "q":
            scores = guide.score_next(hidden)[0]
            served = (torch.log_softmax(scores, dim=-1) if head.type == "lm" else scores)[ids[0, t]]
        else:
            served = guide.score_candidates(torch.tensor([slot]), ids[:, t : t + 1])[0, 0]
        torch.testing.assert_close(trained[t - 1], served, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["demo-reward", "demo-arm", "demo-genarm"])
def test_preference_training_scores_sequences_as_the_sequence_scorer_serves_them(built, name):
    """Bradley-Terry trains S(x): demo-reward's score at each rollout's last real token (its eos when it
    has one), the summed token rewards of arm / lm heads: the scores SequenceScorer serves for x."""
    root, _ = built
    path = guide_paths(root)[name]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    prompts = ["<s>12+345=", "<s><|user|>7-9=<|assistant|>", "<s>1+1="]
    completions = ["357</s>", "-2", "3</s>"]  # the second ran out of tokens before an eos
    rows = [tokenizer(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
    starts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    t = torch.arange(width)
    mask = (t >= torch.tensor(starts)[:, None]) & (t < torch.tensor([len(r) for r in rows])[:, None])
    rollouts = Rollouts(input_ids, mask, mask, torch.tensor([1.0, 0.0, 1.0]), torch.arange(3))
    assert last_token_mask(mask).nonzero()[:, 1].tolist() == [len(r) - 1 for r in rows]
    decoder = load_decoder(path)
    trainee = GuideTrainee(decoder, load_head(path, decoder.config.hidden_size, decoder.config.vocab_size), 1)
    with torch.no_grad():
        trained = sequence_scores(trainee, rollouts, trainee.features(input_ids), torch.arange(3))
    torch.testing.assert_close(trained, SequenceScorer.load(path).score(rows, starts), atol=1e-4, rtol=1e-5)


def test_preference_pairs_match_correct_with_incorrect_rollouts_of_one_problem():
    rollouts = Rollouts(
        input_ids=torch.zeros(5, 3, dtype=torch.long),
        completion_mask=torch.ones(5, 3, dtype=torch.bool),
        target_mask=torch.ones(5, 3, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]),
        problem=torch.tensor([0, 0, 0, 1, 1]),
    )
    assert sorted(map(tuple, preference_pairs(rollouts).tolist())) == [(0, 1), (0, 2)]


def test_sampler_matches_the_base_evaluation_when_greedy():
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(demo_base_dir()))
    prompts = [format_prompt(p.prompt, chat=i % 2 == 1) for i, p in enumerate(held_out_problems()[:24])]
    reference = sample_completions(LlamaForCausalLM.from_pretrained(demo_base_dir()), tokenizer, prompts,
                                   temperature=0.0)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    tokens = generate(load_decoder(demo_base_dir()), encoded, tokenizer.eos_token_id, 8, temperature=0.0).tokens
    ours = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids(tokens, tokenizer.eos_token_id)]
    assert ours == reference


def test_guided_eval_at_strength_zero_is_the_base(built):
    root, _ = built
    configs = [GuidedConfig(), GuidedConfig("qsharp", "demo-value", 0.0), GuidedConfig("cd", "demo-prefix", 0.0)]
    base, *unguided = evaluate_guidance(demo_base_dir(), root / GUIDES_FILE, held_out_problems()[:16], configs,
                                        samples=2, progress=False)
    for result in unguided:
        assert (result.pass_at_1, result.greedy_accuracy, result.mean_kl) == (base.pass_at_1, base.greedy_accuracy, 0.0)
