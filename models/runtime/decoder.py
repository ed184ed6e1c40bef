"""A compact Llama / Qwen2 decoder for guide models, after gpt-fast's ``model.py``.

    h_0 = E[x]                                              token embeddings
    a_l = h_{l-1} + Attn_l(RMSNorm(h_{l-1}))                 GQA attention with RoPE
    h_l = a_l + MLP_l(RMSNorm(a_l))                          SwiGLU MLP
    out = RMSNorm(h_L)                                       final norm -> "hidden" [.., H]
    logits = out @ W_out^T                                   LM head (W_out = E when tied)

Module names mirror Hugging Face's (``embed_tokens``, ``layers.N.self_attn.q_proj``,
...) so checkpoints load with no renaming beyond the ``model.`` prefix.

Four entry points share one layer stack and differ only in which keys/values the
new queries attend to (the ``KVFn`` passed down) and in the mask:

- ``forward``: full causal pass, no cache (training, reference).
- ``prefill``: append prompts to cache slots (batched, padded).
- ``step``: append ONE token per row, each row at its own position (hot path).
- ``score_candidates``: k candidate next tokens per row, read-only on the cache (hot path).

The hot paths (``step``, ``score_candidates``) have static shapes (they attend over
the whole ``max_len`` window, masked) and no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.runtime.config import DecoderConfig, RopeConfig
from models.runtime.kv_cache import SlotKVCache

LayerKV = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(new keys, new values ``[B, kv_heads, T, D]``) -> keys, values attended to ``[B, kv_heads, K, D]``."""
KVFn = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``LayerKV`` for every layer: (layer index, new keys, new values) -> keys, values attended to."""


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


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: LayerKV) -> Tensor:
        """x ``[B, T, H]``, mask ``[B, 1, T, K]`` (True = attend) -> ``[B, T, H]``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv(k, v)
        # softmax(q k^T / sqrt(D) + mask) v; each kv head serves n_heads / n_kv_heads query heads (GQA).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: LayerKV) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
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
        self.cache: SlotKVCache | None = None

    # ----------------------------------------------------------------- setup

    def setup_cache(self, num_slots: int, max_len: int) -> SlotKVCache:
        """Allocate the slot cache on the model's device and dtype (replaces any previous one)."""
        c, w = self.config, self.embed_tokens.weight
        self.cache = SlotKVCache(
            c.num_hidden_layers, num_slots, c.num_key_value_heads, max_len, c.head_dim, dtype=w.dtype, device=w.device
        )
        return self.cache

    def require_cache(self) -> SlotKVCache:
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

    def _run(self, tokens: Tensor, positions: Tensor, mask: Tensor, kv: KVFn) -> Tensor:
        """tokens, positions ``[B, T]``; mask ``[B or 1, 1, T, K]`` -> final-norm hidden ``[B, T, H]``."""
        x = self.embed_tokens(tokens)
        # Angles pos * theta_i in float32, duplicated over both halves of the head dim.
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, lambda k, v, i=i: kv(i, k, v))
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Full causal pass without the cache: ``[B, T]`` -> hidden ``[B, T, H]`` (right padding is harmless)."""
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        return self._run(input_ids, positions, causal, lambda i, k, v: (k, v))

    # ----------------------------------------------------------------- cached paths

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], token_ids: Sequence[Tensor]) -> Tensor:
        """Append ``token_ids[b]`` (1-D, lengths may differ) to slot ``slots[b]``, all rows in one padded pass.

        A slot may already hold tokens: the new ones continue at its current length.
        Not sync-free (capacity check, ragged indexing): it runs when requests join, not per token.

        Returns:
            final-norm hidden state of each row's last new token, ``[B, H]``.
        """
        cache = self.require_cache()
        if len(slots) != len(token_ids) or not slots:
            raise ValueError(f"need one token sequence per slot, got {len(slots)} slots and {len(token_ids)} sequences")
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate slots in prefill: {list(slots)}")
        for s in slots:
            if not cache.is_allocated(s):
                raise ValueError(f"KV-cache slot {s} is not allocated")
        dev = cache.device
        seqs = [torch.as_tensor(t, dtype=torch.long).reshape(-1).to(dev) for t in token_ids]
        n_host = [len(t) for t in seqs]
        slot_t = torch.tensor(list(slots), device=dev)
        start = cache.lengths[slot_t]  # [B]
        ends = [s + n for s, n in zip(start.tolist(), n_host)]
        for s, n, end in zip(slots, n_host, ends):
            if n == 0:
                raise ValueError(f"empty token sequence for slot {s}")
            if end > cache.max_len:
                raise ValueError(f"slot {s} would hold {end} tokens, over the cache max_len={cache.max_len}")
        tokens = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [B, T], padded with 0
        n = torch.tensor(n_host, device=dev)
        t = torch.arange(tokens.shape[1], device=dev)
        positions = start[:, None] + t  # [B, T]
        valid = t < n[:, None]  # [B, T]: real tokens (padding is neither written nor returned)
        K = max(ends)
        # query at position p attends to cached keys 0..p of its own slot
        mask = (torch.arange(K, device=dev) <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, K]
        w_slots, w_pos = slot_t[:, None].expand_as(tokens)[valid], positions[valid]  # [N]

        def kv(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.write(i, w_slots, w_pos, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid])
            return cache.read(i, slot_t, K)

        hidden = self._run(tokens, positions, mask, kv)
        cache.lengths[slot_t] = start + n
        return hidden[torch.arange(len(seqs), device=dev), n - 1]

    @torch.no_grad()
    def step(self, slots: Tensor, token_ids: Tensor) -> Tensor:
        """Append one token per row at that row's own position (its slot's length).

        Args:
            slots: ``[B]`` long, distinct allocated slots on the cache device.
            token_ids: ``[B]`` long. Callers keep every slot below ``max_len`` (not checked: no host sync).
        Returns:
            final-norm hidden ``[B, H]`` of the appended tokens.
        """
        cache = self.require_cache()
        pos = cache.lengths[slots]  # [B]
        mask = (torch.arange(cache.max_len, device=pos.device) <= pos[:, None])[:, None, None, :]  # [B, 1, 1, L]

        def kv(i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            cache.write(i, slots, pos, k[:, :, 0], v[:, :, 0])
            return cache.read(i, slots)

        hidden = self._run(token_ids[:, None], pos[:, None], mask, kv)
        cache.lengths[slots] = pos + 1
        return hidden[:, 0]

    @torch.no_grad()
    def score_candidates(self, slots: Tensor, candidates: Tensor) -> Tensor:
        """Hidden states of k candidate next tokens per row, without touching the cache ("V-type").

        Every candidate sits at the row's next position and attends to the row's cached
        prefix and to itself only, never to the other candidates.

        Args:
            slots: ``[B]`` long, allocated slots. candidates: ``[B, k]`` long token ids.
        Returns:
            final-norm hidden ``[B, k, H]``.
        """
        cache = self.require_cache()
        B, k = candidates.shape
        pos = cache.lengths[slots]  # [B]
        prefix = torch.arange(cache.max_len, device=pos.device) < pos[:, None]  # [B, L]
        own = torch.eye(k, dtype=torch.bool, device=pos.device)  # candidate j sees candidate j only
        mask = torch.cat((prefix[:, None, :].expand(B, k, -1), own.expand(B, k, k)), dim=-1)[:, None]  # [B,1,k,L+k]

        def kv(i: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
            k_old, v_old = cache.read(i, slots)
            return torch.cat((k_old, k_new), dim=2), torch.cat((v_old, v_new), dim=2)

        return self._run(candidates, pos[:, None].expand(B, k), mask, kv)
