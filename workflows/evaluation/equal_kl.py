"""pass@1 at equal KL: each method at each KL budget, the comparison the Q-sharp paper makes.

Rows are methods, columns the budgets B that the run's budgeted configurations give (``max_kl``):

- a budgeted per-step method (rows with ``kl_budget``, KL ``reported``): its configuration at B.
  The server holds every response's KL within B, so the mean KL spent is at most B;
- best-of-N (hard or soft, unguided, pruned or not: KL a bound of the selection alone): the
  largest N whose bound is at most B (None when even the smallest exceeds it). Its KL is the
  policy's, a bound, not a per-response KL;
- the base, at KL 0, in every column.

Left out, and named under the table: fixed-strength guidance (each response's KL is not bounded,
only measured), blockwise (the selection's KL is not estimated) and searches over guided
candidates (their KL adds two estimates from different reference points).

The frontier of a method is its cells' points (mean KL, pass@1), from the base at KL 0; for
best-of-N every N the run has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from workflows.evaluation.configs import BASE_NAME
from workflows.evaluation.metrics import BON_BOUND, KL_BUDGET_RTOL, REPORTED, SOFT_BON_BOUND, ResultRow

SELECTION_BOUNDS = (BON_BOUND, SOFT_BON_BOUND)


@dataclass(frozen=True)
class Cell:
    """One method at one budget: the configuration that stands for it and its numbers."""

    config: str
    strength: float | None  # N for best-of-N
    pass_at_1: float
    pass_at_1_stderr: float | None
    mean_kl: float
    over_budget: int | None  # responses over the budget; None for best-of-N (no per-response budget)


@dataclass(frozen=True)
class MethodRow:
    method: str
    kind: Literal["budget", "best-of-n"]
    cells: tuple[Cell | None, ...]  # one per budget; None: no configuration fits


@dataclass(frozen=True)
class EqualKLTable:
    budgets: tuple[float, ...]
    base: Cell | None
    methods: tuple[MethodRow, ...]
    left_out: tuple[str, ...]  # methods with a KL but not comparable at equal KL
    budgeted_responses: int
    over_budget: int  # responses of budgeted configurations whose reported KL exceeds their budget
    over_budget_configs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cell(row: ResultRow) -> Cell:
    assert row.mean_kl is not None
    return Cell(config=row.config, strength=row.strength, pass_at_1=row.pass_at_1,
                pass_at_1_stderr=row.pass_at_1_stderr, mean_kl=row.mean_kl, over_budget=row.over_budget)


def _fits(kl: float, budget: float) -> bool:
    return kl <= budget * (1 + KL_BUDGET_RTOL)


def equal_kl_table(rows: Sequence[ResultRow]) -> EqualKLTable | None:
    """The table of ``rows`` (module docstring); None when no row has a KL budget."""
    budgeted = [r for r in rows if r.kl_budget is not None]
    if not budgeted:
        return None
    comparable = [r for r in budgeted if r.kl_source == REPORTED]
    budgets = tuple(sorted({r.kl_budget for r in comparable}))
    methods: dict[str, MethodRow] = {}
    by_method: dict[str, list[ResultRow]] = {}
    for row in comparable:
        by_method.setdefault(row.method, []).append(row)
    for method, points in by_method.items():
        at = {r.kl_budget: r for r in points}
        methods[method] = MethodRow(method, "budget", tuple(_cell(at[b]) if b in at else None for b in budgets))
    searches: dict[str, list[ResultRow]] = {}
    for row in rows:
        if row.kl_source in SELECTION_BOUNDS and row.mean_kl is not None:
            searches.setdefault(row.method, []).append(row)
    for method, points in searches.items():
        cells = []
        for budget in budgets:
            fitting = [r for r in points if _fits(r.mean_kl, budget)]
            cells.append(_cell(max(fitting, key=lambda r: r.mean_kl)) if fitting else None)
        methods[method] = MethodRow(method, "best-of-n", tuple(cells))
    base = next((_cell(r) for r in rows if r.method == BASE_NAME), None)
    left_out = tuple(dict.fromkeys(r.method for r in rows if r.method != BASE_NAME and r.method not in methods))
    violating = [r for r in budgeted if r.over_budget]
    return EqualKLTable(budgets=budgets, base=base, methods=tuple(methods.values()), left_out=left_out,
                        budgeted_responses=sum(r.prompts * r.samples_per_prompt for r in budgeted),
                        over_budget=sum(r.over_budget for r in violating),
                        over_budget_configs=tuple(r.config for r in violating))


def frontiers(table: EqualKLTable, rows: Sequence[ResultRow]) -> dict[str, list[Cell]]:
    """Each method's points in order of KL: its budget cells, or every N of best-of-N; each starts
    at the base (KL 0) when the run has it."""
    curves: dict[str, list[Cell]] = {}
    for method in table.methods:
        if method.kind == "budget":
            points = [c for c in method.cells if c is not None]
        else:
            points = [_cell(r) for r in rows if r.method == method.method and r.mean_kl is not None]
        points.sort(key=lambda c: c.mean_kl)
        if table.base is not None and (not points or points[0].mean_kl > 0):
            points.insert(0, table.base)
        curves[method.method] = points
    return curves


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown_cell(cell: Cell | None, kind: str) -> str:
    if cell is None:
        return "none fits"
    text = f"{cell.pass_at_1:.3f} ± {_number(cell.pass_at_1_stderr)} (KL {cell.mean_kl:.3f}"
    if kind == "best-of-n":
        text += f", N={cell.strength:g}"
    return text + ")"


def markdown_equal_kl(table: EqualKLTable) -> str:
    """The section of results.md: the table, then how to read it and the budget check."""
    lines = ["## pass@1 at equal KL", ""]
    if table.budgets:
        header = ["method", *(f"KL <= {b:g}" for b in table.budgets)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        if table.base is not None:
            lines.append("| base | " + " | ".join(_markdown_cell(table.base, "base") for _ in table.budgets) + " |")
        for method in table.methods:
            cells = " | ".join(_markdown_cell(c, method.kind) for c in method.cells)
            lines.append(f"| {method.method} | {cells} |")
    else:
        lines.append("No budgeted configuration without a search: nothing to compare at equal KL.")
    lines += [
        "",
        "- cell: pass@1 ± its standard error (the standard error of the mean over prompts of each prompt's "
        "mean reward), and the mean KL actually spent (nats per response).",
        "- `max_kl` rows: every guidance entry carries `max_kl` B and no strength cap of its own "
        "(a `--configs` entry keeps its strength as the cap); the server steers each step with the largest "
        "strength whose exact KL fits what is left of B.",
    ]
    if any(m.kind == "best-of-n" for m in table.methods):
        lines.append("- best-of-N rows: the largest N whose KL bound (log N - (N-1)/N; log N soft or pruned) is "
                     "at most B; that KL bounds the policy's KL, it is not a per-response budget. "
                     "reward_kl_frontier.png draws every N at its own KL.")
    if table.left_out:
        lines.append("- not comparable at equal KL, left out: " + ", ".join(f"`{m}`" for m in table.left_out)
                     + " (fixed strengths bound no response's KL; blockwise selection's KL is not estimated; "
                       "searches over guided candidates add two KL estimates).")
    check = (f"- budget check: {table.over_budget} of {table.budgeted_responses} budgeted responses reported a KL "
             f"over their `max_kl` (relative tolerance {KL_BUDGET_RTOL:g})")
    if table.over_budget_configs:
        check += ": " + ", ".join(f"`{c}`" for c in table.over_budget_configs)
    lines.append(check + ".")
    return "\n".join(lines) + "\n"
