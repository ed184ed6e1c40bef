"""Build alignserve-dashboard.json, the Grafana dashboard over the server's and vLLM's metrics.

    python deploy/grafana/build_dashboard.py           # rewrite the JSON beside this script
    python deploy/grafana/build_dashboard.py --check   # exit 1 if the committed JSON is stale

Written with grafana-foundation-sdk (the `dev` extra). Every query selects the pods of the
`namespace`, `job` and `pod` variables: the labels the Prometheus Operator puts on the series it
scrapes through deploy/kubernetes/servicemonitor.yaml. Their "All" is `.*`, which also matches
series without those labels (a plain Prometheus scraping `docker run`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import string
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import dashboard, prometheus, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    StackingMode,
    TooltipDisplayMode,
    VisibilityMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).with_name("alignserve-dashboard.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'namespace=~"$namespace", job=~"$job", pod=~"$pod"'
# Exported from start-up on: the variables list a pod before its first request.
ALWAYS_EXPORTED = "alignserve_engine_alive"
QUANTILES = (0.5, 0.9, 0.99)

PanelBuilder = TypeVar("PanelBuilder", timeseries.Panel, statetimeline.Panel)


# ---------------------------------------------------------------- PromQL


def series(name: str, matchers: str = "") -> str:
    """`name` on the chosen pods, narrowed by `matchers`."""
    return f"{name}{{{SELECTOR}{', ' + matchers if matchers else ''}}}"


def rate(name: str, matchers: str = "") -> str:
    return f"rate({series(name, matchers)}[$__rate_interval])"


def aggregate(expr: str, by: str = "", op: str = "sum") -> str:
    return f"{op} by ({by}) ({expr})" if by else f"{op}({expr})"


def ratio(numerator: str, denominator: str, matching: str = "") -> str:
    return f"{numerator} / {matching + ' ' if matching else ''}{denominator}"


def quantile(q: float, histogram: str, by: str = "") -> str:
    buckets = aggregate(rate(histogram + "_bucket"), ", ".join(filter(None, (by, "le"))))
    return f"histogram_quantile({q}, {buckets})"


def mean(histogram: str, by: str = "") -> str:
    return ratio(aggregate(rate(histogram + "_sum"), by), aggregate(rate(histogram + "_count"), by))


# ---------------------------------------------------------------- panels


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def quantiles(histogram: str, by: str = "") -> list[prometheus.Dataquery]:
    """p50, p90 and p99 of a histogram, one series per value of the `by` labels."""
    prefix = "".join(f"{{{{{label}}}}} " for label in by.split(", ") if label)
    return [query(quantile(q, histogram, by), f"{prefix}p{round(q * 100)}") for q in QUANTILES]


def with_queries(panel: PanelBuilder, title: str, description: str, queries: list[prometheus.Dataquery],
                 width: int, height: int) -> PanelBuilder:
    panel = panel.title(title).description(description).datasource(DATASOURCE).span(width).height(height)
    for ref_id, target in zip(string.ascii_uppercase, queries):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def graph(title: str, description: str, unit: str, queries: list[prometheus.Dataquery], *,
          width: int = 8, stacked: bool = False, signed: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().unit(unit).fill_opacity(30 if stacked else 10)
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    if not signed:
        panel = panel.min(0)
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    return with_queries(panel, title, description, queries, width, 8)


def states(title: str, description: str, expr: str, names: dict[int, tuple[str, str]]) -> statetimeline.Panel:
    """One row per pod, coloured by the value of a 0/1 gauge (`names`: value -> text, colour)."""
    mapping = ValueMap({str(value): ValueMappingResult(text=text, color=colour, index=value)
                        for value, (text, colour) in names.items()})
    panel = statetimeline.Panel().mappings([mapping]).show_value(VisibilityMode.NEVER).fill_opacity(80)
    return with_queries(panel, title, description, [query(expr, "{{pod}}")], 12, 6)


def variable(name: str, label: str, query_text: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE).query(query_text)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def build() -> dict[str, Any]:
    board = (
        dashboard.Dashboard("alignserve").uid("alignserve").tags(["alignserve", "vllm"])
        .description("alignserve and its vLLM engine: traffic, latency, guidance, search, cache, reliability.")
        .time("now-1h", "now").refresh("30s").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("namespace", "Namespace", f"label_values({ALWAYS_EXPORTED}, namespace)"))
        .with_variable(variable("job", "Job", f'label_values({ALWAYS_EXPORTED}{{namespace=~"$namespace"}}, job)'))
        .with_variable(variable("pod", "Pod", f'label_values({ALWAYS_EXPORTED}{{namespace=~"$namespace", '
                                              f'job=~"$job"}}, pod)'))

        .with_row(dashboard.Row("Traffic"))
        .with_panel(graph(
            "Requests by endpoint and outcome", "HTTP generation requests per second (alignserve_requests_total).",
            "reqps", [query(aggregate(rate("alignserve_requests_total"), "endpoint, outcome"),
                            "{{endpoint}} {{outcome}}")], stacked=True))
        .with_panel(graph(
            "Non-success share by endpoint and outcome",
            "Share of each endpoint's requests that ended otherwise than 200: rejected (429), unavailable (503), "
            "aborted (client left), invalid, unauthorized, error (5xx).",
            "percentunit", [query(ratio(
                aggregate(rate("alignserve_requests_total", 'outcome!="success"'), "endpoint, outcome"),
                aggregate(rate("alignserve_requests_total"), "endpoint"), "ignoring (outcome) group_left"),
                "{{endpoint}} {{outcome}}")]))
        .with_panel(graph(
            "Tokens per second", "The engine's prompt and generated tokens, and the generated tokens under guidance.",
            "short", [
                query(aggregate(rate("vllm:prompt_tokens_total")), "prompt"),
                query(aggregate(rate("vllm:generation_tokens_total")), "generated"),
                query(aggregate(rate("alignserve_guided_tokens_total")), "guided")]))

        .with_row(dashboard.Row("Latency (per engine request)"))
        .with_panel(graph("Time to first token", "vllm:time_to_first_token_seconds.", "s",
                          quantiles("vllm:time_to_first_token_seconds")))
        .with_panel(graph("Inter-token latency", "vllm:inter_token_latency_seconds.", "s",
                          quantiles("vllm:inter_token_latency_seconds")))
        .with_panel(graph(
            "End-to-end latency",
            "vllm:e2e_request_latency_seconds: one engine request; a best-of-N request runs several.", "s",
            quantiles("vllm:e2e_request_latency_seconds")))

        .with_row(dashboard.Row("Engine load"))
        .with_panel(graph("Running and waiting requests", "Engine requests per pod (the HPA scales on waiting).",
                          "short", [
                              query(aggregate(series("vllm:num_requests_running"), "pod"), "running {{pod}}"),
                              query(aggregate(series("vllm:num_requests_waiting"), "pod"), "waiting {{pod}}")]))
        .with_panel(graph("Queue time", "vllm:request_queue_time_seconds: time an engine request waited.", "s",
                          quantiles("vllm:request_queue_time_seconds")))
        .with_panel(graph("KV-cache usage", "vllm:kv_cache_usage_perc per pod.", "percentunit", [
            query(aggregate(series("vllm:kv_cache_usage_perc"), "pod", "max"), "{{pod}}")]))

        .with_row(dashboard.Row("Guidance"))
        .with_panel(graph(
            "Guided share of generated tokens",
            "alignserve_guided_tokens_total over vllm:generation_tokens_total.", "percentunit", [
                query(ratio(aggregate(rate("alignserve_guided_tokens_total")),
                            aggregate(rate("vllm:generation_tokens_total"))), "guided")]))
        .with_panel(graph(
            "KL per token by guidance",
            "Per choice: KL(guided || base) over its tokens, in nats (alignserve_guidance_kl_per_token_nats).",
            "none", [*quantiles("alignserve_guidance_kl_per_token_nats", "guidance"),
                     query(mean("alignserve_guidance_kl_per_token_nats", "guidance"), "{{guidance}} mean")]))
        .with_panel(graph(
            "Guide step time", "Guidance time per engine step with guided rows (alignserve_guide_step_seconds).",
            "s", quantiles("alignserve_guide_step_seconds")))
        .with_panel(graph(
            "Guide-model KV blocks", "Blocks reserved by admitted guided requests, and the capacity under "
            "--guide-kv-cache-space-gib (no series without it).", "short", [
                query(aggregate(series("alignserve_guide_kv_blocks_held"), "model"), "{{model}} held"),
                query(aggregate(series("alignserve_guide_kv_blocks"), "model"), "{{model}} capacity")]))
        .with_panel(graph(
            "Guide-KV refusals", "Guided requests refused with 429 while the guide model's blocks were held.",
            "reqps", [query(aggregate(rate("alignserve_guide_kv_rejected_total"), "model"), "{{model}}")]))
        .with_panel(graph(
            "Guided choices by module", "Choices generated with each guidance module.", "short",
            [query(aggregate(rate("alignserve_guided_choices_total"), "module"), "{{module}}")], stacked=True))

        .with_row(dashboard.Row("Search"))
        .with_panel(graph(
            "Candidates scored and pruned",
            "Search candidates scored per second by search type, and best-of-N candidates aborted at pruning "
            "checkpoints.", "short", [
                query(aggregate(rate("alignserve_search_candidate_score_count"), "search"), "scored {{search}}"),
                query(aggregate(rate("alignserve_search_pruned_candidates_total")), "pruned")]))
        .with_panel(graph(
            "Median candidate score",
            "alignserve_search_candidate_score by search type and scorer. A median, not a mean: the histogram has "
            "negative buckets, so prometheus_client exports no _sum.", "none",
            [query(quantile(0.5, "alignserve_search_candidate_score", "search, scorer"), "{{search}} {{scorer}}")],
            signed=True))
        .with_panel(graph("Scorer latency", "One scoring call: all candidates of one pick or block.", "s",
                          quantiles("alignserve_scorer_seconds", "scorer")))

        .with_row(dashboard.Row("Response cache"))
        .with_panel(graph(
            "Cache hit rate", "Hits over lookups (hit + miss) by backend.", "percentunit", [query(ratio(
                aggregate(rate("alignserve_cache_requests_total", 'outcome="hit"'), "backend"),
                aggregate(rate("alignserve_cache_requests_total", 'outcome=~"hit|miss"'), "backend")),
                "{{backend}}")], width=12))
        .with_panel(graph(
            "Cache operations", "Lookups and stores by backend and outcome (bypass: not deterministic).", "ops",
            [query(aggregate(rate("alignserve_cache_requests_total"), "backend, outcome"), "{{backend}} {{outcome}}")],
            width=12, stacked=True))

        .with_row(dashboard.Row("Reliability"))
        .with_panel(states("Engine", "alignserve_engine_alive: whether vLLM's engine core answers.",
                           series("alignserve_engine_alive"), {1: ("alive", "green"), 0: ("dead", "red")}))
        .with_panel(states("Draining", "alignserve_draining: the server drains in-flight requests before exiting.",
                           series("alignserve_draining"), {0: ("serving", "green"), 1: ("draining", "orange")}))
        .with_panel(graph("In-flight requests by stage", "alignserve_requests_in_stage.", "short",
                          [query(aggregate(series("alignserve_requests_in_stage"), "stage"), "{{stage}}")],
                          stacked=True))
        .with_panel(graph("Oldest in-flight request by stage", "alignserve_request_oldest_seconds, the oldest "
                          "over the chosen pods.", "s",
                          [query(aggregate(series("alignserve_request_oldest_seconds"), "stage", "max"), "{{stage}}")]))
        .with_panel(graph(
            "Requests ended by the server", "In-flight requests ended with a 503, by reason "
            "(alignserve_requests_ended_total).", "reqps",
            [query(aggregate(rate("alignserve_requests_ended_total"), "reason"), "{{reason}}")]))
    ).build()
    # The dashboard schema of Grafana 12.2 and later; the SDK writes 41, and the one migration to 42
    # (hideFrom.tooltip in field overrides) concerns no panel here.
    board.schema_version = 42
    # The SDK gives every variable the interval variable's `auto` fields, which Grafana's variable model lacks.
    for var in board.templating.list_val:
        var.auto = var.auto_min = var.auto_count = None
    for number, panel in enumerate(board.panels, 1):
        panel.id_val = number
    return json.loads(json.dumps(board, cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not what this builds")
    text = render()
    if parser.parse_args().check:
        stale = not OUTPUT.is_file() or OUTPUT.read_text() != text
        if stale:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
        return int(stale)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
