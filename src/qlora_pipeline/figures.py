"""PNG pictures of a run for people who would rather look than read (``dvc plots`` needs a CDN for its HTML).

Written by evaluate into ``reports/`` (and so logged to MLflow with it): the loss curves, base vs
tuned metrics with their intervals, and the persona-score distributions.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

LOSS_CURVES = "loss_curves.png"
METRICS = "base_vs_tuned.png"
PERSONA_SCORES = "persona_scores.png"
# Shown with their intervals; each is a mean in [0, 1] over the test replies.
INTERVAL_METRICS = ("rouge1", "rouge2", "rougeL", "persona_score", "repeated_3gram")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def loss_curves(log_csv: Path, out: Path) -> bool:
    """Training and validation loss over steps, from train-adapter's ``train_log.csv``; False if there is none."""
    if not log_csv.is_file():
        return False
    with log_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column, label in (("train_loss", "training"), ("val_loss", "validation")):
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            ax.plot(*zip(*points), marker="o" if column == "val_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def metric_intervals(metrics: dict, out: Path) -> None:
    """Base and tuned means with their bootstrap intervals, one row per metric."""
    names = [n for n in INTERVAL_METRICS if n in metrics]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.6))
    y = np.arange(len(names))
    for offset, side, color in ((-0.15, "base", "tab:gray"), (0.15, "tuned", "tab:blue")):
        means = np.array([metrics[n][side] for n in names])
        low = means - np.array([metrics[n][f"{side}_ci"][0] for n in names])
        high = np.array([metrics[n][f"{side}_ci"][1] for n in names]) - means
        ax.errorbar(means, y + offset, xerr=[low, high], fmt="o", color=color, label=side, capsize=3)
    if "persona_score" in metrics:
        reference = metrics["persona_score"]["reference"]
        ax.plot([reference], [names.index("persona_score")], marker="*", color="tab:green", markersize=12,
                linestyle="none", label="persona's own replies")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel=f"mean over test replies ({int(metrics['confidence_level'] * 100)}% interval)",
           title="Base vs tuned")
    # Below the axes: inside, it would cover a row's points.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def persona_scores(scores: dict[str, Sequence[float]], out: Path) -> None:
    """Histograms of the style judge's persona probability per reply, one per side."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 21)
    for label, values in scores.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=2, label=f"{label} (mean {np.mean(values):.2f})")
    ax.set(xlabel="style judge: probability the persona wrote it", ylabel="replies", title="Persona score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
