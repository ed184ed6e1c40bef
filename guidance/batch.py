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
are reported at T = 1). Each request's temperature is written once, when it joins,
into a per-request buffer that `apply` gathers by index with the KL rows.

Entropy gating: an entry with `min_entropy` > 0 steers a row only at positions where the
base distribution at the row's temperature has entropy H = -sum_y p(y) log p(y) >= min_entropy;
elsewhere it adds no offset and its head scores nothing (the guide model still reads every
token). The KL stays exact (0 at an unsteered position), and a report's `steps` counts the
positions some entry steered, recorded per output position like the KL.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from guidance.catalog import GuideCatalog
from guidance.kv_budget import GUIDE_KV_BLOCK_SIZE
from guidance.divergence import GREEDY_TEMPERATURE, candidate_mask, kl_guided_to_base
from guidance.module import WHOLE_VOCABULARY
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


@dataclass
class _Request:
    key: str
    guidance: list[ResolvedGuidance]
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # live reference, grown by the engine
    stat: int  # row of the KL and temperature buffers
    slots: dict[str, int]  # guide model name -> KV-cache slot
    first_output: int  # outputs generated before this (re)join, whose KL is carried
    carried_kl: Tensor | float = 0.0
    carried_steps: Tensor | int = 0
    fed: int = 0  # tokens already in the guide caches
    collected: bool = False

    def new_tokens(self) -> list[int]:
        """Prompt and output tokens the guide models have not seen yet."""
        n_prompt = len(self.prompt_ids)
        if self.fed >= n_prompt:
            return list(self.output_ids[self.fed - n_prompt:])
        return list(self.prompt_ids[self.fed:]) + list(self.output_ids)


