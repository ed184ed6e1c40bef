"""reward_vs_kl.png: pass@1 against mean KL to the base, one curve per method;
reward_kl_frontier.png: the methods of the equal-KL table (``equal_kl``), each through its budgets
(best-of-N through its N) from the base at KL 0, with standard-error bars; and
pass_vs_compute.png: pass@1 against generated tokens per sample (every candidate of a search,
pruned ones up to their abort) and against wall seconds per sample (the configuration's run
time over its samples, all configurations at the same concurrency on the same server).

Points of a curve are joined in order of strength and labelled with it (the guidance
strength, N for best-of-N, candidates per block for blockwise; a budgeted curve's points in
order of their budget, labelled "<=B"); the base is a star at KL 0.
Configurations whose KL leaves out their search's selection (blockwise) are drawn hollow;
those with no KL estimate at all are listed under the plot instead of being placed on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from workflows.evaluation.configs import BASE_NAME  # noqa: E402
from workflows.evaluation.equal_kl import EqualKLTable, frontiers  # noqa: E402
from workflows.evaluation.metrics import ResultRow  # noqa: E402


def _position(row: ResultRow) -> tuple[bool, float]:
    """Where a point sits along its curve: its KL budget, else its strength (None last)."""
    place = row.kl_budget if row.kl_budget is not None else row.strength
    return place is None, place or 0.0


def _label(row: ResultRow) -> str | None:
    if row.kl_budget is not None:
        return f"<={row.kl_budget:g}"
    return None if row.strength is None else f"{row.strength:g}"


def plot_reward_vs_kl(rows: Sequence[ResultRow], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 5))
    curves: dict[str, list[ResultRow]] = {}
    unplotted = []
    for row in rows:
        if row.method == BASE_NAME:
            axes.scatter([0.0], [row.pass_at_1], marker="*", s=180, color="black", zorder=3, label="base")
        elif row.mean_kl is None:
            unplotted.append(row.config)
        else:
            curves.setdefault(row.method, []).append(row)
    for method, points in curves.items():
        points.sort(key=_position)
        complete = all(r.kl_complete for r in points)
        kls, rewards = [r.mean_kl for r in points], [r.pass_at_1 for r in points]
        line, = axes.plot(kls, rewards, marker="o", markerfacecolor=None if complete else "none",
                          label=method if complete else f"{method} (KL excludes selection)")
        for r in points:
            if (text := _label(r)) is not None:
                axes.annotate(text, (r.mean_kl, r.pass_at_1), textcoords="offset points",
                              xytext=(4, 4), fontsize=8, color=line.get_color())
    axes.set_xlabel("mean KL to the base (nats per completion)")
    axes.set_ylabel("pass@1")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    if unplotted:
        figure.text(0.01, 0.01, "KL not estimated, not plotted: " + ", ".join(unplotted), fontsize=7)
    figure.tight_layout(rect=(0, 0.03 if unplotted else 0, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _curves(rows: Sequence[ResultRow]) -> dict[str, list[ResultRow]]:
    """Rows by method, each curve in order of budget or strength."""
    curves: dict[str, list[ResultRow]] = {}
    for row in rows:
        curves.setdefault(row.method, []).append(row)
    for points in curves.values():
        points.sort(key=_position)
    return curves


def plot_frontier(table: EqualKLTable, rows: Sequence[ResultRow], path: Path, title: str) -> None:
    """reward_kl_frontier.png: ``frontiers(table, rows)``, pass@1 ± standard error against mean KL, the
    budgets as dotted vertical lines; best-of-N dashed, its points labelled with N."""
    figure, axes = plt.subplots(figsize=(7.5, 5))
    for budget in table.budgets:
        axes.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
        axes.text(budget, 1.0, f"{budget:g}", transform=axes.get_xaxis_transform(), fontsize=7, color="grey",
                  ha="center", va="bottom")
    kinds = {m.method: m.kind for m in table.methods}
    for method, points in frontiers(table, rows).items():
        bars = axes.errorbar([c.mean_kl for c in points], [c.pass_at_1 for c in points],
                             yerr=[c.pass_at_1_stderr or 0.0 for c in points], marker="o", capsize=3,
                             linestyle="-" if kinds[method] == "budget" else "--", label=method)
        if kinds[method] == "best-of-n":
            for c in points[1:] if points[0].config == BASE_NAME else points:
                axes.annotate(f"N={c.strength:g}", (c.mean_kl, c.pass_at_1), textcoords="offset points",
                              xytext=(4, -10), fontsize=7, color=bars.lines[0].get_color())
    if table.base is not None:
        axes.scatter([0.0], [table.base.pass_at_1], marker="*", s=180, color="black", zorder=3, label="base")
    axes.set_xlabel("mean KL to the base (nats per response)")
    axes.set_ylabel("pass@1 (± standard error)")
    axes.set_title(title, fontsize=10, pad=14)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pass_vs_compute(rows: Sequence[ResultRow], path: Path, title: str) -> None:
    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    costs = (("generated tokens per sample", lambda r: r.generated_tokens_per_sample),
             ("wall seconds per sample", lambda r: r.seconds / (r.prompts * r.samples_per_prompt)))
    for axes, (label, cost) in zip(panels, costs):
        for method, points in _curves(rows).items():
            if method == BASE_NAME:
                axes.scatter([cost(points[0])], [points[0].pass_at_1], marker="*", s=180, color="black", zorder=3,
                             label="base")
                continue
            line, = axes.plot([cost(r) for r in points], [r.pass_at_1 for r in points], marker="o", label=method)
            for r in points:
                if (text := _label(r)) is not None:
                    axes.annotate(text, (cost(r), r.pass_at_1), textcoords="offset points",
                                  xytext=(4, 4), fontsize=8, color=line.get_color())
        axes.set_xscale("log")
        axes.set_xlabel(f"{label} (log scale)")
        axes.set_ylabel("pass@1")
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
