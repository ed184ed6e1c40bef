"""Contrast of a tuned and an untuned model: offset strength * (log pi_expert(y | s) - log pi_reference(y | s)).

Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy") and emulated fine-tuning
(Mitchell et al. 2023, "An Emulator for Fine-Tuning Large Language Models using Small Language
Models") steer a base model with the log-probability ratio of a small fine-tuned model (the expert)
and that model before fine-tuning (the reference), for prefix s and next token y:

    pi(y | s)  ~  pi_base(y | s) * (pi_expert(y | s) / pi_reference(y | s))^strength

Mitchell et al. read the ratio as the reward the fine-tuning learnt, so no reward model is needed.
At strength 1 it is their rule; the strength scales the ratio as the other modules' strengths scale
their rewards.

An entry names two guide models with `lm` heads and the base's tokenizer: `model` (the expert) and
`reference`. It has two terms: the expert's log-softmax at weight +1 and the reference's at weight
-1. The batch runtime runs each term as a group of its own guide model, so caching, batching, the
entropy gate and the KL budget treat them like any other entry, and their offsets add on the same
candidates before the exact KL is taken. Log-probabilities are read as they are: an lm head's
`reward_scale` (a GenARM reward LM's) does not apply.
"""

from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from guidance.module import GuidanceModule, GuideTerm
from guidance.params import GuidanceParams


class ContrastParams(GuidanceParams):
    """A `contrast` entry: `model` is the expert (the tuned model), `reference` the model before tuning."""

    reference: str = Field(min_length=1, description="The untuned guide model (an lm head), configured by the "
                                                     "operator; `model` is the tuned one.")

    @field_validator("reference")
    @classmethod
    def _reference_differs(cls, reference: str, info: ValidationInfo) -> str:
        if reference == info.data.get("model"):
            raise ValueError("reference must be another guide model than model (their contrast would be 0)")
        return reference


class Contrast(GuidanceModule):
    name = "contrast"
    params_class = ContrastParams
    head_types = ("lm",)
    description = ("Proxy-tuning / emulated fine-tuning: offset strength * (log pi_expert(y | s) - "
                   "log pi_reference(y | s)) from a tuned model (`model`) and its untuned reference (`reference`).")
    normalises_over_vocabulary = True
    uses_reward_scale = False

    def terms(self, params: GuidanceParams) -> tuple[GuideTerm, ...]:
        assert isinstance(params, ContrastParams)
        return (GuideTerm("model", params.model, 1.0), GuideTerm("reference", params.reference, -1.0))

    def token_scores(self, head_output: Tensor) -> Tensor:
        return torch.log_softmax(head_output, dim=-1)

    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        """strength * log pi(y | s) of one term (the strength carries the term's sign)."""
        return strength * scores
