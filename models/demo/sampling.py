"""Batched ancestral sampling from a decoder, optionally steered by logit offsets.

The reference loop for the demo's rollouts and guided evaluation, in plain torch
over the guide-model runtime's ``Decoder`` and slot KV cache: prompts of any
lengths share one batch (each row at its own position), each step costs one
incremental forward per model. Steering is pluggable (``Steering``) so that this
module knows nothing of guidance rules:

    l = base logits of prefix s,  d = sum of the steerings' offsets d(s, y)
    y ~ softmax((l + d) / temperature)          (argmax when temperature == 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.runtime.decoder import Decoder


class Steering(Protocol):
    """Something that follows the generated text and offsets the base logits."""

    def start(self, prompts: Sequence[Tensor], max_len: int) -> None:
        """Begin a batch: one row per prompt (1-D token ids), at most ``max_len`` tokens per row."""

    def offsets(self, logits: Tensor) -> Tensor:
        """Offsets ``[B, V]`` for the base logits ``[B, V]`` of the current prefixes."""

    def advance(self, tokens: Tensor) -> None:
        """Append one sampled token per row, ``[B]``."""


@dataclass(frozen=True)
class Generation:
    tokens: Tensor  # [B, max_new_tokens]; positions after a row's first eos hold eos
    kl: Tensor  # [B] sum over generated tokens of KL(softmax(l + d) || softmax(l))


def start_cache(decoder: Decoder, prompts: Sequence[Tensor], max_len: int) -> tuple[Tensor, Tensor]:
    """Fresh cache with one slot per prompt, prompts prefilled: (slots ``[B]``, last hidden ``[B, H]``)."""
    cache = decoder.setup_cache(len(prompts), max_len)
    slots = [cache.allocate() for _ in prompts]
    hidden = decoder.prefill(slots, prompts)
    return torch.tensor(slots), hidden


def kl_to_base(logits: Tensor, offsets: Tensor) -> Tensor:
    """KL(softmax(l + d) || softmax(l)) per row ``[B]``: E_q[log q - log p]."""
    log_q = torch.log_softmax(logits + offsets, dim=-1)
    log_p = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    # Tokens that an offset of -inf removes (q = 0) add 0, not nan.
    return torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1).clamp_min(0.0)


def choose(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """One token per row ``[B]``: argmax at temperature 0, else a sample of softmax(logits / T)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    base: Decoder,
    prompts: Sequence[Sequence[int]],
    eos_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    steerings: Sequence[Steering] = (),
) -> Generation:
    """Continue every prompt (token ids) for up to ``max_new_tokens`` tokens, stopping rows at eos."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    rows = [torch.tensor(list(p), dtype=torch.long) for p in prompts]
    max_len = max(len(r) for r in rows) + max_new_tokens
    slots, hidden = start_cache(base, rows, max_len)
    for steering in steerings:
        steering.start(rows, max_len)
    tokens = torch.full((len(rows), max_new_tokens), eos_token_id, dtype=torch.long)
    kl = torch.zeros(len(rows))
    finished = torch.zeros(len(rows), dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = base.logits(hidden).float()
        offsets = sum((s.offsets(logits) for s in steerings), torch.zeros_like(logits))
        next_ids = torch.where(finished, eos_token_id, choose(logits + offsets, temperature, generator))
        kl += torch.where(finished, 0.0, kl_to_base(logits, offsets))
        tokens[:, step] = next_ids
        finished |= next_ids == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        hidden = base.step(slots, next_ids)
        for steering in steerings:
            steering.advance(next_ids)
    return Generation(tokens=tokens, kl=kl)


def completion_ids(tokens: Tensor, eos_token_id: int) -> list[list[int]]:
    """Per row, the generated ids up to and including the first eos (all of them if none)."""
    completions = []
    for ids in tokens.tolist():
        end = ids.index(eos_token_id) + 1 if eos_token_id in ids else len(ids)
        completions.append(ids[:end])
    return completions
