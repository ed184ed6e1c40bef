"""Rollouts of a base model through the server's own vLLM engine wrapper, labelled by a verifier.

The Q-sharp data loop (Zhou et al., 2025, Algorithm 1): for each prompt and sample,

1. roll in with the current policy (round 1: the base; round k: the round k-1 guided
   policy, i.e. ``rollin_guidance``) and pick a cut h uniformly among its tokens;
2. roll out with the base policy from prompt + roll-in[:h];
3. label the completion roll-in[:h] + roll-out with the verifier's final reward, against the
   prompt's ``answer`` as its reference (a verifier that fails scores 0, is logged and counted).

The value targets are the roll-out's tokens (``RolloutRecord.cut`` = h). When the roll-in
is the base itself, its own continuation after h is already a base roll-out, so one
generation serves both steps (same distribution, half the work).

Every sample is seeded: sample j of prompt i uses seed ``seed + i * samples + j`` for its
roll-in and the same seed for its roll-out; the cut is drawn from a generator seeded the
same way, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from guidance.verifiers import RegisteredVerifier
from models.training.rollouts import RolloutRecord
from server.engine import ChoiceOutput, Engine, SamplingOptions
from server.prompts import PromptRenderer
from workflows.prompt_file import PromptRecord


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
    text: str  # what the verifier reads: the rendered prompt
    reference: Any  # the prompt file's answer (None: none)


def render_prompts(renderer: PromptRenderer, prompts: Sequence[PromptRecord], round_name: str) -> list[RenderedPrompt]:
    rendered = []
    for record in prompts:
        ids = renderer.render_chat(list(record.messages)) if record.is_chat else renderer.encode(record.prompt)
        rendered.append(RenderedPrompt(f"{round_name}/{record.id}", ids, renderer.decode(ids), record.answer))
    return rendered


async def _complete(engine: Engine, request_id: str, prompt_ids: list[int], options: SamplingOptions) -> ChoiceOutput:
    output = ChoiceOutput()
    async for delta in engine.generate(request_id, prompt_ids, options):
        output.add(delta)
    return output


async def _one_rollout(engine: Engine, renderer: PromptRenderer, verifier: RegisteredVerifier,
                       prompt: RenderedPrompt, request_id: str, seed: int, settings: RolloutSettings,
                       rollin_guidance: tuple[dict[str, Any], ...]) -> RolloutRecord | None:
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
    text = renderer.decode(completion, skip_special_tokens=True)
    return RolloutRecord(group=prompt.group, prompt_ids=tuple(prompt.ids), completion_ids=tuple(completion),
                         cut=cut, reward=verifier(prompt.text, text, prompt.reference), text=text)


async def generate_rollouts(engine: Engine, renderer: PromptRenderer, verifier: RegisteredVerifier,
                            prompts: Sequence[PromptRecord], settings: RolloutSettings, round_name: str = "r1",
                            rollin_guidance: Sequence[dict[str, Any]] = (), progress: bool = True
                            ) -> list[RolloutRecord]:
    """``settings.samples`` rollouts of every prompt, all submitted at once (the engine batches
    them); in prompt order, sample order. Samples that produced no token are left out."""
    rendered = render_prompts(renderer, prompts, round_name)
    guidance = tuple(rollin_guidance)
    bar = tqdm(total=len(rendered) * settings.samples, desc=f"rollouts {round_name}", disable=not progress)

    async def one(i: int, j: int) -> RolloutRecord | None:
        index = i * settings.samples + j
        record = await _one_rollout(engine, renderer, verifier, rendered[i], f"rollout-{round_name}-{index}",
                                    settings.seed + index, settings, guidance)
        bar.update()
        return record

    try:
        results = await asyncio.gather(*(one(i, j) for i in range(len(rendered)) for j in range(settings.samples)))
    finally:
        bar.close()
    return [r for r in results if r is not None]
