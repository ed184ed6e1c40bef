"""Turns request prompts (text, token ids, chat messages) into base-model token ids."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.errors import InvalidRequest


class PromptRenderer:
    """The base model's tokenizer and chat template, used in the HTTP process."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    @classmethod
    def load(cls, model_dir: Path) -> "PromptRenderer":
        return cls(AutoTokenizer.from_pretrained(model_dir))

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the tokenizer's special tokens (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=True)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"Token id {bad} is out of range [0, {self.vocab_size}).", param=param
            )
        return token_ids

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant's turn.

        The template writes its own special tokens, so none are added on encoding.
        """
        if not self._tokenizer.chat_template:
            raise InvalidRequest("This model has no chat template; use /v1/completions.", param="messages")
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors are jinja's, raised for unsupported conversations
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
        return self._tokenizer.encode(text, add_special_tokens=False)
