"""The layout of a `guidance.batch.GuidanceBatch`: everything a step needs that depends only on which
request sits in which row, built once after the rows change instead of at every step.

It holds the row and stat indices, the temperatures (None where every row samples at 1), each
guide model's rows and KV slots, the (guide model, module) groups with their strengths, top-k and
candidate masks, which groups' offsets stay sparse (k candidates per row, on one ``[G, K]`` grid of
the top-K tokens) and which rows get dense ``[Gd, V]`` offsets, the entropy gates, and the KL budgets.

An entry that reads several guide models (`GuideTerm`s: contrast's expert and reference) joins one
group per term, at its strength times the term's weight; the groups' offsets add like those of
separate entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from guidance.kl_budget import budget_bounds
from guidance.module import WHOLE_VOCABULARY, GuidanceModule, GuideTerm
from guidance.spec import ResolvedGuidance
from models.runtime.guide import GuideModel

# Candidates per row up to which a group's offsets go on the top-K grid; a group with more, or one
# that steers every token, gets dense offsets [b, V] (a top-K that wide costs like the vocabulary).
MAX_SPARSE_CANDIDATES = 1024


@dataclass
class Feed:
    """The rows that hold a KV-cache slot in one guide model."""

    members: list[int]  # layout positions
    slots: list[int]  # host ints: the paged cache grows its slots on the host
    slot_index: Tensor  # [n] the same slots on the device


@dataclass
class Group:
    """The entries of one (guide model, module) pair: a row appears once per entry (term) it has, and
    every per-entry list and tensor is in that order."""

    model: str
    module: GuidanceModule
    rows: list[int]  # layout positions
    slots: list[int]  # the rows' slots in the guide model
    bounds: list[float]  # min_entropy
    index: Tensor  # [b] layout positions
    slot_index: Tensor  # [b]
    strength: Tensor  # [b, 1] each entry's strength times its term's weight
    top_k: Tensor  # [b] candidates (the vocabulary size: every token)
    max_k: int
    whole: bool  # every entry steers every token
    sparse: bool  # offsets on the top-K grid; else dense [b, V]
    valid: Tensor | None  # [b, max_k] sparse groups: False past an entry's own top_k
    # Set by the layout, which sees every group:
    dense_index: Tensor | None = None  # [b] dense groups: positions among the layout's dense rows
    fills_dense: bool = False  # dense_index is every dense row once, in order (0, 1, ..., Gd - 1)
    gate: slice | None = None  # its entries in the layout's `Gates` (None: none is entropy-gated)

    def subset(self, kept: list[int]) -> Group:
        """The group with only the entries `kept` (those whose entropy gate is open)."""
        pick = torch.tensor(kept, device=self.index.device)
        return replace(
            self, rows=[self.rows[i] for i in kept], slots=[self.slots[i] for i in kept],
            bounds=[self.bounds[i] for i in kept], index=self.index[pick], slot_index=self.slot_index[pick],
            strength=self.strength[pick], top_k=self.top_k[pick], gate=None, fills_dense=False,
            valid=None if self.valid is None else self.valid[pick],
            dense_index=None if self.dense_index is None else self.dense_index[pick])


@dataclass
class Gates:
    """The entropy gates of a layout where some entry's min_entropy is above 0."""

    rows: Tensor  # [n] layout position of each entry of the gated groups, group after group
    bounds: Tensor  # [n] their min_entropy
    row_bound: Tensor  # [G] each row's smallest min_entropy: some entry steers where H >= it, or it is 0


@dataclass
class BudgetBounds:
    """The KL budgets of a layout where some request has one (`guidance.kl_budget`)."""

    max_kl: Tensor  # [G] nats for the whole response (inf: no bound, every row without a budget)
    kl_per_token: Tensor  # [G] nats per generated token (inf: no bound)


@dataclass
class Layout:
    """What `apply` needs of the requests in the rows; built again after the rows change."""

    vocab: int
    requests: list[Any]  # the batch's requests, in row order
    take: slice | Tensor  # the guided rows of the logits: a slice (a view, no copy) when they are 0..G-1
    row_index: Tensor  # [G]
    stat: Tensor  # [G] rows of the KL and steps buffers
    split_temperature: Tensor | None  # [G] at which each row's KL and entropy are taken (None: all at 1)
    feeds: dict[str, Feed]  # per guide model
    groups: list[Group]
    max_k: int  # K, the columns of the candidate grid (0: no sparse group)
    split: bool  # a row's KL comes from the grid (no dense group steers it), or the entropy gate is read
    dense_rows: Tensor | None  # [Gd] layout positions of the rows some dense group steers
    dense_take: Tensor | None  # [Gd] their rows of the logits
    dense_temperature: Tensor | None  # [Gd] their temperatures (None: all at 1)
    all_dense: bool  # every row is a dense row (dense_rows is 0..G-1)
    gates: Gates | None
    budget: BudgetBounds | None  # None: no request has a KL budget
    position: Tensor | None = None  # [G] each row's output position, where its KL goes


