"""Per-configuration metrics over the K samples of each of P prompts.

- pass@1 = (1 / PK) sum_i sum_j r_ij, the mean verifier reward.
- its standard error: the standard error of the mean over prompts of each prompt's mean reward
  m_i = (1 / K) sum_j r_ij, SE = sqrt(sum_i (m_i - pass@1)^2 / (P - 1)) / sqrt(P) (the K samples
  of a prompt are not independent draws of the prompt set; the P prompts are); None for P = 1.
- maj@k (verifiers with an answer extractor): for prompt i, a_i = the most common non-None
  answer among its K samples (ties: the answer seen first); the prompt scores 1 when some
  sample carrying a_i has reward 1, else 0 (also 0 when no sample gives an answer); maj@k is
  the mean over prompts.
- mean KL = (1 / PK) sum_ij KL_ij, where KL_ij is, by how the configuration samples:
  * per-step guidance (and the base): the server's report ``guidance.kl``, the exact
    sum over the completion's tokens of KL(pi_guided(. | s_t) || pi_base(. | s_t)), both at the
    sampling temperature (the Q-sharp paper's KL); 0 for the base.
  * best-of-N (hard: keep the best score): log N - (N - 1) / N, the standard analytic value
    (Stiennon et al. 2020), which Beirami et al. 2024 prove is an upper bound on the true
    KL(pi_bon || pi); plus the kept candidate's reported KL when the candidates were guided.
  * soft best-of-N (a selection temperature > 0): log N, a bound for any rule that keeps one
    of N samples (the kept sample's probability is at most N times its base probability);
    plus the kept candidate's reported KL.
  * blockwise: the reported KL of its per-step guidance only, if it has any; the KL of the
    block selection is not estimated (no estimate is invented: ``mean_kl`` is None when
    there is nothing reported).
  * pruned best-of-N: log N, the bound for any rule that keeps one of N samples (the kept one
    is the best of the unpruned, not of all N, so log N - (N-1)/N does not apply).
- KL per token = sum_ij KL_ij / sum_ij T_ij, with T_ij the completion's tokens.
- generated tokens per sample: the tokens the server generated for a sample, every candidate
  of a search included (the search report's ``generated_tokens``): the compute it cost.
- over budget (configurations whose guidance gives ``max_kl`` B): the number of samples whose
  reported KL exceeds B (1 + KL_BUDGET_RTOL), the server's float32 rounding of the running sum;
  the server guarantees 0.
- steered fraction (per-step guidance): sum_ij steps_ij / sum_ij T_ij, the share of tokens an
  entry steered (below 1 with entropy-gated entries, ``min_entropy``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from workflows.evaluation.configs import EvalConfig
from workflows.evaluation.samples import Sample

REPORTED = "reported"
BON_BOUND = "log N - (N-1)/N bound"
SOFT_BON_BOUND = "log N bound"
SELECTION_NOT_ESTIMATED = "selection KL not estimated"
TOKENS_ALL = "all generated"
TOKENS_KEPT = "kept candidates only"
# Relative tolerance of the budget check: the float32 rounding of the server's running KL sum.
KL_BUDGET_RTOL = 1e-6


def pass_at_1(samples: Sequence[Sample]) -> float:
    """Mean verifier reward over all samples."""
    return sum(s.reward for s in samples) / len(samples)


def pass_at_1_stderr(samples: Sequence[Sample]) -> float | None:
    """Standard error over prompts of the per-prompt mean reward (module docstring); None for one prompt."""
    by_prompt: dict[int, list[float]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt_index, []).append(sample.reward)
    means = [sum(rewards) / len(rewards) for rewards in by_prompt.values()]
    if len(means) < 2:
        return None
    mean = sum(means) / len(means)
    return math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means))


def over_budget(samples: Sequence[Sample], max_kl: float) -> int:
    """The samples whose reported KL exceeds ``max_kl`` by more than the relative KL_BUDGET_RTOL."""
    return sum(s.kl > max_kl * (1 + KL_BUDGET_RTOL) for s in samples)


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most common non-None answer, ties broken by first occurrence; None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # Counter keeps first-seen order; max keeps the first best


def maj_at_k(samples: Sequence[Sample]) -> float:
    """Mean over prompts of 1[some sample carrying the majority answer has reward 1]."""
    by_prompt: dict[int, list[Sample]] = {}
    for sample in samples:
        by_prompt.setdefault(sample.prompt_index, []).append(sample)
    correct = 0
    for group in by_prompt.values():
        answer = majority_answer([s.answer for s in group])
        correct += answer is not None and any(s.answer == answer and s.reward >= 1.0 for s in group)
    return correct / len(by_prompt)


def best_of_n_kl(n: int) -> float:
    """KL_bon = log N - (N - 1) / N (nats): 0 for N = 1."""
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def selection_kl(config: EvalConfig) -> tuple[float | None, str | None]:
    """KL a configuration's search adds to each sample, and how it is obtained: (0, None) without
    search, (None, note) when it is not estimated."""
    search = config.search
    if search is None:
        return 0.0, None
    if search["type"] == "best_of_n":
        if search.get("temperature", 0.0) > 0 or search.get("prune") is not None:
            return math.log(search["n"]), SOFT_BON_BOUND
        return best_of_n_kl(search["n"]), BON_BOUND
    return None, SELECTION_NOT_ESTIMATED


def kl_source(config: EvalConfig) -> str:
    """How the configuration's mean KL is obtained, e.g. "reported", "log N - (N-1)/N bound",
    "reported + log N - (N-1)/N bound", "reported; selection KL not estimated"."""
    _, selection = selection_kl(config)
    if selection is None:
        return REPORTED
    if selection == SELECTION_NOT_ESTIMATED:
        return f"{REPORTED}; {selection}" if config.guidance else selection
    return f"{REPORTED} + {selection}" if config.guidance else selection


@dataclass(frozen=True)
class ResultRow:
    config: str
    method: str
    strength: float | None
    prompts: int
    samples_per_prompt: int
    pass_at_1: float
    pass_at_1_stderr: float | None  # None: one prompt
    maj_at_k: float | None  # None: the verifier names no answers
    mean_kl: float | None  # nats per completion; None: not estimated
    kl_source: str
    kl_per_token: float | None
    reported_kl: float  # mean of the responses' guidance.kl alone
    kl_complete: bool  # False when the search's selection is left out of mean_kl
    kl_budget: float | None  # the guidance's max_kl; None without
    over_budget: int | None  # samples whose reported KL exceeds kl_budget; None without a budget
    tokens: int
    tokens_counted: str
    seconds: float
    generated_tokens_per_sample: float
    steered_fraction: float | None  # None without per-step guidance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(config: EvalConfig, samples: Sequence[Sample], seconds: float, with_majority: bool) -> ResultRow:
    """The metrics of one configuration's samples (module docstring)."""
    prompts = len({s.prompt_index for s in samples})
    reported = sum(s.kl for s in samples) / len(samples)
    selection, _ = selection_kl(config)
    if selection is None:
        mean_kl = reported if config.guidance else None
    else:
        mean_kl = reported + selection
    tokens = sum(s.completion_tokens for s in samples)
    budget = config.kl_budget
    return ResultRow(
        config=config.name, method=config.method, strength=config.strength, prompts=prompts,
        samples_per_prompt=len(samples) // prompts, pass_at_1=pass_at_1(samples),
        pass_at_1_stderr=pass_at_1_stderr(samples),
        maj_at_k=maj_at_k(samples) if with_majority else None, mean_kl=mean_kl, kl_source=kl_source(config),
        kl_per_token=None if mean_kl is None or tokens == 0 else mean_kl * len(samples) / tokens,
        reported_kl=reported, kl_complete=selection is not None, kl_budget=budget,
        over_budget=None if budget is None else over_budget(samples, budget), tokens=tokens,
        tokens_counted=TOKENS_ALL if config.search is None else TOKENS_KEPT, seconds=seconds,
        generated_tokens_per_sample=sum(s.completion_tokens if s.generated_tokens is None else s.generated_tokens
                                        for s in samples) / len(samples),
        steered_fraction=sum(s.steps for s in samples) / tokens if config.guidance and tokens else None,
    )
