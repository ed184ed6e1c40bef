"""How well a pruning scorer's score of a completion's first t tokens predicts its final reward.

    .venv/bin/python -m bench.prefix_scores --rollouts ROLLOUTS.jsonl --model runs/smollm2/base \
        --guide-models runs/smollm2/guides/guides.json --scorers value-r2 value-r1 \
        [--lengths 4,8,12] [--n 8,16,32] [--draws 100] [--seed 0] --out DIR

Pruned best-of-N (`search.prune`, server/search.py `_prune`) scores the live candidates of a pick
on their first t tokens and aborts the lowest-scored. It can only pay if that prefix score
predicts the final verifier reward. Measured here on base samples with a 0/1 verifier reward,
K per prompt, per scorer and per checkpoint t in --lengths, and on the whole completion ("full"):

- AUROC of the score against the reward, all prompts pooled: P(score of a random right sample >
  score of a random wrong one), ties counting 1/2;
- within-prompt pairwise accuracy: the same over the (right, wrong) pairs of one prompt only,
  pooled over all such pairs. Pruning ranks the candidates of one prompt, so this is what it needs;
- simulated pruning at the single checkpoint t, for N in --n: --draws seeded draws of N of a
  prompt's K samples without replacement (the same draws for every scorer and t); in each,
  P(some right candidate survives) when the server's rule drops the lowest-scored
  floor(live * fraction) live candidates (at most N - min_keep; ties: the later candidate), when
  as many live candidates are dropped uniformly at random (exact, hypergeometric, given the draw),
  and without pruning. A verifier-picked best-of-N is right exactly when a right candidate
  survives, so each is that configuration's pass@1; means over prompts and draws. Beside it the
  tokens generated per pick, an abort at t saving all later tokens, and plain best-of-N's exact
  pass@1 and tokens for a range of N: the comparison at equal tokens.

Live at t, as `_prune` decides: a checkpoint at t scores the candidates that have not finished,
once every one of them has t tokens; a pick's candidates decode in lockstep, so those with at most
t tokens (the stop token counted, as the engine counts it) have finished by then and are neither
scored nor pruned. AUROC and pairwise accuracy at t are over the samples live at t; "full" scores
every sample on its whole completion, and its simulation treats all of them as live.

The samples are a rollout file of the base (`alignserve train rollouts` without
`--rollin-guidance`): the engine's own token ids of each completion (the stop token included) and
the prompt's rendered ids. `alignserve eval` keeps only the text (the server's API returns no ids),
and re-tokenising it does not always give the generated ids back; with the same prompts, K,
sampling and seed, both commands draw the same samples (sample j of prompt i: seed + i * K + j).

Scores come from the server's own code: the guide-model table read as `alignserve serve` reads it
(`Settings.guide_model_paths`), `ScorerCatalog.load` with the server's default dtype (float32, as
server/app.py loads it), and `Scorer.score(decode(prompt ids), prompt ids,
[Completion(decode(ids[:t]), ids[:t]) ...])` with the base tokenizer's decode, one call per prompt
and t, as one checkpoint scores one pick. Only scorers the server accepts for pruning
(`prefix_names`) are taken.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from guidance.catalog import GuideCatalog
from guidance.search.scorers import Completion, Scorer, ScorerCatalog
from guidance.search.selection import lowest_scored, prune_count
from models.training.rollouts import RolloutRecord, read_rollouts
from server.prompts import PromptRenderer
from server.settings import Settings

FULL = "full"  # the row of whole completions
PLAIN_N = (1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32)  # plain best-of-N sizes reported, for comparison at equal tokens


@dataclass(frozen=True)
class Survival:
    """P(some right candidate survives) and generated tokens per pick, means over prompts x draws."""

    pruned: float  # the lowest-scored live candidates dropped
    random: float  # as many live candidates dropped at random
    unpruned: float  # nothing dropped
    pruned_tokens: float
    random_tokens: float  # expected
    unpruned_tokens: float


# --- metrics (pure) ---------------------------------------------------------------------------

def pair_wins(higher: np.ndarray, lower: np.ndarray) -> float:
    """Sum over all pairs (h, l) of [h > l] + [h == l] / 2."""
    diff = higher[:, None] - lower[None, :]
    return float((diff > 0).sum() + 0.5 * (diff == 0).sum())


def auroc(scores: np.ndarray, right: np.ndarray) -> float | None:
    """P(a right sample's score > a wrong one's), ties 1/2 (Mann-Whitney); None without both kinds."""
    positive, negative = scores[right], scores[~right]
    if not len(positive) or not len(negative):
        return None
    return pair_wins(positive, negative) / (len(positive) * len(negative))


def pairwise_accuracy(scores: np.ndarray, right: np.ndarray, groups: np.ndarray) -> tuple[float | None, int]:
    """(share of (right, wrong) pairs of the same group where the right one scores higher, ties 1/2;
    the number of such pairs), pooled over all pairs."""
    wins, pairs = 0.0, 0
    for group in np.unique(groups):
        member = groups == group
        positive, negative = scores[member & right], scores[member & ~right]
        wins += pair_wins(positive, negative)
        pairs += len(positive) * len(negative)
    return (wins / pairs if pairs else None), pairs


def pruned_candidates(scores: np.ndarray, live: np.ndarray, fraction: float, min_keep: int) -> list[int]:
    """The candidates the server's first checkpoint aborts (`prune_count`, `lowest_scored`)."""
    live_indexes = np.flatnonzero(live).tolist()
    count = prune_count(len(live_indexes), fraction, len(scores), min_keep)
    if count <= 0:
        return []
    return list(lowest_scored(live_indexes, scores[live_indexes].tolist(), count))


