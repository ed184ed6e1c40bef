"""Request-level search over the engine: best-of-N and blockwise controlled decoding (step-level
search: server.step_search).

Both turn one prompt's `n` choices into `ChoiceDelta`s, as `Engine.generate` does, so the
endpoints stream and collect them alike. Each choice is an independent pick.

best_of_n: the N candidates of all n picks are submitted together (one engine request
each, candidate c of pick j seeded `seed + j * N + c`: best-of-1 is the plain request);
as soon as a pick's N candidates have finished they are scored in one call and the kept
one is emitted whole. With `prune`, once every live candidate of a pick has generated
`every * k` tokens (checkpoint k), their first `every * k` tokens are scored by the prune
scorer and the lowest-scored `floor(live * fraction)` are aborted (ties: the later
candidate), keeping at least `min_keep`; scoring at an exact length keeps a seeded
request reproducible. Checkpoints stop once none could prune. The engine aborts a pruned
candidate at once (its KV blocks and guide-model slot are freed); its tokens so far count
in `generated_tokens`. The kept candidate is chosen among the unpruned ones. With `aggregate`, each
candidate is cut into steps at the scorer's step delimiter, its steps are scored (`Scorer.score_steps`)
and their aggregate (`guidance.search.aggregate`) is its score.

blockwise: per block, K continuations of at most M tokens of prompt + blocks kept so far
(vLLM's prefix cache serves the shared prefix), scored as prompt + blocks + candidate;
the kept block is emitted, and the next round starts, until a block stops (EOS or a stop
string) or max_tokens is reached.

A KL budget (`guidance.kl_budget`) applies per candidate sequence: each best-of-N candidate has the
whole budget; a blockwise candidate block may spend what the blocks kept before it left of `max_kl`,
so the kept sequence stays within it.

Closing a stream (client gone) aborts every engine request it runs; an engine error in
one candidate fails the choice, aborting the others.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from guidance.batch import GuidanceReport
from guidance.kl_budget import spend
from guidance.search.aggregate import aggregate
from guidance.search.report import Checkpoint, SearchReport
from guidance.search.remote import RemoteScorerError, ScorerBadResponse, ScorerTimedOut, ScorerUnreachable
from guidance.search.scorers import (Completion, Conversation, ModelScorer, Scorer, ScorerCatalog,
                                     ScorerInputTooLong, step_prefixes)
from guidance.search.selection import lowest_scored, prune_count, select, selection_generator
from guidance.search.spec import BestOfN, Blockwise, Prune, SearchParams, StepSearchParams
from guidance.search.step_split import split_completion
from guidance.search.steps import weighted_majority
from guidance.verifiers import answer_extractor
from server.engine import ChoiceDelta, ChoiceOutput, Engine, SamplingOptions
from server.errors import APIError, BadGateway, ContextLengthExceeded, ScorerTimeout, ScorerUnavailable
from server.metrics import PRUNED_CANDIDATES, SCORER_CALLS, observe_search
from server.step_search import StepSearch
from server.streams import merge
from server.tracking import Stage, stage


@dataclass
class _Candidates:
    """One best-of-N pick's candidates as they stream in, and its pruning so far."""

    outputs: list[ChoiceOutput]
    pruned: set[int] = field(default_factory=set)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    next_checkpoint: int = 1  # 0: no checkpoint could prune any more
    finished: int = 0

    def live(self) -> list[int]:
        return [c for c, o in enumerate(self.outputs) if o.finish_reason is None and c not in self.pruned]

    def generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class Search:
    def __init__(self, engine: Engine, scorers: ScorerCatalog, decode: Callable[[list[int]], str],
                 scorer_timeout_s: float = 60.0) -> None:
        """`decode`: token ids -> text (the partial completions a pruning scorer reads); a scoring call
        that takes over `scorer_timeout_s` fails its request with ScorerTimeout."""
        self.engine, self.scorers, self.decode = engine, scorers, decode
        self.scorer_timeout_s = scorer_timeout_s
        # Scorers run here, off the event loop. A scorer that never returns keeps its thread (threads
        # cannot be stopped), so they have threads of their own rather than the loop's default pool.
        self._scoring = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="scorer")

    def generate(self, request_id: str, prompt_ids: list[int], prompt_text: str, options: SamplingOptions,
                 search: SearchParams, conversation: Conversation | None = None) -> AsyncIterator[ChoiceDelta]:
        """Deltas of the `options.n` searched choices of one prompt (`conversation`: a chat request's
        messages, for scorers that read them)."""
        prompt = _Prompt(prompt_ids, prompt_text, conversation)
        if isinstance(search, BestOfN):
            return self._best_of_n(request_id, prompt, options, search)
        if isinstance(search, Blockwise):
            return merge([self._blockwise_choice(f"{request_id}-{j}", j, prompt, options, search)
                          for j in range(options.n)])
        steps = StepSearch(self.engine, self.decode, functools.partial(self._score_steps, search, prompt))
        return merge([steps.choice(f"{request_id}-{j}", j, prompt_ids, options, search) for j in range(options.n)])

    async def _best_of_n(self, request_id: str, prompt: _Prompt, options: SamplingOptions,
                         search: BestOfN) -> AsyncIterator[ChoiceDelta]:
        size, prompt_ids = search.n, prompt.ids
        picks = [_Candidates([ChoiceOutput() for _ in range(size)]) for _ in range(options.n)]
        async for delta in self.engine.generate(request_id, prompt_ids, replace(options, n=options.n * size)):
            pick, index = divmod(delta.index, size)
            group = picks[pick]
            group.outputs[index].add(delta)
            if search.prune is not None and group.next_checkpoint:
                await self._prune(request_id, pick, group, search, prompt)
            if delta.finish_reason is None:
                continue
            group.finished += 1
            if group.finished < size:
                continue
            unpruned = [c for c in range(size) if c not in group.pruned]
            scores, kept = await self._keep(search, prompt,
                                            [Completion(group.outputs[c].text, tuple(group.outputs[c].token_ids))
                                             for c in unpruned], selection_generator(options.seed, pick))
            by_candidate: list[float | None] = [None] * size
            for c, score in zip(unpruned, scores):
                by_candidate[c] = score
            chosen = group.outputs[unpruned[kept]]
            yield _kept_delta(pick, chosen, options, chosen.finish_reason, chosen.guidance,
                              SearchReport(score=scores[kept], candidate_scores=tuple(by_candidate),
                                           selected=unpruned[kept], generated_tokens=group.generated_tokens(),
                                           checkpoints=None if search.prune is None else tuple(group.checkpoints)))

    async def _prune(self, request_id: str, pick: int, group: _Candidates, search: BestOfN, prompt: _Prompt
                     ) -> None:
        """Run every checkpoint of `group` that its live candidates have reached (module docstring)."""
        prune: Prune = search.prune
        while group.next_checkpoint:
            live, length = group.live(), group.next_checkpoint * prune.every
            if any(len(group.outputs[c].token_ids) < length for c in live):
                return  # not reached yet
            count = prune_count(len(live), prune.fraction, search.n - len(group.pruned), prune.min_keep)
            if count <= 0:
                group.next_checkpoint = 0  # live candidates only get fewer: no later checkpoint prunes
                return
            group.next_checkpoint += 1
            partial = [group.outputs[c].token_ids[:length] for c in live]
            scores = await self._score(prune.scorer, "prune", prompt,
                                       [Completion(self.decode(ids), tuple(ids)) for ids in partial], search.reference)
            pruned = tuple(sorted(lowest_scored(live, scores, count)))
            group.pruned.update(pruned)
            group.checkpoints.append(Checkpoint(tokens=length, scored=tuple(live), scores=tuple(scores),
                                                pruned=pruned))
            PRUNED_CANDIDATES.inc(len(pruned))
            await asyncio.gather(*(self.engine.abort(request_id, pick * search.n + c) for c in pruned))

    async def _blockwise_choice(self, request_id: str, pick: int, prompt: _Prompt, options: SamplingOptions,
                                search: Blockwise) -> AsyncIterator[ChoiceDelta]:
        prompt_ids = prompt.ids
        size, rounds = search.candidates, math.ceil(options.max_tokens / search.block_tokens)
        kept_ids: list[int] = []
        kept_text = ""
        report, generated = None, 0
        round_scores: list[tuple[float, ...]] = []
        kept_indexes: list[int] = []
        for round_ in range(rounds):
            block_options = replace(
                options, n=size, max_tokens=min(search.block_tokens, options.max_tokens - len(kept_ids)),
                seed=None if options.seed is None else options.seed + (pick * rounds + round_) * size,
                guidance=spend(options.guidance, 0.0 if report is None else report.kl),
            )
            block = [ChoiceOutput() for _ in range(size)]
            async for delta in self.engine.generate(f"{request_id}-b{round_}", prompt_ids + kept_ids, block_options):
                block[delta.index].add(delta)
            generated += sum(len(c.token_ids) for c in block)
            scores, kept = await self._keep(
                search, prompt,
                [Completion(kept_text + c.text, (*kept_ids, *c.token_ids)) for c in block],
                selection_generator(options.seed, pick, round_))
            chosen = block[kept]
            kept_ids += chosen.token_ids
            kept_text += chosen.text
            round_scores.append(tuple(scores))
            kept_indexes.append(kept)
            if chosen.guidance is not None:
                # The first block's report holds the request's own budget (later blocks': what was left).
                report = chosen.guidance if report is None else report.then(chosen.guidance)
            stopped = chosen.finish_reason == "stop"
            done = stopped or len(kept_ids) >= options.max_tokens or round_ == rounds - 1
            yield _kept_delta(
                pick, chosen, options, ("stop" if stopped else "length") if done else None,
                (report or GuidanceReport(kl=0.0, steps=0)) if done and options.guidance else None,
                SearchReport(score=scores[kept], candidate_scores=tuple(round_scores),
                             selected=tuple(kept_indexes), generated_tokens=generated) if done else None,
                first=round_ == 0,  # later blocks' prompts hold the kept tokens too
            )
            if done:
                return

    async def _keep(self, search: SearchParams, prompt: _Prompt, completions: list[Completion],
                    generator: torch.Generator) -> tuple[list[float], int]:
        """Score candidates and pick one: (scores, index kept); with `answers`, the weighted majority."""
        scores = await self._score(search.scorer, search.type, prompt, completions, search.reference,
                                   getattr(search, "aggregate", None))
        if getattr(search, "answers", None) is not None:
            read = answer_extractor(search.answers)
            winner = weighted_majority([read(c.text) for c in completions], scores)
            if winner is not None:
                return scores, winner
        return scores, select(torch.tensor(scores), search.temperature, generator)

    async def _score(self, name: str, search_type: str, prompt: _Prompt, completions: list[Completion],
                     reference: Any, aggregate_by: str | None = None) -> list[float]:
        """Scores by scorer `name` (a verifier compares with `reference`; with `aggregate_by`, the aggregate
        of each completion's step scores)."""
        scorer: Scorer = self.scorers[name]
        extra = _conversation(scorer, prompt)
        if aggregate_by is None:
            work = functools.partial(scorer.score, prompt.text, prompt.ids, completions, reference, **extra)
        else:
            work = functools.partial(_score_by_steps, scorer, aggregate_by, self.decode, prompt, completions,
                                     reference, extra)
        return await self._call(scorer, search_type, work)

    async def _score_steps(self, search: StepSearchParams, prompt: _Prompt, solutions: list[tuple[Completion, ...]],
                           known: list[list[float]]) -> list[list[float]]:
        """Each solution's step scores. A prefix scorer scores only each solution's newest step (the
        prefix that ends with it; `known` holds the earlier steps' scores); a process reward model
        scores every step of each solution in one pass."""
        scorer: Scorer = self.scorers[search.scorer]
        if isinstance(scorer, ModelScorer):
            newest = [step_prefixes(steps)[-1] for steps in solutions]
            scores = await self._call(scorer, search.type, functools.partial(
                scorer.score, prompt.text, prompt.ids, newest, search.reference))
            return [[*before, score] for before, score in zip(known, scores)]
        return await self._call(scorer, search.type, functools.partial(
            scorer.score_steps, prompt.text, prompt.ids, solutions, search.reference, **_conversation(scorer, prompt)),
            newest_scores=lambda rows: [row[-1] for row in rows])

    async def _call(self, scorer: Scorer, search_type: str, call: Callable[[], Any],
                    newest_scores: Callable[[Any], list[float]] = list) -> Any:
        """Run a scoring `call` off the event loop (a model scorer runs a forward, a remote one waits
        on HTTP), observed under `search_type` ("prune" for pruning checkpoints) with the scores
        `newest_scores` reads of its result. A scorer that fails fails the request with a 502/503
        naming it."""
        began = time.perf_counter()
        running = asyncio.get_running_loop().run_in_executor(self._scoring, call)
        try:
            with stage(Stage.SCORING):
                result = await asyncio.wait_for(running, self.scorer_timeout_s)
        except ScorerInputTooLong as exc:
            raise ContextLengthExceeded(str(exc), param="max_tokens") from exc
        except (TimeoutError, RemoteScorerError) as exc:
            error = _scorer_error(scorer.name, exc, self.scorer_timeout_s)
            SCORER_CALLS.labels(scorer.name, _OUTCOMES[type(error)]).inc()
            raise error from exc
        observe_search(search_type, scorer.name, newest_scores(result), time.perf_counter() - began)
        return result


