"""The soak's invariants and measures (bench/soak), computed from what clients and probes saw.

Each check returns a `Check`: a name, whether it passed, and details that say why. They read
`RequestRecord`s (bench/soak/traffic.py), counters scraped from the server, and RSS samples; none
talks to the server, so each can be tested on hand-made data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench.soak.traffic import RequestRecord, is_clean, is_engine_dead, is_envelope, is_ok, outcome

MEMORY_GROWTH_LIMIT_PCT = 25.0  # RSS growth allowed since the server's first phase (allocator pools settling)
THROUGHPUT_WINDOW_S = 300.0
RESTART_SLACK = 2.0  # a restart may take this many times the first start (a busy machine), + RESTART_EXTRA_S
RESTART_EXTRA_S = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    details: str


def outcomes(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Requests by outcome label (bench.soak.traffic.outcome), sorted by label."""
    return dict(sorted(Counter(outcome(r) for r in records).items()))


def check_no_hung(records: Sequence[RequestRecord]) -> Check:
    hung = Counter(r.kind for r in records if r.hung)
    return Check("no request hung", not hung,
                 f"{sum(hung.values())} hung: {dict(hung)}" if hung else f"none of {len(records)} hung")


def check_clean(records: Sequence[RequestRecord]) -> Check:
    """Every answered request ended as the contract allows (hung ones are `check_no_hung`'s)."""
    unclean = [r for r in records if not r.hung and not is_clean(r)]
    details = f"{len(unclean)} of {len(records)} not clean: {outcomes(unclean)}" if unclean else \
        f"all {len(records)} clean"
    return Check("every request ended cleanly (no 500, the error envelope)", not unclean, details)


def replay_counts(records: Iterable[RequestRecord]) -> dict[str, dict[str, int]]:
    """Replayed pairs compared and those whose texts differ, by kind."""
    compared = [r for r in records if r.replay_matched is not None]
    return {"compared": dict(Counter(r.kind for r in compared)),
            "differ": dict(Counter(r.kind for r in compared if not r.replay_matched))}


def check_replays(counts: dict[str, dict[str, int]]) -> Check:
    differ = sum(counts["differ"].values())
    return Check("replays identical", not differ,
                 f"{differ} of {sum(counts['compared'].values())} pairs differ: {counts['differ']}" if differ else
                 f"identical pairs: {counts['compared']}")


def check_zero(name: str, value: float | None) -> Check:
    """`value` (None: the server did not answer) is back to 0."""
    return Check(f"{name} back to 0", value == 0, "no answer from the server" if value is None else f"{value:g}")


def check_all_ok(name: str, records: Sequence[RequestRecord]) -> Check:
    """Every request but those its client left on purpose got a 200 (and at least one was sent)."""
    failed = [r for r in records if not r.left and not is_ok(r)]
    return Check(name, bool(records) and not failed,
                 f"{len(failed)} of {len(records)} failed: {outcomes(failed)}" if failed else f"all {len(records)} 200")


def missing_retry_after(records: Iterable[RequestRecord]) -> int:
    """429s without a Retry-After header or without the error envelope."""
    return sum(r.status == 429 and (not r.retry_after or not is_envelope(r.error)) for r in records)


def check_refusals(records: Sequence[RequestRecord]) -> Check:
    """Some requests refused with a clean 429 carrying Retry-After, every other one 200."""
    refused = sum(r.status == 429 for r in records)
    others = [r for r in records if r.status != 429 and not is_ok(r)]
    bare = missing_retry_after(records)
    return Check("the excess refused with 429 and Retry-After, the rest 200", refused > 0 and not bare and not others,
                 f"{outcomes(records)}; 429 without Retry-After or envelope: {bare}")


def check_memory(growth_pct: dict[str, float], limit_pct: float = MEMORY_GROWTH_LIMIT_PCT) -> Check:
    return Check(f"RSS within +{limit_pct:g}% of the server's first phase", max(growth_pct.values()) <= limit_pct,
                 ", ".join(f"{part} {pct:+.1f}%" for part, pct in growth_pct.items()))


def check_stalled(record: RequestRecord, limit_s: float) -> Check:
    passed = record.status == 503 and is_envelope(record.error) and record.error["code"] == "scorer_timeout" \
        and record.latency_s <= limit_s
    return Check(f"stalled scorer: 503 scorer_timeout within {limit_s:g} s", passed,
                 f"{outcome(record)} after {record.latency_s:.1f} s")


# The engine kill