def build_layout(rows: Mapping[int, Any], models: Mapping[str, GuideModel], vocab: int,
                 device: torch.device) -> Layout:
    """The layout of the requests in `rows` (row -> request with `slots`, `stat`, `temperature`,
    `guidance` and `budget`)."""
    ordered = sorted(rows)
    requests = [rows[r] for r in ordered]
    row_index = torch.tensor(ordered, device=device)
    stat = torch.tensor([q.stat for q in requests], device=device)
    feeds = {}
    for name, model in models.items():
        if members := [i for i, q in enumerate(requests) if name in q.slots]:
            slots = [requests[i].slots[name] for i in members]
            feeds[name] = Feed(members, slots, model.cache.index(slots))
    by_pair: dict[tuple[str, str], list[tuple[int, ResolvedGuidance, GuideTerm]]] = {}
    for i, q in enumerate(requests):
        for entry in q.guidance:
            for term in entry.terms:
                by_pair.setdefault((term.model, entry.module.name), []).append((i, entry, term))
    groups = [_group(entries, requests, models, vocab, device) for entries in by_pair.values()]
    dense_rows = sorted({i for g in groups if not g.sparse for i in g.rows})
    for g in groups:
        if not g.sparse:
            positions = [dense_rows.index(i) for i in g.rows]
            g.dense_index = torch.tensor(positions, device=device)
            g.fills_dense = positions == list(range(len(dense_rows)))
    gated = [g for g in groups if any(g.bounds)]
    start = 0
    for g in gated:
        g.gate, start = slice(start, start + len(g.rows)), start + len(g.rows)
    gates = Gates(
        rows=torch.tensor([i for g in gated for i in g.rows], device=device),
        bounds=torch.tensor([b for g in gated for b in g.bounds], device=device),
        row_bound=torch.tensor([min(e.params.min_entropy for e in q.guidance) for q in requests], device=device),
    ) if gated else None
    dense_index = torch.tensor(dense_rows, device=device) if dense_rows else None
    bounds = [budget_bounds(q.budget) for q in requests]
    budget = BudgetBounds(
        max_kl=torch.tensor([b[0] for b in bounds], device=device),
        kl_per_token=torch.tensor([b[1] for b in bounds], device=device),
    ) if any(q.budget is not None for q in requests) else None
    temperatures = [q.temperature for q in requests]
    dense_temperatures = [temperatures[i] for i in dense_rows]
    return Layout(
        vocab=vocab, requests=requests,
        take=slice(0, len(ordered)) if ordered == list(range(len(ordered))) else row_index,
        row_index=row_index, stat=stat, feeds=feeds, groups=groups,
        split_temperature=_temperatures(temperatures, device),
        max_k=max((g.max_k for g in groups if g.sparse), default=0),
        split=gates is not None or len(dense_rows) < len(ordered), dense_rows=dense_index,
        dense_take=None if dense_index is None else row_index[dense_index],
        dense_temperature=_temperatures(dense_temperatures, device), all_dense=len(dense_rows) == len(ordered),
        gates=gates, budget=budget)


def _temperatures(temperatures: list[float], device: torch.device) -> Tensor | None:
    """The rows' temperatures as a tensor, None when all are 1 (nothing to divide by)."""
    return None if all(t == 1.0 for t in temperatures) else torch.tensor(temperatures, device=device)


def _group(entries: list[tuple[int, ResolvedGuidance, GuideTerm]], requests: list[Any],
           models: Mapping[str, GuideModel], vocab: int, device: torch.device) -> Group:
    """The `Group` of one (guide model, module) pair's (layout position, entry, term) triples."""
    rows = [i for i, _, _ in entries]
    model = entries[0][2].model
    slots = [requests[i].slots[model] for i in rows]
    # Candidates per entry: its top_k, at most the vocabulary (all of it for WHOLE_VOCABULARY).
    top_k = [vocab if e.top_k == WHOLE_VOCABULARY else min(e.top_k, vocab) for _, e, _ in entries]
    max_k = max(top_k)
    sparse = max_k < vocab and max_k <= MAX_SPARSE_CANDIDATES
    top_k_index = torch.tensor(top_k, device=device)
    return Group(
        model=model, module=entries[0][1].module, rows=rows, slots=slots,
        bounds=[e.params.min_entropy for _, e, _ in entries], index=torch.tensor(rows, device=device),
        slot_index=models[model].cache.index(slots),
        strength=torch.tensor([[term.weight * e.params.strength] for _, e, term in entries], device=device),
        top_k=top_k_index, max_k=max_k, whole=min(top_k) == vocab, sparse=sparse,
        valid=torch.arange(max_k, device=device) < top_k_index[:, None] if sparse else None)
