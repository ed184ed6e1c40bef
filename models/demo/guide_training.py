"""Training objectives of the demo guide models, and the loop that fits them.

A guide model under training is a copy of the base ``Decoder`` plus a head from
``models.runtime.heads``. Its embeddings and lower layers stay frozen at the base's
weights, so their output on the rollouts ("features") is computed once and shared
by every guide; the top layers, the final norm and the head are trained. h_t is the
final-norm hidden state at position t of a rollout x (prompt + completion) with
final reward R.

Token scores, one per (prefix s = x_<t, next token y = x_t):
    Q-type heads (scoring "q"):  head(h_{t-1})[x_t]   (the prefix scores every next token)
    V-type heads (scoring "v"):  head(h_t)            (the candidate's own hidden state)
    lm head:                     log softmax(head(h_{t-1}))[x_t] = log pi_r(x_t | x_<t)

Value objectives, every generated position t of every rollout one example:
    bernoulli  BCE(logit, R)        histogram  CE(atom logits, atom of R)        expected  (V - R)^2
Preference objective, pairs (x_w correct, x_l incorrect) of one prompt:
    -log sigmoid(beta * (S(x_w) - S(x_l)))      (Bradley-Terry)
with S(x) the sequence score a SequenceScorer serves: sum_t score_t over the completion for token-reward
heads (ARM; GenARM for lm), the score at x's last real token (its eos when it has one) for a reward head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from models.demo.rollouts import Rollouts
from models.demo.train import TrainConfig, learning_rate_factor
from models.runtime.decoder import Decoder
from models.runtime.heads import GuideHead, expected_value

FEATURE_BATCH = 1024  # rows per no-grad forward


@dataclass(frozen=True)
class FitConfig:
    """Optimisation of one guide model (AdamW, warm-up then cosine decay)."""

    steps: int
    batch_size: int = 128
    head_lr: float = 3e-3
    backbone_lr: float = 1e-3
    warmup_steps: int = 20
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float


def run_blocks(decoder: Decoder, x: Tensor, first: int, last: int) -> Tensor:
    """Layers ``first..last-1`` of ``decoder`` on activations ``[B, T, H]`` (causal, positions 0..T-1)."""
    T = x.shape[1]
    positions = torch.arange(T, device=x.device)
    freqs = positions[:, None].float() * decoder.inv_freq  # RoPE angles, as in Decoder._run
    emb = torch.cat((freqs, freqs), dim=-1)[None, None]  # [1, 1, T, D]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
    for layer in decoder.layers[first:last]:
        x = layer(x, cos, sin, causal, lambda k, v: (k, v))
    return x


@torch.no_grad()
def frozen_features(decoder: Decoder, input_ids: Tensor, num_layers: int) -> Tensor:
    """Output ``[N, T, H]`` of the embeddings and the first ``num_layers`` layers, in batches."""
    return torch.cat([run_blocks(decoder, decoder.embed_tokens(ids), 0, num_layers)
                      for ids in input_ids.split(FEATURE_BATCH)])


class GuideTrainee(nn.Module):
    """Decoder + head, with the embeddings and all but the top ``trainable_layers`` layers frozen."""

    def __init__(self, decoder: Decoder, head: GuideHead, trainable_layers: int) -> None:
        super().__init__()
        self.decoder, self.head = decoder, head
        self.split = decoder.config.num_hidden_layers - trainable_layers
        if not 0 <= self.split < decoder.config.num_hidden_layers:
            raise ValueError(f"trainable_layers must be in [1, {decoder.config.num_hidden_layers}], "
                             f"got {trainable_layers}")
        decoder.embed_tokens.requires_grad_(False)  # also the tied output embedding of arm / lm heads
        for layer in decoder.layers[: self.split]:
            layer.requires_grad_(False)

    def features(self, input_ids: Tensor) -> Tensor:
        """Output of the frozen part, ``[N, T, H]``."""
        return frozen_features(self.decoder, input_ids, self.split)

    def token_scores(self, input_ids: Tensor, features: Tensor) -> Tensor:
        """Score of each (x_<t, x_t), ``[B, T]`` (``[B, T, m]`` for histograms); position 0 holds 0."""
        top = run_blocks(self.decoder, features, self.split, self.decoder.config.num_hidden_layers)
        hidden = self.decoder.norm(top)
        embedding = self.decoder.output_embedding if self.head.uses_output_embedding else None
        if self.head.scoring == "v":
            return self.head(hidden, embedding)
        scores = self.head(hidden[:, :-1], embedding)  # [B, T-1, V(, m)]
        if self.head.type == "lm":
            scores = torch.log_softmax(scores, dim=-1)
        index = input_ids[:, 1:, None]
        if scores.dim() == 4:
            index = index[..., None].expand(-1, -1, -1, scores.shape[-1])
        picked = scores.gather(2, index).squeeze(2)  # [B, T-1(, m)]
        return torch.cat((torch.zeros_like(picked[:, :1]), picked), dim=1)


def value_loss(head: GuideHead, scores: Tensor, rewards: Tensor) -> Tensor:
    """Mean loss over examples: scores ``[N]`` / ``[N, m]``, rewards ``[N]``."""
    if head.type == "bernoulli":
        return F.binary_cross_entropy_with_logits(scores, rewards)
    if head.type == "histogram":  # the target is the atom nearest to R
        return F.cross_entropy(scores, (rewards[:, None] - head.atoms).abs().argmin(dim=1))
    return F.mse_loss(scores, rewards)


def last_token_mask(mask: Tensor) -> Tensor:
    """``[N, T]`` bool, True at each row's last True of ``mask`` ``[N, T]``."""
    positions = torch.arange(mask.shape[1])
    last = torch.where(mask, positions, -1).amax(dim=1)  # [N]
    return positions == last[:, None]


