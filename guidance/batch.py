"""Guidance over a batch of rows: engine-independent state and the per-step `apply`.

An engine adapter tells the batch which request sits in which row (`add`,
`remove`, `move`, in that order per update) and calls `apply(logits)` once per
decoding step. Per step each guide model costs one batched forward over all its
rows: `step` feeds every row the token it generated last (a `prefill` of the
prompt when a request joins), then its head scores the candidates.

Per-request KL is written per output position into a preallocated buffer, so a
step that does not sample (a chunk of a long prompt) is overwritten by the step
that does, and the total is summed only when it is collected. It is the KL between
the distributions the engine samples from: offsets are added before temperature, so
at a request's temperature T the guided policy is softmax((l + d) / T) and the base
softmax(l / T) (see `guidance.divergence.kl_guided_to_base`; greedy requests, T = 0,
are reported at T = 1). Each request keeps its temperature from when it joins; the layout
holds them as a tensor, or as None when every row samples at 1 (no division by T then).

Entropy gating: an entry with `min_entropy` > 0 steers a row only at positions where the
base distribution at the row's temperature has entropy H = -sum_y p(y) log p(y) >= min_entropy;
elsewhere it adds no offset and its head scores nothing (the guide model still reads every
token). The KL stays exact (0 at an unsteered position), and a report's `steps` counts the
positions some entry steered, recorded per output position like the KL.

KL budgets (`guidance.kl_budget`): a request whose entries give `max_kl` or `kl_per_token` is steered
at each step with its strengths times the largest scale t in [0, 1] whose KL, computed by the same
code as the recorded one, fits the step's allowance. The guide models score once per step; the
bisection recomputes only offsets (from the scores) and KLs, for every guided row of the step (rows
without a budget keep scale 1: exactly their unbudgeted offsets). The KL spent before each output
position is kept per position (`_spent_before`), like the KL, so a prompt chunk's step is overwritten
by the step that samples; the scale of each position is kept too, for the report's strengths.

Per step `apply` builds nothing that the step does not change. What depends only on which
request sits in which row (row and stat indices, temperatures, the (guide model, module) groups
with their strengths, top-k and slots, the entropy gates) is a `guidance.batch_layout.Layout`, built by the first
`apply` after an `add`, `remove` or `move`. The engine's new tokens, host lists, become one tensor
per guide model per step; each row's output position is kept on the device and moved by one per
step while every row is fed exactly its one new token (read from the output lists otherwise).

Offsets stay sparse where they can: a group that steers k candidates per row (V-type scoring, or
a Q-type entry with top_k below the vocabulary; k up to `batch_layout.MAX_SPARSE_CANDIDATES`) takes them from
one top-K of the base logits per step, K the largest such k. So each group's candidates are a
prefix of every row's top-K, and offsets of several entries on one token add up in one column
of a ``[G, K]`` grid: the grid is added to the logits at those K tokens, and the exact KL comes
from `guidance.divergence.split_at_candidates` (one pass over the vocabulary, shared with the
entropy gate). Rows that some group steers at every token (or at more candidates) get dense
offsets ``[Gd, V]``, their grid included, and the reference `kl_guided_to_base`.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from guidance.catalog import GuideCatalog
from guidance.divergence import (
    GREEDY_TEMPERATURE, CandidateSplit, candidate_mask, guided_logits_and_kl, split_at_candidates)
from guidance.kl_budget import KLBudget, allowance, largest_fitting_scale, request_budget
from guidance.kv_budget import GUIDE_KV_BLOCK_SIZE
from guidance.batch_layout import Feed, Group, Layout, build_layout
from guidance.spec import ResolvedGuidance
from models.runtime.guide import GuideModel

# Reports of requests that left the batch, kept until collected (oldest dropped first).
MAX_UNCOLLECTED_REPORTS = 4096
# Upper bounds (seconds) of the histogram of guidance time per engine step.
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class StepTimings:
    """Cumulative histogram of the wall time `apply` spends on guided steps (host clock: on
    CUDA it measures launch time unless the device is synchronised)."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_SECONDS_BUCKETS) + 1))
    count: int = 0
    total_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(STEP_SECONDS_BUCKETS, seconds)] += 1
        self.count += 1
        self.total_seconds += seconds


