"""Guide heads: map the backbone's final-norm hidden states to guidance scores.

Two scoring shapes (DESIGN.md section 3):

- Q-type (``scoring="q"``): the hidden state of prefix s, ``[B, H]``, scores every
  vocabulary token y as the next token: ``[B, V]`` (or ``[B, V, m]``).
- V-type (``scoring="v"``): the hidden state of each candidate token appended to s
  (``Decoder.score_candidates``), ``[B, k, H]``, gives one score per candidate:
  ``[B, k]`` (or ``[B, k, m]``). On the last token of a whole sequence, ``[B, H]``, it
  scores the sequence: ``[B]`` (or ``[B, m]``; ``models.runtime.sequence``).

======== =============================================== =========== ============
type     score                                           Q-type      V-type
======== =============================================== =========== ============
bernoulli logit of P(R = 1 | s, y)                        [B, V]      [B, k]
histogram logits over m return atoms z_j (in the config)  [B, V, m]   [B, k, m]
expected  predicted expected reward V(s, y)               [B, V]      [B, k]
reward    sequence reward r(x) at x's last token          --          [B, k]
arm       r(s, y) = e_y . (U V^T h_s) + b . h_s           [B, V]      --
lm        backbone LM logits (GenARM; caller log-softmaxes) [B, V]    --
======== =============================================== =========== ============

A head is stored in the guide-model directory, next to the backbone checkpoint:
``guide_head.json`` (``{"type": ..., "scoring": ..., params}``) and ``head.safetensors``.
A plain causal-LM checkpoint (no ``guide_head.json``; its ``config.json`` names a
``...ForCausalLM`` architecture) is a guide model too: its own LM head, served as an ``lm`` head.
All leading dimensions are carried through, so heads also apply to ``[B, T, H]`` in training.

``expected_value`` maps the scores of a value head (``VALUE_HEAD_TYPES``) to an expected
reward: sigmoid of a bernoulli logit, sum_j softmax(logits)_j z_j of a histogram, the
score itself for expected and reward heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.runtime.loader import CheckpointError

HEAD_CONFIG_FILE = "guide_head.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
CAUSAL_LM_HEAD = {"type": "lm", "scoring": "q"}  # the head of a plain causal-LM checkpoint
SCORINGS = ("q", "v")


class GuideHead(nn.Module):
    """Base class. ``forward(hidden, output_embedding)``: the backbone's output embedding
    ``[V, H]`` is passed for heads that score tokens through it (``arm``, ``lm``)."""

    type: ClassVar[str]
    scorings: ClassVar[tuple[str, ...]] = SCORINGS
    uses_output_embedding: ClassVar[bool] = False

    def __init__(self, hidden_size: int, vocab_size: int, scoring: str) -> None:
        super().__init__()
        if scoring not in self.scorings:
            raise ValueError(f"head type {self.type!r} does not support scoring={scoring!r}; use {self.scorings}")
        self.hidden_size, self.vocab_size, self.scoring = hidden_size, vocab_size, scoring
        # Token-reward heads (arm, lm): the factor the served token rewards are multiplied by, set by the
        # trainer so that the sequence reward has unit spread on validation data (strength 1 means the same
        # for every model of a kind). Training reads the raw scores.
        self.reward_scale = 1.0

    def params(self) -> dict[str, Any]:
        """Type-specific JSON parameters (besides ``type`` and ``scoring``)."""
        return {}

    def config(self) -> dict[str, Any]:
        scale = {"reward_scale": self.reward_scale} if self.reward_scale != 1.0 else {}
        return {"type": self.type, "scoring": self.scoring, **self.params(), **scale}

    def score_tokens(self, hidden: Tensor, tokens: Tensor, output_embedding: Tensor | None = None) -> Tensor:
        """Q-type: the token reward of one given next token per prefix, ``forward(hidden)[i, tokens[i]]``
        (log-softmaxed over the vocabulary for ``lm`` heads): hidden ``[M, H]``, tokens ``[M]`` ->
        ``[M]`` (``[M, m]``). Heads override it to skip the other V - 1 scores (training reads one
        token per position)."""
        scores = self(hidden, output_embedding)
        return scores[torch.arange(len(tokens), device=tokens.device), tokens]


class _ValueHead(GuideHead):
    """Linear value head with ``num_atoms`` outputs per scored token (1 = a scalar score)."""

    def __init__(self, hidden_size: int, vocab_size: int, scoring: str, num_atoms: int = 1) -> None:
        super().__init__(hidden_size, vocab_size, scoring)
        self.num_atoms = num_atoms
        scored = vocab_size if scoring == "q" else 1  # Q-type: every token y; V-type: the token already appended
        self.proj = nn.Linear(hidden_size, scored * num_atoms)

    def forward(self, hidden: Tensor, output_embedding: Tensor | None = None) -> Tensor:
        """Q: ``[..., H] -> [..., V(, m)]``; V: ``[..., k, H] -> [..., k(, m)]``."""
        out = self.proj(hidden)
        if self.scoring == "q":
            out = out.unflatten(-1, (self.vocab_size, self.num_atoms))
        return out.squeeze(-1) if self.num_atoms == 1 else out

    def score_tokens(self, hidden: Tensor, tokens: Tensor, output_embedding: Tensor | None = None) -> Tensor:
        if self.scoring != "q":
            raise RuntimeError(f"a V-type {self.type!r} head scores appended candidates, not next tokens")
        weight = self.proj.weight.view(self.vocab_size, self.num_atoms, self.hidden_size)[tokens]  # [M, m, H]
        out = (weight @ hidden.unsqueeze(-1)).squeeze(-1) + self.proj.bias.view(self.vocab_size, -1)[tokens]
        return out.squeeze(-1) if self.num_atoms == 1 else out


class BernoulliHead(_ValueHead):
    """Logit of the probability that the final reward is 1; Q-sharp offset log(1 - p + p e^eta)."""

    type = "bernoulli"


class ExpectedHead(_ValueHead):
    """Predicted expected reward (CD-FUDGE prefix scorer); offset lambda * V."""

    type = "expected"


class RewardHead(_ValueHead):
    """Scalar sequence reward r(x) (outcome reward model), read at the last token of x; V-type only."""

    type = "reward"
    scorings = ("v",)


class HistogramHead(_ValueHead):
    """Logits of a categorical return distribution over atoms z_j; offset logsumexp_j(log p_j + eta z_j)."""

    type = "histogram"

    def __init__(self, hidden_size: int, vocab_size: int, scoring: str, atoms: list[float]) -> None:
        atoms = [float(z) for z in atoms]
        if len(atoms) < 2 or not all(map(math.isfinite, atoms)) or any(a >= b for a, b in zip(atoms, atoms[1:])):
            raise ValueError(f"histogram atoms must be >= 2 finite, strictly increasing values, got {atoms}")
        super().__init__(hidden_size, vocab_size, scoring, num_atoms=len(atoms))
        self.atom_values = atoms  # exact values for the JSON config, whatever the buffer's dtype
        self.register_buffer("atoms", torch.tensor(atoms), persistent=False)  # z [m]

    def params(self) -> dict[str, Any]:
        return {"atoms": self.atom_values}


class ARMHead(GuideHead):
    """Low-rank autoregressive reward head: r(s, y) = e_y . (W h_s) + b . h_s, W = U V^T of rank r.

    All y come from one forward: ``[..., H] -> [..., V]``.
    """

    type = "arm"
    scorings = ("q",)
    uses_output_embedding = True

    def __init__(self, hidden_size: int, vocab_size: int, scoring: str, rank: int) -> None:
        super().__init__(hidden_size, vocab_size, scoring)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"arm rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.u = nn.Parameter(torch.randn(hidden_size, rank) * 0.02)  # U [H, r]
        self.v = nn.Parameter(torch.randn(hidden_size, rank) * 0.02)  # V [H, r]
        self.b = nn.Parameter(torch.zeros(hidden_size))  # b [H]

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def forward(self, hidden: Tensor, output_embedding: Tensor) -> Tensor:
        wh = (hidden @ self.v) @ self.u.T  # W h = U (V^T h), [..., H]
        return wh @ output_embedding.T + (hidden @ self.b).unsqueeze(-1)  # e_y . W h + b . h, [..., V]

    def score_tokens(self, hidden: Tensor, tokens: Tensor, output_embedding: Tensor | None = None) -> Tensor:
        wh = (hidden @ self.v) @ self.u.T
        return (wh * output_embedding[tokens]).sum(-1) + hidden @ self.b


class LMHead(GuideHead):
    """The backbone's own LM head (GenARM reward LM): next-token logits ``[..., V]``."""

    type = "lm"
    scorings = ("q",)
    uses_output_embedding = True

    def forward(self, hidden: Tensor, output_embedding: Tensor) -> Tensor:
        return F.linear(hidden, output_embedding)

    def score_tokens(self, hidden: Tensor, tokens: Tensor, output_embedding: Tensor | None = None) -> Tensor:
        """log pi_r(token | prefix): the GenARM token reward (normalised over the whole vocabulary)."""
        log_probs = torch.log_softmax(self(hidden, output_embedding), dim=-1)
        return log_probs[torch.arange(len(tokens), device=tokens.device), tokens]


