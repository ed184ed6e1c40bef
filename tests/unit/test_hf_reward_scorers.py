"""Off-the-shelf reward models as scorers: scores equal transformers' own forward, PRM step scores equal a
hand computation, entries are validated naming the field, and scorer-only models are refused for guidance."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.search.aggregate import aggregate
from guidance.search.hf_entries import read_scorer_entry
from guidance.search.hf_scorers import ProcessRewardScorer, RewardModelScorer, load_hf_scorer
from guidance.search.scorers import Completion, Conversation, ScorerCatalog, ScorerInputTooLong
from guidance.search.step_split import split_completion, split_text
from guidance.spec import parse_guidance
from models.demo.tokenizer import save_tokenizer
from models.runtime.hf_reward import Qwen2ForProcessRewardModel
from tests.hf_reward_models import save_classifier, save_other_tokenizer, save_qwen_prm, save_tagged_lm

CHAT = Conversation(({"role": "user", "content": "12+34="},))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-rm")
    base = root / "base"
    base_tokenizer = save_tokenizer(base, 256)
    other = save_other_tokenizer(root / "other-tokenizer")
    return {"root": root, "base": base, "base_tokenizer": base_tokenizer, "other": other}


def scorer_of(dirs, name, entry):
    return load_hf_scorer(read_scorer_entry(name, entry), dirs["base"])


def classifier_reward(path, ids) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_classifier_with_the_base_tokenizer_scores_the_token_ids_as_transformers_does(dirs, family):
    tokenizer = dirs["base_tokenizer"]
    path = save_classifier(dirs["root"] / f"same-{family}", family, tokenizer)
    scorer = scorer_of(dirs, "rm", {"path": str(path), "kind": "reward_model"})
    assert isinstance(scorer, RewardModelScorer) and scorer.reads_token_ids and scorer.max_length == 256
    prompt = tokenizer("12+34=").input_ids
    completions = [Completion(t, tuple(tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]))
                   for t in ("46", "4600", "")]
    scores = scorer.score("<s>12+34=", prompt, completions, conversation=CHAT)  # ids win over the conversation
    expected = [classifier_reward(path, [*prompt, *c.token_ids]) for c in completions]
    assert scores == pytest.approx(expected, abs=1e-5)
    architecture = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family] + "ForSequenceClassification"
    assert scorer.describe() == {"name": "rm", "kind": "reward_model", "architecture": architecture,
                                 "reads": "token_ids"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_classifier_with_another_tokenizer_scores_text_and_chats_in_its_own_template(dirs, family):
    other = dirs["other"]
    path = save_classifier(dirs["root"] / f"other-{family}", family, other, seed=1)
    scorer = scorer_of(dirs, "rm", {"path": str(path), "kind": "reward_model"})
    assert not scorer.reads_token_ids and scorer.describe()["reads"] == "text"
    completions = [Completion("46", (1, 2)), Completion("4 6\n", (3,))]
    # A completion request: prompt text + completion, in its own tokens.
    scores = scorer.score("12+34=", [9, 9], completions)
    assert scores == pytest.approx([classifier_reward(path, other("12+34=" + c.text).input_ids) for c in completions],
                                   abs=1e-5)
    # A chat request: the conversation with the candidate as the reply, in its own chat template.
    scores = scorer.score("<s><|user|>12+34=<|assistant|>", [9, 9], completions, conversation=CHAT)
    rendered = [f"<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n{c.text}<|im_end|>\n" for c in completions]
    assert [other.apply_chat_template(CHAT.with_reply(c.text), tokenize=False) for c in completions] == rendered
    assert scores == pytest.approx(
        [classifier_reward(path, other(text, add_special_tokens=False).input_ids) for text in rendered], abs=1e-5)


def test_a_candidate_longer_than_the_model_reads_is_refused_clearly(dirs):
    path = save_classifier(dirs["root"] / "short", "llama", dirs["other"])
    scorer = scorer_of(dirs, "rm", {"path": str(path), "kind": "reward_model"})
    with pytest.raises(ScorerInputTooLong, match=r"'rm' reads at most 256 tokens; candidate 1 is 301 of its tokens"):
        scorer.score("", [], [Completion("1", ()), Completion("1" * 301, ())])


def qwen_step_rewards(path, ids, tag_id) -> list[float]:
    """Qwen2.5-Math-PRM's model card: softmax(logits)[..., 1] at the <extra_0> positions."""
    model = Qwen2ForProcessRewardModel.from_pretrained(str(path)).eval()
    ids = torch.tensor([ids])
    with torch.no_grad():
        probs = model(ids).softmax(-1)[..., 1]
    return probs[ids == tag_id].tolist()


