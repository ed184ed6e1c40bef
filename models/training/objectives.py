"""Training objectives of guide models.

A guide model under training is a ``Decoder`` backbone (the base, a cut of its first
layers, or another checkpoint with the same tokenizer) plus a head from
``models.runtime.heads``. Its embeddings and lower layers stay frozen at the base's
weights, so their output on the rollouts ("features") is computed once and shared
by every guide; the top layers, the final norm and the head are trained. h_t is the
final-norm hidden state at position t of a rollout x (prompt + completion) with
final reward R.

Token scores, one per (prefix s = x_<t, next token y = x_t):
    Q-type heads (scoring "q"):  head(h_{t-1})[x_t]   (the prefix scores every next token)
    V-type heads (scoring "v"):  head(h_t)            (the candidate's own hidden state)
    lm head:                     log softmax(head(h_{t-1}))[x_t] = log pi_r(x_t | x_<t)

Value objectives, every target position t of every rollout one example (the tokens the base
wrote after the roll-in's cut; every generated token when there is no cut):
    bernoulli  BCE(logit, R)        histogram  CE(atom logits, atom of R)        expected  (V - R)^2
Preference objective, pairs (x_w correct, x_l incorrect) of one prompt:
    -log sigmoid(beta * (S(x_w) - S(x_l)))      (Bradley-Terry)
with S(x) the sequence score a SequenceScorer serves: sum_t score_t over the completion for token-reward
heads (ARM; GenARM for lm), the score at x's last real token (its eos when it has one) for a reward head.
Likelihood objective (rejection-sampling fine-tuning of an lm head; the caller keeps only the rollouts
the verifier marked right): the mean over every completion token of the batch of
    -log pi(x_t | x_<t)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.runtime.decoder import Decoder, attend_causal
from models.runtime.heads import GuideHead, expected_value
from models.training.loop import FitConfig, FitResult, fit
from models.training.rollouts import Rollouts

FEATURE_BATCH = 256  # rows per no-grad forward


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
        x = layer(x, cos, sin, lambda q, k, v: attend_causal(q, k, v, causal))
    return x


@torch.no_grad()
def frozen_features(decoder: Decoder, input_ids: Tensor, num_layers: int) -> Tensor:
    """Output ``[N, T, H]`` of the embeddings and the first ``num_layers`` layers, in batches."""
    return torch.cat([run_blocks(decoder, decoder.embed_tokens(ids), 0, num_layers)
                      for ids in input_ids.split(FEATURE_BATCH)])


class GuideTrainee(nn.Module):
    """Decoder + head, with the embeddings and all but the top ``trainable_layers`` layers frozen
(0: only the final norm and the head train)."""

    def __init__(self, decoder: Decoder, head: GuideHead, trainable_layers: int) -> None:
        super().__init__()
        self.decoder, self.head = decoder, head
        self.split = decoder.config.num_hidden_layers - trainable_layers
        if not 0 <= self.split <= decoder.config.num_hidden_layers:
            raise ValueError(f"trainable_layers must be in [0, {decoder.config.num_hidden_layers}], "
                             f"got {trainable_layers}")
        decoder.embed_tokens.requires_grad_(False)  # also the tied output embedding of arm / lm heads
        for layer in decoder.layers[: self.split]:
            layer.requires_grad_(False)

    def features(self, input_ids: Tensor) -> Tensor:
        """Output of the frozen part, ``[N, T, H]``."""
        return frozen_features(self.decoder, input_ids, self.split)

    def token_scores(self, input_ids: Tensor, features: Tensor, mask: Tensor) -> Tensor:
        """Score of (x_<t, x_t) at every position t where ``mask`` ``[B, T]`` is True (never position
        0), in row-major order: ``[M]`` (``[M, m]`` for histograms)."""
        top = run_blocks(self.decoder, features, self.split, self.decoder.config.num_hidden_layers)
        hidden = self.decoder.norm(top)  # [B, T, H]
        embedding = self.decoder.output_embedding if self.head.uses_output_embedding else None
        if self.head.scoring == "v":
            return self.head(hidden[mask], embedding)  # the candidate's own hidden state h_t
        prefix = torch.zeros_like(mask)
        prefix[:, :-1] = mask[:, 1:]  # t-1 for every marked t: same row-major order
        return self.head.score_tokens(hidden[prefix], input_ids[mask], embedding)

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


def select(rollouts: Rollouts, features: Tensor, rows: Tensor) -> tuple[Rollouts, Tensor]:
    """The rollouts ``rows`` and their features, without padding columns none of them uses."""
    subset = rollouts.subset(rows).trimmed()
    return subset, features[rows, : subset.input_ids.shape[1]]


def value_examples(model: GuideTrainee, rollouts: Rollouts, features: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Scores and rewards of every target position of rollouts ``rows``: ``[M(, m)]``, ``[M]``."""
    subset, subset_features = select(rollouts, features, rows)
    mask = subset.target_mask
    scores = model.token_scores(subset.input_ids, subset_features, mask)
    return scores, subset.rewards[:, None].expand_as(mask)[mask]