HEAD_TYPES: dict[str, type[GuideHead]] = {
    cls.type: cls for cls in (BernoulliHead, HistogramHead, ExpectedHead, RewardHead, ARMHead, LMHead)
}
VALUE_HEAD_TYPES = ("reward", "expected", "bernoulli", "histogram")  # heads whose scores expected_value reads
TOKEN_REWARD_HEADS = ("arm", "lm")  # heads whose token scores are rewards a sequence sums
_PARAMS: dict[str, tuple[str, ...]] = {"histogram": ("atoms",), "arm": ("rank",)}


def build_head(config: dict[str, Any], hidden_size: int, vocab_size: int) -> GuideHead:
    """Construct a freshly initialised head from its JSON config; ValueError names any bad field."""
    head_type = config.get("type")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"unknown guide head type {head_type!r}; known: {sorted(HEAD_TYPES)}")
    params = {k: v for k, v in config.items() if k not in ("type", "scoring", "reward_scale")}
    reward_scale = config.get("reward_scale", 1.0)
    if "reward_scale" in config and head_type not in TOKEN_REWARD_HEADS:
        raise ValueError(f"reward_scale applies to token-reward heads {TOKEN_REWARD_HEADS}, not {head_type!r}")
    if isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float)) \
            or not math.isfinite(reward_scale) or reward_scale <= 0:
        raise ValueError(f"reward_scale must be a positive finite number, got {reward_scale!r}")
    wanted = _PARAMS.get(head_type, ())
    if unknown := sorted(params.keys() - set(wanted)):
        raise ValueError(f"unknown parameters {unknown} for guide head type {head_type!r}; it takes {list(wanted)}")
    if missing := sorted(set(wanted) - params.keys()):
        raise ValueError(f"guide head type {head_type!r} needs parameters {missing}")
    cls = HEAD_TYPES[head_type]
    # Without a "scoring", value heads default to "q"; single-shape heads take their only one.
    head = cls(hidden_size, vocab_size, config.get("scoring", cls.scorings[0]), **params)
    head.reward_scale = float(reward_scale)
    return head