@dataclass
class _Group:
    """Rows that use one module with one guide model this step."""

    rows: list[int] = field(default_factory=list)  # positions among the guided rows
    entries: list[ResolvedGuidance] = field(default_factory=list)


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
        self._temperature = torch.ones(max_requests, device=self._device)  # sampling temperature by stat row
        self._free_stats = list(range(max_requests - 1, -1, -1))
        self._rows: dict[int, _Request] = {}
        self._uncollected: OrderedDict[str, tuple[Tensor | float, Tensor | int]] = OrderedDict()
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
        carried_kl, carried_steps = self._uncollected.pop(key, (0.0, 0))  # rejoining after preemption
        stat = self._free_stats.pop()
        self._temperature[stat] = 1.0 if temperature < GREEDY_TEMPERATURE else float(temperature)
        self._rows[row] = _Request(
            key=key,
            guidance=active,
            prompt_ids=prompt_ids,
            output_ids=output_ids,
            stat=stat,
            slots={name: self._models[name].cache.allocate() for name in {g.params.model for g in active}},
            first_output=len(output_ids),
            carried_kl=carried_kl,
            carried_steps=carried_steps,
        )

    def remove(self, row: int) -> None:
        request = self._rows.pop(row, None)
        if request is None:
            return
        for name, slot in request.slots.items():
            self._models[name].cache.free(slot)
        if not request.collected:
            self._uncollected[request.key] = self._totals(request)
            while len(self._uncollected) > MAX_UNCOLLECTED_REPORTS:
                self._uncollected.popitem(last=False)
        self._free_stats.append(request.stat)

    def move(self, source: int, target: int, swap: bool) -> None:
        moving = self._rows.pop(source, None)
        if swap:
            if (other := self._rows.pop(target, None)) is not None:
                self._rows[source] = other
        else:
            self.remove(target)
        if moving is not None:
            self._rows[target] = moving

    # Per step.

    @torch.no_grad()
    def apply(self, logits: Tensor) -> Tensor:
        """Add every guided row's offsets to its logits ``[rows, V]`` in place; record its KL at
        the row's sampling temperature."""
        if not self._rows:
            return logits
        began = time.perf_counter()
        rows = list(self._rows)
        requests = [self._rows[r] for r in rows]
        unseen = {id(q): q.new_tokens() for q in requests}
        for name, model in self._models.items():
            fresh = [(q, unseen[id(q)]) for q in requests if name in q.slots and unseen[id(q)]]
            if fresh:
                self._feed(name, model, fresh)
        for q in requests:
            q.fed = len(q.prompt_ids) + len(q.output_ids)
        row_index = torch.tensor(rows, device=logits.device)
        base = logits[row_index].float()  # [G, V]
        offsets = torch.zeros_like(base)
        stat = torch.tensor([q.stat for q in requests], device=self._device)
        temperature = self._temperature[stat].to(base.device)  # [G]
        entropy = _entropy(base, temperature) if any(e.params.min_entropy > 0 for q in requests
                                                     for e in q.guidance) else None
        steered = [False] * len(requests)
        for (model_name, _), group in self._groups(requests).items():
            if entropy is not None:
                group = _open_rows(group, entropy)
            if group.rows:
                self._add_offsets(offsets, base, requests, model_name, group)
            for i in group.rows:
                steered[i] = True
        position = torch.tensor([len(q.output_ids) for q in requests], device=self._device)
        self._kl_at[stat, position] = kl_guided_to_base(base, offsets, temperature).to(self._device)
        self._steered_at[stat, position] = 1.0 if entropy is None else torch.tensor(
            steered, dtype=torch.float32, device=self._device)  # ungated: every row is steered
        logits[row_index] = (base + offsets).to(logits.dtype)
        self.timings.observe(time.perf_counter() - began)
        return logits

    def _feed(self, name: str, model: GuideModel, fresh: list[tuple[_Request, list[int]]]) -> None:
        """Append each row's unseen tokens to its guide cache: one `step` when every row has one
        new token (the steady state), else one `prefill` (requests joining or resuming).

        Rows with nothing unseen (a long prompt whose prefill the engine spreads over several
        steps) are left out; their last hidden state is still current."""
        slots = [q.slots[name] for q, _ in fresh]  # host ints: the paged cache grows rows on the host
        if all(len(tokens) == 1 for _, tokens in fresh):
            hidden = model.step(slots, torch.tensor([t[0] for _, t in fresh], device=self._device))
        else:
            hidden = model.prefill(slots, [torch.tensor(t, device=self._device) for _, t in fresh])
        self._last_hidden[name][model.cache.index(slots)] = hidden

    @staticmethod
    def _groups(requests: list[_Request]) -> dict[tuple[str, str], _Group]:
        groups: dict[tuple[str, str], _Group] = defaultdict(_Group)
        for i, request in enumerate(requests):
            for entry in request.guidance:
                group = groups[(entry.params.model, entry.module.name)]
                group.rows.append(i)
                group.entries.append(entry)
        return groups

    def _add_offsets(self, offsets: Tensor, base: Tensor, requests: list[_Request],
                     model_name: str, group: _Group) -> None:
        """offsets[rows] += d for one (guide model, module) group, ``d`` zero outside each row's candidates."""
        model, info, atoms = self._models[model_name], self._catalog[model_name], self._atoms[model_name]
        module = group.entries[0].module
        vocab = base.shape[-1]
        index = torch.tensor(group.rows, device=base.device)
        strength = torch.tensor([[e.params.strength] for e in group.entries], device=base.device)  # [b, 1]
        top_k = [vocab if e.top_k == WHOLE_VOCABULARY else min(e.top_k, vocab) for e in group.entries]
        slots = [requests[i].slots[model_name] for i in group.rows]

        if info.scoring == "q":
            hidden = self._last_hidden[model_name][model.cache.index(slots)]
            scores = module.token_scores(model.score_next(hidden).float())  # [b, V(, m)]
            if min(top_k) == vocab:
                offsets.index_add_(0, index, module.offsets(scores, strength, info.head_type, atoms))
                return
            candidates, valid = candidate_mask(base[index], torch.tensor(top_k, device=base.device), max(top_k))
            gather_index = candidates if scores.dim() == 2 else candidates.unsqueeze(-1).expand(-1, -1, scores.shape[-1])
            candidate_scores = scores.gather(1, gather_index)
        else:
            candidates, valid = candidate_mask(base[index], torch.tensor(top_k, device=base.device), max(top_k))
            candidate_scores = model.score_candidates(slots, candidates.to(self._device))  # [b, k(, m)]
        d = module.offsets(candidate_scores.float(), strength, info.head_type, atoms).masked_fill(~valid, 0.0)
        offsets.index_add_(0, index, torch.zeros_like(base[index]).scatter_(1, candidates, d))

    # Reports.

    def _totals(self, request: _Request) -> tuple[Tensor | float, Tensor | int]:
        end = len(request.output_ids)
        kl = request.carried_kl + self._kl_at[request.stat, request.first_output:end].sum()
        return kl, request.carried_steps + self._steered_at[request.stat, request.first_output:end].sum()

    def collect(self, keys: Sequence[str]) -> dict[str, GuidanceReport]:
        """Reports of the given requests (finished or still in the batch); each is returned once."""
        active = {q.key: q for q in self._rows.values()}
        reports = {}
        for key in keys:
            if key in self._uncollected:
                kl, steps = self._uncollected.pop(key)
            elif key in active and not active[key].collected:
                kl, steps = self._totals(active[key])
                active[key].collected = True
            else:
                continue
            reports[key] = GuidanceReport(kl=float(kl), steps=int(steps))
        return reports


def _entropy(logits: Tensor, temperature: Tensor) -> Tensor:
    """H(softmax(l / T)) = -sum_y p(y) log p(y) per row, in nats: ``[G, V]``, ``[G]`` -> ``[G]``."""
    log_p = torch.log_softmax(logits / temperature[:, None], dim=-1)
    return -(log_p.exp() * log_p).nan_to_num().sum(-1)  # masked tokens (p = 0, log p = -inf) add 0


def _open_rows(group: _Group, entropy: Tensor) -> _Group:
    """The rows of `group` whose entry's entropy gate is open (every row of an ungated entry)."""
    bounds = [e.params.min_entropy for e in group.entries]
    if not any(bounds):
        return group
    index = torch.tensor(group.rows, device=entropy.device)
    is_open = (entropy[index] >= torch.tensor(bounds, device=entropy.device)).tolist()  # host decision: skip work
    kept = [i for i, keep in enumerate(is_open) if keep or bounds[i] == 0]
    return _Group(rows=[group.rows[i] for i in kept], entries=[group.entries[i] for i in kept])
