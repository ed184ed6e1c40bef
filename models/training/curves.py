"""The training and validation loss curves of a guide's fit, drawn as a PNG beside its card."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CURVES_FILE = "training_curves.png"


def plot_curves(curve: Sequence[dict[str, float]], title: str, path: Path, best_step: int | None = None) -> None:
    """Training loss (mean over each interval) and validation loss against the step; the kept point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.6))
    trained = [point for point in curve if "train_loss" in point]
    axes.plot([p["step"] for p in trained], [p["train_loss"] for p in trained], marker=".", label="training")
    axes.plot([p["step"] for p in curve], [p["validation_loss"] for p in curve], marker=".", label="validation")
    if best_step is not None:
        axes.axvline(best_step, color="grey", linestyle=":", label=f"best validation (step {best_step})")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