def random_survival(right: np.ndarray, live: np.ndarray, count: int) -> float:
    """P(some right candidate survives) when `count` live candidates are dropped uniformly at random:
    1 when a right one is not live; else, with r right among L live, 1 - C(L - r, count - r) / C(L, count)
    (the chance that the dropped ones include all r right ones)."""
    if (right & ~live).any():
        return 1.0
    r, total = int((right & live).sum()), int(live.sum())
    if r == 0:
        return 0.0
    if count < r:
        return 1.0
    return 1.0 - math.comb(total - r, count - r) / math.comb(total, count)


def draws(groups: np.ndarray, n: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` draws of `n` sample indexes without replacement per group, group by group; candidate c
    of a draw is its c-th index. Seeded by (seed, n) alone, so every scorer and t see the same draws."""
    rng = np.random.default_rng([seed, n])
    return [rng.choice(np.flatnonzero(groups == group), size=n, replace=False)
            for group in np.unique(groups) for _ in range(count)]


def simulate_survival(scores: np.ndarray, right: np.ndarray, lengths: np.ndarray, checkpoint: int | None,
                      picks: Sequence[np.ndarray], fraction: float, min_keep: int) -> Survival:
    """Survival of some right candidate over `picks` (index arrays into the samples), pruned at one
    checkpoint by `scores` (read for live samples only), at random, and not at all; and the tokens
    generated. `lengths`: each sample's tokens, the stop token counted; live at `checkpoint`: more
    tokens than that. `checkpoint` None: whole completions scored, all live, an abort saves nothing.
    An abort at the checkpoint saves length - checkpoint tokens (the server's come a little later)."""
    if checkpoint is None:
        live, saved = np.ones(len(lengths), dtype=bool), np.zeros(len(lengths))
    else:
        live, saved = lengths > checkpoint, np.maximum(lengths - checkpoint, 0)
    survival: list[tuple[float, float, float]] = []
    tokens: list[tuple[float, float, float]] = []
    for pick in picks:
        candidate_right, candidate_live, candidate_saved = right[pick], live[pick], saved[pick]
        dropped = pruned_candidates(scores[pick], candidate_live, fraction, min_keep)
        kept_right = candidate_right.copy()
        kept_right[dropped] = False
        survival.append((kept_right.any(), random_survival(candidate_right, candidate_live, len(dropped)),
                         candidate_right.any()))
        generated, live_count = float(lengths[pick].sum()), int(candidate_live.sum())
        # random dropping: each live candidate is dropped with probability len(dropped) / live_count
        random_saved = len(dropped) / live_count * candidate_saved[candidate_live].sum() if live_count else 0.0
        tokens.append((generated - candidate_saved[dropped].sum(), generated - random_saved, generated))
    return Survival(*np.mean(survival, axis=0).tolist(), *np.mean(tokens, axis=0).tolist())


def plain_best_of_n(right: np.ndarray, lengths: np.ndarray, groups: np.ndarray, n: int) -> tuple[float, float]:
    """(pass@1 of a verifier-picked best-of-n drawn from a prompt's K samples, exactly 1 - C(K - r, n) / C(K, n)
    with r of them right; its expected generated tokens, n x their mean length), means over prompts."""
    passes, tokens = [], []
    for group in np.unique(groups):
        member = groups == group
        k, r = int(member.sum()), int(right[member].sum())
        passes.append(1.0 - math.comb(k - r, n) / math.comb(k, n))
        tokens.append(n * float(lengths[member].mean()))
    return float(np.mean(passes)), float(np.mean(tokens))


# --- data and scoring -----------------------------------------------------------------------

def prompt_groups(records: Sequence[RolloutRecord]) -> np.ndarray:
    """Each record's prompt, numbered in order of first appearance."""
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(r.group, len(numbers)) for r in records])


def score_prefixes(scorer: Scorer, records: Sequence[RolloutRecord], groups: np.ndarray, length: int | None,
                   decode: Callable[[list[int]], str]) -> np.ndarray:
    """Scores of every record's first `length` completion tokens (None: all of them), NaN for a record
    not live at `length` (at most `length` tokens); one `Scorer.score` call per prompt."""
    scores = np.full(len(records), np.nan)
    for group in np.unique(groups):
        members = [i for i in np.flatnonzero(groups == group)
                   if length is None or len(records[i].completion_ids) > length]
        if not members:
            continue
        prompt = list(records[members[0]].prompt_ids)
        partial = [list(records[i].completion_ids[:length]) for i in members]
        scores[members] = scorer.score(decode(prompt), prompt, [Completion(decode(ids), tuple(ids)) for ids in partial])
    return scores


def evaluate(scores: np.ndarray, right: np.ndarray, lengths: np.ndarray, groups: np.ndarray, length: int | None,
             picks: dict[int, list[np.ndarray]], fraction: float, min_keep: int) -> dict:
    """One row of the results (`scores`: NaN where not live): live count, right rates of the live and
    finished samples, AUROC, pairwise accuracy, survival and tokens per N."""
    live = np.ones(len(lengths), dtype=bool) if length is None else lengths > length
    pairwise, pairs = pairwise_accuracy(scores[live], right[live], groups[live])
    return {
        "tokens": FULL if length is None else length,
        "live": int(live.sum()),
        "right_live": float(right[live].mean()) if live.any() else None,
        "right_finished": float(right[~live].mean()) if (~live).any() else None,
        "auroc": auroc(scores[live], right[live]),
        "pairwise_accuracy": pairwise,
        "pairs": pairs,
        "survival": {str(n): asdict(simulate_survival(scores, right, lengths, length, n_picks, fraction, min_keep))
                     for n, n_picks in picks.items()},
    }


# --- report -----------------------------------------------------------------------------------

def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(results: dict) -> str:
    run, ns = results["run"], results["run"]["n"]
    lines = [
        "# Prefix scores against the final reward",
        "",
        f"```\n{run['command']}\n```",
        "",
        f"Samples: {run['rollouts']}: {run['sample_count']} samples of {run['prompt_count']} prompts, pass@1 "
        f"{run['pass_at_1']:.3f}; the engine's token ids. Pruning rule: fraction {run['fraction']:g}, min_keep "
        f"{run['min_keep']}; {run['draws']} draws of N per prompt (seed {run['seed']}); with N = K every draw holds "
        f"all of a prompt's samples, only their order (the tie rule) differs.",
        "",
        "Plain best-of-N (verifier-picked, exact over each prompt's K samples): pass@1 and generated tokens per "
        "pick, to compare pruned configurations with at equal tokens.",
        "",
        "| N | " + " | ".join(str(n) for n in results["plain"]) + " |",
        "|---" * (1 + len(results["plain"])) + "|",
        "| pass@1 | " + " | ".join(f"{p['pass_at_1']:.3f}" for p in results["plain"].values()) + " |",
        "| tokens | " + " | ".join(f"{p['tokens']:.1f}" for p in results["plain"].values()) + " |",
        "",
        "Per scorer: t (prefix tokens; full: the whole completion), live (samples with more than t tokens, the stop "
        "token counted: the ones a checkpoint at t scores), right among live / among finished, AUROC and "
        "within-prompt pairwise accuracy over the live samples, then per N the probability that some right "
        "candidate survives one checkpoint at t (a verifier-picked best-of-N's pass@1), and below the generated "
        "tokens per pick (an abort at t saving the rest): pruned by the score / dropped at random / not pruned.",
    ]
    for name, scorer in results["scorers"].items():
        lines += ["", f"## {name} (scored in {scorer['seconds']:.1f} s)", "",
                  "| t | live | right: live / finished | AUROC | pairwise acc (pairs) | "
                  + " | ".join(f"N={n}: pruned / random / none" for n in ns) + " |",
                  "|---" * (5 + len(ns)) + "|"]
        for row in scorer["rows"]:
            survival = [row["survival"][str(n)] for n in ns]
            lines.append(
                f"| {row['tokens']} | {row['live']} | {_cell(row['right_live'])} / {_cell(row['right_finished'])} | "
                f"{_cell(row['auroc'])} | {_cell(row['pairwise_accuracy'])} ({row['pairs']}) | "
                + " | ".join(f"{s['pruned']:.3f} / {s['random']:.3f} / {s['unpruned']:.3f}" for s in survival)
                + " |")
        lines += ["", "| t | " + " | ".join(f"N={n} tokens: pruned / random / none" for n in ns) + " |",
                  "|---" * (1 + len(ns)) + "|"]
        for row in scorer["rows"]:
            survival = [row["survival"][str(n)] for n in ns]
            lines.append(f"| {row['tokens']} | " + " | ".join(
                f"{s['pruned_tokens']:.1f} / {s['random_tokens']:.1f} / {s['unpruned_tokens']:.1f}" for s in survival)
                + " |")
    return "\n".join(lines) + "\n"


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=Path, required=True,
                        help="rollout file of base samples (`alignserve train rollouts`, no roll-in guidance)")
    parser.add_argument("--model", type=Path, required=True, help="base model directory (its tokenizer decodes)")
    parser.add_argument("--guide-models", type=Path, required=True, help="guide-model table, as for `serve`")
    parser.add_argument("--scorers", nargs="+", required=True, help="prune scorers (sequence-scoring guide models)")
    parser.add_argument("--lengths", type=_ints, default=[4, 8, 12], help="checkpoints t [default: 4,8,12]")
    parser.add_argument("--n", type=_ints, default=[8, 16, 32], help="best-of-N sizes [default: 8,16,32]")
    parser.add_argument("--draws", type=int, default=100, help="draws of N per prompt [default: 100]")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of live candidates pruned [default: 0.5]")
    parser.add_argument("--min-keep", type=int, default=1, help="candidates never pruned below [default: 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws [default: 0]")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    args = parser.parse_args()

    records = read_rollouts(args.rollouts)
    if any(r.reward not in (0.0, 1.0) for r in records):
        parser.error(f"{args.rollouts}: rewards must be 0 or 1 (a right / wrong verifier)")
    right = np.array([r.reward == 1.0 for r in records])
    lengths = np.array([len(r.completion_ids) for r in records])
    groups = prompt_groups(records)
    per_prompt = int(np.bincount(groups).min())
    if max(args.n) > per_prompt:
        parser.error(f"--n {max(args.n)} is more than the {per_prompt} samples of some prompt")
    renderer = PromptRenderer.load(args.model)
    settings = Settings(model=args.model, guide_models=args.guide_models)
    catalog = ScorerCatalog.load(GuideCatalog.from_paths(settings.guide_model_paths()))
    if unknown := [name for name in args.scorers if name not in catalog.prefix_names()]:
        parser.error(f"not prune scorers: {unknown}; available: {catalog.prefix_names()}")
    picks = {n: draws(groups, n, args.draws, args.seed) for n in args.n}

    results: dict = {
        "run": {"command": shlex.join([".venv/bin/python", "-m", "bench.prefix_scores", *sys.argv[1:]]),
                "rollouts": str(args.rollouts), "sample_count": len(records), "prompt_count": int(groups.max()) + 1,
                "pass_at_1": float(right.mean()), "n": args.n, "draws": args.draws, "fraction": args.fraction,
                "min_keep": args.min_keep, "seed": args.seed},
        "plain": {str(n): dict(zip(("pass_at_1", "tokens"), plain_best_of_n(right, lengths, groups, n)))
                  for n in PLAIN_N if n <= per_prompt},
        "scorers": {},
    }
    for name in args.scorers:
        began = time.perf_counter()
        scored = {length: score_prefixes(catalog[name], records, groups, length, renderer.decode)
                  for length in [*args.lengths, None]}
        seconds = time.perf_counter() - began
        results["scorers"][name] = {
            "seconds": seconds,
            "rows": [evaluate(scores, right, lengths, groups, length, picks, args.fraction, args.min_keep)
                     for length, scores in scored.items()],
        }
        print(f"{name}: scored in {seconds:.1f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (args.out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
