"""Guide models with a tokenizer other than the base model's are refused at start-up."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from guidance.catalog import GuideCatalog, GuideModelInfo
from guidance.loading import check_tokenizers
from models.demo.tokenizer import save_tokenizer


def guide(path, vocab_size: int) -> GuideModelInfo:
    return GuideModelInfo("g", path, "bernoulli", "q", vocab_size)


def test_same_tokenizer_is_accepted(tmp_path):
    base, other = tmp_path / "base", tmp_path / "guide"
    tokenizer = save_tokenizer(base, 64)
    save_tokenizer(other, 64)
    check_tokenizers(base, GuideCatalog({"g": guide(other, len(tokenizer))}))


def test_different_tokenizer_is_refused_with_names(tmp_path):
    base, other = tmp_path / "base", tmp_path / "guide"
    tokenizer = save_tokenizer(base, 64)
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>").save_pretrained(other)
    with pytest.raises(ValueError, match="'g'.*different tokenizer"):
        check_tokenizers(base, GuideCatalog({"g": guide(other, len(tokenizer))}))


def test_missing_tokenizer_is_refused(tmp_path):
    base = tmp_path / "base"
    save_tokenizer(base, 64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(ValueError, match="'g'"):
        check_tokenizers(base, GuideCatalog({"g": guide(tmp_path / "empty", 10)}))


def test_smaller_vocabulary_is_refused(tmp_path):
    base, other = tmp_path / "base", tmp_path / "guide"
    tokenizer = save_tokenizer(base, 64)
    save_tokenizer(other, 64)
    with pytest.raises(ValueError, match="vocab_size"):
        check_tokenizers(base, GuideCatalog({"g": guide(other, len(tokenizer) - 1)}))


def test_guide_dtype_reaches_the_worker_and_auto_follows_the_base_model():
    import torch

    from guidance.adapters.vllm import CONFIG_KEY, engine_config, resolve_guide_dtype
    from guidance.catalog import GuideCatalog
    from server.engine import engine_args
    from server.settings import Settings

    assert engine_config(GuideCatalog({}), "bfloat16")[CONFIG_KEY]["guide_dtype"] == "bfloat16"
    assert resolve_guide_dtype("auto", torch.float32) == torch.float32
    assert resolve_guide_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_guide_dtype("float16", torch.bfloat16) == torch.float16
    args = engine_args(Settings(guide_dtype="bfloat16"), GuideCatalog.from_paths(Settings().guide_model_paths()))
    assert args.additional_config[CONFIG_KEY]["guide_dtype"] == "bfloat16"
