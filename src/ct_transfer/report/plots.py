"""Plots of a grid, drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no backend switch).

Each ``*_figure`` function returns a Figure; ``save`` writes it as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

COLORS = {"none": "#999999", "imagenet": "#1f77b4"}
LABELS = {"none": "from scratch", "imagenet": "ImageNet"}


def save(fig: Figure, path, *, dpi: int = 100) -> Path:
    from .. import _io

    path = Path(path)
    with _io.atomic_open(path, "wb") as fh:  # no half-written PNG on a full disk
        fig.savefig(fh, dpi=dpi, format="png")
    return path


def bars_figure(rows: list[dict], *, ylabel: str, title: str, paper: dict | None = None,
                scale: float = 1.0) -> Figure:
    """Mean ± std per model and condition; ``paper``: {model: {"without", "with"}} drawn as markers."""
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(5, 1.1 * len(rows) + 2), 3.6), layout="tight")
    ax = fig.subplots()
    for off, cond, key in ((-0.2, "none", "without"), (0.2, "imagenet", "with")):
        ran = [i for i, r in enumerate(rows) if r[key] and r[key]["mean"] is not None]
        means = [rows[i][key]["mean"] * scale for i in ran]
        errs = [(rows[i][key]["std"] or 0) * scale for i in ran]
        if ran:  # a condition that was not run has no bar (a bar at 0 would read as accuracy 0)
            ax.bar(x[ran] + off, means, 0.4, yerr=errs, label=LABELS[cond], color=COLORS[cond], capsize=3)
        for i in sorted(set(range(len(rows))) - set(ran)):
            ax.text(x[i] + off, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
        if paper:
            px = [i + off for i, r in enumerate(rows) if r["model"] in paper]
            py = [paper[r["model"]][key] * scale for r in rows if r["model"] in paper]
            if px:
                ax.scatter(px, py, marker="D", color="black", zorder=3, s=18,
                           label="paper" if cond == "none" else None)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def val_curves_figure(groups: dict) -> Figure:
    """Validation accuracy per epoch, one panel per model, one line per run."""
    models = list(groups)
    cols = max(1, min(3, len(models)))
    nrows = max(1, math.ceil(len(models) / cols))
    fig = Figure(figsize=(4.2 * cols, 3 * nrows), layout="tight")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, model in zip(axes.flat, models):
        for cond in ("none", "imagenet"):
            for r in groups[model].get(cond, []):
                h = r["history"]
                ax.plot([e["epoch"] for e in h], [e["val_acc"] for e in h], color=COLORS[cond], alpha=0.8,
                        marker="o" if len(h) == 1 else None, label=f"{LABELS[cond]} s{r['seed']}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy")
        if ax.lines:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    return fig


def confusion_figure(runs: list[dict], *, subset: str = "test") -> Figure:
    """One confusion matrix per run (sklearn's display: rows true, columns predicted)."""
    cols = max(1, min(6, len(runs)))
    nrows = max(1, math.ceil(len(runs) / cols))
    fig = Figure(figsize=(2.4 * cols, 2.6 * nrows), layout="tight")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, r in zip(axes.flat, runs):
        m = r["metrics"][subset]
        cm = np.asarray(m["confusion_matrix"])
        labels = _class_labels(r["metrics"].get("classes"), m, len(cm))
        ConfusionMatrixDisplay(cm, display_labels=labels).plot(ax=ax, colorbar=False, cmap="Blues")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        cond = "IN" if r["weights"] == "imagenet" else r["weights"]
        ax.set_title(f"{r['model']}\n{cond} s{r['seed']}", fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle(f"{subset} confusion matrices", fontsize=8)
    return fig


def _class_labels(classes: list[str] | None, metrics: dict, k: int) -> list[str]:
    # matrices follow the run's class order (binary: [[tn, fp], [fn, tp]], positive second)
    if classes and len(classes) == k:
        return list(classes)
    pos = metrics.get("positive_class")
    if k == 2 and pos:
        return [f"not {pos}", pos]
    return [str(i) for i in range(k)]


def write_plots(out_dir, *, tables: dict, groups: dict, runs: list[dict], paper_val: dict) -> dict[str, str]:
    """All report figures as PNG in ``out_dir``; returns {file name: caption}."""
    out_dir = Path(out_dir)
    figures = {} if tables is None else {  # no run of the paper's two conditions: no comparison bars
        "accuracy_val.png": ("validation accuracy, ours (bars) and the paper's Table 6 (diamonds)",
                             bars_figure(tables["val"]["accuracy"]["rows"], ylabel="val accuracy",
                                         title="Validation accuracy (mean ± std over seeds) vs paper",
                                         paper=paper_val["accuracy"])),
        "accuracy.png": ("test accuracy", bars_figure(tables["test"]["accuracy"]["rows"], ylabel="test accuracy",
                                                      title="Test accuracy (mean ± std over seeds)")),
        "f1.png": ("test F1", bars_figure(tables["test"]["f1"]["rows"], ylabel="test F1",
                                          title="Test F1 (mean ± std over seeds)")),
        "train_time.png": ("training time", bars_figure(tables["test"]["train_seconds"]["rows"], ylabel="minutes",
                                                        title="Training time per run (our epochs and hardware)",
                                                        scale=1 / 60)),
    }
    if groups:
        figures["val_curves.png"] = ("validation curves", val_curves_figure(groups))
    figures["confusion_matrices.png"] = ("test confusion matrices", confusion_figure(runs))
    for name, (_, fig) in figures.items():
        save(fig, out_dir / name)
    return {name: caption for name, (caption, _) in figures.items()}
