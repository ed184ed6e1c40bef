"""Off-the-shelf reward models as search scorers, run in the server process with ``transformers``.

What each reads (``guidance.search.hf_entries`` for the entries, ``models.runtime.hf_reward`` for
the forwards):

- ``RewardModelScorer`` (a one-label ``*ForSequenceClassification``): when its tokenizer equals the
  base model's, the token ids of prompt + completion (exactly what the generator produced); else
  text tokenised by its own tokenizer: for a chat request the conversation with the candidate as
  the assistant's reply, rendered with its own chat template; otherwise prompt text + completion.
- ``ProcessRewardScorer`` (Qwen2.5-Math-PRM or a Math-Shepherd-style causal LM): always text, since
  each step is followed by its step tag. The steps are written as each checkpoint's model card does:
  Qwen2.5-Math-PRM ``step_1<extra_0>step_2<extra_0>`` (the assistant's reply, in its chat template),
  Math-Shepherd ``question step_1 ки\\nstep_2 ки``. Each step is stripped, and any step tag in it
  removed, so that only the inserted tags are read. Step k's score is read at the k-th inserted tag.

A text that does not fit the model (its ``max_position_embeddings``, in its own tokens) raises
``ScorerInputTooLong``. One forward at a time per model (a lock); all candidates in one forward.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from guidance.loading import tokenizer_difference
from guidance.search.aggregate import aggregate
from guidance.search.hf_entries import ScorerModelSpec
from guidance.search.scorers import Completion, Conversation, Scorer, ScorerInputTooLong
from guidance.search.step_split import split_text
from models.runtime.hf_reward import load_reward_model, sequence_rewards, step_rewards


class _HFScorer(Scorer):
    reads_conversation = True

    def __init__(self, spec: ScorerModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.name, self.kind, self.spec = spec.name, spec.kind, spec
        self.model, self.tokenizer = model, tokenizer
        self.max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._lock = threading.Lock()  # one forward at a time per model

    def _encode(self, prompt_text: str, reply: str, conversation: Conversation | None, separator: str = "") -> list[int]:
        """Token ids, in its own tokenizer, of the chat with `reply` as the assistant's (its chat template),
        or of prompt text + `separator` + reply, its BOS added unless the text already starts with it."""
        tokenizer = self.tokenizer
        if conversation is not None and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(conversation.with_reply(reply), tokenize=False)
            return tokenizer(text, add_special_tokens=False).input_ids
        text = prompt_text + separator + reply
        bos = tokenizer.bos_token
        return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids

    def _check_lengths(self, sequences: Sequence[Sequence[int]]) -> None:
        longest = max(range(len(sequences)), key=lambda i: len(sequences[i]))
        if self.max_length is not None and len(sequences[longest]) > self.max_length:
            raise ScorerInputTooLong(
                f"The scorer {self.name!r} reads at most {self.max_length} tokens; candidate {longest} is "
                f"{len(sequences[longest])} of its tokens: lower max_tokens.")

    def identity(self) -> str:
        """What its scores depend on besides its weights, for cache keys."""
        spec = self.spec
        return f"{spec.kind} {spec.form} tag={spec.step_tag!r} labels={spec.labels} delimiter={spec.step_delimiter!r}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.spec.architecture}


class RewardModelScorer(_HFScorer):
    """A one-label sequence classifier's reward of prompt + completion."""

    def __init__(self, spec: ScorerModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 reads_token_ids: bool) -> None:
        """`reads_token_ids`: its tokenizer equals the base model's, so it scores the generated ids."""
        super().__init__(spec, model, tokenizer)
        self.reads_token_ids = reads_token_ids

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None, conversation: Conversation | None = None) -> list[float]:
        if self.reads_token_ids:
            sequences = [[*prompt_ids, *c.token_ids] for c in completions]
        else:
            sequences = [self._encode(prompt_text, c.text, conversation) for c in completions]
        self._check_lengths(sequences)
        with self._lock:
            return sequence_rewards(self.model, sequences).tolist()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reads": "token_ids" if self.reads_token_ids else "text"}


class ProcessRewardScorer(_HFScorer):
    """A process reward model: one score per step, read at the step tag that follows it."""

    def __init__(self, spec: ScorerModelSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(spec, model, tokenizer)
        self.step_delimiter = spec.step_delimiter
        self.tag_id = _single_token(tokenizer, spec.step_tag, f"{spec.name}.step_tag")
        self.label_ids = None if spec.labels is None else tuple(
            _single_token(tokenizer, label, f"{spec.name}.labels") for label in spec.labels)
        probe = [self._encode(" ", self._reply(["1", "2"]), None, self._separator)]
        if len(self._tag_positions(probe[0], 2)) != 2:
            raise ValueError(f"{spec.name}.step_tag: {spec.step_tag!r} is not read back as one token after a step "
                             "by the PRM's tokenizer")

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None, conversation: Conversation | None = None) -> list[float]:
        """The last step's score of each completion, cut into steps at the entry's `step_delimiter`."""
        steps = [[Completion(text, ()) for text in split_text(c.text, self.step_delimiter)] for c in completions]
        return [aggregate(scores, "last")
                for scores in self.score_steps(prompt_text, prompt_ids, steps, reference, conversation)]

    def score_steps(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Sequence[Completion]],
                    reference: Any = None, conversation: Conversation | None = None) -> list[list[float]]:
        """One forward over every completion, each written with a step tag after each of its steps."""
        sequences = [self._encode(prompt_text, self._reply([step.text for step in steps]), conversation,
                                  self._separator) for steps in completions]
        self._check_lengths(sequences)
        positions = [self._tag_positions(ids, len(steps)) for ids, steps in zip(sequences, completions)]
        with self._lock:
            return step_rewards(self.model, sequences, positions, self.label_ids)

    @property
    def _separator(self) -> str:
        """Between prompt text and reply: Math-Shepherd's ``f"{question} {output}"``."""
        return " " if self.spec.form == "tagged_lm" else ""

    def _reply(self, steps: Sequence[str]) -> str:
        tag = self.spec.step_tag
        clean = [step.replace(tag, "").strip() for step in steps]
        if self.spec.form == "qwen_prm":
            return "".join(f"{step}{tag}" for step in clean)
        return "\n".join(f"{step} {tag}" for step in clean)

    def _tag_positions(self, ids: Sequence[int], steps: int) -> list[int]:
        """The positions of the last `steps` step tags (the prompt may hold tags of its own)."""
        positions = [t for t, token in enumerate(ids) if token == self.tag_id][-steps:] if steps else []
        if len(positions) != steps:
            raise RuntimeError(f"the scorer {self.name!r} found {len(positions)} step tags for {steps} steps")
        return positions

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "step_delimiter": self.step_delimiter, "step_tag": self.spec.step_tag}


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str, field: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{field}: {text!r} is {len(ids)} tokens of the model's tokenizer; it must be one")
    return ids[0]


def load_hf_scorer(spec: ScorerModelSpec, base_model: Path, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Scorer:
    """The scorer of a validated entry, its model and tokenizer loaded from its directory (local files only)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{spec.name}.path: no tokenizer in {spec.path} ({exc})") from exc
    model = load_reward_model(spec.path, spec.architecture, dtype=dtype, device=device)
    if spec.kind == "prm":
        return ProcessRewardScorer(spec, model, tokenizer)
    return RewardModelScorer(spec, model, tokenizer, reads_token_ids=tokenizer_difference(base_model, spec.path) is None)
