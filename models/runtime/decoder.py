"""A compact Llama / Qwen2 decoder for guide models, after gpt-fast's ``model.py``.

    h_0 = E[x]                                              token embeddings
    a_l = h_{l-1} + Attn_l(RMSNorm(h_{l-1}))                 GQA attention with RoPE
    h_l = a_l + MLP_l(RMSNorm(a_l))                          SwiGLU MLP
    out = RMSNorm(h_L)                                       final norm -> "hidden" [.., H]
    logits = out @ W_out^T                                   LM head (W_out = E when tied)

Module names mirror Hugging Face's (``embed_tokens``, ``layers.N.self_attn.q_proj``,
...) so checkpoints load with no renaming beyond the ``model.`` prefix.

Four entry points share one layer stack and differ only in what the new queries
attend to (the ``LayerAttend`` passed down):

- ``forward``: full causal pass, no cache (training, reference).
- ``prefill``: append prompts to cache slots (batched, padded).
- ``step``: append ONE token per row, each row at its own position (hot path).
- ``score_candidates``: k candidate next tokens per row, read-only on the cache (hot path).

The cache is paged (``PagedKVCache``). The hot paths (``step``, ``score_candidates``)
attend over the batch's longest live length rounded up to a bucket (``cache.window``),
sized from the cache's host copy of the lengths, so their cost follows the tokens
cached, not ``max_len``, and they make no device -> host sync. Each new query attends
to its row's cached prefix and to its own key/value with one softmax
(``attend_prefix_and_self``): the prefix is gathered once per layer and never
concatenated with the new keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.runtime.config import DecoderConfig, RopeConfig
from models.runtime.kv_cache import PagedKVCache

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(queries ``[B, heads, T, D]``, new keys, values ``[B, kv_heads, T, D]``, RoPE applied) -> ``[B, heads, T, D]``."""
LayerAttend = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``Attend`` for every layer: (layer index, queries, new keys, new values) -> attention output."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # y = w * x / sqrt(mean(x^2) + eps), normalised in float32 as in the reference models.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies ``[head_dim / 2]``: theta^(-2i/D), rescaled per ``rope.rope_type`` (float32, CPU)."""
    # device="cpu" is explicit so that a model built under `torch.device("meta")` still gets real values.
    inv_freq = 1.0 / rope.rope_theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Wavelengths above old_len / low_freq_factor are divided by `factor`, below
        # old_len / high_freq_factor kept, and the band in between interpolated.
        old_len = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by angle pos * theta_i. x ``[B, heads, T, D]``, cos/sin ``[B, 1, T, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend_causal(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, each kv head serving heads / kv_heads query heads (GQA).

    q ``[B, heads, T, D]``; k, v ``[B, kv_heads, K, D]``; mask ``[B or 1, 1, T, K]`` (True = attend).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attend_prefix_and_self(
    q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_mask: Tensor, k_self: Tensor, v_self: Tensor
) -> Tensor:
    """Query t attends to the cached prefix and to its own new key only, with one softmax.

    With s_j = q.k_j / sqrt(D) over prefix positions j (-inf where ``prefix_mask`` is False) and
    s_* = q.k_self / sqrt(D), m = max(max_j s_j, s_*):

        y = (sum_j e^(s_j - m) v_j + e^(s_* - m) v_self) / (sum_j e^(s_j - m) + e^(s_* - m))

    i.e. softmax over [prefix..., self] without concatenating the prefix with the new keys and
    values (no copy of the prefix per layer). The heads / kv_heads query heads that share a kv
    head are folded into the rows of one matmul, so the prefix is never repeated for GQA.

    Args:
        q: ``[B, heads, T, D]``. k_prefix, v_prefix: ``[B, kv_heads, L, D]``. prefix_mask: ``[B, L]``.
        k_self, v_self: ``[B, kv_heads, T, D]`` (RoPE applied at each query's position).
    Returns:
        ``[B, heads, T, D]``.
    """
    B, H, T, D = q.shape
    G, R = k_prefix.shape[1], H // k_prefix.shape[1]
    scale = D**-0.5
    q = q.reshape(B, G, R * T, D)  # query head h reads kv head h // R, as in HF's repeat_kv
    s = (q @ k_prefix.transpose(-1, -2)).float() * scale  # [B, G, R*T, L]
    s = s.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
    s_self = (q.view(B, G, R, T, D) * k_self[:, :, None]).sum(-1).float().view(B, G, R * T, 1) * scale
    m = torch.maximum(s.amax(-1, keepdim=True), s_self)  # finite, as s_self is, even for an empty prefix
    p, p_self = (s - m).exp(), (s_self - m).exp()
    num = (p.to(v_prefix.dtype) @ v_prefix).float()  # [B, G, R*T, D]
    num = num + (p_self.view(B, G, R, T, 1) * v_self[:, :, None].float()).view(B, G, R * T, D)
    y = num / (p.sum(-1, keepdim=True) + p_self)
    return y.to(q.dtype).view(B, H, T, D)


def host_slots(slots: Sequence[int] | Tensor) -> list[int]:
    """Slot ids as host ints (a tensor is read back: free on CPU, a sync on an accelerator)."""
    return slots.tolist() if isinstance(slots, Tensor) else [int(s) for s in slots]


def cached_prefix(cache: PagedKVCache, slots: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What the hot paths attend to: the first L = ``cache.window(longest length)`` positions of each slot.

    L comes from the host lengths (no sync). Returns device tensors: slot index ``[B]``, lengths
    = next positions ``[B]``, blocks ``[B, L / block_size]`` (for ``cache.read``), prefix mask ``[B, L]``.
    """
    index = cache.index(slots)
    pos = cache.lengths[index]
    L = cache.window(max(cache.length(s) for s in slots))
    blocks = cache.block_table[index, : L // cache.block_size]
    return index, pos, blocks, torch.arange(L, device=pos.device) < pos[:, None]


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        """x ``[B, T, H]`` -> ``[B, T, H]``; ``attend`` decides which keys/values the queries see."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        # SwiGLU: W_down (silu(W_gate x) * W_up x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Llama / Qwen2 decoder. ``lm_head=False`` builds a headless backbone (untied checkpoints without one)."""

    def __init__(self, config: DecoderConfig, lm_head: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)
        self.lm_head: nn.Linear | None = None
        if config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight = self.embed_tokens.weight
        elif lm_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cache: PagedKVCache | None = None

    # ----------------------------------------------------------------- setup

    def setup_cache(
        self, num_slots: int, max_len: int, num_blocks: int | None = None, block_size: int = 16
    ) -> PagedKVCache:
        """Allocate the paged cache on the model's device and dtype (replaces any previous one).

        ``num_blocks=None`` holds every slot at ``max_len`` (the worst case); fewer blocks
        (``blocks_in_budget``) cap the memory, and a prefill or step that would need more
        raises ``BlocksExhaustedError`` before changing anything.
        """
        c, w = self.config, self.embed_tokens.weight
        self.cache = PagedKVCache(
            c.num_hidden_layers, num_slots, c.num_key_value_heads, max_len, c.head_dim,
            num_blocks=num_blocks, block_size=block_size, dtype=w.dtype, device=w.device,
        )
        return self.cache

    def blocks_in_budget(self, budget_bytes: int, block_size: int = 16) -> int:
        """Cache blocks of this model (its layers, kv heads, head dim, dtype) that fit in ``budget_bytes``."""
        c = self.config
        return PagedKVCache.blocks_in_budget(
            budget_bytes, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, block_size,
            self.embed_tokens.weight.dtype,
        )

    def require_cache(self) -> PagedKVCache:
        if self.cache is None:
            raise RuntimeError("no KV cache: call setup_cache(num_slots, max_len) first")
        return self.cache

    @property
    def output_embedding(self) -> Tensor:
        """Output embedding rows e_y ``[V, H]`` (the LM head weight; the input embedding when tied)."""
        if self.lm_head is None:
            raise RuntimeError("this backbone has no LM head (untied checkpoint without lm_head.weight)")
        return self.lm_head.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., H]`` final-norm hidden -> ``[..., V]`` next-token logits."""
        return F.linear(hidden, self.output_embedding)

    # ----------------------------------------------------------------- core

    def _run(self, tokens: Tensor, positions: Tensor, attend: LayerAttend) -> Tensor:
        """tokens, positions ``[B, T]`` -> final-norm hidden ``[B, T, H]``."""
        x = self.embed_tokens(tokens)
        # Angles pos * theta_i in float32, duplicated over both halves of the head dim.
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Full causal pass without the cache: ``[B, T]`` -> hidden ``[B, T, H]`` (right padding is harmless)."""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        return self._run(input_ids, positions, lambda i, q, k, v: attend_causal(q, k, v, causal))

    # ----------------------------------------------------------------- cached paths

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], token_ids: Sequence[Tensor]) -> Tensor:
        """Append ``token_ids[b]`` (1-D, lengths may differ) to slot ``slots[b]``, all rows in one padded pass.

        A slot may already hold tokens: the new ones continue at its current length. The new
        keys/values are written to the slot's blocks, then each query attends causally to
        its slot's first ``cache.window(longest end)`` positions.
        Not sync-free (ragged indexing): it runs when requests join, not per token.

        Raises:
            ValueError: bad arguments, a slot not allocated or listed twice, or past ``max_len``.
            BlocksExhaustedError: too few free blocks. Either way nothing has changed.
        Returns:
            final-norm hidden state of each row's last new token, ``[B, H]``.
        """
        cache = self.require_cache()
        if len(slots) != len(token_ids) or not slots:
            raise ValueError(f"need one token sequence per slot, got {len(slots)} slots and {len(token_ids)} sequences")
        slots = [int(s) for s in slots]
        dev = cache.device
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1).to(dev) for t in token_ids]
        n_host = [len(t) for t in seqs]
        for s, n in zip(slots, n_host):
            if n == 0:
                raise ValueError(f"empty token sequence for slot {s}")
        cache.reserve(slots, n_host)
        start_host = [cache.length(s) for s in slots]
        slot_t = cache.index(slots)
        tokens = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [B, T], padded with 0
        n = torch.tensor(n_host, device=dev)
        t = torch.arange(tokens.shape[1], device=dev)
        positions = torch.tensor(start_host, device=dev)[:, None] + t  # [B, T]
        valid = t < n[:, None]  # [B, T]: real tokens (padding is neither written nor returned)
        K = cache.window(max(s + k for s, k in zip(start_host, n_host)))
        blocks = cache.block_table[slot_t, : K // cache.block_size]  # [B, K / block_size]
        # query at position p attends to cached keys 0..p of its own slot
        mask = (torch.arange(K, device=dev) <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, K]
        where = cache.locate(slot_t[:, None].expand_as(tokens)[valid], positions[valid])  # [N] each

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            cache.write(i, where, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid])
            return attend_causal(q, *cache.read(i, blocks), mask)

        hidden = self._run(tokens, positions, attend)
        cache.advance(slots, n_host)
        return hidden[torch.arange(len(seqs), device=dev), n - 1]

    @torch.no_grad()
    def step(self, slots: Sequence[int] | Tensor, token_ids: Tensor) -> Tensor:
        """Append one token per row at that row's own position (its slot's length).

        The token attends to its slot's cached prefix (the first ``cache.window(longest
        length)`` positions, masked to the slot's length) and to itself
        (``attend_prefix_and_self``); its key/value are then stored for later steps.

        Args:
            slots: ``[B]`` distinct allocated slots, best a host sequence of ints. A tensor is read
                back to the host (``tolist``: free on CPU, a sync on an accelerator) because
                growing the slots' blocks is host bookkeeping.
            token_ids: ``[B]`` long, on the cache device.
        Raises:
            ValueError, BlocksExhaustedError: as ``cache.reserve``, before anything changes.
        Returns:
            final-norm hidden ``[B, H]`` of the appended tokens.
        """
        cache = self.require_cache()
        host = host_slots(slots)
        ones = [1] * len(host)
        cache.reserve(host, ones)
        index, pos, blocks, prefix = cached_prefix(cache, host)
        where = cache.locate(index, pos)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            y = attend_prefix_and_self(q, *cache.read(i, blocks), prefix, k, v)
            cache.write(i, where, k[:, :, 0], v[:, :, 0])
            return y

        hidden = self._run(token_ids[:, None], pos[:, None], attend)
        cache.advance(host, ones)
        return hidden[:, 0]

    @torch.no_grad()
    def score_candidates(self, slots: Sequence[int] | Tensor, candidates: Tensor) -> Tensor:
        """Hidden states of k candidate next tokens per row, without touching the cache ("V-type").

        Every candidate sits at the row's next position and attends to the row's cached
        prefix (the first ``cache.window(longest length)`` positions, masked) and to itself
        only, never to the other candidates (``attend_prefix_and_self``).

        Args:
            slots: ``[B]`` allocated slots, best a host sequence of ints (a tensor is read back, as in ``step``).
            candidates: ``[B, k]`` long token ids on the cache device.
        Returns:
            final-norm hidden ``[B, k, H]``.
        """
        cache = self.require_cache()
        host = host_slots(slots)
        for s in host:
            cache.check_allocated(s)
        B, k = candidates.shape
        _, pos, blocks, prefix = cached_prefix(cache, host)

        def attend(i: int, q: Tensor, k_new: Tensor, v_new: Tensor) -> Tensor:
            return attend_prefix_and_self(q, *cache.read(i, blocks), prefix, k_new, v_new)

        return self._run(candidates, pos[:, None].expand(B, k), attend)
