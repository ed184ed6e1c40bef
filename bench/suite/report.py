"""The suite's targets, markdown report and plots, from the rows `bench.suite.sections` measured.

Targets are reported, never asserted: the machines are shared and noisy.
"""

from __future__ import annotations

from pathlib import Path

from bench.suite.sections import UNGUIDED

OF_BOUND_TARGET = 0.85  # guided / unguided >= 0.85 x compute bound, at the highest concurrency
LENGTH_TARGET = 0.9  # guided / unguided ratio at the longest length >= 0.9 x the ratio at the shortest
PASSTHROUGH_THROUGHPUT_TARGET = 0.95  # alignserve unguided >= 0.95 x vLLM's server
PASSTHROUGH_TTFT_TARGET = 1.10  # alignserve p50 TTFT <= 1.10 x vLLM's server
BEST_OF_8_TARGET = 2.0  # best-of-8 p50 latency <= 2 x best-of-1, at concurrency 1


def _target(name: str, value: float | None, goal: str, met: bool | None) -> dict:
    return {"target": name, "value": None if value is None else round(value, 3), "goal": goal, "met": met}


def targets(results: dict) -> list[dict]:
    """Each target of the issue against what was measured (sections not run are left out)."""
    found = []
    overhead = results.get("overhead", [])
    if overhead:
        top = max(r["concurrency"] for r in overhead)
        for row in overhead:
            if row["concurrency"] == top and row["load"] != UNGUIDED:
                found.append(_target(f"{row['load']} guided/unguided at c={top}, of the compute bound "
                                     f"({row['bound']})", row["of_bound"], f">= {OF_BOUND_TARGET}",
                                     row["of_bound"] >= OF_BOUND_TARGET))
    length = [r for r in results.get("length", []) if r["load"] != UNGUIDED]
    if len(length) >= 2:
        first, last = min(length, key=lambda r: r["tokens"]), max(length, key=lambda r: r["tokens"])
        value = last["ratio"] / first["ratio"]
        found.append(_target(f"length: guided/unguided at {last['tokens']} tokens / at {first['tokens']}", value,
                             f">= {LENGTH_TARGET}", value >= LENGTH_TARGET))
    passthrough = results.get("passthrough", [])
    for generator in sorted({r["generator"] for r in passthrough}):
        rows = {(r["server"], r["concurrency"]): r for r in passthrough if r["generator"] == generator}
        for (server, concurrency), ours in sorted(rows.items()):
            theirs = rows.get(("vllm", concurrency))
            if server != "alignserve" or theirs is None:
                continue
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            found.append(_target(f"passthrough tokens/s vs vLLM, c={concurrency} ({generator})", ratio,
                                 f">= {PASSTHROUGH_THROUGHPUT_TARGET}", ratio >= PASSTHROUGH_THROUGHPUT_TARGET))
            ttft = ours["ttft_ms"]["p50"] / theirs["ttft_ms"]["p50"]
            found.append(_target(f"passthrough p50 TTFT vs vLLM, c={concurrency} ({generator})", ttft,
                                 f"<= {PASSTHROUGH_TTFT_TARGET}", ttft <= PASSTHROUGH_TTFT_TARGET))
    latency = {r["n"]: r["latency_ms"]["p50"] for r in results.get("best_of_n", []) if r["concurrency"] == 1}
    if 1 in latency and 8 in latency:
        value = latency[8] / latency[1]
        found.append(_target("best-of-8 / best-of-1 p50 latency, c=1", value, f"<= {BEST_OF_8_TARGET}",
                             value <= BEST_OF_8_TARGET))
    found += _hf_target(results)
    one_b = results.get("guide_kv", {}).get("one_b_guide")
    if one_b:
        found.append(_target("guide KV of a 1B-class guide, 256 sequences at max_model_len 8192 (GiB)", one_b["gib"],
                             f"<= budget {one_b['budget_gib']:g}", one_b["gib"] <= one_b["budget_gib"]))
    return found


