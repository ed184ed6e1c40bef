"""deploy/grafana: the dashboard JSON, its generator and its ConfigMap, checked without a server or Grafana.

The PromQL is parsed loosely: metric names are the identifiers left once strings, label matchers,
range selectors and label lists are removed, and that are not functions or keywords.
tests/integration/test_grafana_dashboard.py checks the same names against a live /metrics.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, Histogram

import server.metrics
from tests.dockerfile import ROOT

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "alignserve-dashboard.json"
BASE = ROOT / "deploy" / "kubernetes"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = 'namespace=~"$namespace", job=~"$job", pod=~"$pod"'
# `kubectl apply` (client side) keeps the whole object in an annotation, and annotations hold 256 KiB.
CONFIGMAP_LIMIT = 256 * 1024

# vLLM 0.32's metric families by type, as its stat logger registers them (read off a live server's /metrics).
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
MATCHERS = re.compile(r"\{[^}]*\}")
RANGE = re.compile(r"\[[^\]]*\]")
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
SELECTED = re.compile(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


# ---------------------------------------------------------------- helpers (also used by the integration test)


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(board) if p["type"] != "row"]


def expressions(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in graph_panels(board) for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression."""
    bare = LABEL_LIST.sub(" ", RANGE.sub("", MATCHERS.sub("", STRING.sub('""', expr))))
    return {name for name in IDENTIFIER.findall(bare) if name not in KEYWORDS}


def labels_used(expr: str) -> set[str]:
    """The labels an expression groups by, matches on or filters on."""
    grouped = {label.strip() for _, labels in LABEL_LIST.findall(expr) for label in labels.split(",")}
    filtered = {label for _, matchers in SELECTED.findall(expr) for label in MATCHER_LABEL.findall(matchers)}
    return (grouped | filtered) - {""}


def family_types() -> dict[str, str]:
    """Every metric family the dashboard may use: alignserve's (server/metrics.py) and vLLM's."""
    ours = {family.name: family.type for family in REGISTRY.collect() if family.name.startswith("alignserve_")}
    return {**ours, **VLLM_FAMILIES}


def known_series() -> dict[str, tuple[str, str]]:
    """Series name -> (family, type): `_total` of counters, `_bucket`/`_sum`/`_count` of histograms, less
    the `_sum` of histograms with a negative bucket (prometheus_client exports none for them)."""
    sumless = {f"{metric._name}_sum" for metric in vars(server.metrics).values()
               if isinstance(metric, Histogram) and metric._upper_bounds[0] < 0}
    return {family + suffix: (family, kind) for family, kind in family_types().items() for suffix in SUFFIXES[kind]
            if family + suffix not in sumless}


# ---------------------------------------------------------------- the JSON


def test_dashboard_is_json_of_a_current_grafana():
    board = dashboard()
    assert board["schemaVersion"] >= 42  # Grafana 12.2 and later
    assert board["uid"] == "alignserve" and board["title"]
    assert board.get("id") is None  # a provisioned dashboard gets its id from Grafana


def test_datasource_and_pod_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "pod"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        listed = re.fullmatch(rf"label_values\(([\w:]+)(\{{[^}}]*\}})?, {name}\)", variable["query"])
        assert listed and listed[1] in known_series(), variable["query"]
        # "All" must also match series without the label (Prometheus outside Kubernetes).
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_every_panel_has_a_query():
    for panel in graph_panels(dashboard()):
        targets = panel.get("targets", [])
        assert targets and all(t["expr"].strip() for t in targets), panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_datasource_is_the_template_variable():
    def datasources(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                else:
                    yield from datasources(value)
        elif isinstance(node, list):
            for item in node:
                yield from datasources(item)

    found = list(datasources(dashboard()))
    assert found and all(ds == DATASOURCE for ds in found)
    for panel in graph_panels(dashboard()):
        assert panel["datasource"] == DATASOURCE and all(t["datasource"] == DATASOURCE for t in panel["targets"])


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    all_panels = list(panels(dashboard()))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


# ---------------------------------------------------------------- the PromQL


def test_every_metric_is_one_we_or_vllm_export():
    known = known_series()
    for expr in expressions(dashboard()):
        names = metric_names(expr)
        assert names, expr
        assert names <= known.keys(), f"unknown metrics {names - known.keys()} in {expr}"


def test_every_metric_selects_the_chosen_pods():
    for expr in expressions(dashboard()):
        selected = SELECTED.findall(expr)
        assert {name for name, _ in selected} == metric_names(expr), expr
        assert all(matchers.startswith(SELECTOR) for _, matchers in selected), expr


def test_counters_and_histograms_are_read_with_rate():
    known = known_series()
    for expr in expressions(dashboard()):
        for name in metric_names(expr):
            _, kind = known[name]
            if kind == "gauge":
                assert f"rate({name}{{" not in expr, expr
            else:
                assert expr.count(f"{name}{{") == expr.count(f"rate({name}{{"), f"{name} outside rate(): {expr}"
            if name.endswith("_bucket"):
                assert expr.startswith("histogram_quantile(") and "le" in labels_used(expr), expr


def test_aggregations_keep_only_labels_the_series_carry():
    """`sum by (x)` over a series without x is one unlabelled sum: check x against the labels each
    alignserve metric is declared with (vLLM's: the integration test reads them off /metrics)."""
    declared = {metric._name: set(metric._labelnames) for metric in vars(server.metrics).values()
                if hasattr(metric, "_labelnames")}
    declared |= {"alignserve_requests_in_stage": {"stage"}, "alignserve_request_oldest_seconds": {"stage"},
                 "alignserve_guide_step_seconds": set()}
    target = {"namespace", "job", "pod", "le"}
    known = known_series()
    for expr in expressions(dashboard()):
        families = {known[name][0] for name in metric_names(expr)}
        if all(f.startswith("alignserve_") for f in families):
            carried = set().union(*(declared[f] for f in families)) | target
            assert labels_used(expr) <= carried, expr


# ---------------------------------------------------------------- the generator


def generator() -> Any:
    pytest.importorskip("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_json_is_what_the_generator_builds():
    assert generator().render() == DASHBOARD.read_text(), "run python deploy/grafana/build_dashboard.py"


def contained(part: Any, whole: Any) -> bool:
    """Whether every key and value of `part` is in `whole` (which may add keys)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and contained(v, whole[k]) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(whole, list) and len(part) == len(whole) and all(map(contained, part, whole))
    return part == whole


def test_every_field_of_the_json_is_one_the_sdk_dashboard_model_knows():
    """The SDK's models of Grafana's schemas (dashboard, panel options and field config of each panel type,
    Prometheus queries) drop what they do not know: a round trip through them keeps it all."""
    generator()
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    board = dashboard()
    assert contained(board, json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder)))


# ---------------------------------------------------------------- provisioning


def test_the_base_provisions_the_dashboard_for_grafanas_sidecar():
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "../grafana" in base["components"]
    component = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    (generated,) = component["configMapGenerator"]
    assert generated["files"] == [DASHBOARD.name]
    assert generated["options"]["labels"]["grafana_dashboard"] == "1"
    assert generated["options"]["disableNameSuffixHash"] is True
    assert "namespace" not in component
    assert len(DASHBOARD.read_bytes()) < CONFIGMAP_LIMIT


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_configmap_from_the_json():
    built = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True)
    (configmap,) = [doc for doc in yaml.safe_load_all(built.stdout)
                    if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "alignserve-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard()


def test_deploy_doc_describes_the_dashboard():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/grafana/alignserve-dashboard.json" in doc and 'grafana_dashboard: "1"' in doc