def sequence_scores(model: GuideTrainee, rollouts: Rollouts, features: Tensor, rows: Tensor) -> Tensor:
    """S(x) of rollouts ``rows`` ``[N]``, as ``models.runtime.sequence.SequenceScorer`` serves it: a
    reward head's score at x's last real token (its eos when it has one); otherwise the sum of the
    completion's token scores."""
    subset, subset_features = select(rollouts, features, rows)
    mask = subset.completion_mask
    if model.head.type == "reward":
        mask = last_token_mask(mask)
    scores = model.token_scores(subset.input_ids, subset_features, mask)
    return torch.zeros(len(rows), dtype=scores.dtype).index_add(0, mask.nonzero()[:, 0], scores)


def pair_margins(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor) -> Tensor:
    """S(x_w) - S(x_l) for ``pairs`` ``[P, 2]`` of (correct, incorrect) row indices: ``[P]``."""
    sums = sequence_scores(model, rollouts, features, pairs.T.reshape(-1))  # winners, then losers
    return sums[: len(pairs)] - sums[len(pairs):]


def fit_value(model: GuideTrainee, rollouts: Rollouts, features: Tensor, config: FitConfig, seed: int, desc: str,
              progress: bool, checkpoint: Path | None = None,
              validation: tuple[Rollouts, Tensor] | None = None) -> FitResult:
    """Regress every target position of ``rollouts`` onto its final reward; with ``validation``
    (held-out rollouts and their features) keep the weights of the best validation loss."""
    def loss_fn(batch: Tensor) -> Tensor:
        return value_loss(model.head, *value_examples(model, rollouts, features, batch))

    validation_loss = None if validation is None else lambda: value_metrics(model, *validation).loss
    return fit(model, loss_fn, len(rollouts), config, seed, desc, progress, checkpoint, validation_loss)


def fit_preference(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor, beta: float,
                   config: FitConfig, seed: int, desc: str, progress: bool, checkpoint: Path | None = None,
                   validation: tuple[Rollouts, Tensor, Tensor] | None = None) -> FitResult:
    """Bradley-Terry on (correct, incorrect) pairs of rollouts of one prompt; with ``validation``
    (held-out rollouts, their features and pairs) keep the weights of the best validation loss."""
    def loss_fn(batch: Tensor) -> Tensor:
        return -F.logsigmoid(beta * pair_margins(model, rollouts, features, pairs[batch])).mean()

    validation_loss = None if validation is None else lambda: preference_metrics(model, *validation, beta).loss
    return fit(model, loss_fn, len(pairs), config, seed, desc, progress, checkpoint, validation_loss)


def completion_log_likelihoods(model: GuideTrainee, rollouts: Rollouts, features: Tensor, rows: Tensor) -> Tensor:
    """log pi(x_t | x_<t) of every completion token of rollouts ``rows`` (an lm head): ``[M]``."""
    subset, subset_features = select(rollouts, features, rows)
    return model.token_scores(subset.input_ids, subset_features, subset.completion_mask)