def _score_by_steps(scorer: Scorer, how: str, decode: Callable[[list[int]], str], prompt: _Prompt,
                    completions: list[Completion], reference: Any, extra: dict[str, Any]) -> list[float]:
    """Each completion cut into steps at the scorer's delimiter, its steps scored, their `how` aggregate."""
    steps = [split_completion(c, scorer.step_delimiter, decode) for c in completions]
    return [aggregate(scores, how) for scores in scorer.score_steps(prompt.text, prompt.ids, steps, reference, **extra)]


_OUTCOMES: dict[type[APIError], str] = {ScorerTimeout: "timeout", ScorerUnavailable: "unavailable",
                                        BadGateway: "bad_response"}


def _scorer_error(name: str, exc: Exception, timeout_s: float) -> APIError:
    """The API error of a scoring call that failed: ours timed out, or a remote scorer's failed."""
    if isinstance(exc, ScorerTimedOut):
        return ScorerTimeout(f"{exc}; retry the request.")
    if isinstance(exc, ScorerUnreachable):
        return ScorerUnavailable(f"{exc}; retry the request.")
    if isinstance(exc, ScorerBadResponse):
        return BadGateway(str(exc))
    return ScorerTimeout(f"The scorer {name!r} did not answer within {timeout_s:g} s (--scorer-timeout-s); "
                         "retry the request.")


def _conversation(scorer: Scorer, prompt: _Prompt) -> dict[str, Any]:
    """The keyword that hands a chat request's messages to a scorer that reads them."""
    return {"conversation": prompt.conversation} if scorer.reads_conversation else {}


@dataclass(frozen=True)
class _Prompt:
    """What scorers read of a prompt: its token ids, its rendered text, and a chat request's messages."""

    ids: list[int]
    text: str
    conversation: Conversation | None


def _kept_delta(pick: int, chosen: ChoiceOutput, options: SamplingOptions, finish_reason: str | None,
                guidance: GuidanceReport | None, search: SearchReport | None, first: bool = True) -> ChoiceDelta:
    """The kept candidate (or block) as choice `pick`'s delta; the `first` one carries the prompt's
    logprobs when they were asked for (every candidate computed the same ones)."""
    return ChoiceDelta(index=pick, text=chosen.text, token_ids=tuple(chosen.token_ids),
                       logprobs=tuple(chosen.logprobs) if options.logprobs is not None else None,
                       finish_reason=finish_reason, guidance=guidance, search=search,
                       prompt_logprobs=chosen.prompt_logprobs if first else None)