def test_a_qwen_prm_scores_each_step_at_its_separator(dirs):
    other = dirs["other"]
    path = save_qwen_prm(dirs["root"] / "qwen-prm", other)
    scorer = scorer_of(dirs, "prm", {"path": str(path), "kind": "prm"})
    assert isinstance(scorer, ProcessRewardScorer) and scorer.step_delimiter == "\n\n"
    tag = other.convert_tokens_to_ids("<extra_0>")
    solutions = [["12+34 ", "=46\n\n"], ["4<extra_0>6"], ["x\n\n", "y\n\n", "z"]]
    steps = [[Completion(text, ()) for text in solution] for solution in solutions]
    replies = ["12+34<extra_0>=46<extra_0>", "46<extra_0>", "x<extra_0>y<extra_0>z<extra_0>"]
    chat = scorer.score_steps("", [], steps, conversation=CHAT)
    expected = [qwen_step_rewards(path, other(other.apply_chat_template(CHAT.with_reply(reply), tokenize=False),
                                              add_special_tokens=False).input_ids, tag) for reply in replies]
    assert [len(s) for s in chat] == [2, 1, 3]
    assert chat == [pytest.approx(e, abs=1e-5) for e in expected]
    text = scorer.score_steps("12+34=", [], steps)
    assert text == [pytest.approx(qwen_step_rewards(path, other("12+34=" + reply).input_ids, tag), abs=1e-5)
                    for reply in replies]
    # score: the completion cut at blank lines, its last step's score.
    whole = scorer.score("", [], [Completion("x\n\ny\n\nz", ())], conversation=CHAT)
    assert whole == pytest.approx([expected[2][-1]], abs=1e-5)
    assert scorer.describe() == {"name": "prm", "kind": "prm", "architecture": "Qwen2ForProcessRewardModel",
                                 "step_delimiter": "\n\n", "step_tag": "<extra_0>"}


def test_a_math_shepherd_style_prm_reads_the_good_label_at_each_step_tag(dirs):
    other = dirs["other"]
    path = save_tagged_lm(dirs["root"] / "shepherd", other)
    scorer = scorer_of(dirs, "ms", {"path": str(path), "kind": "prm", "step_tag": "ки", "labels": ["+", "-"],
                                    "step_delimiter": "\n"})
    steps = [[Completion("12+34=46\n", ()), Completion("The answer is 46", ())]]
    scores = scorer.score_steps("Q: 12+34?", [], steps)
    # Math-Shepherd's usage: f"{question} {step} ки\n{step} ки", softmax over the (+, -) logits, the + one.
    ids = torch.tensor([other("Q: 12+34? 12+34=46 ки\nThe answer is 46 ки").input_ids])
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = model(ids).logits[..., [other.convert_tokens_to_ids("+"), other.convert_tokens_to_ids("-")]]
    expected = logits.softmax(-1)[..., 0][ids == other.convert_tokens_to_ids("ки")].tolist()
    assert len(expected) == 2 and scores == [pytest.approx(expected, abs=1e-5)]
    assert scorer.score("Q: 12+34?", [], [Completion("12+34=46\nThe answer is 46", ())]) == pytest.approx(
        [expected[-1]], abs=1e-5)


def test_aggregates_are_exact():
    scores = [0.5, 0.25, 0.75]
    assert [aggregate(scores, how) for how in ("last", "min", "prod", "mean")] == [0.75, 0.25, 0.09375, 0.5]
    assert aggregate([0.3], "prod") == 0.3
    with pytest.raises(ValueError, match="unknown aggregate 'max'"):
        aggregate(scores, "max")
    with pytest.raises(ValueError, match="no step scores"):
        aggregate([], "last")


def test_completions_split_into_steps_keep_their_delimiters_and_tokens(dirs):
    assert split_text("a\n\nb") == ["a\n\n", "b"]
    assert split_text("a\n\n") == ["a\n\n"] and split_text("") == [""] and split_text("ab") == ["ab"]
    assert split_text("a\n\n\n\nb") == ["a\n\n", "\n\n", "b"]
    tokenizer = dirs["base_tokenizer"]
    text = "1+1=2\n\nso 2\n\ndone"
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    steps = split_completion(Completion(text, ids), "\n\n", lambda t: tokenizer.decode(t))
    assert [s.text for s in steps] == ["1+1=2\n\n", "so 2\n\n", "done"]
    assert [tokenizer.decode(s.token_ids) for s in steps] == [s.text for s in steps]


@pytest.fixture(scope="module")
def models(dirs):
    root = dirs["root"]
    return {"classifier": str(save_classifier(root / "c", "llama", dirs["other"])),
            "qwen_prm": str(save_qwen_prm(root / "q", dirs["other"])),
            "lm": str(save_tagged_lm(root / "lm", dirs["other"]))}


