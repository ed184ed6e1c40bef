"""Rollouts of a base model through the server's own vLLM engine wrapper, labelled by a sequence scorer.

The Q-sharp data loop (Zhou et al., 2025, Algorithm 1): for each prompt and sample,

1. roll in with the current policy (round 1: the base; round k: the round k-1 guided
   policy, i.e. ``rollin_guidance``) and pick a cut h uniformly among its tokens;
2. roll out with the base policy from prompt + roll-in[:h];
3. label the completion roll-in[:h] + roll-out with the scorer's score of it (``workflows.labels``):
   a verifier's final reward against the prompt's ``answer`` as its reference (a verifier that
   fails scores 0, is logged and counted), or a reward model's score.

A prompt's samples are labelled together, in one ``Scorer.score`` call (off the event loop, so the
engine keeps generating). A call that raises (a remote scorer down after its retries, a completion
too long for the scorer) or gives a score that is not a finite number labels none of its rollouts:
they are dropped and counted, never scored 0 (0 is a real score for a reward model); when every
call fails, ``LabellingFailed``.

The value targets are the roll-out's tokens (``RolloutRecord.cut`` = h). When the roll-in
is the base itself, its own continuation after h is already a base roll-out, so one
generation serves both steps (same distribution, half the work).

Every sample is seeded: sample j of prompt i uses seed ``seed + i * samples + j`` for its
roll-in and the same seed for its roll-out; the cut is drawn from a generator seeded the
same way, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from guidance.search.scorers import Completion, Conversation, Scorer
from models.training.rollouts import RolloutRecord
from server.engine import ChoiceOutput, Engine, SamplingOptions
from server.prompts import PromptRenderer
from workflows.prompt_file import PromptRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutSettings:
    samples: int = 16  # per prompt (the Q-sharp paper's 16)
    temperature: float = 0.8  # the sampling the guide will serve under (the paper's 0.8 / 0.9)
    top_p: float = 0.9
    max_tokens: int = 32
    seed: int = 0


@dataclass(frozen=True)
class RenderedPrompt:
    group: str
    ids: list[int]
    text: str  # what a scorer reads as the prompt: the rendered prompt
    reference: Any  # the prompt file's answer (None: none)
    conversation: Conversation | None = None  # a chat prompt's messages, for scorers that render them themselves


@dataclass(frozen=True)
class LabelledRollouts:
    records: list[RolloutRecord]
    unscored: int = 0  # rollouts dropped: their scorer call failed
    failed_calls: int = 0


class LabellingFailed(RuntimeError):
    """Every scorer call failed: no rollout has a label."""


def render_prompts(renderer: PromptRenderer, prompts: Sequence[PromptRecord], round_name: str) -> list[RenderedPrompt]:
    rendered = []
    for record in prompts:
        ids = renderer.render_chat(list(record.messages)) if record.is_chat else renderer.encode(record.prompt)
        conversation = Conversation(tuple(record.messages)) if record.is_chat else None
        rendered.append(RenderedPrompt(f"{round_name}/{record.id}", ids, renderer.decode(ids), record.answer,
                                       conversation))
    return rendered


async def _complete(engine: Engine, request_id: str, prompt_ids: list[int], options: SamplingOptions) -> ChoiceOutput:
    output = ChoiceOutput()
    async for delta in engine.generate(request_id, prompt_ids, options):
        output.add(delta)
    return output


@dataclass(frozen=True)
class _Sample:
    completion: list[int]
    cut: int


async def _one_sample(engine: Engine, prompt: RenderedPrompt, request_id: str, seed: int, settings: RolloutSettings,
                      rollin_guidance: tuple[dict[str, Any], ...]) -> _Sample | None:
    options = SamplingOptions(max_tokens=settings.max_tokens, temperature=settings.temperature,
                              top_p=settings.top_p, seed=seed)
    rollin = await _complete(engine, f"{request_id}-in", prompt.ids, replace(options, guidance=rollin_guidance))
    if not rollin.token_ids:
        return None
    cut = random.Random(seed).randrange(len(rollin.token_ids))
    completion = list(rollin.token_ids)
    if rollin_guidance:
        kept = completion[:cut]
        rollout = await _complete(engine, f"{request_id}-out", prompt.ids + kept,
                                  replace(options, max_tokens=settings.max_tokens - cut))
        completion = kept + list(rollout.token_ids)
    return _Sample(completion, cut)


def _label(scorer: Scorer, prompt: RenderedPrompt, completions: list[Completion]) -> list[float]:
    """One score per completion, read as the server's search reads them (a chat prompt's conversation for
    scorers that take one); ValueError for scores that are no labels."""
    extra = {"conversation": prompt.conversation} if scorer.reads_conversation else {}
    scores = scorer.score(prompt.text, prompt.ids, completions, prompt.reference, **extra)
    if len(scores) != len(completions) or not all(map(math.isfinite, scores)):
        raise ValueError(f"gave {scores} for {len(completions)} completions")
    return scores


async def generate_rollouts(engine: Engine, renderer: PromptRenderer, scorer: Scorer, prompts: Sequence[PromptRecord],
                            settings: RolloutSettings, round_name: str = "r1",
                            rollin_guidance: Sequence[dict[str, Any]] = (), progress: bool = True
                            ) -> LabelledRollouts:
    """``settings.samples`` rollouts of every prompt, all submitted at once (the engine batches
    them), labelled by ``scorer`` a prompt at a time; in prompt order, sample order. Samples that
    produced no token, and those of a failed scorer call (module docstring), are left out."""
    rendered = render_prompts(renderer, prompts, round_name)
    guidance = tuple(rollin_guidance)
    bar = tqdm(total=len(rendered) * settings.samples, desc=f"rollouts {round_name}", disable=not progress)
    failures: list[tuple[int, Exception]] = []  # (rollouts dropped, why) per failed call

    async def one(i: int, j: int) -> _Sample | None:
        index = i * settings.samples + j
        sample = await _one_sample(engine, rendered[i], f"rollout-{round_name}-{index}", settings.seed + index,
                                   settings, guidance)
        bar.update()
        return sample

    async def group(i: int) -> list[RolloutRecord]:
        prompt = rendered[i]
        samples = [s for s in await asyncio.gather(*(one(i, j) for j in range(settings.samples))) if s is not None]
        if not samples:
            return []
        texts = [renderer.decode(s.completion, skip_special_tokens=True) for s in samples]
        completions = [Completion(text, tuple(s.completion)) for text, s in zip(texts, samples)]
        try:
            rewards = await asyncio.to_thread(_label, scorer, prompt, completions)
        except Exception as exc:  # a failed call loses its prompt's rollouts, never the run
            failures.append((len(samples), exc))
            logger.warning("scorer %r failed on prompt %s (%d rollouts dropped): %s: %s", scorer.name, prompt.group,
                           len(samples), type(exc).__name__, exc)
            return []
        return [RolloutRecord(group=prompt.group, prompt_ids=tuple(prompt.ids), completion_ids=tuple(s.completion),
                              cut=s.cut, reward=reward, text=text) for s, text, reward in zip(samples, texts, rewards)]

    try:
        groups = await asyncio.gather(*(group(i) for i in range(len(rendered))))
    finally:
        bar.close()
    records = [r for g in groups for r in g]
    if failures and not records:
        dropped, last = sum(n for n, _ in failures), failures[-1][1]
        raise LabellingFailed(f"the scorer {scorer.name!r} failed on every prompt ({len(failures)} calls, {dropped} "
                              f"rollouts); the last error: {type(last).__name__}: {last}")
    return LabelledRollouts(records, sum(n for n, _ in failures), len(failures))
