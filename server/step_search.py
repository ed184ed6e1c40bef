"""Step-level search over the engine: beam search, DVTS and particle filtering (guidance.search.spec).

A choice grows partial solutions one step at a time. Each round, every growing solution is expanded by
one engine request (`n` = its expansions) for one step of prompt + solution (vLLM's prefix cache serves
the shared prefix); the step delimiter is a stop string, and the runner also finds it in the decoded
tokens (split across tokens or not), ends the step at the token that completes it and aborts an
expansion the engine did not stop. All expansions of a round, of every choice and request, run at once
in the engine's batch; then one scorer call scores them, and each search keeps its survivors:

- beam: one group of width W = beam_width; its candidates are the expansions of its growing solutions;
  it keeps the best W - (finished so far) of them; a kept finished one waits in the group;
- dvts: n / beam_width groups of width 1 over beam_width expansions each, never sharing a solution;
- particle_filter: one group of `particles`; after each round all particles (finished ones with their
  last score) are resampled with replacement by softmax(logit(score) / resample_temperature).

A solution finishes when a step ends without the delimiter (end of sequence, a request stop string), at
the request's max_tokens, or at max_steps. The search ends when no solution grows; the answer is the best
finished solution (selection temperature 0), a softmax draw, or the weighted majority over `answers`.

Streaming: after every round the steps that every surviving solution shares are decided (no later round
can change them) and are sent at once; the rest of the answer follows when the search ends. A token-level
KL budget applies along each solution: an expansion may spend what its solution's steps left.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from guidance.batch import GuidanceReport
from guidance.kl_budget import spend
from guidance.search.aggregate import aggregate
from guidance.search.report import StepRound, StepSearchReport
from guidance.search.scorers import Completion
from guidance.search.selection import select, selection_generator
from guidance.search.spec import DVTS, Beam, ParticleFilter, StepSearchParams
from guidance.search.steps import (finite, particle_weights, resample, shared_steps, step_end, top_k,
                                   weighted_majority)
from guidance.verifiers import answer_extractor
from server.engine import ChoiceDelta, ChoiceOutput, Engine, PromptLogprobs, SamplingOptions, TokenLogprob
from server.streams import merge, tagged

# (solutions as their steps, the scores known of each one's earlier steps) -> each one's step scores
StepScorer = Callable[[list[tuple[Completion, ...]], list[list[float]]], Awaitable[list[list[float]]]]


@dataclass(frozen=True)
class Solution:
    """A partial or finished solution: its steps (and their tokens' logprobs), each step's score, its
    lineage (an id per step, root first: what solutions share), why it finished (None while it grows)
    and its guidance report."""

    steps: tuple[Completion, ...] = ()
    logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    scores: tuple[float, ...] = ()
    lineage: tuple[int, ...] = ()
    finish_reason: str | None = None
    report: GuidanceReport | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t for step in self.steps for t in step.token_ids]

    @property
    def text(self) -> str:
        return "".join(step.text for step in self.steps)


@dataclass
class _Group:
    """Solutions that compete for `width` places (a beam, a DVTS subtree, a particle population)."""

    width: int
    growing: list[Solution] = field(default_factory=lambda: [Solution()])
    finished: list[Solution] = field(default_factory=list)


@dataclass
class _Wave:
    """One round's expansions: the new solutions (those of growing solution i at i * expansions ...),
    the tokens generated, and the prompt's logprobs when they were asked for."""

    candidates: list[Solution]
    generated: int
    prompt_logprobs: PromptLogprobs | None


class StepSearch:
    def __init__(self, engine: Engine, decode: Callable[[Sequence[int]], str], score_steps: StepScorer) -> None:
        """`score_steps(solutions, known)`: each solution's step scores by the search's scorer; `known`
        holds the scores of each solution's earlier steps, which a prefix scorer need not compute again."""
        self.engine, self.decode, self.score_steps = engine, decode, score_steps
        self._ids = itertools.count()

    async def choice(self, request_id: str, pick: int, prompt_ids: list[int], options: SamplingOptions,
                     search: StepSearchParams) -> AsyncIterator[ChoiceDelta]:
        """The deltas of choice `pick`: its decided steps as they are decided, then the rest of its answer."""
        groups, expansions = _start(search)
        rounds: list[StepRound] = []
        generated, sent, prompt_logprobs = 0, 0, None
        for round_ in range(search.max_steps):
            growing = [(g, s) for g in groups for s in g.growing]
            if not growing:
                break
            wave = await self._expand(f"{request_id}-s{round_}", pick, round_, prompt_ids,
                                      [s for _, s in growing], expansions, options, search)
            generated += wave.generated
            prompt_logprobs = prompt_logprobs or wave.prompt_logprobs
            parents = [growing[k // expansions] for k in range(len(wave.candidates))]
            step_scores = await self.score_steps([c.steps for c in wave.candidates],
                                                 [list(parent.scores) for _, parent in parents])
            last = round_ == search.max_steps - 1
            candidates = [replace(c, scores=tuple(s), finish_reason=c.finish_reason or ("length" if last else None))
                          for c, s in zip(wave.candidates, step_scores)]
            rounds.append(_keep(groups, candidates, [g for g, _ in parents], search,
                                selection_generator(options.seed, pick, round_)))
            survivors = [s for g in groups for s in (*g.growing, *g.finished)]
            decided = shared_steps([s.lineage for s in survivors])
            if decided > sent and any(g.growing for g in groups):
                yield _delta(pick, survivors[0], sent, decided, options, prompt_logprobs if sent == 0 else None)
                sent = decided
        finished = [s for g in groups for s in g.finished]
        scores = [aggregate(s.scores, search.aggregate) for s in finished]
        chosen, answer = _pick(finished, scores, search, selection_generator(options.seed, pick, search.max_steps))
        solution = finished[chosen]
        report = StepSearchReport(score=scores[chosen], rounds=tuple(rounds), finished_scores=tuple(scores),
                                  selected=chosen, generated_tokens=generated,
                                  kept_tokens=len(solution.token_ids), answer=answer)
        guidance = (solution.report or GuidanceReport(kl=0.0, steps=0)) if options.guidance else None
        yield replace(_delta(pick, solution, sent, len(solution.steps), options,
                             prompt_logprobs if sent == 0 else None),
                      finish_reason=solution.finish_reason, guidance=guidance, search=report)

    async def _expand(self, round_id: str, pick: int, round_: int, prompt_ids: list[int],
                      growing: list[Solution], expansions: int, options: SamplingOptions,
                      search: StepSearchParams) -> _Wave:
        """One step of every growing solution, `expansions` samples each, in one wave of engine requests."""
        outputs = [[ChoiceOutput() for _ in range(expansions)] for _ in growing]
        ends: list[list[int | None]] = [[None] * expansions for _ in growing]
        streams = []
        for i, parent in enumerate(growing):
            step_options = replace(
                options, n=expansions,
                max_tokens=min(search.step_tokens or search.max_step_tokens,
                               options.max_tokens - len(parent.token_ids)),
                stop=options.stop if search.step_tokens else (*options.stop, search.step_delimiter),
                # A stride of the most candidates a round can have keeps every expansion's seed distinct.
                seed=None if options.seed is None else
                options.seed + ((pick * search.max_steps + round_) * search.candidates_per_pick + i * expansions),
                guidance=spend(options.guidance, 0.0 if parent.report is None else parent.report.kl))
            streams.append(tagged(i, self.engine.generate(f"{round_id}-{i}", prompt_ids + parent.token_ids,
                                                          step_options)))
        async for i, delta in merge(streams):
            output = outputs[i][delta.index]
            output.add(delta)
            if search.step_tokens or ends[i][delta.index] is not None:
                continue
            end = step_end(self.decode, output.token_ids, search.step_delimiter)
            if end is not None:
                ends[i][delta.index] = end
                if output.finish_reason is None:  # the engine did not stop at the delimiter: stop it here
                    await self.engine.abort(f"{round_id}-{i}", delta.index)
        candidates = [self._grown(parent, output, end, options.max_tokens)
                      for parent, row, row_ends in zip(growing, outputs, ends) for output, end in zip(row, row_ends)]
        return _Wave(candidates, sum(len(o.token_ids) for row in outputs for o in row),
                     outputs[0][0].prompt_logprobs)

    def _grown(self, parent: Solution, output: ChoiceOutput, end: int | None, max_tokens: int) -> Solution:
        """`parent` with the step `output` generated: a delimited step ends at `end`; a step that stopped
        otherwise (end of sequence, a stop string), or that reaches max_tokens, finishes the solution."""
        ids = output.token_ids if end is None else output.token_ids[:end]
        before = parent.token_ids
        if end is None and output.finish_reason == "stop":
            text, finish = output.text, "stop"  # the engine's text: a request's stop string is not shown
        else:
            text = _appended_text(self.decode, before, ids)
            finish = "length" if len(before) + len(ids) >= max_tokens else None
        report = parent.report if output.guidance is None else \
            output.guidance if parent.report is None else parent.report.then(output.guidance)
        return Solution(steps=(*parent.steps, Completion(text, tuple(ids))),
                        logprobs=(*parent.logprobs, tuple(output.logprobs[:len(ids)])), scores=parent.scores,
                        lineage=(*parent.lineage, next(self._ids)), finish_reason=finish, report=report)


def _start(search: StepSearchParams) -> tuple[list[_Group], int]:
    """The search's groups, each holding the empty solution, and the expansions per growing solution."""
    if isinstance(search, Beam):
        return [_Group(search.beam_width)], search.expansions
    if isinstance(search, DVTS):
        return [_Group(1) for _ in range(search.n // search.beam_width)], search.beam_width
    return [_Group(search.particles, [Solution()] * search.particles)], 1


def _keep(groups: list[_Group], candidates: list[Solution], owners: list[_Group], search: StepSearchParams,
          generator: torch.Generator) -> StepRound:
    """Each group keeps its survivors of this round (module docstring); the round's report."""
    scores = finite([aggregate(c.scores, search.aggregate) for c in candidates])
    if isinstance(search, ParticleFilter):
        [group] = groups
        population = candidates + group.finished
        weights = scores + [aggregate(f.scores, search.aggregate) for f in group.finished]
        drawn = resample(particle_weights(finite(weights), search.resample_temperature, search.weighting),
                         group.width, generator)
        group.growing = [population[k] for k in drawn if not population[k].finish_reason]
        group.finished = [population[k] for k in drawn if population[k].finish_reason]
        return StepRound(scores=tuple(scores), kept=tuple(drawn))
    kept: list[int] = []
    for group in groups:
        mine = [k for k, owner in enumerate(owners) if owner is group]
        if not mine:
            continue
        best = [mine[r] for r in top_k([scores[k] for k in mine], group.width - len(group.finished))]
        kept += best
        group.finished += [candidates[k] for k in best if candidates[k].finish_reason]
        group.growing = [candidates[k] for k in best if not candidates[k].finish_reason]
    return StepRound(scores=tuple(scores), kept=tuple(sorted(kept)))


def _pick(finished: list[Solution], scores: list[float], search: StepSearchParams,
          generator: torch.Generator) -> tuple[int, str | None]:
    """The answering solution's index, and with `answers` the answer that won the weighted majority."""
    if search.answers is not None:
        read = answer_extractor(search.answers)
        answers = [read(s.text) for s in finished]
        winner = weighted_majority(answers, scores)
        if winner is not None:
            return winner, str(answers[winner])
    return select(torch.tensor(finite(scores)), search.temperature, generator), None


def _appended_text(decode: Callable[[Sequence[int]], str], before: list[int], ids: Sequence[int]) -> str:
    """The text `ids` add after `before` (decoded in context: a tokenizer may render a token's leading
    space only after another token)."""
    head, whole = decode(before), decode([*before, *ids])
    return whole[len(head):] if whole.startswith(head) else decode(ids)


def _delta(pick: int, solution: Solution, start: int, stop: int, options: SamplingOptions,
           prompt_logprobs: PromptLogprobs | None) -> ChoiceDelta:
    """Steps start..stop of `solution` as one delta of choice `pick`."""
    steps = solution.steps[start:stop]
    return ChoiceDelta(index=pick, text="".join(s.text for s in steps),
                       token_ids=tuple(t for s in steps for t in s.token_ids),
                       logprobs=tuple(lp for row in solution.logprobs[start:stop] for lp in row)
                       if options.logprobs is not None else None,
                       finish_reason=None, prompt_logprobs=prompt_logprobs)
