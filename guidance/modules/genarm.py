"""GenARM: offset alpha * log pi_r(y | s) from an autoregressive reward LM.

The reward LM's logits are log-softmaxed over the whole vocabulary before the
candidates are picked, so offsets are true log-probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.module import GuidanceModule


class GenARM(GuidanceModule):
    name = "genarm"
    head_types = ("lm",)
    description = "GenARM: offset strength * log pi_r(y | s) from an autoregressive reward LM."
    normalises_over_vocabulary = True

    def token_scores(self, head_output: Tensor) -> Tensor:
        return torch.log_softmax(head_output, dim=-1)

    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        return strength * scores
