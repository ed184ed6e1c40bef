"""Per-request guidance parameters, validated at the HTTP edge and again in the engine."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from guidance.errors import GuidanceError

MAX_STRENGTH = 1000.0
# Validation context key: the request gives a KL budget of its own (`validate_entry`).
REQUEST_BUDGET = "request_budget"

# The two bounds of a KL budget (`guidance.kl_budget`), as an entry or a whole request gives them: one
# declaration, so both refuse the same values with the same words (NaN and infinities as such, "Input
# should be a finite number", not by a bound).
MaxKL = Annotated[float | None, Field(
    ge=0.0, allow_inf_nan=False,
    description="KL budget of the whole response (nats, at the sampling temperature): each step steers with "
                "the largest strength (up to `strength`) whose exact KL fits what is left of it.")]
KLPerToken = Annotated[float | None, Field(
    ge=0.0, allow_inf_nan=False,
    description="KL budget of each generated token (nats, at the sampling temperature): each step steers "
                "with the largest strength (up to `strength`) whose exact KL is at most this.")]


class GuidanceParams(BaseModel):
    """One entry of a request's ``guidance`` list.

    `top_k` picks the candidate tokens C (the top-k of the base logits); -1 means the
    whole vocabulary, None the module's default. Tokens outside C get offset 0.
    `min_entropy` gates the entry: at a position where the base distribution's entropy
    H = -sum_y p(y) log p(y) is below it, the entry adds nothing (and scores nothing).
    `max_kl` (nats for the whole response) and `kl_per_token` (nats per generated token) set a
    KL budget (`guidance.kl_budget`): each step uses the largest strength, up to `strength`, whose
    exact KL fits. With a budget (the entry's or the request's) `strength` may be left out; the cap is
    then `MAX_STRENGTH`.
    """

    # NaN and infinities are refused as such ("Input should be a finite number"), not by a bound.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str
    model: str = Field(min_length=1, description="A guide model configured by the operator.")
    strength: float = Field(
        ge=0.0, le=MAX_STRENGTH,
        description="Guidance strength; 0 = unguided. With a KL budget, the largest strength it may use "
                    "(default: the maximum).")
    top_k: int | None = Field(default=None, description="Candidate tokens: top-k of the base logits; -1 = all.")
    min_entropy: float = Field(
        default=0.0, ge=0.0,
        description="Steer only positions where the base distribution's entropy (nats, at the sampling "
                    "temperature) is at least this; 0 = every position.")

    max_kl: MaxKL = None
    kl_per_token: KLPerToken = None

    @model_validator(mode="before")
    @classmethod
    def _budget_caps_strength(cls, data: Any, info: ValidationInfo) -> Any:
        """With a KL budget (the entry's or the request's) and no `strength`, the budget alone sets the
        strength, up to MAX_STRENGTH."""
        if not isinstance(data, dict) or "strength" in data:
            return data
        if (info.context or {}).get(REQUEST_BUDGET) or any(data.get(name) is not None
                                                           for name in ("max_kl", "kl_per_token")):
            return {**data, "strength": MAX_STRENGTH}
        return data

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, top_k: int | None) -> int | None:
        if top_k is not None and top_k != -1 and top_k < 1:
            raise ValueError("top_k must be -1 (whole vocabulary) or at least 1")
        return top_k


def _field_path(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_entry(params_class: type[GuidanceParams], entry: Any, param: str,
                   request_budget: bool = False) -> GuidanceParams:
    """Validate one guidance entry, naming the offending field on error (`request_budget`: the request
    gives a KL budget of its own, so the entry may leave `strength` out)."""
    try:
        return params_class.model_validate(entry, context={REQUEST_BUDGET: request_budget})
    except ValidationError as exc:
        error = exc.errors()[0]
        path = _field_path(param, tuple(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"Unrecognized guidance argument: {path}"
        elif error["type"] == "missing":
            message = f"Missing guidance parameter: {path}"
        else:
            message = f"Invalid value for '{path}': {message}"
        raise GuidanceError(message, path) from None
