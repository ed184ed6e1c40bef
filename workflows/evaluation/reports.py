"""The evaluation's files: results.csv, results.md, results.json and samples.jsonl.

- results.csv: one row per configuration, the columns of ``metrics.ResultRow`` (empty cell: none);
- results.md: the run's settings (with the exact command line) and a table of the main columns,
  with notes on how each KL was obtained and what the token counts cover; with KL budgets, then
  the table of pass@1 at equal KL (``equal_kl``) and the budget check;
- results.json: ``{"run": settings, "configs": [...], "results": [...], "equal_kl": table or null}``;
- samples.jsonl: every sample (configuration, prompt, seed, completion, reward, answer, KL, tokens).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from workflows.evaluation.configs import EvalConfig
from workflows.evaluation.equal_kl import equal_kl_table, markdown_equal_kl
from workflows.evaluation.metrics import (
    BON_BOUND,
    REPORTED,
    SELECTION_NOT_ESTIMATED,
    SOFT_BON_BOUND,
    TOKENS_KEPT,
    ResultRow,
)
from workflows.evaluation.samples import Sample

CSV_COLUMNS = [f.name for f in fields(ResultRow)]
MARKDOWN_COLUMNS = ["config", "method", "strength", "pass@1", "maj@k", "mean KL", "KL source", "KL/token",
                    "tokens", "generated/sample", "steered", "seconds"]
KL_NOTES = {
    REPORTED: "the server's `guidance.kl`: exact per-token KL(guided || base) at the sampling temperature, "
              "summed over the completion (0 for the base)",
    BON_BOUND: "best-of-N: log N - (N-1)/N nats, the analytic estimate (Stiennon et al. 2020), an upper bound "
               "(Beirami et al. 2024)",
    SOFT_BON_BOUND: "soft or pruned best-of-N: log N nats, a bound for any rule that keeps one of N samples",
    SELECTION_NOT_ESTIMATED: "blockwise and step-level search: the KL of the selection is not estimated; mean KL is the "
                             "reported per-step KL only, n/a without per-step guidance",
}


@dataclass(frozen=True)
class RunInfo:
    """What the header of the results states about the run."""

    command: str
    model: str  # served model name
    server: str  # where it ran: "started from DIR" or the URL
    prompts_file: str
    prompts: int
    verifier: str
    samples: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: tuple[str, ...] = ()  # the requests' stop strings


def _cell(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _strength(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def write_csv(rows: Sequence[ResultRow], path: Path) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.to_json().items()})


def markdown_table(rows: Sequence[ResultRow]) -> str:
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for r in rows:
        cells = [r.config, r.method, _strength(r.strength), _cell(r.pass_at_1), _cell(r.maj_at_k),
                 _cell(r.mean_kl), r.kl_source, _cell(r.kl_per_token, 4), str(r.tokens),
                 f"{r.generated_tokens_per_sample:.1f}", _cell(r.steered_fraction, 2), f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: Sequence[ResultRow], info: RunInfo) -> str:
    """The run's settings, the table, and notes on the KL sources and token counts that occur in it."""
    header = [
        "# alignserve eval", "", "```", info.command, "```", "",
        f"- model: `{info.model}` ({info.server})",
        f"- prompts: `{info.prompts_file}` ({info.prompts} prompts), verifier `{info.verifier}`",
        f"- samples per prompt (K): {info.samples}; temperature {info.temperature:g}, top_p {info.top_p:g}, "
        f"max_tokens {info.max_tokens}" + (f", stop {list(info.stop)}" if info.stop else ""),
        f"- seed {info.seed}: sample j of prompt i is requested with seed + (i*K + j) * S, S the seeds one sample "
        "uses (1; N for best-of-N; blocks x candidates for blockwise)",
        "",
    ]
    sources = {part for r in rows for part in r.kl_source.replace(";", " +").split(" + ")}
    notes = ["", "KL sources (nats per completion):"]
    notes += [f"- {name}: {text}" for name, text in KL_NOTES.items() if name in sources]
    if any(r.tokens_counted == TOKENS_KEPT for r in rows):
        notes.append("- tokens of search configurations count the kept completions only (the server's "
                     "`usage.completion_tokens`); generated/sample counts every candidate generated, "
                     "pruned ones up to where they were aborted.")
    report = "\n".join(header) + "\n" + markdown_table(rows) + "\n" + "\n".join(notes) + "\n"
    table = equal_kl_table(rows)
    return report if table is None else report + "\n" + markdown_equal_kl(table)


def write_json(rows: Sequence[ResultRow], configs: Sequence[EvalConfig], info: RunInfo, path: Path) -> None:
    table = equal_kl_table(rows)
    body = {"run": asdict(info), "configs": [c.to_json() for c in configs], "results": [r.to_json() for r in rows],
            "equal_kl": None if table is None else table.to_json()}
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def write_samples(samples: Mapping[str, Sequence[Sample]], path: Path) -> None:
    """One JSON line per sample, ``{"config": name, ...sample}``."""
    with Path(path).open("w") as handle:
        for name, group in samples.items():
            for sample in group:
                handle.write(json.dumps({"config": name, **sample.to_json()}, default=str) + "\n")
