"""A KL budget per request: at each step, the largest guidance strength whose exact KL fits.

A request's guidance entries, and the request itself, may give `max_kl` (nats for the whole
response) and `kl_per_token` (nats per generated token). The budget bounds the response's KL, which
all of its entries make together, so one rule covers a single entry, a composition and the request:

- The request's budget is the tightest its entries give: the smallest `max_kl` and the smallest
  `kl_per_token` (`request_budget`). A bound the request gives is folded into each entry at parse
  time, each entry's bound becoming the tighter of its own and the request's (`under`), so it is one
  more bound in that minimum and everything that reads the entries (the batch, search, the report)
  sees it.
- At each step one scale t in [0, 1] multiplies every entry's strength (each entry's `strength` is
  its cap), so the budget splits between the entries in proportion to the strengths asked for.
- The allowance of a step is a = min(kl_per_token, max_kl - spent), spent the KL of the tokens the
  choice generated so far (`allowance`; below `KL_RESOLUTION` it is 0, and t = 0); t is the
  largest scale with KL(t) <= a, where KL(t) = KL(softmax((l + d(t)) / T) || softmax(l / T)) and
  d(t) = sum_e d_e(t s_e) is the summed offset of the entries at strengths t s_e: exactly the
  per-token KL a report sums.

Why bisection finds it: where every offset is linear in its strength (cd, arm, genarm, contrast, and any
composition of them) d(t) = t d(1), and with q_t = softmax((l + t d(1)) / T), d' = d(1) / T,
dKL/dt = t Var_{q_t}(d') >= 0: KL is non-decreasing in t. Q-sharp's Bernoulli offset
log(1 - p + p e^{t s}) is not linear, but both it and its derivative in t increase with p, so
dKL/dt (a covariance under q_t of the two) is >= 0 as well. A histogram head, or Q-sharp composed
with other modules, may not be monotone; the bisection still keeps only scales whose KL fits
(the lower end starts at t = 0, whose KL is 0), so the budget holds, but t may then not be the
largest that fits.

Tolerance: `BISECTION_STEPS` halvings in float32 leave t within 2^-24 of the largest fitting
scale (in the monotone case), i.e. a strength within 2^-24 times its cap. The KL compared with
the allowance is the one recorded for the token (float32; on candidate rows computed in float64),
so the reported KL stays within `max_kl` up to float32 rounding of the running sum (a relative
1e-6); the exact KL may differ from the reported one by that KL's own rounding (about 1e-6 nats
per token on rows steered at every token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BISECTION_STEPS = 24
# Nats below which what is left of a budget counts as spent: about the float32 rounding of a token's
# KL, so a budget ends with strength 0 rather than with steps that steer by rounding noise.
KL_RESOLUTION = 1e-6


@dataclass(frozen=True)
class KLBudget:
    """A request's budget: nats for the whole response and per generated token (None: no bound)."""

    max_kl: float | None = None
    kl_per_token: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"max_kl": self.max_kl, "kl_per_token": self.kl_per_token}


def request_budget(entries: Sequence[Mapping[str, Any]]) -> KLBudget | None:
    """The tightest budget of a request's entries (validated entries as dicts; None when no entry gives one)."""
    max_kl = [e["max_kl"] for e in entries if e.get("max_kl") is not None]
    per_token = [e["kl_per_token"] for e in entries if e.get("kl_per_token") is not None]
    if not max_kl and not per_token:
        return None
    return KLBudget(max_kl=min(max_kl) if max_kl else None, kl_per_token=min(per_token) if per_token else None)


def under(entry: Mapping[str, Any], budget: KLBudget) -> dict[str, float | None]:
    """The bounds of an entry (validated, as a dict) under the request's own `budget` too: each the tighter
    of the two, by the rule that combines entries (`request_budget`)."""
    return request_budget([entry, budget.as_dict()]).as_dict()


def budget_bounds(budget: KLBudget | None) -> tuple[float, float]:
    """(max_kl, kl_per_token) as numbers, infinite where there is no bound."""
    if budget is None:
        return math.inf, math.inf
    return (math.inf if budget.max_kl is None else budget.max_kl,
            math.inf if budget.kl_per_token is None else budget.kl_per_token)


def allowance(max_kl: Tensor, kl_per_token: Tensor, spent: Tensor) -> Tensor:
    """The KL each row may spend on its next token: min(kl_per_token, max_kl - spent), or 0 (the
    budget is spent) below `KL_RESOLUTION`.

    All ``[B]``; infinite bounds for rows without a budget give an infinite allowance."""
    allowed = torch.minimum(kl_per_token, max_kl - spent)
    return torch.where(allowed < KL_RESOLUTION, torch.zeros_like(allowed), allowed)


def largest_fitting_scale(kl_at: Callable[[Tensor], Tensor], allowed: Tensor) -> Tensor:
    """The largest scale t in [0, 1] per row with kl_at(t) <= allowed, by bisection: ``[B]``.

    `kl_at` maps scales ``[B]`` to each row's KL ``[B]`` at its strengths times its scale. A row
    whose allowance is infinite gets exactly 1 (untouched); one whose allowance is 0 gets 0 (its
    budget is spent). The result's KL always fits (t = 0 has KL 0); see the module docstring for
    when it is the largest and for the tolerance.
    """
    ones = torch.ones_like(allowed)
    fits = kl_at(ones) <= allowed
    if bool(fits.all()):  # one host read: when every row fits at its cap, no bisection is needed
        low = ones
    else:
        low, high = fits.float(), ones  # a row that fits at 1 keeps 1 (its midpoints are 1)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            fits = kl_at(middle) <= allowed
            low, high = torch.where(fits, middle, low), torch.where(fits, high, middle)
    return torch.where(allowed.isinf(), ones, torch.where(allowed > 0, low, torch.zeros_like(low)))


def spend(entries: Sequence[dict], spent: float) -> tuple[dict, ...]:
    """Request entries (as dicts) with `spent` nats taken off each `max_kl`: what a continuation of
    a response that already spent them may still spend (blockwise search's next block)."""
    return tuple({**e, "max_kl": max(e["max_kl"] - spent, 0.0)} if e.get("max_kl") is not None else e
                 for e in entries)
