"""The benchmark suite's arithmetic: compute bound, percentiles, workload and targets."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
import torch

from bench.load import percentiles_ms
from bench.soak.server import guide_block_bytes
from bench.suite.compute_bound import compute_bound, layer_macs
from bench.suite.report import markdown, targets
from bench.suite.workload import build_workload, default_guides
from guidance.catalog import GuideCatalog
from models.demo.build import demo_base_dir
from models.demo.paths import demo_guides_file

CONFIG = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 100}


def _model(directory, head: dict | None = None, head_weights: dict | None = None):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    if head is not None:
        (directory / "guide_head.json").write_text(json.dumps(head))
        save_file(head_weights or {}, str(directory / "head.safetensors"))
    return directory


def test_layer_macs_count_attention_and_gated_mlp():
    # q, o: 8 x (2 x 4) each; k, v: 8 x (1 x 4) each; MLP: 3 x 8 x 16; two layers.
    assert layer_macs(CONFIG) == 2 * (2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16)


def test_v_type_bound_counts_k_plus_one_tokens_and_k_head_evaluations(tmp_path):
    base = _model(tmp_path / "base")
    guide = _model(tmp_path / "guide", {"type": "bernoulli", "scoring": "v"},
                   {"proj.weight": torch.zeros(1, 8), "proj.bias": torch.zeros(1)})
    layers, head, base_macs = layer_macs(CONFIG), 9, layer_macs(CONFIG) + 8 * 100
    bound = compute_bound(base, guide, "v", 20)
    assert bound.guide_macs == 21 * layers + 20 * head
    assert bound.ratio == pytest.approx(base_macs / (base_macs + 21 * layers + 20 * head))


def test_q_type_and_embedding_heads_count_the_vocabulary_projection(tmp_path):
    base = _model(tmp_path / "base")
    arm = _model(tmp_path / "arm", {"type": "arm", "scoring": "q", "rank": 2},
                 {"u": torch.zeros(8, 2), "v": torch.zeros(8, 2), "b": torch.zeros(8)})
    whole_head = (8 * 2 * 2 + 8) + 8 * 100
    assert compute_bound(base, arm, "q", 0).guide_macs == layer_macs(CONFIG) + whole_head
    # k candidates: their k rows of the head, head MACs x k / V.
    assert compute_bound(base, arm, "q", 20).guide_macs == layer_macs(CONFIG) + whole_head * 20 // 100


def test_percentiles_interpolate_and_handle_small_samples():
    assert percentiles_ms([]) == {}
    assert percentiles_ms([0.5]) == {"p50": 500.0, "p99": 500.0}
    values = [i / 1000 for i in range(1, 102)]  # 1..101 ms
    assert percentiles_ms(values) == {"p50": 51.0, "p99": 100.0}


def test_default_guides_take_one_per_shape_with_v_type_qsharp_first():
    catalog = GuideCatalog.from_table(demo_guides_file())
    assert default_guides(catalog) == ["demo-value-hist", "demo-value", "demo-prefix", "demo-arm", "demo-genarm"]
    work = build_workload(demo_base_dir(), demo_guides_file(), "demo-base", None, None)
    assert work.scorer == "demo-reward"
    assert [load.label for load in work.loads][:2] == ["qsharp[demo-value-hist, V, k=20]", "qsharp[demo-value, Q]"]
    assert len(work.prompts_for(500)) == 500


def test_unknown_guide_is_refused_naming_it():
    with pytest.raises(ValueError, match="nope"):
        build_workload(demo_base_dir(), demo_guides_file(), "demo-base", ["nope"], None)


@pytest.fixture
def mixed_table(tmp_path):
    """The demo guide models (by absolute directory) plus a reward model served by URL."""
    table = {name: str(demo_guides_file().parent / path)
             for name, path in json.loads(demo_guides_file().read_text()).items()}
    path = tmp_path / "guides.json"
    path.write_text(json.dumps({**table, "rm": {"url": "http://rm:8000", "format": "text"}}))
    return path


def test_a_url_entry_is_no_load_but_may_be_the_scorer(mixed_table):
    demo = build_workload(demo_base_dir(), demo_guides_file(), "demo-base", None, None)
    work = build_workload(demo_base_dir(), mixed_table, "demo-base", None, None)
    assert [load.label for load in work.loads] == [load.label for load in demo.loads]
    assert work.scorer == "demo-reward"
    assert build_workload(demo_base_dir(), mixed_table, "demo-base", ["demo-value"], "rm").scorer == "rm"
    with pytest.raises(ValueError, match=r"\['rm'\] not guide models .*served by URL"):
        build_workload(demo_base_dir(), mixed_table, "demo-base", ["rm"], None)


def test_the_soak_sizes_guide_kv_by_the_local_guides_of_a_mixed_table(mixed_table):
    assert guide_block_bytes(mixed_table) == guide_block_bytes(demo_guides_file()) is not None


def _row(**fields) -> dict:
    return {"failed": 0, "ttft_ms": {"p50": 10.0}, "itl_ms": {"p50": 1.0}, "latency_ms": {"p50": 100.0},
            "requests_per_s": 1.0, "generated_tokens": 10, "seconds": 1.0, **fields}


RESULTS = {
    "setup": {"command": "alignserve bench", "model": "m", "requests_per_client": 1, "length_concurrency": 2,
              "scorer": "s", "hf_threads": 1},
    "machine": {"cpus": 2},
    "overhead": [_row(load="unguided", concurrency=32, tokens_per_s=100.0, ratio=1.0, bound=1.0),
                 _row(load="q", concurrency=32, tokens_per_s=50.0, ratio=0.5, bound=0.5, of_bound=1.0),
                 _row(load="v", concurrency=32, tokens_per_s=20.0, ratio=0.2, bound=0.3, of_bound=0.667)],
    "length": [_row(load="unguided", tokens=64, tokens_per_s=100.0), _row(load="v", tokens=64, ratio=0.4,
                                                                          tokens_per_s=40.0),
               _row(load="unguided", tokens=1024, tokens_per_s=80.0), _row(load="v", tokens=1024, ratio=0.3,
                                                                           tokens_per_s=24.0)],
    "passthrough": [_row(server="alignserve", generator="ours", concurrency=32, tokens_per_s=96.0,
                         ttft_ms={"p50": 11.0}),
                    _row(server="vllm", generator="ours", concurrency=32, tokens_per_s=100.0, ttft_ms={"p50": 10.0})],
    "best_of_n": [_row(n=1, concurrency=1, latency_ms={"p50": 100.0}),
                  _row(n=8, concurrency=1, latency_ms={"p50": 250.0})],
    "hf": [{"implementation": "hf generate", "load": "unguided", "concurrency": 32, "tokens_per_s": 50.0},
           {"implementation": "hf generate", "load": "v", "concurrency": 32, "tokens_per_s": 5.0}],
}


def test_targets_compare_each_measurement_with_the_issue_goals():
    found = {t["target"].split(" (")[0].split(" at c=")[0]: t for t in targets(RESULTS)}
    assert found["q guided/unguided"]["met"] and not found["v guided/unguided"]["met"]
    length = next(t for t in targets(RESULTS) if t["target"].startswith("length"))
    assert length["value"] == pytest.approx(0.75) and not length["met"]
    passthrough = [t for t in targets(RESULTS) if t["target"].startswith("passthrough")]
    assert [(t["value"], t["met"]) for t in passthrough] == [(0.96, True), (1.1, True)]
    best = next(t for t in targets(RESULTS) if t["target"].startswith("best-of-8"))
    assert (best["value"], best["met"]) == (2.5, False)
    # ours v / HF v = 20 / 5 = 4 against vLLM / HF unguided = 100 / 50 = 2.
    hf = next(t for t in targets(RESULTS) if t["target"].startswith("ours"))
    assert (hf["value"], hf["met"]) == (4.0, True)


def test_markdown_has_every_section_and_the_targets():
    text = markdown({**RESULTS, "targets": targets(RESULTS)})
    for heading in ("## Passthrough", "## Guidance overhead", "## Length scaling", "## Best-of-N",
                    "## Against the usual implementation", "## Targets"):
        assert heading in text
    assert "**no**" in text and "| yes |" in text
