"""A reward guide model written as a public sequence classifier (`alignserve train reward --classifier-out`,
`alignserve models export-classifier`): transformers' own class, our HF reward-model loader and the guide
model in our runtime score the same token ids alike (less the head's bias, a constant), as Llama and as
Qwen2. (vLLM's pooling runner on the same export: tests/integration/test_remote_scorer_vllm.py.)"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from guidance.search.hf_entries import read_scorer_entry
from guidance.search.hf_scorers import load_hf_scorer
from guidance.search.scorers import Completion
from models.demo.build import demo_base_dir
from models.export_classifier import CARD_FILE, export_classifier
from models.runtime import SequenceScorer
from models.training.rollouts import write_rollouts
from server.cli import main
from tests.unit.test_export_prm import save_guide
from tests.unit.test_training import demo_records

TEXTS = ("<s>12+34=46</s>", "<s>12+34=47</s>", "<s>7+8=", "<s>123+456=579</s>")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`alignserve train reward` on demo rollouts, writing the classifier beside the guide."""
    root = tmp_path_factory.mktemp("reward")
    write_rollouts(demo_records(16), root / "r.jsonl")
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["train", "reward", "--base", str(demo_base_dir()), "--rollouts", str(root / "r.jsonl"),
                     "--layers", "2", "--steps", "4", "--batch-size", "8", "--eval-every", "2",
                     "--validation-fraction", "0.25", "--out", str(root / "out"), "--classifier-out",
                     str(root / "rm")])
    assert code == 0
    [card] = json.loads(printed.getvalue())
    return root, card


def transformers_scores(path: Path, sequences: list[list[int]]) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return [float(model(torch.tensor([ids])).logits[0, 0]) for ids in sequences]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_export_scores_as_the_guide_does_in_transformers_and_in_our_loader(trained, family):
    root, _ = trained
    guide, rm = root / "out" / "reward", root / "rm"
    if family == "qwen2":
        rm = root / "rm-qwen2"
        assert main(["models", "export-classifier", str(guide), str(rm), "--family", "qwen2"]) == 0
    card = json.loads((rm / CARD_FILE).read_text())
    config = json.loads((rm / "config.json").read_text())
    assert config["model_type"] == family and len(config["id2label"]) == 1
    assert config["architectures"] == [f"{'Llama' if family == 'llama' else 'Qwen2'}ForSequenceClassification"]
    assert card["architecture"] == config["architectures"][0]
    tokenizer = AutoTokenizer.from_pretrained(str(rm))
    sequences = [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]
    embedded = (SequenceScorer.load(guide).score(sequences) - card["dropped_bias"]).tolist()
    assert transformers_scores(rm, sequences) == pytest.approx(embedded, abs=1e-4)
    scorer = load_hf_scorer(read_scorer_entry("rm", {"path": str(rm), "kind": "reward_model"}), demo_base_dir())
    completions = [Completion(text, tuple(ids[1:])) for text, ids in zip(TEXTS, sequences)]
    assert scorer.score("<s>", sequences[0][:1], completions) == pytest.approx(embedded, abs=1e-4)
    assert len(set(embedded)) == len(embedded)  # the check compares distinct scores, not a constant


def test_the_training_card_printed_names_the_classifier(trained):
    root, card = trained
    written = json.loads((root / "rm" / CARD_FILE).read_text())
    assert card["classifier"] == {"path": str(root / "rm"), **written}
    assert written["source"] == str(root / "out" / "reward")
    assert written["architecture"] == "LlamaForSequenceClassification"  # the demo base's family


def test_a_pad_token_that_ends_sequences_is_not_written_so_transformers_reads_the_last_token(trained, tmp_path):
    """SmolLM2's pad token is its end-of-turn token: transformers' classifier would read the token before a
    completion's final one. The export writes no pad token then, and scores what the guide scores."""
    root, _ = trained
    guide = tmp_path / "guide"
    shutil.copytree(root / "out" / "reward", guide)
    config = json.loads((guide / "config.json").read_text())
    (guide / "config.json").write_text(json.dumps({**config, "pad_token_id": config["eos_token_id"]}))
    card = export_classifier(guide, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text()).get("pad_token_id") is None
    assert "end-of-sequence" in card["pad_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    sequences = [tokenizer(text, add_special_tokens=False).input_ids for text in TEXTS]
    assert sequences[0][-1] == config["eos_token_id"]  # a completion that ends the sequence
    embedded = (SequenceScorer.load(guide).score(sequences) - card["dropped_bias"]).tolist()
    assert transformers_scores(tmp_path / "rm", sequences) == pytest.approx(embedded, abs=1e-4)
    scorer = load_hf_scorer(read_scorer_entry("rm", {"path": str(tmp_path / "rm"), "kind": "reward_model"}), guide)
    completions = [Completion(text, tuple(ids[1:])) for text, ids in zip(TEXTS, sequences)]
    assert scorer.score("<s>", sequences[0][:1], completions) == pytest.approx(embedded, abs=1e-4)


def test_other_heads_and_families_are_refused_naming_the_reason(tmp_path, capsys):
    value = save_guide(tmp_path / "value", {"type": "bernoulli", "scoring": "v"})
    with pytest.raises(ValueError, match="needs a 'reward' head with scoring 'v', got 'bernoulli'"):
        export_classifier(value, tmp_path / "out")
    assert main(["models", "export-classifier", str(value), str(tmp_path / "out")]) == 2
    assert "needs a 'reward' head" in capsys.readouterr().err and not (tmp_path / "out").exists()
    reward = save_guide(tmp_path / "reward", {"type": "reward", "scoring": "v"})
    with pytest.raises(ValueError, match="family must be one of"):
        export_classifier(reward, tmp_path / "out", "mistral")