@pytest.mark.parametrize("entry, message", [
    ({"kind": "reward_model"}, "rm.path: Field required"),
    ({"path": "x"}, "rm.kind: Field required"),
    ({"path": "x", "kind": "orm"}, "rm.kind: must be one of 'reward_model', 'prm', got 'orm'"),
    ({"path": "{classifier}", "kind": "reward_model", "step_tag": "x"}, "rm.step_tag: Extra inputs are not permitted"),
    ({"path": "{root}/missing", "kind": "reward_model"}, "rm.path: .*missing is not a model directory"),
    ({"path": "{lm}", "kind": "reward_model"}, "rm.kind: 'reward_model' needs a \\*ForSequenceClassification"),
    ({"path": "{qwen_prm}", "kind": "reward_model"}, "rm.kind: .*Qwen2ForProcessRewardModel \\(kind 'prm'\\)"),
    ({"path": "{classifier}", "kind": "prm"}, "rm.kind: 'prm' needs a Qwen2ForProcessRewardModel or a \\*ForCausalLM"),
    ({"path": "{lm}", "kind": "prm", "labels": ["+", "-"]}, "rm.step_tag: Field required for a causal-LM PRM"),
    ({"path": "{lm}", "kind": "prm", "step_tag": "ки"}, "rm.labels: Field required for a causal-LM PRM"),
    ({"path": "{lm}", "kind": "prm", "step_tag": "ки", "labels": ["+"]}, "rm.labels: List should have at least 2 items"),
    ({"path": "{lm}", "kind": "prm", "step_tag": "STEP", "labels": ["+", "-"]},
     "rm.step_tag: 'STEP' is 4 tokens of the model's tokenizer; it must be one"),
    ({"path": "{lm}", "kind": "prm", "step_tag": "ки", "labels": ["+", "--"]}, "rm.labels: '--' is 2 tokens"),
    ({"path": "{qwen_prm}", "kind": "prm", "labels": ["+", "-"]}, "rm.labels: a Qwen2ForProcessRewardModel reads"),
    ({"path": "{qwen_prm}", "kind": "prm", "step_delimiter": ""}, "rm.step_delimiter: String should have at least 1"),
])
def test_bad_entries_are_refused_naming_the_field(dirs, models, entry, message):
    entry = {key: value.format(root=dirs["root"], **models) if isinstance(value, str) else value
             for key, value in entry.items()}
    assert pytest.raises(ValueError, load_hf_scorer_of, dirs, entry).match(message)


def load_hf_scorer_of(dirs, entry):
    return load_hf_scorer(read_scorer_entry("rm", entry), dirs["base"])


def test_a_classifier_with_several_labels_is_refused(dirs, tmp_path):
    path = save_classifier(tmp_path / "two", "llama", dirs["other"])
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rm.path: .* is a classifier with 2 labels; a reward model has one"):
        read_scorer_entry("rm", {"path": str(path), "kind": "reward_model"})


def test_the_scorers_are_listed_and_only_the_prm_scores_steps(dirs, models):
    rm = scorer_of(dirs, "rm", {"path": models["classifier"], "kind": "reward_model"})
    prm = scorer_of(dirs, "prm", {"path": models["qwen_prm"], "kind": "prm", "step_delimiter": "\n"})
    catalog = ScorerCatalog.load(GuideCatalog({}), reward_models=[rm, prm])
    assert {"rm", "prm"} <= set(catalog.names())
    assert "prm" in catalog.step_names() and "rm" not in catalog.step_names()
    assert "rm" not in catalog.prefix_names() and "prm" not in catalog.prefix_names()
    assert catalog["prm"].describe()["step_delimiter"] == "\n" and catalog["rm"].describe()["kind"] == "reward_model"
    with pytest.raises(ValueError, match="reward_model scorer 'demo-verifier' has the name of a verifier"):
        ScorerCatalog.load(GuideCatalog({}), reward_models=[
            scorer_of(dirs, "demo-verifier", {"path": models["classifier"], "kind": "reward_model"})])


def test_token_level_guidance_with_a_scorer_only_model_is_refused():
    catalog = GuideCatalog({}, {"rm": "reward_model", "remote-rm": "remote"})
    for name, kind in (("rm", "reward_model"), ("remote-rm", "remote")):
        with pytest.raises(GuidanceError) as info:
            parse_guidance([{"type": "qsharp", "model": name, "strength": 1.0}], catalog)
        assert info.value.param == "guidance[0].model"
        assert f"'{name}' is a scorer only ({kind})" in info.value.message
        assert "token-level guidance needs a guide model in this server's format with the base model's tokenizer" \
            in info.value.message
    assert "rm" not in catalog and catalog.names() == []


def test_a_reward_model_listed_as_a_plain_directory_gets_a_hint(models):
    with pytest.raises(ValueError, match='a reward model is listed as {"path": ..., "kind": "reward_model"}'):
        GuideCatalog.from_paths({"rm": models["classifier"]})


def test_the_guide_table_resolves_reward_model_paths_beside_url_entries(tmp_path):
    from models.demo.build import demo_base_dir
    from server.settings import Settings

    table = tmp_path / "guides.json"
    table.write_text(json.dumps({"g": "value", "r": {"url": "http://rm:8000"},
                                 "rm": {"path": "rm-dir", "kind": "reward_model"}, "bad": {"kind": "prm"}}))
    settings = Settings(model=demo_base_dir(), guide_models=table)
    assert settings.guide_model_paths() == {"g": (tmp_path / "value").resolve()}
    assert settings.remote_scorer_entries() == {"r": {"url": "http://rm:8000"}}
    assert settings.scorer_model_entries() == {"rm": {"path": str((tmp_path / "rm-dir").resolve()),
                                                      "kind": "reward_model"}, "bad": {"kind": "prm"}}
