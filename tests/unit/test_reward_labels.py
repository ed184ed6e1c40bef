"""Rollouts labelled by a reward model (`--reward-model`): exact scores, failed calls dropped and counted,
the CLI's refusals, the histogram value head on the observed range, and the demo's reward guide."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from guidance.search.scorers import Completion, Conversation, Scorer
from models.demo.build import demo_base_dir
from models.demo.paths import demo_guides_file
from models.runtime import SequenceScorer
from models.training.guides import Backbone, GuideRecipe
from models.training.loop import FitConfig
from models.training.rollouts import RolloutRecord, informative_groups, write_rollouts
from server.cli import main
from server.engine import ChoiceDelta, SamplingOptions
from server.prompts import PromptRenderer
from tests.hf_reward_models import save_classifier, save_other_tokenizer
from workflows import training
from workflows.labels import Labeller, reward_model_labeller
from workflows.prompt_file import PromptRecord, write_prompts
from workflows.rollouts import LabellingFailed, RolloutSettings, generate_rollouts
from workflows.training import ValueHead, split_groups, summary_file, train_from_rollouts

DEMO_REWARD = "demo-reward"  # the demo guide with a sequence `reward` head (scoring "v")


class SeededEngine:
    """Answers request seed s with the token ids of texts[s % len(texts)] (demo tokenizer); no guidance."""

    def __init__(self, tokenizer, texts: Sequence[str]) -> None:
        self._ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]

    async def _stream(self, options: SamplingOptions):
        ids = self._ids[options.seed % len(self._ids)][: options.max_tokens]
        yield ChoiceDelta(index=0, text="", token_ids=tuple(ids), logprobs=None, finish_reason="stop")

    def generate(self, request_id, prompt_ids, options):
        return self._stream(options)

    def shutdown(self) -> None:
        pass


class FakeRewardModel(Scorer):
    """Scores that are no probabilities, distinct per prompt and completion; raises on prompts holding
    `fail_on`, gives NaN on those holding `nan_on`; records every call that gave scores."""

    name, kind, reads_conversation = "fake-rm", "remote", True

    def __init__(self, fail_on: str | None = None, nan_on: str | None = None) -> None:
        self.fail_on, self.nan_on = fail_on, nan_on
        self.calls: list[dict[str, Any]] = []

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None, conversation: Conversation | None = None) -> list[float]:
        if self.fail_on is not None and self.fail_on in prompt_text:
            raise ConnectionError("the scorer is down")
        if self.nan_on is not None and self.nan_on in prompt_text:
            return [float("nan")] * len(completions)
        scores = [-2.5 + 0.01 * len(prompt_text) + 0.5 * len(c.text) + 0.125 * i for i, c in enumerate(completions)]
        self.calls.append({"prompt": prompt_text, "ids": list(prompt_ids), "completions": list(completions),
                           "reference": reference, "conversation": conversation, "scores": scores})
        return scores


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_base_dir())


PROMPTS = [PromptRecord(id="a", prompt="123+456=", answer="579"), PromptRecord(id="b", prompt="1+1=", answer="2"),
           PromptRecord(id="c", messages=({"role": "user", "content": "2+2="},))]


def run(tokenizer, scorer: Scorer, prompts=PROMPTS, samples: int = 3):
    engine = SeededEngine(tokenizer, ["579", "57", "6"])
    return asyncio.run(generate_rollouts(engine, PromptRenderer(tokenizer), scorer, prompts,
                                         RolloutSettings(samples=samples, max_tokens=8), progress=False))


def test_rollouts_carry_exactly_the_scores_of_one_call_per_prompt(tokenizer) -> None:
    scorer = FakeRewardModel()
    labelled = run(tokenizer, scorer)
    assert len(scorer.calls) == 3 and all(len(c["completions"]) == 3 for c in scorer.calls)  # batched per prompt
    assert labelled.unscored == 0 and labelled.failed_calls == 0
    for group, record in zip(("r1/a", "r1/b", "r1/c"), PROMPTS):
        rows = [r for r in labelled.records if r.group == group]
        (call,) = [c for c in scorer.calls if c["ids"] == list(rows[0].prompt_ids)]
        assert [r.reward for r in rows] == call["scores"]  # the score of the whole completion, as given
        assert [(c.text, c.token_ids) for c in call["completions"]] == [(r.text, r.completion_ids) for r in rows]
        assert call["reference"] == record.answer and call["prompt"] == tokenizer.decode(rows[0].prompt_ids)
        # A chat prompt's conversation goes to scorers that render it themselves, as the server's search does.
        assert call["conversation"] == (Conversation(record.messages) if record.is_chat else None)
    assert min(r.reward for r in labelled.records) < 0


def test_a_failed_call_drops_its_prompts_rollouts_and_counts_them(tokenizer) -> None:
    labelled = run(tokenizer, FakeRewardModel(fail_on="1+1="))
    assert {r.group for r in labelled.records} == {"r1/a", "r1/c"} and len(labelled.records) == 6
    assert labelled.unscored == 3 and labelled.failed_calls == 1  # dropped, never labelled 0
    # A score that is not a finite number is no label either.
    labelled = run(tokenizer, FakeRewardModel(nan_on="123"))
    assert {r.group for r in labelled.records} == {"r1/b", "r1/c"} and labelled.unscored == 3


def test_every_call_failing_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(LabellingFailed, match=r"the scorer 'fake-rm' failed on every prompt \(2 calls, 6 rollouts\)"
                                              r".*ConnectionError: the scorer is down"):
        run(tokenizer, FakeRewardModel(fail_on="="), PROMPTS[:2])


# Sampling through `sample_rollouts` and the CLI, on the scripted engine.

@pytest.fixture
def scripted_engine(monkeypatch, tokenizer) -> None:
    monkeypatch.setattr(training.Engine, "start", staticmethod(lambda settings, catalog: SeededEngine(
        tokenizer, ["579</s>", "57", "6</s>"])))


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    write_prompts(PROMPTS[:2], tmp_path / "prompts.jsonl")
    return tmp_path / "prompts.jsonl"


def test_the_summary_records_the_reward_model_and_the_rollouts_it_dropped(scripted_engine, prompts_file,
                                                                         tmp_path: Path) -> None:
    labeller = Labeller(FakeRewardModel(fail_on="1+1="), {"reward_model": "fake-rm", "describe": {"name": "fake-rm"}})
    out = tmp_path / "r.jsonl"
    summary = training.sample_rollouts(demo_base_dir(), prompts_file, labeller, out,
                                       RolloutSettings(samples=3, max_tokens=8), progress=False)
    assert summary["labels"] == labeller.source and json.loads(summary_file(out).read_text()) == summary
    assert summary["reward_model_errors"] == 3 and summary["reward_model_failed_calls"] == 1
    assert summary["rollouts"] == 3 and "mean_reward" in summary and "pass_at_1" not in summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(row.keys() == {"group", "prompt_ids", "completion_ids", "cut", "reward", "text"} for row in rows)


def test_the_demo_reward_guide_labels_rollouts_with_its_own_scores(scripted_engine, prompts_file, tmp_path: Path,
                                                                   capsys) -> None:
    out = tmp_path / "r.jsonl"
    code = main(["train", "rollouts", "--base", str(demo_base_dir()), "--prompts", str(prompts_file), "--out",
                 str(out), "--reward-model", DEMO_REWARD, "--guide-models", str(demo_guides_file()), "--samples", "3",
                 "--max-tokens", "8"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(summary_file(out).read_text())
    assert summary["labels"] == {"reward_model": DEMO_REWARD,
                                 "describe": {"name": DEMO_REWARD, "kind": "model", "head": "reward"}}
    records = [RolloutRecord.from_json(json.loads(line)) for line in out.read_text().splitlines()]
    assert len(records) == 6 and summary["reward_model_errors"] == 0
    direct = SequenceScorer.load(demo_guides_file().parent / DEMO_REWARD)
    expected = direct.score([[*r.prompt_ids, *r.completion_ids] for r in records],
                            [len(r.prompt_ids) for r in records])
    torch.testing.assert_close(torch.tensor([r.reward for r in records]), expected.float(), rtol=1e-5, atol=1e-5)
    assert len({r.reward for r in records}) > 2  # real scores, not a verifier's 0 or 1



def test_an_hf_reward_model_alone_of_its_table_labels_a_chat_in_its_own_template(tmp_path: Path, tokenizer) -> None:
    other = save_other_tokenizer(tmp_path / "other")
    save_classifier(tmp_path / "rm", "llama", other)
    table = tmp_path / "guides.json"  # the broken entry is never read: only the named one is loaded
    table.write_text(json.dumps({"rm": {"path": "rm", "kind": "reward_model"}, "broken": {"kind": "prm"}}))
    with reward_model_labeller("rm", demo_base_dir(), table, {}) as labeller:
        assert labeller.source["reward_model"] == "rm" and labeller.source["describe"]["reads"] == "text"
        labelled = run(tokenizer, labeller.scorer, PROMPTS[2:], samples=2)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    for record in labelled.records:
        chat = [*PROMPTS[2].messages, {"role": "assistant", "content": record.text}]
        ids = other(other.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
        with torch.no_grad():
            assert record.reward == pytest.approx(float(model(torch.tensor([ids])).logits[0, 0]), abs=1e-4)


def cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def test_the_cli_refuses_bad_label_flags_naming_them(monkeypatch, prompts_file, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(training.Engine, "start", lambda *a: pytest.fail("the engine started"))
    base, table = str(demo_base_dir()), str(demo_guides_file())
    rollouts = ["train", "rollouts", "--base", base, "--prompts", str(prompts_file), "--out", str(tmp_path / "r.jsonl")]
    value = ["train", "value", "--base", base, "--prompts", str(prompts_file), "--out", str(tmp_path / "out")]
    cases = [
        (rollouts, "give exactly one of --verifier and --reward-model"),
        ([*rollouts, "--verifier", "demo-verifier", "--reward-model", DEMO_REWARD], "exactly one of --verifier and "
                                                                                     "--reward-model"),
        (value, "exactly one of --verifier and --reward-model"),
        ([*value, "--verifier", "demo-verifier", "--reward-model", DEMO_REWARD], "exactly one of --verifier and "
                                                                                  "--reward-model"),
        ([*rollouts, "--reward-model", "nope", "--guide-models", table], "--reward-model: "
                                                                         f"{table} has no entry 'nope'"),
        ([*value, "--reward-model", "nope", "--guide-models", table], "has no entry 'nope'"),
        ([*rollouts, "--reward-model", "demo-verifier", "--guide-models", table],
         "--reward-model 'demo-verifier' is a verifier: give it as --verifier demo-verifier"),
        ([*rollouts, "--reward-model", "demo-value", "--guide-models", table],
         "--reward-model: 'demo-value' in"),  # a Q-type value head scores next tokens, not sequences
    ]
    for argv, message in cases:
        code, err = cli(capsys, *argv)
        assert code == 2 and message in err, (argv, err)


# Training on a reward model's labels.

def reward_model_records(tmp_path: Path, fraction: float) -> tuple[Path, list[RolloutRecord], set[str]]:
    """Demo rollouts labelled with scores (four per prompt), a validation prompt holding the extremes; the
    file, its records and the validation groups."""
    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    groups = [str(i) for i in range(12)]
    _, valid = split_groups([RolloutRecord(g, (1,), (2,), 0, float(i)) for i, g in enumerate(groups)], fraction, 0)
    valid_groups = {r.group for r in valid}
    records = []
    for i, group in enumerate(groups):
        prompt = tokenizer(f"<s>{i}+{i}=", add_special_tokens=False)["input_ids"]
        extreme = 9.0 if group in valid_groups else 0.0
        for j, (answer, score) in enumerate(((2 * i, 2.0 + 0.01 * i), (2 * i + 1, -1.0 - extreme),
                                             (2 * i, 1.5 + extreme), (2 * i - 1, -0.5))):
            completion = tokenizer(f"{answer}</s>", add_special_tokens=False)["input_ids"]
            records.append(RolloutRecord(group, tuple(prompt), tuple(completion), j % 2, score, str(answer)))
    write_rollouts(records, tmp_path / "r.jsonl")
    labels = {"reward_model": "rm", "describe": {"name": "rm", "kind": "reward_model"}}
    summary_file(tmp_path / "r.jsonl").write_text(json.dumps({"labels": labels}))
    return tmp_path / "r.jsonl", records, valid_groups


def test_the_value_head_is_chosen_on_the_labels() -> None:
    assert ValueHead().config([0.0, 1.0, 1.0]) == {"type": "bernoulli"}  # a verifier's: today's default
    assert ValueHead("histogram", 3).config([0.0, 1.0]) == {"type": "histogram", "atoms": [0.0, 0.5, 1.0]}
    assert ValueHead(None, 5).config([0.5, -1.0, 2.0]) == {"type": "histogram",
                                                            "atoms": [-1.0, -0.25, 0.5, 1.25, 2.0]}
    with pytest.raises(ValueError, match=r"--head bernoulli .* span \[-1, 2\]"):
        ValueHead("bernoulli").config([0.5, -1.0, 2.0])


def test_a_value_model_on_scores_has_histogram_atoms_over_the_training_range(tmp_path: Path) -> None:
    file, records, valid_groups = reward_model_records(tmp_path, 0.25)
    recipe = GuideRecipe("v", {"type": "bernoulli", "scoring": "v"}, "value", fit=FitConfig(steps=2, batch_size=8))
    card = train_from_rollouts(demo_base_dir(), [file], recipe, Backbone(demo_base_dir(), 2), tmp_path / "out",
                               validation_fraction=0.25, progress=False, value_head=ValueHead(atoms=5))
    train = [r.reward for r in informative_groups(records) if r.group not in valid_groups]
    low, high = min(train), max(train)
    assert (low, high) == (-1.0, 2.11) and max(r.reward for r in records) == 10.5  # validation's are left out
    assert card["type"] == "histogram"
    assert card["atoms"] == pytest.approx([low + (high - low) * k / 4 for k in range(5)])
    assert card["labels"] == json.loads(summary_file(file).read_text())["labels"]
    assert card["rollouts"]["mean_reward"] == pytest.approx(sum(r.reward for r in records) / len(records), abs=1e-4)
    head = json.loads((tmp_path / "out" / "v" / "guide_head.json").read_text())
    assert head["type"] == "histogram" and head["atoms"] == card["atoms"]


def test_heads_and_trainers_that_need_right_or_wrong_labels_refuse_scores(tmp_path: Path, capsys) -> None:
    file, _, _ = reward_model_records(tmp_path, 0.25)
    common = ["--base", str(demo_base_dir()), "--rollouts", str(file), "--out", str(tmp_path / "out")]
    code, err = cli(capsys, "train", "value", *common, "--head", "bernoulli")
    assert code == 2 and "--head bernoulli regresses onto labels in {0, 1}" in err and "--head histogram" in err
    code, err = cli(capsys, "train", "arm", *common)
    assert code == 2 and "the preference objective reads right/wrong labels" in err