@dataclass(frozen=True)
class GuidanceReport:
    kl: float  # sum over generated tokens of KL(pi_guided || pi_base) at the sampling temperature
    steps: int  # generated tokens that were steered (every guided token, unless entries are entropy-gated)
    # With a KL budget: the scale of the strengths over the steered tokens, (mean, min, max); 0s without any.
    scale: tuple[float, float, float] | None = None
    # Set by the server, which holds the request's entries: its budget and each entry's strength (the cap).
    budget: KLBudget | None = None
    caps: tuple[float, ...] = ()

    def strengths(self) -> list[dict[str, float]]:
        """Each entry's strength over the steered tokens: its cap times the scale's mean, min and max."""
        mean, low, high = self.scale or (0.0, 0.0, 0.0)
        return [{"mean": cap * mean, "min": cap * low, "max": cap * high} for cap in self.caps]

    def then(self, later: GuidanceReport) -> GuidanceReport:
        """This report followed by `later`'s tokens (blockwise search's blocks): sums, the scale's mean
        weighted by steered tokens, its min and max over both; this report's budget and caps."""
        scale = self.scale
        if self.scale is not None and later.scale is not None and later.steps:
            steps = self.steps + later.steps
            scale = (later.scale if not self.steps else (
                (self.scale[0] * self.steps + later.scale[0] * later.steps) / steps,
                min(self.scale[1], later.scale[1]), max(self.scale[2], later.scale[2])))
        return replace(self, kl=self.kl + later.kl, steps=self.steps + later.steps, scale=scale)


@dataclass(frozen=True)
class _Totals:
    """A request's sums over the output positions so far (tensors on the batch's device, or numbers)."""

    kl: Tensor | float = 0.0
    steps: Tensor | int = 0
    # Budgeted requests: sum, min and max of the scale over the steered positions.
    scale_sum: Tensor | float = 0.0
    scale_min: Tensor | float = float("inf")
    scale_max: Tensor | float = float("-inf")

    def report(self, budgeted: bool) -> GuidanceReport:
        steps = int(self.steps)
        scale = None
        if budgeted:
            scale = (float(self.scale_sum) / steps, float(self.scale_min), float(self.scale_max)) if steps else (
                0.0, 0.0, 0.0)
        return GuidanceReport(kl=float(self.kl), steps=steps, scale=scale)


@dataclass
class _Request:
    key: str
    guidance: list[ResolvedGuidance]
    budget: KLBudget | None
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # live reference, grown by the engine
    stat: int  # row of the KL buffers
    temperature: float  # at which its KL is measured: the sampling temperature, 1 for greedy rows
    slots: dict[str, int]  # guide model name -> KV-cache slot
    first_output: int  # outputs generated before this (re)join, whose totals are carried
    carried: _Totals = field(default_factory=_Totals)
    fed: int = 0  # tokens already in the guide caches
    collected: bool = False

    def new_tokens(self) -> list[int]:
        """Prompt and output tokens the guide models have not seen yet."""
        n_prompt = len(self.prompt_ids)
        if self.fed >= n_prompt:
            return list(self.output_ids[self.fed - n_prompt:])
        return list(self.prompt_ids[self.fed:]) + list(self.output_ids)


class _Scored(NamedTuple):
    """A group's guide-model scores at one step, with the candidates they are at."""

    group: Group
    scores: Tensor  # [b, k(, m)], or [b, V(, m)] when candidates is None
    candidates: Tensor | None  # [b, k] token ids; None: every token
    valid: Tensor | None  # [b, k] False past an entry's own top_k (None: all valid)


