"""Tiny off-the-shelf reward models for tests: random weights, saved with transformers' own save_pretrained.

A second tokenizer (byte-level, Qwen-style special tokens and chat template, ids unlike the demo
tokenizer's) stands for a reward model of another family than the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification)

from models.runtime.hf_reward import Qwen2ForProcessRewardModel

OTHER_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>")
OTHER_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.5)
CLASSIFIERS = {"llama": (LlamaConfig, LlamaForSequenceClassification),
               "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
               "qwen3": (Qwen3Config, Qwen3ForSequenceClassification)}


def save_other_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges (one token per byte, as Qwen's tokenizer class rebuilds it), unlike
    the demo's: Qwen-style specials, `ки` one added token, the bytes in reverse order."""
    vocab = {token: i for i, token in enumerate((*OTHER_SPECIAL, *sorted(pre_tokenizers.ByteLevel.alphabet(),
                                                                          reverse=True)))}
    backend = Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(OTHER_SPECIAL))
    backend.add_tokens(["ки"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<extra_0>"],
                                        chat_template=OTHER_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def save_classifier(directory: Path, family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A one-label `*ForSequenceClassification` of `family` with `tokenizer` saved beside it."""
    config_class, model_class = CLASSIFIERS[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    model_class(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def save_qwen_prm(directory: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    Qwen2ForProcessRewardModel(Qwen2Config(vocab_size=len(tokenizer), **SHAPE)).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def save_tagged_lm(directory: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A causal LM (Math-Shepherd's form: a Mistral/Llama LM read at a step tag)."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **SHAPE)).save_pretrained(
        str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