def _hf_target(results: dict) -> list[dict]:
    """ours guided / HF guided >= vLLM unguided / HF unguided, at the highest concurrency both ran."""
    hf = {(r["load"], r["concurrency"]): r["tokens_per_s"] for r in results.get("hf", [])}
    ours = {(r["load"], r["concurrency"]): r["tokens_per_s"] for r in results.get("overhead", [])}
    vllm = {r["concurrency"]: r["tokens_per_s"] for r in results.get("passthrough", [])
            if r["server"] == "vllm" and r["generator"] == "ours"}
    guided = [load for load, _ in hf if load != UNGUIDED]
    levels = [c for c in {c for _, c in hf} if c in vllm and guided and (guided[0], c) in ours]
    if not levels:
        return []
    top, load = max(levels), guided[0]
    ours_ratio = ours[(load, top)] / hf[(load, top)]
    vllm_ratio = vllm[top] / hf[(UNGUIDED, top)]
    return [_target(f"ours {load} / HF generate guided, c={top} (vLLM unguided / HF unguided: {vllm_ratio:.2f})",
                    ours_ratio, f">= {vllm_ratio:.2f}", ours_ratio >= vllm_ratio)]


def _percentile(row: dict, key: str, which: str) -> str:
    value = row.get(key, {}).get(which)
    return "" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def markdown(results: dict) -> str:
    setup, machine = results["setup"], results["machine"]
    lines = [f"# `alignserve bench`: {setup['model']}", "",
             f"Command: `{setup['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None), "",
             f"Every load sends `ignore_eos` completions of exactly the stated tokens at temperature 1, closed loop "
             f"(each client sends its next request when the last one ends), {setup['requests_per_client']} requests "
             f"per client, after an untimed warm-up wave on each server. Compute bound: `bench/suite/compute_bound.py` (weight multiply-accumulates per token: "
             f"base / (base + guide per step)).", ""]
    if results.get("passthrough"):
        lines += ["## Passthrough: unguided, alignserve vs vLLM's own server", ""]
        lines += _table(["server", "load generator", "c", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                         "ITL p99 ms", "failed"],
                        [[r["server"], r["generator"], r["concurrency"], r["tokens_per_s"],
                          _percentile(r, "ttft_ms", "p50"), _percentile(r, "ttft_ms", "p99"),
                          _percentile(r, "itl_ms", "p50"), _percentile(r, "itl_ms", "p99"), r["failed"]]
                         for r in results["passthrough"]])
    if results.get("overhead"):
        lines += ["## Guidance overhead: each module against unguided", ""]
        lines += _table(["load", "c", "tokens/s", "guided / unguided", "compute bound", "of bound", "TTFT p50 ms",
                         "ITL p50 ms", "failed"],
                        [[r["load"], r["concurrency"], r["tokens_per_s"], r["ratio"], r["bound"], r.get("of_bound"),
                          _percentile(r, "ttft_ms", "p50"), _percentile(r, "itl_ms", "p50"), r["failed"]]
                         for r in results["overhead"]])
    if results.get("length"):
        lines += [f"## Length scaling (c={setup['length_concurrency']})", ""]
        lines += _table(["tokens", "load", "tokens/s", "guided / unguided", "ITL p50 ms", "failed"],
                        [[r["tokens"], r["load"], r["tokens_per_s"], r.get("ratio"), _percentile(r, "itl_ms", "p50"),
                          r["failed"]] for r in results["length"]])
    if results.get("best_of_n"):
        lines += [f"## Best-of-N by `{setup['scorer']}`", ""]
        lines += _table(["N", "c", "latency p50 ms", "latency p99 ms", "requests/s", "generated tokens/s", "failed"],
                        [[r["n"], r["concurrency"], _percentile(r, "latency_ms", "p50"),
                          _percentile(r, "latency_ms", "p99"), r["requests_per_s"],
                          round(r["generated_tokens"] / r["seconds"], 1) if r["seconds"] else "", r["failed"]]
                         for r in results["best_of_n"]])
    if results.get("hf"):
        lines += ["## Against the usual implementation: Hugging Face `generate` + a value-model logits processor",
                  "", "Batched per call (batch = c), in the benchmark's process on "
                  f"{setup['hf_threads']} thread(s) (the vLLM CPU worker also runs on one core), both models in "
                  f"{setup.get('dtype', 'float32')} like the server's.", ""]
        lines += _table(["implementation", "load", "c", "tokens/s"],
                        [[r["implementation"], r["load"], r["concurrency"], r["tokens_per_s"]] for r in results["hf"]])
    if results.get("guide_kv"):
        lines += ["## Guide KV memory", "", "Printed by alignserve at start-up:", ""]
        lines += [f"- {line}" for line in results["guide_kv"]["startup"]]
        lines += ["", f"A 1B-class guide (Llama-3.2-1B's shape, bfloat16), 256 sequences at max_model_len 8192: "
                      f"{results['guide_kv']['one_b_guide']['line']}", ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "goal", "met"],
                    [[t["target"], t["value"], t["goal"], {True: "yes", False: "**no**", None: ""}[t["met"]]]
                     for t in results["targets"]])
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    """PNG plots of the sections that ran; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if results.get("overhead"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        loads = [load for load in dict.fromkeys(r["load"] for r in results["overhead"]) if load != UNGUIDED]
        for index, load in enumerate(loads):
            rows = [r for r in results["overhead"] if r["load"] == load]
            line, = ax.plot([r["concurrency"] for r in rows], [r["ratio"] for r in rows], "o-", label=load)
            ax.axhline(rows[0]["bound"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrency", ylabel="guided / unguided tokens/s", ylim=(0, 1.05),
               title="Guidance overhead (dotted: compute bound)")
        ax.legend(fontsize=7)
        save(fig, "overhead.png")
    if results.get("passthrough"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for server in ("alignserve", "vllm"):
            for generator, style in (("ours", "o-"), ("vllm bench serve", "s--")):
                rows = [r for r in results["passthrough"] if r["server"] == server and r["generator"] == generator]
                if rows:
                    ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], style,
                            label=f"{server} ({generator})")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrency", ylabel="output tokens/s", title="Passthrough (unguided)")
        ax.legend(fontsize=8)
        save(fig, "passthrough.png")
    if results.get("length"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for load in dict.fromkeys(r["load"] for r in results["length"]):
            rows = [r for r in results["length"] if r["load"] == load]
            ax.plot([r["tokens"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=load)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="generated tokens per request", ylabel="output tokens/s", title="Length scaling")
        ax.legend(fontsize=8)
        save(fig, "length.png")
    if results.get("best_of_n"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows = [r for r in results["best_of_n"] if r["concurrency"] == 1]
        ax.plot([r["n"] for r in rows], [r["latency_ms"]["p50"] / 1e3 for r in rows], "o-", label="c=1, p50")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="N", ylabel="latency (s)", title="Best-of-N latency")
        ax.legend(fontsize=8)
        save(fig, "best_of_n.png")
    if results.get("hf"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = {f"HF generate, {r['load']}": {} for r in results["hf"]}
        for r in results["hf"]:
            series[f"HF generate, {r['load']}"][r["concurrency"]] = r["tokens_per_s"]
        guided = next((r["load"] for r in results["hf"] if r["load"] != UNGUIDED), None)
        series["alignserve, " + str(guided)] = {r["concurrency"]: r["tokens_per_s"]
                                                for r in results.get("overhead", []) if r["load"] == guided}
        series["vLLM server, unguided"] = {r["concurrency"]: r["tokens_per_s"] for r in results.get("passthrough", [])
                                           if r["server"] == "vllm" and r["generator"] == "ours"}
        for label, points in series.items():
            if points:
                levels = sorted(points)
                ax.plot(levels, [points[c] for c in levels], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="concurrency (HF: batch size)", ylabel="output tokens/s", title="Against HF generate")
        ax.legend(fontsize=7)
        save(fig, "hf_baseline.png")
    return written