class GuidanceBatch:
    def __init__(
        self,
        models: Mapping[str, GuideModel],
        catalog: GuideCatalog,
        *,
        max_requests: int,
        max_len: int,
        device: torch.device | str = "cpu",
        kv_blocks: Mapping[str, int] | None = None,
    ) -> None:
        """`kv_blocks`: KV-cache blocks per guide model (guidance.kv_budget); a model without an entry
        holds `max_requests` sequences of `max_len` tokens."""
        self._models = dict(models)
        self._catalog = catalog
        self._device = torch.device(device)
        for name, model in self._models.items():
            model.setup_cache(max_requests, max_len, num_blocks=(kv_blocks or {}).get(name),
                              block_size=GUIDE_KV_BLOCK_SIZE)
        # Final hidden state of the last token each slot has seen, per guide model: [slots, H], in the
        # model's dtype (its head reads it); scores are turned to float32 before any offset math.
        self._last_hidden = {
            name: torch.zeros(max_requests, m.backbone.config.hidden_size, device=self._device,
                              dtype=m.backbone.embed_tokens.weight.dtype)
            for name, m in self._models.items()
        }
        self._atoms = {
            name: torch.tensor(catalog[name].atoms, device=self._device) if catalog[name].atoms else None
            for name in self._models
        }
        self._kl_at = torch.zeros(max_requests, max_len, device=self._device)  # KL by output position
        self._steered_at = torch.zeros(max_requests, max_len, device=self._device)  # 1 where a position was steered
        # Budgeted requests: KL spent before each output position, and the strength scale at each.
        self._spent_before = torch.zeros(max_requests, max_len + 1, device=self._device)
        self._scale_at = torch.zeros(max_requests, max_len, device=self._device)
        self._free_stats = list(range(max_requests - 1, -1, -1))
        self._rows: dict[int, _Request] = {}
        self._layout: Layout | None = None  # None: the rows changed since it was built
        self._uncollected: OrderedDict[str, tuple[_Totals, bool]] = OrderedDict()  # key -> (totals, budgeted)
        self.timings = StepTimings()

    @property
    def num_guided(self) -> int:
        return len(self._rows)

    # Batch updates: apply removed, then added, then moved.

    def add(self, row: int, key: str, guidance: Sequence[ResolvedGuidance],
            prompt_ids: Sequence[int], output_ids: Sequence[int], temperature: float = 1.0) -> None:
        """A request joins row `row` (replacing whatever was there).

        `temperature` is the request's sampling temperature, at which its KL is measured
        (below `GREEDY_TEMPERATURE`, i.e. greedy decoding: at temperature 1)."""
        if row in self._rows:
            self.remove(row)
        active = [g for g in guidance if g.params.strength > 0]
        if not active:
            return  # strength 0 everywhere: exactly the unguided distribution, nothing to run
        carried, _ = self._uncollected.pop(key, (_Totals(), False))  # rejoining after preemption
        stat = self._free_stats.pop()
        budget = request_budget([g.params.model_dump() for g in guidance])
        if budget is not None:
            self._spent_before[stat, len(output_ids)] = carried.kl
        self._rows[row] = _Request(
            key=key,
            guidance=active,
            budget=budget,
            prompt_ids=prompt_ids,
            output_ids=output_ids,
            stat=stat,
            temperature=1.0 if temperature < GREEDY_TEMPERATURE else float(temperature),
            slots={name: self._models[name].cache.allocate() for name in {m for g in active for m in g.models}},
            first_output=len(output_ids),
            carried=carried,
        )
        self._layout = None

    def remove(self, row: int) -> None:
        request = self._rows.pop(row, None)
        if request is None:
            return
        self._layout = None
        for name, slot in request.slots.items():
            self._models[name].cache.free(slot)
        if not request.collected:
            self._uncollected[request.key] = (self._totals(request), request.budget is not None)
            while len(self._uncollected) > MAX_UNCOLLECTED_REPORTS:
                self._uncollected.popitem(last=False)
        self._free_stats.append(request.stat)

    def move(self, source: int, target: int, swap: bool) -> None:
        moving = self._rows.pop(source, None)
        if swap:
            if (other := self._rows.pop(target, None)) is not None:
                self._rows[source] = other
                self._layout = None
        else:
            self.remove(target)
        if moving is not None:
            self._rows[target] = moving
            self._layout = None

    # Per step.

    @torch.no_grad()
    def apply(self, logits: Tensor) -> Tensor:
        """Add every guided row's offsets to its logits ``[rows, V]`` (on the batch's device) in place;
        record its KL at the row's sampling temperature."""
        if not self._rows:
            return logits
        began = time.perf_counter()
        if self._layout is None or self._layout.vocab != logits.shape[-1]:
            self._layout = build_layout(self._rows, self._models, logits.shape[-1], self._device)
        layout = self._layout
        position = self._feed(layout)
        base = logits[layout.take].float()  # [G, V]; may be a view of `logits`: all reads come before the writes
        # Sorted, so every sparse group's candidates are a prefix of each row's top-K.
        top = torch.topk(base, layout.max_k) if layout.max_k or layout.gates else None
        split = split_at_candidates(base, top.indices, layout.split_temperature) if layout.split else None
        entropy = split.entropy() if layout.gates else None
        # A host read: which gated entries are open, so that closed ones score nothing.
        opened = (entropy[layout.gates.rows] >= layout.gates.bounds).tolist() if layout.gates else []
        scored = self._score_groups(layout, base, top, opened)
        scale = None
        if layout.budget is not None:
            spent = self._spent_before[layout.stat, position]
            allowed = allowance(layout.budget.max_kl, layout.budget.kl_per_token, spent)
            scale = largest_fitting_scale(lambda t: self._offsets_and_kl(layout, base, top, split, scored, t)[2],
                                          allowed)
        grid, dense, kl = self._offsets_and_kl(layout, base, top, split, scored, scale)
        self._kl_at[layout.stat, position] = kl
        if scale is not None:
            self._spent_before[layout.stat, position + 1] = spent + kl
            self._scale_at[layout.stat, position] = scale
        self._steered_at[layout.stat, position] = 1.0 if entropy is None else (  # ungated: every row is steered
            (layout.gates.row_bound == 0) | (entropy >= layout.gates.row_bound)).float()
        if layout.max_k:
            logits.index_put_((layout.row_index[:, None], top.indices), (top.values + grid).to(logits.dtype))
        if dense is not None:
            logits.index_copy_(0, layout.dense_take, dense.to(logits.dtype))
        self.timings.observe(time.perf_counter() - began)
        return logits

    def _score_groups(self, layout: Layout, base: Tensor, top: torch.return_types.topk | None,
                      opened: list[bool]) -> list[_Scored]:
        """Every group's scores at its candidates, but for the entries whose entropy gate is closed
        (`opened`: one flag per gated entry): sparse groups' at each row's first k of the `top` K
        tokens, dense groups' at their rows' own top-k, or at every token."""
        scored = []
        for group in layout.groups:
            if group.gate is not None:
                kept = [i for i, (is_open, bound) in enumerate(zip(opened[group.gate], group.bounds))
                        if is_open or bound == 0]
                if not kept:
                    continue
                group = group if len(kept) == len(group.rows) else group.subset(kept)
            if group.sparse:
                candidates, valid = top.indices[group.index, :group.max_k], group.valid
            elif group.whole:
                candidates, valid = None, None
            else:
                candidates, valid = candidate_mask(base[group.index], group.top_k, group.max_k)
            scored.append(_Scored(group, self._scores(group, candidates), candidates, valid))
        return scored

    def _offsets_and_kl(self, layout: Layout, base: Tensor, top: torch.return_types.topk | None,
                        split: CandidateSplit | None, scored: list[_Scored],
                        scale: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """The offsets of the `scored` groups at their strengths times each row's `scale` ``[G]`` (None: 1)
        and each row's KL ``[G]``: (the candidate grid ``[G, K]``, the dense rows' guided logits
        ``[Gd, V]`` in float32 or None, KL)."""
        grid, dense = self._group_offsets(layout, base, scored, scale)
        kl = split.kl(grid) if split is not None else base.new_zeros(len(layout.requests))  # [G]
        if dense is None:
            return grid, None, kl
        rows = layout.dense_rows
        if layout.max_k:  # a dense row's KL needs all of its offsets, the grid's too
            dense.scatter_add_(1, top.indices[rows], grid[rows])
        guided, dense_kl = guided_logits_and_kl(base if layout.all_dense else base[rows], dense,
                                                layout.dense_temperature)
        return grid, guided, kl.index_copy_(0, rows, dense_kl)

    def _group_offsets(self, layout: Layout, base: Tensor, scored: list[_Scored],
                       scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The `scored` groups' offsets at their strengths times each row's `scale`: sparse groups' on the
        candidate grid ``[G, K]``, dense groups' over the vocabulary ``[Gd, V]`` of the dense rows (None
        when no dense group steers: a dense row's offsets are then its grid's, and `split` has its KL)."""
        grid = base.new_zeros(len(layout.requests), layout.max_k)
        dense = None
        for group, scores, candidates, valid in scored:
            strength = group.strength if scale is None else group.strength * scale[group.index].unsqueeze(1)
            info = self._catalog[group.model]
            offsets = group.module.offsets(scores, strength, info.head_type, self._atoms[group.model])
            if valid is not None:
                offsets = offsets.masked_fill(~valid, 0.0)
            if group.sparse:
                grid[:, :group.max_k].index_add_(0, group.index, offsets)
                continue
            if candidates is not None:
                offsets = base.new_zeros(len(group.rows), base.shape[-1]).scatter_(1, candidates, offsets)
            if dense is None and group.fills_dense:
                dense = offsets  # the only dense group, every dense row once and in order: nothing to add
                continue
            if dense is None:
                dense = base.new_zeros(len(layout.dense_rows), layout.vocab)
            dense.index_add_(0, group.dense_index, offsets)
        return grid, dense

    def _feed(self, layout: Layout) -> Tensor:
        """Append every row's unseen tokens to its guide caches; each row's output position ``[G]``."""
        unseen = [q.new_tokens() for q in layout.requests]
        for name, feed in layout.feeds.items():
            self._feed_model(name, feed, [unseen[i] for i in feed.members])
        for q in layout.requests:
            q.fed = len(q.prompt_ids) + len(q.output_ids)
        # The position is len(output_ids) = fed - len(prompt_ids): one more when a row was fed one token.
        if layout.position is not None and all(len(tokens) == 1 for tokens in unseen):
            layout.position += 1
        else:  # a new layout, a prefill (join, rejoin), or a row with nothing new (a prompt chunk)
            layout.position = torch.tensor([len(q.output_ids) for q in layout.requests], device=self._device)
        return layout.position

    def _feed_model(self, name: str, feed: Feed, unseen: list[list[int]]) -> None:
        """Append the unseen tokens of one guide model's rows to its cache: one `step` when each
        row has one new token (the steady state), else one `prefill` (requests joining or resuming).

        Rows with nothing unseen (a long prompt whose prefill the engine spreads over several
        steps) are left out; their last hidden state is still current."""
        model = self._models[name]
        fresh = [i for i, tokens in enumerate(unseen) if tokens]
        if not fresh:
            return
        every = len(fresh) == len(unseen)
        slots = feed.slots if every else [feed.slots[i] for i in fresh]
        tokens = [unseen[i] for i in fresh]
        if all(len(t) == 1 for t in tokens):
            # The engine hands its new tokens over as host lists: one tensor of them per step is inherent.
            hidden = model.step(slots, torch.tensor([t[0] for t in tokens], device=self._device))
        else:
            hidden = model.prefill(slots, [torch.tensor(t, device=self._device) for t in tokens])
        self._last_hidden[name][feed.slot_index if every else model.cache.index(slots)] = hidden

    def _scores(self, group: Group, candidates: Tensor | None) -> Tensor:
        """The group's guide-model scores (float32) at its candidates ``[b, k(, m)]``, or at every token
        ``[b, V(, m)]`` (candidates None; Q-type only)."""
        model, info = self._models[group.model], self._catalog[group.model]
        if info.scoring == "v":
            scores = model.score_candidates(group.slots, candidates)  # [b, k(, m)]
        elif candidates is not None and not group.module.normalises_over_vocabulary:
            # Only the k candidates' rows of the head: k x H multiply-adds per row instead of V x H.
            scores = model.score_next_tokens(self._last_hidden[group.model][group.slot_index], candidates)
        else:
            hidden = self._last_hidden[group.model][group.slot_index]
            scores = group.module.token_scores(model.score_next(hidden).float())  # [b, V(, m)]
            if candidates is not None:
                index = candidates if scores.dim() == 2 else candidates.unsqueeze(-1).expand(-1, -1, scores.shape[-1])
                scores = scores.gather(1, index)
        # Token-reward heads serve their rewards scaled to unit spread of the sequence reward (models.runtime.heads),
        # to the modules that read them as rewards.
        if group.module.uses_reward_scale and model.head.reward_scale != 1.0:
            return scores.float() * model.head.reward_scale
        return scores.float()

    # Reports.

    def _totals(self, request: _Request) -> _Totals:
        span, carried = slice(request.first_output, len(request.output_ids)), request.carried
        kl = carried.kl + self._kl_at[request.stat, span].sum()
        steered = self._steered_at[request.stat, span]
        if request.budget is None:
            return _Totals(kl, carried.steps + steered.sum())
        scale, on = self._scale_at[request.stat, span], steered > 0
        # The carried min and max join the span's, so an empty span has them too.
        low = torch.cat([torch.where(on, scale, float("inf")), torch.as_tensor(carried.scale_min).reshape(1)])
        high = torch.cat([torch.where(on, scale, float("-inf")), torch.as_tensor(carried.scale_max).reshape(1)])
        return _Totals(kl, carried.steps + steered.sum(), carried.scale_sum + (scale * steered).sum(),
                       low.min(), high.max())

    def collect(self, keys: Sequence[str]) -> dict[str, GuidanceReport]:
        """Reports of the given requests (finished or still in the batch); each is returned once."""
        active = {q.key: q for q in self._rows.values()}
        reports = {}
        for key in keys:
            if key in self._uncollected:
                totals, budgeted = self._uncollected.pop(key)
            elif key in active and not active[key].collected:
                totals, budgeted = self._totals(active[key]), active[key].budget is not None
                active[key].collected = True
            else:
                continue
            reports[key] = totals.report(budgeted)
        return reports