def kill_answers(records: Sequence[RequestRecord], killed_at: float, answer_s: float) -> dict:
    """How the requests in flight at the kill (not left by their clients) were answered: by outcome, how
    many engine_dead, how many late (past `answer_s`, or never), how many otherwise (neither engine_dead
    nor a 200 whose answer was made before the engine died), and the slowest answer."""
    in_flight = [r for r in records if r.started < killed_at and (r.hung or r.ended >= killed_at) and not r.left]
    late = [r for r in in_flight if r.hung or r.ended - killed_at > answer_s]
    return {"in_flight": outcomes(in_flight), "engine_dead": sum(map(is_engine_dead, in_flight)), "late": len(late),
            "other": sum(not (is_engine_dead(r) or is_ok(r)) for r in in_flight if r not in late),
            "slowest_answer_s": round(max((r.ended - killed_at for r in in_flight if not r.hung), default=0.0), 2)}


def check_killed_requests(answers: dict, answer_s: float) -> Check:
    """Every request in flight at the kill answered in time, with engine_dead (at least one did)."""
    passed = answers["engine_dead"] > 0 and not answers["late"] and not answers["other"]
    return Check(f"requests in flight at the kill answered engine_dead within {answer_s:g} s", passed,
                 f"{answers['in_flight']}; {answers['late']} late, {answers['other']} otherwise; slowest answer "
                 f"{answers['slowest_answer_s']:.1f} s after the kill")


def first_503_s(probes: Sequence[tuple[float, int | str]]) -> float | None:
    """Seconds after the kill of the first /health probe answered 503; probes are (seconds, status or the
    error that took the answer's place)."""
    return next((t for t, status in probes if status == 503), None)


def check_health_after_kill(probes: Sequence[tuple[float, int | str]]) -> Check:
    first = first_503_s(probes)
    seen = Counter(str(status) for _, status in probes)
    return Check("/health answers 503 after the kill", first is not None,
                 f"first 503 {first:.1f} s after the kill" if first is not None else f"probes saw {dict(seen)}")


def check_exit(returncode: int | None, exit_s: float | None, limit_s: float) -> Check:
    passed = returncode not in (None, 0) and exit_s is not None and exit_s <= limit_s
    details = f"exited with {returncode} {exit_s:.1f} s after the kill" if exit_s is not None else \
        f"still running {limit_s:g} s after the kill"
    return Check(f"the server exits non-zero within {limit_s:g} s", passed, details)


def check_restart(restart_s: float, first_s: float) -> Check:
    limit = first_s * RESTART_SLACK + RESTART_EXTRA_S
    return Check("the restarted server serves within its normal start time", restart_s <= limit,
                 f"restart {restart_s:.1f} s, first start {first_s:.1f} s (limit {limit:.1f} s)")


# Measures

def memory_growth_pct(baseline: dict, now: dict) -> dict[str, float]:
    """Growth of the server's and its children's RSS since `baseline`, in percent."""
    return {part: round(100.0 * (now[f"{part}_mib"] - baseline[f"{part}_mib"]) / baseline[f"{part}_mib"], 1)
            for part in ("server", "children")}


def tokens_per_s(records: Iterable[RequestRecord], seconds: float) -> float:
    """Completion tokens of `records` per second of `seconds`."""
    return round(sum(r.completion_tokens for r in records) / seconds, 2) if seconds > 0 else 0.0


def throughput_windows(records: Sequence[RequestRecord], began: float, ended: float,
                       window_s: float = THROUGHPUT_WINDOW_S) -> dict:
    """Completion tokens/s of requests ended in the first and in the last window of [began, ended]; the
    window is `window_s`, or half the span when that is shorter."""
    window = min(window_s, (ended - began) / 2)
    if window <= 0:
        return {}
    first = tokens_per_s([r for r in records if r.ended <= began + window], window)
    last = tokens_per_s([r for r in records if r.ended > ended - window], window)
    return {"window_s": round(window, 1), "first_tokens_per_s": first, "last_tokens_per_s": last,
            "last_over_first": round(last / first, 3) if first else None}


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """A Prometheus metric (a counter without its "_total") summed over its samples that carry `labels`;
    0 when it has none."""
    return sum(sample.value for family in text_string_to_metric_families(exposition) if family.name == name
               for sample in family.samples
               if sample.name in (name, f"{name}_total") and all(sample.labels.get(k) == v for k, v in labels.items()))


def metric_by_label(exposition: str, name: str, label: str) -> dict[str, float]:
    """A Prometheus metric's samples by the value of `label`."""
    return {sample.labels[label]: sample.value for family in text_string_to_metric_families(exposition)
            if family.name == name for sample in family.samples if label in sample.labels}
