"""Prometheus metrics: vLLM's own `vllm:*` metrics plus alignserve's, in one registry.

vLLM's stat logger registers its request, token and latency metrics (running and
waiting requests, time to first token, inter-token latency, end-to-end latency,
prompt and generation tokens, request outcomes) in prometheus_client's default
registry of this process, with vLLM's names and meanings, so existing dashboards
and autoscalers work unchanged. The metrics below are ours. Labels are bounded:
endpoint, outcome, guidance module, search type, scorer (operator-configured names),
cache backend — never a request id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from guidance.batch import STEP_SECONDS_BUCKETS, StepTimings
from guidance.search.remote import RemoteScorer
from guidance.verifiers import error_counts

REQUESTS = Counter(
    "alignserve_requests_total", "HTTP generation requests by endpoint and outcome.", ["endpoint", "outcome"]
)
GUIDED_CHOICES = Counter(
    "alignserve_guided_choices_total", "Choices generated with a guidance module.", ["module"]
)
GUIDED_TOKENS = Counter("alignserve_guided_tokens_total", "Tokens generated under guidance.")
KL_PER_TOKEN = Histogram(
    "alignserve_guidance_kl_per_token_nats",
    "Per choice: KL(guided || base) summed over its tokens, divided by its tokens.",
    ["guidance"],
    buckets=(0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
)
CACHE_REQUESTS = Counter(
    "alignserve_cache_requests_total",
    "Response-cache lookups and stores by backend and outcome (hit, miss, store, error, bypass).",
    ["backend", "outcome"],
)
SEARCH_SCORES = Histogram(
    "alignserve_search_candidate_score",
    "Scores of request-level search candidates (best-of-N completions, blockwise blocks, partial sequences at "
    "pruning checkpoints: search=\"prune\") by search type and scorer.",
    ["search", "scorer"],
    buckets=(-5.0, -2.0, -1.0, -0.5, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 2.0, 5.0),
)
SCORER_SECONDS = Histogram(
    "alignserve_scorer_seconds", "Time of one successful scoring call (all candidates of one pick or block).",
    ["scorer"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SCORER_CALLS = Counter(
    "alignserve_scorer_calls_total",
    "Scoring calls of searches by scorer and outcome (ok, timeout, unavailable, bad_response).",
    ["scorer", "outcome"],
)
PRUNED_CANDIDATES = Counter(
    "alignserve_search_pruned_candidates_total", "Best-of-N candidates aborted early at pruning checkpoints.")
GUIDE_KV_BLOCKS = Gauge(
    "alignserve_guide_kv_blocks", "KV-cache blocks of each guide model under --guide-kv-cache-space-gib.", ["model"])
GUIDE_KV_BLOCKS_HELD = Gauge(
    "alignserve_guide_kv_blocks_held", "Guide-model KV blocks admitted requests may fill (reserved at admission).",
    ["model"])
GUIDE_KV_REJECTED = Counter(
    "alignserve_guide_kv_rejected_total", "Requests refused (429) because a guide model's KV blocks were held.",
    ["model"])
DRAINING = Gauge("alignserve_draining", "1 while the server drains in-flight requests before exiting.")
REQUESTS_ENDED = Counter(
    "alignserve_requests_ended_total",
    "In-flight requests the server ended with a 503, by reason: deadline_exceeded, request_stalled (the watchdog), "
    "engine_dead.", ["reason"])
ENGINE_ALIVE = Gauge("alignserve_engine_alive", "1 while vLLM's engine core answers, 0 once it died.")


class RequestStagesCollector(Collector):
    """`alignserve_requests_in_stage` and `alignserve_request_oldest_seconds`: the in-flight requests
    by stage (server.tracking.Stage) and the age of the oldest in each, read at scrape time."""

    def __init__(self) -> None:
        self.stages: tuple[str, ...] = ()
        self.snapshot: Callable[[], list[dict]] = list

    def follow(self, stages: Iterable[str], snapshot: Callable[[], list[dict]]) -> None:
        """Report the requests `snapshot` returns, in each of `stages`."""
        self.stages, self.snapshot = tuple(stages), snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = GaugeMetricFamily("alignserve_requests_in_stage", "In-flight generation requests by stage.",
                                   labels=["stage"])
        oldest = GaugeMetricFamily("alignserve_request_oldest_seconds",
                                   "Age of the oldest in-flight request in each stage.", labels=["stage"])
        requests = self.snapshot()
        for name in self.stages:
            ages = [r["age_s"] for r in requests if r["stage"] == name]
            counts.add_metric([name], len(ages))
            oldest.add_metric([name], max(ages, default=0.0))
        yield counts
        yield oldest


REQUEST_STAGES = RequestStagesCollector()
REGISTRY.register(REQUEST_STAGES)


class GuideStepCollector(Collector):
    """`alignserve_guide_step_seconds`: time the guidance processor spends per engine step
    (guide-model forwards and offsets), read from the engine worker at scrape time."""

    def __init__(self) -> None:
        self.timings: StepTimings | None = None

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "alignserve_guide_step_seconds", "Guidance time per engine step with guided rows."
        )
        if self.timings is not None:
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, STEP_SECONDS_BUCKETS), "+Inf"), self.timings.bucket_counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([], buckets, self.timings.total_seconds)
        yield family


GUIDE_STEPS = GuideStepCollector()
REGISTRY.register(GUIDE_STEPS)


class VerifierErrorsCollector(Collector):
    """`alignserve_verifier_errors_total`: verifier calls that raised (or gave no finite reward) and
    were scored 0, by verifier, read from the registry's counts at scrape time."""

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily("alignserve_verifier_errors", "Verifier calls that failed and scored 0.",
                                     labels=["verifier"])
        for name, count in error_counts().items():
            family.add_metric([name], count)
        yield family


REGISTRY.register(VerifierErrorsCollector())


class RemoteScorerAttemptsCollector(Collector):
    """`alignserve_remote_scorer_attempts_total`: HTTP attempts of the scorers served by URL, by scorer and
    outcome (ok, retried, timeout, unreachable, bad_response), read from each scorer at scrape time."""

    def __init__(self) -> None:
        self.scorers: list[RemoteScorer] = []

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily("alignserve_remote_scorer_attempts",
                                     "HTTP attempts of remote scorers by outcome (retried: followed by a repeat).",
                                     labels=["scorer", "outcome"])
        for scorer in self.scorers:
            for outcome, count in scorer.attempts().items():
                family.add_metric([scorer.name, outcome], count)
        yield family


REMOTE_SCORER_ATTEMPTS = RemoteScorerAttemptsCollector()
REGISTRY.register(REMOTE_SCORER_ATTEMPTS)


def observe_guidance(modules: list[str], kl: float, steps: int) -> None:
    for module in modules:
        GUIDED_CHOICES.labels(module).inc()
    GUIDED_TOKENS.inc(steps)
    if steps:
        KL_PER_TOKEN.labels("+".join(sorted(set(modules)))).observe(kl / steps)


def observe_search(search: str, scorer: str, scores: list[float], seconds: float) -> None:
    for score in scores:
        SEARCH_SCORES.labels(search, scorer).observe(score)
    SCORER_SECONDS.labels(scorer).observe(seconds)
    SCORER_CALLS.labels(scorer, "ok").inc()
