"""export_prm: a bernoulli V guide as a Qwen2ForProcessRewardModel reads the guide's V at each separator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from guidance.search.hf_entries import read_scorer_entry
from guidance.search.hf_scorers import ProcessRewardScorer, load_hf_scorer
from guidance.search.scorers import Completion, Conversation
from models.demo import tokenizer as demo
from models.export_prm import CARD_FILE, SEPARATOR, export_prm
from models.runtime import SequenceScorer, build_head, save_head
from models.runtime.hf_reward import QWEN_PRM_ARCHITECTURE, load_reward_model

H = 32


def blank_line_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's character tokenizer with "\\n\\n" as one more token (as SmolLM2 has one)."""
    vocab = demo.vocabulary()
    vocab["\n\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=demo.UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(demo.SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{demo.BOS_TOKEN} $A", special_tokens=[(demo.BOS_TOKEN, vocab[demo.BOS_TOKEN])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=demo.BOS_TOKEN, eos_token=demo.EOS_TOKEN, pad_token=demo.PAD_TOKEN,
        unk_token=demo.UNK_TOKEN, additional_special_tokens=[demo.SYSTEM_TOKEN, demo.USER_TOKEN, demo.ASSISTANT_TOKEN],
        chat_template=demo.CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def save_guide(directory: Path, head_config: dict) -> Path:
    """A tiny random Llama backbone, a random head of `head_config` and the tokenizer: a guide-model directory."""
    tokenizer = blank_line_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    head = build_head(head_config, H, len(tokenizer))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, 0.3)
    save_head(head, directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("export-prm")
    guide = save_guide(root / "guide", {"type": "bernoulli", "scoring": "v"})
    return guide, root / "prm", export_prm(guide, root / "prm")


def guide_values(guide: Path, prefixes: list[list[int]]) -> list[float]:
    """The guide's own V = sigmoid(w . h + b) at each prefix's last token."""
    return SequenceScorer.load(guide).score(prefixes).tolist()


def test_the_checkpoint_loads_and_reads_the_guide_value_at_every_position(exported):
    guide, prm_dir, card = exported
    tokenizer = AutoTokenizer.from_pretrained(str(prm_dir), local_files_only=True)
    base = AutoTokenizer.from_pretrained(str(guide), local_files_only=True)
    blank = base("\n\n", add_special_tokens=False).input_ids
    separator = tokenizer.convert_tokens_to_ids(SEPARATOR)
    assert len(blank) == 1 and separator == len(base)
    assert tokenizer.chat_template == base.chat_template
    assert card["separator"] == {"token": SEPARATOR, "id": separator}
    assert card["separator_embedding"] == {"copied_from": "\n\n", "id": blank[0], "blank_line_tokens": 1}
    assert json.loads((prm_dir / CARD_FILE).read_text()) == card
    config = json.loads((prm_dir / "config.json").read_text())
    assert config["architectures"] == [QWEN_PRM_ARCHITECTURE] and config["model_type"] == "qwen2"
    assert config["vocab_size"] == len(base) + 1 and not config["use_sliding_window"]
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}

    model = load_reward_model(prm_dir, QWEN_PRM_ARCHITECTURE)
    texts = ["12+34=46<extra_0>", "a<extra_0>b\n\nc<extra_0>", "\n\n<extra_0><extra_0>x y", "7"]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert (separator in ids) == (SEPARATOR in text)
        with torch.no_grad():
            probs = model(torch.tensor([ids])).softmax(-1)[0, :, 1].tolist()
        as_guide = [blank[0] if token == separator else token for token in ids]
        assert probs == pytest.approx(guide_values(guide, [as_guide[:t + 1] for t in range(len(ids))]), abs=1e-5)


@pytest.mark.parametrize("chat", [False, True])
def test_the_prm_scorer_scores_each_step_with_the_guide_value_after_a_blank_line(exported, chat):
    guide, prm_dir, _ = exported
    scorer = load_hf_scorer(read_scorer_entry("prm", {"path": str(prm_dir), "kind": "prm"}), guide)
    assert isinstance(scorer, ProcessRewardScorer)
    steps = [Completion("step1\n\n", ()), Completion("step2", ())]
    conversation = Conversation(({"role": "user", "content": "12+34="},)) if chat else None
    scores = scorer.score_steps("<s>12+34=", [], [steps], conversation=conversation)
    base = AutoTokenizer.from_pretrained(str(guide), local_files_only=True)
    start = "<s><|user|>12+34=<|assistant|>" if chat else "<s>12+34="
    prefixes = [base(start + text, add_special_tokens=False).input_ids for text in ("step1\n\n", "step1\n\nstep2\n\n")]
    assert scores == [pytest.approx(guide_values(guide, prefixes), abs=1e-5)]


@pytest.mark.parametrize("head", [{"type": "histogram", "scoring": "v", "atoms": [0.0, 1.0]},
                                  {"type": "bernoulli", "scoring": "q"}, {"type": "reward", "scoring": "v"}])
def test_other_heads_are_refused(tmp_path, head):
    guide = save_guide(tmp_path / "guide", head)
    with pytest.raises(ValueError, match=r"'histogram' V heads are not supported yet\) needs a 'bernoulli' head "
                                         r"with scoring 'v'"):
        export_prm(guide, tmp_path / "prm")
    assert not (tmp_path / "prm").exists()
