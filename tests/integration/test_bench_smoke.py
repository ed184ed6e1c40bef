"""`alignserve bench --smoke`: every section of the suite runs end to end on the demo model
(both servers, both load generators, the HF baseline) and writes its report; no speed is asserted."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import ALIGNSERVE

SECTIONS = ("passthrough", "overhead", "length", "best_of_n", "hf")


def test_bench_smoke_writes_every_section(tmp_path):
    out = tmp_path / "suite"
    run = subprocess.run([str(ALIGNSERVE), "bench", "--smoke", "--out", str(out)], capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for section in SECTIONS:
        assert results[section], section
        for row in results[section]:
            assert row["tokens_per_s"] > 0 and row.get("failed", 0) == 0, (section, row)
    generators = {(r["server"], r["generator"]) for r in results["passthrough"]}
    assert generators == {(s, g) for s in ("alignserve", "vllm") for g in ("ours", "vllm bench serve")}
    assert {r["load"] for r in results["overhead"]} >= {"unguided", "qsharp[demo-value-hist, V, k=20]",
                                                         "cd[demo-prefix, V, k=20]", "arm[demo-arm, Q]"}
    # Best-of-2 generates both candidates' tokens.
    best = {(r["n"], r["concurrency"]): r for r in results["best_of_n"]}
    assert best[(2, 1)]["generated_tokens"] == 2 * best[(2, 1)]["output_tokens"]
    assert results["targets"] and results["machine"]["cpus"]
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "## Against the usual implementation" in report
    assert {p.name for p in out.glob("*.png")} == {"overhead.png", "passthrough.png", "length.png", "best_of_n.png",
                                                   "hf_baseline.png"}