def fit_likelihood(model: GuideTrainee, rollouts: Rollouts, features: Tensor, config: FitConfig, seed: int, desc: str,
                   progress: bool, checkpoint: Path | None = None,
                   validation: tuple[Rollouts, Tensor] | None = None) -> FitResult:
    """Maximum likelihood of the completions of ``rollouts`` (mean -log pi per completion token of a batch of
    rollouts); with ``validation`` (held-out rollouts and their features) keep the weights of the best
    validation loss."""
    if model.head.type != "lm":
        raise ValueError(f"the likelihood objective trains an lm head, not {model.head.type!r}")

    def loss_fn(batch: Tensor) -> Tensor:
        return -completion_log_likelihoods(model, rollouts, features, batch).mean()

    validation_loss = None if validation is None else lambda: likelihood_metrics(model, *validation).loss
    return fit(model, loss_fn, len(rollouts), config, seed, desc, progress, checkpoint, validation_loss)


@dataclass(frozen=True)
class LikelihoodMetrics:
    """Mean -log pi per completion token (nats), and its exponential, the perplexity."""

    loss: float
    perplexity: float


@torch.no_grad()
def likelihood_metrics(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> LikelihoodMetrics:
    """The likelihood objective's loss over every completion token of ``rollouts``, and the perplexity."""
    log_likelihoods = torch.cat([completion_log_likelihoods(model, rollouts, features, rows)
                                 for rows in torch.arange(len(rollouts)).split(FEATURE_BATCH)])
    loss = float(-log_likelihoods.double().mean())
    return LikelihoodMetrics(loss, math.exp(loss))


@torch.no_grad()
def value_metrics(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> Metrics:
    """Loss, and accuracy of (predicted value > 1/2) against the reward, over every target position."""
    batches = torch.arange(len(rollouts)).split(FEATURE_BATCH)
    scores, rewards = map(torch.cat, zip(*(value_examples(model, rollouts, features, b) for b in batches)))
    correct = (expected_value(model.head, scores) > 0.5) == (rewards > 0.5)
    return Metrics(value_loss(model.head, scores, rewards).item(), correct.float().mean().item())


@torch.no_grad()
def preference_metrics(model: GuideTrainee, rollouts: Rollouts, features: Tensor, pairs: Tensor,
                       beta: float) -> Metrics:
    """Loss, and the fraction of pairs whose correct rollout scores higher."""
    margins = torch.cat([pair_margins(model, rollouts, features, batch) for batch in pairs.split(FEATURE_BATCH)])
    return Metrics(-F.logsigmoid(beta * margins).mean().item(), (margins > 0).float().mean().item())


@dataclass(frozen=True)
class RewardSpread:
    """Mean and standard deviation of the sequence reward S(x) over rollouts; ``scale`` = 1 / std."""

    mean: float
    std: float
    sequences: int

    @property
    def scale(self) -> float:
        return 1.0 / self.std


@torch.no_grad()
def reward_spread(model: GuideTrainee, rollouts: Rollouts, features: Tensor) -> RewardSpread:
    """The spread of S(x) (``sequence_scores``, the raw head) over every rollout; ValueError when S is
    constant (nothing to scale by)."""
    scores = torch.cat([sequence_scores(model, rollouts, features, rows)
                        for rows in torch.arange(len(rollouts)).split(FEATURE_BATCH)]).double()
    std = float(scores.std(correction=0)) if len(scores) > 1 else 0.0
    if not std > 0:
        raise ValueError(f"the sequence reward is constant over {len(scores)} rollouts: it cannot be normalised")
    return RewardSpread(float(scores.mean()), std, len(scores))


@torch.no_grad()
def calibration_error(model: GuideTrainee, rollouts: Rollouts, features: Tensor, bins: int = 10) -> float:
    """Expected calibration error of a value head over every target position: with the predicted
    values v in [0, 1] split into ``bins`` equal-width bins B_b,
    ECE = sum_b |B_b| / N * |mean_{B_b}(v) - mean_{B_b}(R)|."""
    batches = torch.arange(len(rollouts)).split(FEATURE_BATCH)
    scores, rewards = map(torch.cat, zip(*(value_examples(model, rollouts, features, b) for b in batches)))
    values = expected_value(model.head, scores).clamp(0.0, 1.0)
    bin_index = (values * bins).long().clamp_max(bins - 1)
    count = torch.zeros(bins).index_add(0, bin_index, torch.ones_like(values))
    value_sum = torch.zeros(bins).index_add(0, bin_index, values)
    reward_sum = torch.zeros(bins).index_add(0, bin_index, rewards)
    return float((value_sum - reward_sum).abs().sum() / len(values))
