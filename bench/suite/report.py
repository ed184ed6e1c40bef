"""The suite's targets, markdown report and plots, from the rows `bench.suite.sections` measured.

Targets are reported, never asserted: the machines are shared and noisy.
"""

from __future__ import annotations

from operator import itemgetter
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

    def plot(name: str, series: list[tuple[str, dict[int, float], str]], title: str, xlabel: str, ylabel: str,
             bounds: dict[str, float] | None = None, **axes) -> None:
        """One figure of (label, {x: y}, style) lines on a log2 x axis; `bounds`: a dotted line per label."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points, style in series:
            if points:
                xs = sorted(points)
                line, = ax.plot(xs, [points[x] for x in xs], style, label=label)
                if bounds and label in bounds:
                    ax.axhline(bounds[label], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, **axes)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def by(rows: list[dict], x: str, y, **match) -> dict[int, float]:
        """{row[x]: y(row)} over the rows whose fields equal `match`."""
        return {r[x]: y(r) for r in rows if all(r.get(k) == v for k, v in match.items())}

    if overhead := results.get("overhead"):
        loads = [load for load in dict.fromkeys(r["load"] for r in overhead) if load != UNGUIDED]
        plot("overhead.png", [(load, by(overhead, "concurrency", lambda r: r["ratio"], load=load), "o-")
                              for load in loads],
             "Guidance overhead (dotted: compute bound)", "concurrency", "guided / unguided tokens/s",
             bounds={r["load"]: r["bound"] for r in overhead}, ylim=(0, 1.05))
    if passthrough := results.get("passthrough"):
        plot("passthrough.png", [(f"{server} ({generator})", by(passthrough, "concurrency", lambda r: r["tokens_per_s"],
                                                                 server=server, generator=generator), style)
                                 for server in ("alignserve", "vllm")
                                 for generator, style in (("ours", "o-"), ("vllm bench serve", "s--"))],
             "Passthrough (unguided)", "concurrency", "output tokens/s")
    if length := results.get("length"):
        plot("length.png", [(load, by(length, "tokens", lambda r: r["tokens_per_s"], load=load), "o-")
                            for load in dict.fromkeys(r["load"] for r in length)],
             "Length scaling", "generated tokens per request", "output tokens/s")
    if best := results.get("best_of_n"):
        plot("best_of_n.png", [("c=1, p50", by(best, "n", lambda r: r["latency_ms"]["p50"] / 1e3, concurrency=1), "o-")],
             "Best-of-N latency", "N", "latency (s)")
    if hf := results.get("hf"):
        tokens_per_s = itemgetter("tokens_per_s")
        guided = next((r["load"] for r in hf if r["load"] != UNGUIDED), None)
        series = [(f"HF generate, {load}", by(hf, "concurrency", tokens_per_s, load=load), "o-")
                  for load in dict.fromkeys(r["load"] for r in hf)]
        series += [(f"alignserve, {guided}", by(results.get("overhead", []), "concurrency", tokens_per_s, load=guided),
                    "o-"),
                   ("vLLM server, unguided", by(results.get("passthrough", []), "concurrency", tokens_per_s,
                                                server="vllm", generator="ours"), "o-")]
        plot("hf_baseline.png", series, "Against HF generate", "concurrency (HF: batch size)", "output tokens/s",
             yscale="log")
    return written