def expected_reward(scores: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
    """Expected reward from the scores of a value head of ``head_type``: ``[...]`` (``[..., m]`` for
    histograms over ``atoms`` ``[m]``) -> ``[...]``.

    bernoulli: sigmoid(logit) = P(R = 1); histogram: sum_j softmax(logits)_j z_j;
    expected, reward: the score itself. ValueError for heads that predict no reward value.
    """
    if head_type == "bernoulli":
        return torch.sigmoid(scores)
    if head_type == "histogram":
        return torch.softmax(scores, dim=-1) @ atoms.to(scores.dtype)
    if head_type in VALUE_HEAD_TYPES:
        return scores
    raise ValueError(f"a {head_type!r} head does not predict a reward value; expected_value needs one of "
                     f"{VALUE_HEAD_TYPES}")


def expected_value(head: GuideHead, scores: Tensor) -> Tensor:
    """``expected_reward`` of ``head``'s scores."""
    return expected_reward(scores, head.type, getattr(head, "atoms", None))


def save_head(head: GuideHead, directory: str | Path) -> None:
    """Write ``guide_head.json`` and ``head.safetensors`` into ``directory`` (created if needed)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / HEAD_CONFIG_FILE).write_text(json.dumps(head.config(), indent=2) + "\n")
    save_file({k: t.detach().contiguous().cpu() for k, t in head.state_dict().items()}, str(root / HEAD_WEIGHTS_FILE))


def read_head_config(directory: str | Path) -> dict[str, Any]:
    """The head config of a guide-model directory: its ``guide_head.json``, or `CAUSAL_LM_HEAD` for a
    plain causal-LM checkpoint; FileNotFoundError when it is neither (ValueError for unreadable JSON)."""
    root = Path(directory)
    config_file = root / HEAD_CONFIG_FILE
    if config_file.is_file():
        return json.loads(config_file.read_text())
    model_config = root / "config.json"
    architectures = (json.loads(model_config.read_text()).get("architectures") or []) if model_config.is_file() else []
    if any(str(name).endswith("ForCausalLM") for name in architectures):
        return dict(CAUSAL_LM_HEAD)
    raise FileNotFoundError(f"no {HEAD_CONFIG_FILE} in {root}, and its config.json names no causal-LM architecture")


def load_head(
    directory: str | Path,
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> GuideHead:
    """Read a head saved by ``save_head`` (or a plain causal-LM checkpoint's, ``read_head_config``);
    CheckpointError if its weights do not match its config."""
    root = Path(directory)
    weights_file = root / HEAD_WEIGHTS_FILE
    head = build_head(read_head_config(root), hidden_size, vocab_size)
    expected = {k: t.shape for k, t in head.state_dict().items()}
    state = load_file(str(weights_file)) if weights_file.is_file() else {}
    if state.keys() != expected.keys() or any(state[k].shape != s for k, s in expected.items()):
        got = {k: tuple(t.shape) for k, t in state.items()}
        want = {k: tuple(s) for k, s in expected.items()}
        raise CheckpointError(f"{weights_file} holds {got}, but a {head.type!r} head needs {want}")
    head.load_state_dict(state)
    return head.to(device=device, dtype=dtype).eval()
