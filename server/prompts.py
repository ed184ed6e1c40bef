"""Turns request prompts (text, token ids, chat messages) into base-model token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.errors import InvalidRequest


# Variables the renderer itself passes to a chat template.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize"})


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How a conversation is rendered, as vLLM's chat fields ask: tool and document schemas for
    the template, whether to open the assistant's turn or continue its last message, and further
    variables of the template (`chat_template_kwargs`)."""

    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


class PromptRenderer:
    """The base model's tokenizer and chat template, used in the HTTP process."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> "PromptRenderer":
        return cls(AutoTokenizer.from_pretrained(model_dir))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt, by default with the tokenizer's special tokens (e.g. BOS)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"Token id {bad} is out of range [0, {self.vocab_size}).", param=param
            )
        return token_ids

    def render_chat(self, messages: list[dict[str, Any]], options: ChatTemplateOptions = ChatTemplateOptions()
                    ) -> list[int]:
        """Token ids of the chat template applied to `messages` (by default ready for the assistant's
        turn; see `ChatTemplateOptions`).

        The template writes its own special tokens, so none are added on encoding.
        """
        if not self._tokenizer.chat_template:
            raise InvalidRequest("This model has no chat template; use /v1/completions.", param="messages")
        reserved = RESERVED_TEMPLATE_VARIABLES & options.template_kwargs.keys()
        if reserved:
            raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}; "
                                 "use the request fields of that name.", param="chat_template_kwargs")
        if options.continue_final_message and (options.add_generation_prompt or messages[-1]["role"] != "assistant"):
            raise InvalidRequest("continue_final_message needs add_generation_prompt false and a final "
                                 "assistant message to continue.", param="continue_final_message")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=options.tools, documents=options.documents, tokenize=False,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message, **options.template_kwargs,
            )
        except Exception as exc:  # template errors are jinja's, raised for unsupported conversations
            raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
        return self._tokenizer.encode(text, add_special_tokens=False)
