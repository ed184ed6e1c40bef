"""Request-level search over the engine: best-of-N and blockwise controlled decoding.

Both turn one prompt's `n` choices into `ChoiceDelta`s, as `Engine.generate` does, so the
endpoints stream and collect them alike. Each choice is an independent pick.

best_of_n: the N candidates of all n picks are submitted together (one engine request
each, candidate c of pick j seeded `seed + j * N + c`: best-of-1 is the plain request);
as soon as a pick's N candidates have finished they are scored in one call and the kept
one is emitted whole.

blockwise: per block, K continuations of at most M tokens of prompt + blocks kept so far
(vLLM's prefix cache serves the shared prefix), scored as prompt + blocks + candidate;
the kept block is emitted, and the next round starts, until a block stops (EOS or a stop
string) or max_tokens is reached.

Closing a stream (client gone) aborts every engine request it runs; an engine error in
one candidate fails the choice, aborting the others.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from guidance.batch import GuidanceReport
from guidance.search.report import SearchReport
from guidance.search.scorers import Completion, Scorer, ScorerCatalog
from guidance.search.selection import select, selection_generator
from guidance.search.spec import BestOfN, Blockwise, SearchParams
from server.engine import ChoiceDelta, ChoiceOutput, Engine, SamplingOptions
from server.metrics import observe_search
from server.streams import merge


class Search:
    def __init__(self, engine: Engine, scorers: ScorerCatalog) -> None:
        self.engine, self.scorers = engine, scorers

    def generate(self, request_id: str, prompt_ids: list[int], prompt_text: str, options: SamplingOptions,
                 search: SearchParams) -> AsyncIterator[ChoiceDelta]:
        """Deltas of the `options.n` searched choices of one prompt."""
        if isinstance(search, BestOfN):
            return self._best_of_n(request_id, prompt_ids, prompt_text, options, search)
        return merge([self._blockwise_choice(f"{request_id}-{j}", j, prompt_ids, prompt_text, options, search)
                      for j in range(options.n)])

    async def _best_of_n(self, request_id: str, prompt_ids: list[int], prompt_text: str, options: SamplingOptions,
                         search: BestOfN) -> AsyncIterator[ChoiceDelta]:
        size = search.n
        candidates = [[ChoiceOutput() for _ in range(size)] for _ in range(options.n)]
        unfinished = [size] * options.n
        async for delta in self.engine.generate(request_id, prompt_ids, replace(options, n=options.n * size)):
            pick, index = divmod(delta.index, size)
            candidates[pick][index].add(delta)
            if delta.finish_reason is None:
                continue
            unfinished[pick] -= 1
            if unfinished[pick] == 0:
                group = candidates[pick]
                scores, kept = await self._keep(search, prompt_text, prompt_ids,
                                                [Completion(c.text, tuple(c.token_ids)) for c in group],
                                                selection_generator(options.seed, pick))
                chosen = group[kept]
                yield _kept_delta(pick, chosen, options, chosen.finish_reason, chosen.guidance,
                                  SearchReport(score=scores[kept], candidate_scores=tuple(scores), selected=kept))

    async def _blockwise_choice(self, request_id: str, pick: int, prompt_ids: list[int], prompt_text: str,
                                options: SamplingOptions, search: Blockwise) -> AsyncIterator[ChoiceDelta]:
        size, rounds = search.candidates, math.ceil(options.max_tokens / search.block_tokens)
        kept_ids: list[int] = []
        kept_text = ""
        kl, steps = 0.0, 0
        round_scores: list[tuple[float, ...]] = []
        kept_indexes: list[int] = []
        for round_ in range(rounds):
            block_options = replace(
                options, n=size, max_tokens=min(search.block_tokens, options.max_tokens - len(kept_ids)),
                seed=None if options.seed is None else options.seed + (pick * rounds + round_) * size,
            )
            block = [ChoiceOutput() for _ in range(size)]
            async for delta in self.engine.generate(f"{request_id}-b{round_}", prompt_ids + kept_ids, block_options):
                block[delta.index].add(delta)
            scores, kept = await self._keep(
                search, prompt_text, prompt_ids,
                [Completion(kept_text + c.text, (*kept_ids, *c.token_ids)) for c in block],
                selection_generator(options.seed, pick, round_))
            chosen = block[kept]
            kept_ids += chosen.token_ids
            kept_text += chosen.text
            round_scores.append(tuple(scores))
            kept_indexes.append(kept)
            if chosen.guidance is not None:
                kl, steps = kl + chosen.guidance.kl, steps + chosen.guidance.steps
            stopped = chosen.finish_reason == "stop"
            done = stopped or len(kept_ids) >= options.max_tokens or round_ == rounds - 1
            yield _kept_delta(
                pick, chosen, options, ("stop" if stopped else "length") if done else None,
                GuidanceReport(kl=kl, steps=steps) if done and options.guidance else None,
                SearchReport(score=scores[kept], candidate_scores=tuple(round_scores),
                             selected=tuple(kept_indexes)) if done else None,
                first=round_ == 0,  # later blocks' prompts hold the kept tokens too
            )
            if done:
                return

    async def _keep(self, search: SearchParams, prompt_text: str, prompt_ids: list[int],
                    completions: list[Completion], generator: torch.Generator) -> tuple[list[float], int]:
        """Score candidates off the event loop (a model scorer runs a forward) and pick one:
        (scores, index kept)."""
        scorer: Scorer = self.scorers[search.scorer]
        began = time.perf_counter()
        scores = await asyncio.to_thread(scorer.score, prompt_text, prompt_ids, completions)
        observe_search(search.type, scorer.name, scores, time.perf_counter() - began)
        return scores, select(torch.tensor(scores), search.temperature, generator)


def _kept_delta(pick: int, chosen: ChoiceOutput, options: SamplingOptions, finish_reason: str | None,
                guidance: GuidanceReport | None, search: SearchReport | None, first: bool = True) -> ChoiceDelta:
    """The kept candidate (or block) as choice `pick`'s delta; the `first` one carries the prompt's
    logprobs when they were asked for (every candidate computed the same ones)."""
    return ChoiceDelta(index=pick, text=chosen.text, token_ids=tuple(chosen.token_ids),
                       logprobs=tuple(chosen.logprobs) if options.logprobs is not None else None,
                       finish_reason=finish_reason, guidance=guidance, search=search,
                       prompt_logprobs=chosen.prompt_logprobs if first else None)
