"""The demo character-level tokenizer, saved and reloaded as vLLM loads it."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from models.demo.build import demo_base_dir
from models.demo.tokenizer import CHARACTERS, SPECIAL_TOKENS, format_prompt, save_tokenizer

SAMPLES = [
    "12+34=46",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\nlines\n\n",
    string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
    "a  b   c",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    directory: Path = tmp_path_factory.mktemp("demo_tokenizer")
    save_tokenizer(directory, model_max_length=512)
    return AutoTokenizer.from_pretrained(directory)


def test_vocabulary_and_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 104
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_one_token_per_character(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_bos_prepended_only_with_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    with_bos = tokenizer("1+2=")["input_ids"]
    without = tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id] + without
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == "1+2="


def test_special_tokens_in_text_are_single_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer("<s><|user|>1+2=<|assistant|>3</s>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "<|user|>", "1", "+", "2", "=", "<|assistant|>", "3", "</s>"
    ]


def test_unknown_character_maps_to_unk(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer("1é2", add_special_tokens=False)["input_ids"]
    assert ids == [
        tokenizer.convert_tokens_to_ids("1"),
        tokenizer.unk_token_id,
        tokenizer.convert_tokens_to_ids("2"),
    ]


def test_chat_template_renders_exact_string(tokenizer: PreTrainedTokenizerBase) -> None:
    user = [{"role": "user", "content": "12+34="}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|user|>12+34=<|assistant|>"
    assert prompt == format_prompt("12+34=", chat=True)
    conversation = [
        {"role": "system", "content": "be exact"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == "<s><|system|>be exact<|user|>1+1=<|assistant|>2</s>"


def test_chat_template_rejects_unknown_role(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_stream_reproduces_text(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> None:
    """vLLM detokenizes fast tokenizers incrementally with DecodeStream,
    primed with the prompt ids."""
    prompt_ids = tokenizer(format_prompt("7-9=", chat=True), add_special_tokens=False)["input_ids"]
    completion = "-2 and  some\ttext\n</s>"
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    stream = DecodeStream(ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = [stream.step(tokenizer.backend_tokenizer, i) for i in completion_ids]
    expected = completion.removesuffix("</s>") if skip_special_tokens else completion
    assert "".join(piece or "" for piece in pieces) == expected


def test_committed_checkpoint_tokenizer_matches_the_builder(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    committed = AutoTokenizer.from_pretrained(demo_base_dir())
    assert committed.get_vocab() == tokenizer.get_vocab()
    text = "<s><|user|>5-987=<|assistant|>-982</s>"
    assert committed(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert committed.chat_template == tokenizer.chat_template
