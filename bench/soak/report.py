"""The soak's phases as results: `results.json` (per phase: requests by outcome, hung, 5xx, latency,
throughput, memory, the checks) and `report.md`, one table row per phase (bench/soak)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.load import percentiles_ms
from bench.soak.checks import Check, missing_retry_after, outcomes, replay_counts, tokens_per_s
from bench.soak.traffic import RequestRecord, is_clean, is_server_error, outcome

FAILURE_EXAMPLES = 10  # requests that ended unclean, kept per phase in results.json


@dataclass
class Phase:
    """A phase's requests, what it checked and measured; `began` is `time.monotonic()`."""

    name: str
    server: str  # which start of the server it ran on
    concurrency: int
    seconds: float
    records: list[RequestRecord]
    checks: list[Check]
    began: float = 0.0
    memory: dict | None = None  # RSS after the phase (bench.soak.server.sample_memory)
    memory_growth_pct: dict[str, float] | None = None  # since the server's first phase
    settled: dict[str, float | None] = field(default_factory=dict)  # counters after the phase (None: no answer)
    facts: dict = field(default_factory=dict)  # what a fault measured

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def line(self) -> str:
        """One line of progress."""
        failed = "; ".join(c.name for c in self.checks if not c.passed)
        return (f"[soak] {self.name}: {len(self.records)} requests in {self.seconds:.1f} s, {outcomes(self.records)}; "
                f"{'FAIL: ' + failed if failed else 'pass'}")


def _failure(record: RequestRecord) -> dict:
    return {**asdict(record), "text": record.text[:200], "outcome": outcome(record)}


def phase_summary(phase: Phase) -> dict:
    answered = [r for r in phase.records if not (r.hung or r.left or r.transport_error)]
    return {
        "name": phase.name, "server": phase.server, "concurrency": phase.concurrency, "seconds": phase.seconds,
        "requests": len(phase.records), "outcomes": outcomes(phase.records),
        "hung": sum(r.hung for r in phase.records),
        "five_xx": sum((r.status or 0) >= 500 or r.in_stream for r in phase.records),
        "server_errors": sum(map(is_server_error, phase.records)),
        "missing_retry_after": missing_retry_after(phase.records),
        "replays": replay_counts(phase.records),
        "latency_ms": percentiles_ms([r.latency_s for r in answered]),
        "completion_tokens": sum(r.completion_tokens for r in phase.records),
        "tokens_per_s": tokens_per_s(phase.records, phase.seconds),
        "memory": phase.memory, "memory_growth_pct": phase.memory_growth_pct, "settled": phase.settled,
        "checks": [asdict(c) for c in phase.checks], "passed": phase.passed, "facts": phase.facts,
        "failures": [_failure(r) for r in phase.records if not is_clean(r)][:FAILURE_EXAMPLES],
    }


def failed_checks(phases: list[dict]) -> list[str]:
    return [f"{p['name']}: {c['name']} ({c['details']})" for p in phases for c in p["checks"] if not c["passed"]]


def _ms(latency: dict) -> str:
    return f"{latency['p50']:.0f} / {latency['p99']:.0f}" if latency else "-"


def _memory(phase: dict) -> str:
    memory, growth = phase["memory"], phase["memory_growth_pct"]
    if memory is None:
        return "-"
    suffix = "" if growth is None else f" ({growth['server']:+.1f}% / {growth['children']:+.1f}%)"
    return f"{memory['server_mib']:.0f} / {memory['children_mib']:.0f}{suffix}"


def _row(phase: dict) -> str:
    failed = "; ".join(c["name"] for c in phase["checks"] if not c["passed"])
    counts = ", ".join(f"{label}: {n}" for label, n in phase["outcomes"].items())
    return (f"| {phase['name']} | {phase['server']} | {phase['concurrency']} | {phase['requests']} | {counts} | "
            f"{phase['hung']} | {phase['five_xx']} | {_ms(phase['latency_ms'])} | {phase['tokens_per_s']:.0f} | "
            f"{_memory(phase)} | {'FAIL: ' + failed if failed else 'pass'} |")


def report(result: dict) -> str:
    """The run as markdown: the machine and server, one row per phase, the failed checks, the faults."""
    machine = result["machine"]
    model = result["offer"]["model"] if result["offer"] else "?"
    lines = [
        f"# Soak: {model}, {result['wall_s']:.0f} s, {'passed' if result['passed'] else 'FAILED'}", "",
        f"Machine: {machine.get('cpu')}, {machine.get('usable_cpus')} usable CPUs (flags: "
        f"{', '.join(machine.get('cpu_flags') or []) or 'none'}), {machine.get('memory_gib')} GiB, "
        f"vLLM {machine.get('vllm')}, {machine.get('allocator')}.", "",
        f"Server: `{' '.join(result['server_flags'])}`; start seconds {result['starts_s']}; how each ended "
        f"{result['stops']}.", "",
        "| phase | server | c | requests | outcomes | hung | 5xx | p50 / p99 ms | tokens/s "
        "| RSS server / children MiB (growth) | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[_row(p) for p in result["phases"]], "",
        f"Soak rounds, throughput in the first vs the last window: {result['soak_throughput'] or 'n/a'}", ""]
    if not result["passed"]:
        lines += ["## Failed", "", *[f"- {f}" for f in result["failed_checks"]]]
        lines += [f"- the run broke:\n\n```\n{result['error']}\n```"] if result["error"] else []
        lines.append("")
    lines += ["## Faults", "", *[f"- {p['name']}: {p['facts']}" for p in result["phases"] if p["facts"]], ""]
    return "\n".join(lines)


def write_results(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result))
