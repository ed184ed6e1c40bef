"""Sequence scorers for request-level search, by the names requests use.

A scorer maps (prompt, completions) to one score per completion, all in one call:

- a rule-based verifier (``guidance.verifiers``, e.g. ``demo-verifier``) scores the text,
  against the request's ``search.reference`` when it needs one (``math``, ``exact``, ...);
- a guide model scores the token ids of prompt + completion in one batched forward
  (``models.runtime.sequence.SequenceScorer``): a V-type scalar head (``reward``,
  ``expected``, ``bernoulli``, ``histogram``) reads the last token — a sequence reward
  model, or a prefix scorer on prompt + block in blockwise search; an ARM or GenARM
  head (``arm``, ``lm``) sums the completion's token rewards;
- a reward model served on its own engine, reached by URL (``guidance.search.remote``), scores
  the text, or for a chat request the conversation rendered with its own chat template;
- an off-the-shelf HF reward model in its own format (``guidance.search.hf_scorers``): a sequence
  classifier, or a process reward model that scores each step.

Requests name scorers; the operator configures them (verifiers are built in or installed
plug-ins, except those not served, such as ``python-tests``, unless the operator serves them too; models and
URLs come from the guide-model table). Scoring runs in the caller's thread: the server calls it off its event loop.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guidance.catalog import GuideCatalog, GuideModelInfo
from guidance.verifiers import RegisteredVerifier, get_verifier, verifier_names
from models.runtime.sequence import SequenceScorer, scores_sequences


@dataclass(frozen=True)
class Completion:
    """A candidate to score: its text and the token ids that follow the prompt."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Conversation:
    """A chat request's messages (OpenAI's shape), for scorers that render them with their own template."""

    messages: tuple[dict[str, Any], ...]
    continues_last: bool = False  # the completion continues the last (assistant) message

    def with_reply(self, text: str) -> list[dict[str, Any]]:
        """The conversation with the candidate `text` as the assistant's reply."""
        if self.continues_last:
            *head, last = self.messages
            content = last.get("content") or ""
            begun = content if isinstance(content, str) else "".join(part["text"] for part in content)
            return [*head, {**last, "content": begun + text}]
        return [*self.messages, {"role": "assistant", "content": text}]


DEFAULT_STEP_DELIMITER = "\n\n"  # a blank line ends a step


class ScorerInputTooLong(ValueError):
    """A candidate is longer than a scorer can read (counted in the scorer's own tokens); the message says
    by how much."""


class Scorer(ABC):
    name: str
    kind: str
    max_length: int | None = None  # longest prompt + completion it can score (None: any)
    # Whether `score` takes a chat request's `conversation=` (keyword) besides the rendered prompt text.
    reads_conversation: bool = False
    step_delimiter: str = DEFAULT_STEP_DELIMITER  # where a whole completion is cut into steps for `score_steps`

    @abstractmethod
    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None) -> list[float]:
        """One score per completion (higher is better); `reference` is the request's ``search.reference``."""

    def score_steps(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Sequence[Completion]],
                    reference: Any = None) -> list[list[float]]:
        """One score per step of each completion (a completion given as its steps, in order), for step-level
        search and PRM aggregation: a process reward model scores every step in one pass; a prefix scorer
        scores prompt + steps[:k + 1] for each k. Scorers that judge finished answers only cannot."""
        raise NotImplementedError(f"the scorer {self.name!r} does not score steps")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


def step_prefixes(completion: Sequence[Completion]) -> list[Completion]:
    """A completion's prefixes that end at each of its steps: steps[:1], steps[:2], ..."""
    prefixes, text, ids = [], "", ()
    for step in completion:
        text, ids = text + step.text, (*ids, *step.token_ids)
        prefixes.append(Completion(text, ids))
    return prefixes


class VerifierScorer(Scorer):
    kind = "verifier"

    def __init__(self, name: str, verifier: RegisteredVerifier) -> None:
        self.name, self.verifier = name, verifier

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None) -> list[float]:
        """The verifier's rewards (a verifier that fails on a completion scores it 0, counted)."""
        return [self.verifier(prompt_text, c.text, reference) for c in completions]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.verifier.describe()}


