"""The dashboard against a live server: every series deploy/grafana/alignserve-dashboard.json queries is
exported by /metrics, with the type the query assumes and the labels it groups by."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_grafana_dashboard import dashboard, expressions, known_series, labels_used, metric_names

pytestmark = pytest.mark.engine

# Labelled families without a sample until their event: a request the server ended (deadline, watchdog,
# dead engine), and guide-model KV blocks (only under --guide-kv-cache-space-gib; refusals at its limit).
# For these only the family itself (its # HELP and # TYPE lines) is checked.
EVENT_ONLY = {"alignserve_requests_ended", "alignserve_guide_kv_blocks", "alignserve_guide_kv_blocks_held",
              "alignserve_guide_kv_rejected"}
# Labels Prometheus adds to every series it scrapes through the ServiceMonitor.
TARGET_LABELS = {"namespace", "job", "pod"}

BODIES = {
    "unguided": {},
    "guided": {"guidance": [{"type": "qsharp", "model": "demo-value", "strength": 1.0}]},
    "best-of-N": {"search": {"type": "best_of_n", "n": 2, "scorer": "demo-arm"}},
}


@pytest.fixture(scope="module")
def families(http: httpx.Client) -> dict[str, Metric]:
    """/metrics, parsed, after one request of each kind the dashboard shows."""
    for kind, extra in BODIES.items():
        response = http.post("/v1/completions", json={"model": "demo-base", "prompt": "12+34=", "max_tokens": 8,
                                                      "temperature": 0, **extra})
        assert response.status_code == 200, f"{kind}: {response.text}"
    return {family.name: family for family in text_string_to_metric_families(http.get("/metrics").text)}


def sampled(families: dict[str, Metric], series: str) -> list[dict[str, str]]:
    """The label sets of the samples of one series."""
    family, _ = known_series()[series]
    return [sample.labels for sample in families[family].samples if sample.name == series]


def test_every_series_the_dashboard_queries_is_exported(families):
    used = set().union(*map(metric_names, expressions(dashboard())))
    for series in sorted(used):
        family, kind = known_series()[series]
        assert family in families, f"{family} is not exported"
        assert families[family].type == kind, f"{family} is a {families[family].type}, queried as a {kind}"
        if family not in EVENT_ONLY:
            assert sampled(families, series), f"{series} has no sample"


def test_the_labels_each_query_uses_are_on_its_series(families):
    for expr in expressions(dashboard()):
        samples = [labels for series in metric_names(expr) for labels in sampled(families, series)]
        if samples:
            carried = set().union(*samples) | TARGET_LABELS
            assert labels_used(expr) <= carried, expr
