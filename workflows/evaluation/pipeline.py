"""One evaluation run against a running server: check every configuration, then run them one after
the other (so each one's wall seconds are its own), rewriting the results after each, so an
interrupted run keeps what finished."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from guidance.verifiers import resolve_verifier
from workflows.evaluation.configs import EvalConfig
from workflows.evaluation.metrics import ResultRow, summarize
from workflows.evaluation.equal_kl import equal_kl_table
from workflows.evaluation.plot import plot_frontier, plot_pass_vs_compute, plot_reward_vs_kl
from workflows.evaluation.reports import RunInfo, markdown_report, write_csv, write_json, write_samples
from workflows.evaluation.runner import EvalRequestError, Runner, SamplingSettings
from workflows.evaluation.samples import Sample
from workflows.prompt_file import PromptRecord

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.csv", "results.md", "results.json", "samples.jsonl", "reward_vs_kl.png", "pass_vs_compute.png")
FRONTIER_FILE = "reward_kl_frontier.png"  # written when some configuration has a KL budget
# Run settings that must match for a resumed run to reuse earlier results (the command may differ).
RESUME_KEYS = ("model", "prompts_file", "prompts", "verifier", "samples", "temperature", "top_p", "max_tokens", "seed",
               "stop")


def finished_results(out: Path, info: RunInfo) -> dict[str, tuple[dict, float, list[Sample]]]:
    """Configurations an earlier run in ``out`` finished: ``{name: (config JSON, seconds, samples)}``
    (the metrics are recomputed from the samples); ValueError naming the setting when that run
    sampled differently."""
    results_file, samples_file = out / "results.json", out / "samples.jsonl"
    if not results_file.is_file():
        return {}
    earlier = json.loads(results_file.read_text())
    this = json.loads(json.dumps(asdict(info)))  # as results.json holds it (a tuple reads back as a list)
    for key in RESUME_KEYS:
        if earlier["run"].get(key, []) != this[key]:  # a run from before `stop` existed sent none
            raise ValueError(f"--resume: {out} holds a run with {key}={earlier['run'].get(key)!r}, this one has "
                             f"{this[key]!r}; use another --out")
    samples: dict[str, list[Sample]] = {}
    for line in samples_file.read_text().splitlines():
        body = json.loads(line)
        samples.setdefault(body.pop("config"), []).append(Sample(**body))
    configs = {c["name"]: c for c in earlier["configs"]}
    return {row["config"]: (configs[row["config"]], row["seconds"], samples[row["config"]])
            for row in earlier["results"]}


def served_model_name(url: str) -> str:
    """The first model ``GET /v1/models`` lists; EvalRequestError when the server does not answer."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise EvalRequestError(f"could not read the served model's name from {url}/v1/models: {exc}") from exc


def write_results(out: Path, rows: Sequence[ResultRow], configs: Sequence[EvalConfig],
                  samples: dict[str, list[Sample]], info: RunInfo) -> None:
    """Every file of RESULT_FILES for the configurations finished so far, and FRONTIER_FILE with KL budgets."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_report(rows, info))
    write_json(rows, configs, info, out / "results.json")
    write_samples(samples, out / "samples.jsonl")
    title = (f"{info.model} on {Path(info.prompts_file).name} ({info.verifier}), K={info.samples}, "
             f"T={info.temperature:g}, top_p={info.top_p:g}")
    plot_reward_vs_kl(rows, out / "reward_vs_kl.png", title)
    plot_pass_vs_compute(rows, out / "pass_vs_compute.png", title)
    table = equal_kl_table(rows)
    if table is None:
        (out / FRONTIER_FILE).unlink(missing_ok=True)  # an earlier run's, in the same --out
    else:
        plot_frontier(table, rows, out / FRONTIER_FILE, title)


async def evaluate(url: str, records: Sequence[PromptRecord], configs: Sequence[EvalConfig],
                   settings: SamplingSettings, info: RunInfo, out: Path, concurrency: int = 32,
                   timeout_s: float = 3600.0, progress: bool = True,
                   transport: httpx.AsyncBaseTransport | None = None, resume: bool = False) -> list[ResultRow]:
    """Run ``configs`` in order on ``records`` and write the results to ``out``; the rows. With
    ``resume``, a configuration an earlier run in ``out`` finished with the same request and the
    same sampling keeps its results (``finished_results``) instead of running again."""
    verifier = resolve_verifier(info.verifier)
    extractor, errors_before = verifier.answer, verifier.errors
    earlier = finished_results(out, info) if resume else {}
    reused = {c.name for c in configs if c.name in earlier and earlier[c.name][0] == c.to_json()}
    rows: list[ResultRow] = []
    samples: dict[str, list[Sample]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, transport=transport,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        runner = Runner(client, records, settings, verifier, concurrency)
        await runner.check([c for c in configs if c.name not in reused])
        with tqdm(total=len(configs) * len(records) * settings.samples, unit="request",
                  disable=not progress) as bar:
            for config in configs:
                bar.set_description(config.name)
                if config.name in reused:
                    _, seconds, samples[config.name] = earlier[config.name]
                    rows.append(summarize(config, samples[config.name], seconds, with_majority=extractor is not None))
                    bar.update(len(records) * settings.samples)
                else:
                    began = time.perf_counter()
                    samples[config.name] = await runner.run(config, bar)
                    rows.append(summarize(config, samples[config.name], time.perf_counter() - began,
                                          with_majority=extractor is not None))
                # Reused results too: a failure further on must not drop them from the files.
                write_results(out, rows, configs[: len(rows)], samples, info)
    if (table := equal_kl_table(rows)) is not None and table.over_budget:
        logger.warning("%d of %d budgeted responses reported a KL over their max_kl: %s", table.over_budget,
                       table.budgeted_responses, ", ".join(table.over_budget_configs))
    if errors := verifier.errors - errors_before:
        logger.warning("verifier %r failed on %d samples; they scored 0", verifier.name, errors)
    return rows