def value_examples(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> tuple[Tensor, Tensor]:
    """Scores and rewards of every generated position: ``[N(, m)]``, ``[N]``."""
    mask = rollouts.completion_mask
    scores = model.token_scores(rollouts.input_ids, features)[mask]
    return scores, rollouts.rewards[:, None].expand_as(mask)[mask]


def sequence_scores(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> Tensor:
    """S(x) of each rollout ``[N]``, as ``models.runtime.sequence.SequenceScorer`` serves it: a reward
    head's score at x's last real token (its eos when it has one); otherwise the sum of the
    completion's token scores."""
    scores = model.token_scores(rollouts.input_ids, features)
    mask = rollouts.completion_mask
    if model.head.type == "reward":
        mask = last_token_mask(mask)
    return (scores * mask).sum(dim=1)


def pair_margins(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor) -> Tensor:
    """S(x_w) - S(x_l) for ``pairs`` ``[P, 2]`` of (correct, incorrect) row indices: ``[P]``."""
    rows = pairs.T.reshape(-1)  # winners, then losers
    sums = sequence_scores(model, rollouts.subset(rows), features[rows])
    return sums[: len(pairs)] - sums[len(pairs):]


def index_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of ``range(count)``, a fresh permutation per epoch."""
    while True:
        yield from torch.randperm(count, generator=generator).split(batch_size)


def fit(model: GuideTrainee, loss_fn: Callable[[Tensor], Tensor], count: int, config: FitConfig, seed: int,
        desc: str, progress: bool) -> float:
    """Minimise ``loss_fn(batch of example indices)`` over ``count`` examples; mean loss of the last 20 steps."""
    backbone = [p for p in model.decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": config.backbone_lr},
         {"params": list(model.head.parameters()), "lr": config.head_lr}],
        weight_decay=0.0,
    )
    schedule = TrainConfig(warmup_steps=config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.steps, schedule))
    batches = index_batches(count, config.batch_size, torch.Generator().manual_seed(seed))
    model.train()
    recent: list[float] = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = loss_fn(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
    model.eval()
    return sum(recent) / len(recent)


def fit_value(model: GuideTrainee, rollouts: Rollouts, features: Tensor, config: FitConfig, seed: int, desc: str,
              progress: bool) -> float:
    """Regress every generated prefix of ``rollouts`` onto its final reward."""
    def loss_fn(batch: Tensor) -> Tensor:
        return value_loss(model.head, *value_examples(model, rollouts.subset(batch), features[batch]))

    return fit(model, loss_fn, len(rollouts), config, seed, desc, progress)


def fit_preference(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor, beta: float,
                   config: FitConfig, seed: int, desc: str, progress: bool) -> float:
    """Bradley-Terry on (correct, incorrect) pairs of rollouts of one prompt."""
    def loss_fn(batch: Tensor) -> Tensor:
        return -F.logsigmoid(beta * pair_margins(model, rollouts, features, pairs[batch])).mean()

    return fit(model, loss_fn, len(pairs), config, seed, desc, progress)


@torch.no_grad()
def value_metrics(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> Metrics:
    """Loss, and accuracy of (predicted value > 1/2) against the reward, over every generated position."""
    batches = torch.arange(len(rollouts)).split(FEATURE_BATCH)
    scores, rewards = map(torch.cat, zip(*(value_examples(model, rollouts.subset(b), features[b])
                                           for b in batches)))
    correct = (expected_value(model.head, scores) > 0.5) == (rewards > 0.5)
    return Metrics(value_loss(model.head, scores, rewards).item(), correct.float().mean().item())


@torch.no_grad()
def preference_metrics(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor,
                       beta: float) -> Metrics:
    """Loss, and the fraction of pairs whose correct rollout scores higher."""
    margins = torch.cat([pair_margins(model, rollouts, features, batch) for batch in pairs.split(FEATURE_BATCH)])
    return Metrics(-F.logsigmoid(beta * margins).mean().item(), (margins > 0).float().mean().item())