class ModelScorer(Scorer):
    kind = "model"

    def __init__(self, info: GuideModelInfo, scorer: SequenceScorer) -> None:
        self.name, self.info, self._scorer = info.name, info, scorer
        self.max_length = scorer.model.backbone.config.max_position_embeddings
        self._lock = threading.Lock()  # one forward at a time per model

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None) -> list[float]:
        sequences = [[*prompt_ids, *c.token_ids] for c in completions]
        # An empty completion (a candidate that stopped at once) is scored on the prompt's last token.
        starts = [min(len(prompt_ids), len(s)) for s in sequences]
        with self._lock:
            return self._scorer.score(sequences, starts).tolist()

    def score_steps(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Sequence[Completion]],
                    reference: Any = None) -> list[list[float]]:
        """Each step's score is the model's score of the prefix that ends with it (one batched call)."""
        prefixes = [step_prefixes(c) for c in completions]
        flat = self.score(prompt_text, prompt_ids, [p for row in prefixes for p in row])
        scores, at = [], 0
        for row in prefixes:
            scores.append(flat[at:at + len(row)])
            at += len(row)
        return scores

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "head": self.info.head_type}


def is_sequence_scorer(info: GuideModelInfo) -> bool:
    """Whether a configured guide model can score whole sequences."""
    return scores_sequences(info.head_type, info.scoring)


class ScorerCatalog:
    """Every scorer a request may name: the served verifiers and the guide models that score sequences."""

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        self._scorers = {s.name: s for s in scorers}

    @classmethod
    def load(cls, catalog: GuideCatalog, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", remote: Sequence[Scorer] = (),
             reward_models: Sequence[Scorer] = (), code_verifiers: bool = False) -> "ScorerCatalog":
        """The served verifiers (with `code_verifiers`, also those that run code a request brings, such as
        ``python-tests``), every sequence-scoring guide model of `catalog` (loaded), the `remote` scorers and
        the off-the-shelf `reward_models` (``guidance.search.hf_scorers``); none of them may take a
        verifier's name."""
        verifiers = [get_verifier(name) for name in verifier_names()]
        scorers: list[Scorer] = [VerifierScorer(v.name, v) for v in verifiers if v.served or code_verifiers]
        for name in catalog.names():
            info = catalog[name]
            if not is_sequence_scorer(info):
                continue
            if name in verifier_names():
                raise ValueError(f"guide model {name!r} has the name of a verifier; rename it")
            scorers.append(ModelScorer(info, SequenceScorer.load(info.path, dtype=dtype, device=device)))
        for scorer in (*remote, *reward_models):
            if scorer.name in verifier_names():
                raise ValueError(f"{scorer.kind} scorer {scorer.name!r} has the name of a verifier; rename it")
            scorers.append(scorer)
        return cls(scorers)

    def __contains__(self, name: object) -> bool:
        return name in self._scorers

    def __getitem__(self, name: str) -> Scorer:
        return self._scorers[name]

    def names(self) -> list[str]:
        return sorted(self._scorers)

    def reference_names(self) -> list[str]:
        """Scorers that need the request's ``search.reference``."""
        return sorted(name for name, scorer in self._scorers.items()
                      if isinstance(scorer, VerifierScorer) and scorer.verifier.needs_reference)

    def prefix_names(self) -> list[str]:
        """Scorers that read token ids, so score a partial sequence as well as a whole one (the guide
        models; a verifier judges a finished answer)."""
        return sorted(name for name, scorer in self._scorers.items() if isinstance(scorer, ModelScorer))

    def step_names(self) -> list[str]:
        """Scorers that score each step of a completion (`Scorer.score_steps`): prefix scorers and
        process reward models."""
        return sorted(name for name, scorer in self._scorers.items()
                      if type(scorer).score_steps is not Scorer.score_steps)
