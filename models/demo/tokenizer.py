"""A character-level fast tokenizer for the demo model.

Every ASCII printable character, ``"\\n"`` and ``"\\t"`` is one token, so
``decode(encode(text)) == text`` for any such text; other characters become
``<unk>``. Special tokens come first in the vocabulary. The chat template
renders ``<s><|user|>12+34=<|assistant|>46</s>``-style conversations.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
)
# Space..tilde, then the two whitespace controls the task text may hold.
CHARACTERS: tuple[str, ...] = tuple(chr(code) for code in range(32, 127)) + ("\n", "\t")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT_TOKEN
    + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)


def format_prompt(text: str, chat: bool) -> str:
    """The model input for ``text``, special tokens written as text: plain
    ``<s>text``, or what the chat template renders for one user message plus
    the generation prompt (kept in sync with CHAT_TEMPLATE by the unit tests).
    """
    if chat:
        return f"{BOS_TOKEN}{USER_TOKEN}{text}{ASSISTANT_TOKEN}"
    return f"{BOS_TOKEN}{text}"


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first, then one id per character."""
    tokens = SPECIAL_TOKENS + CHARACTERS
    return {token: index for index, token in enumerate(tokens)}


def build_backend_tokenizer() -> Tokenizer:
    """The `tokenizers` object: one pre-token per character, ids by lookup."""
    vocab = vocabulary()
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # "[\s\S]" matches any single character, newlines included.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins token strings with nothing between them.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return tokenizer


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers wrapper, with special tokens and chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        # The default cleanup would delete spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(output_dir: Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """Build the tokenizer and write it to ``output_dir``."""
    tokenizer = build_tokenizer(model_max_length)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer
