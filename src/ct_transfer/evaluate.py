"""Evaluate: metrics from sklearn.metrics, per-image prediction files, plots (inference: ``inference``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _io
from .errors import CTTransferError


def compute_metrics(y_true, proba, classes: list[str], *, threshold: float | None = None,
                    intervals: bool = True) -> dict:
    """Accuracy, precision, recall, F1, specificity, ROC-AUC and the confusion matrix (argmax decisions),
    ``ece`` (expected calibration error), ``ci95`` (95% intervals: Wilson for accuracy, precision,
    recall, specificity; seeded bootstrap for F1 and AUC) and, given a decision ``threshold`` on the
    positive class's probability, ``operating_point`` (sensitivity/specificity at that threshold).

    Binary: the positive class is ``classes[1]``; ``confusion_matrix`` is [[tn, fp], [fn, tp]].
    More classes: macro averages, one-vs-rest AUC, the full matrix, no specificity.
    """
    from sklearn import metrics as skm  # lazy: it pulls scipy.stats + pandas (seconds); predict/serve skip it
    from . import calibration as cal

    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    if len(y_true) == 0:
        raise CTTransferError("no images to evaluate (the subset is empty)")
    y_pred = proba.argmax(1)
    labels = list(range(len(classes)))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    binary = len(classes) == 2
    avg = dict(average="binary", pos_label=1) if binary else dict(average="macro", labels=labels)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0, **avg)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0, **avg)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0, **avg)),
    }
    if binary:
        out["specificity"] = float(skm.recall_score(y_true, y_pred, pos_label=0, average="binary", zero_division=0))
    try:
        if binary:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, proba[:, 1]))
        else:
            out["roc_auc"] = float(skm.roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    except ValueError:  # one class only in y_true: AUC undefined
        out["roc_auc"] = None
    out["confusion_matrix"] = cm.tolist()
    out["positive_class"] = classes[1] if binary else None
    out["ece"] = cal.expected_calibration_error(y_true, proba)
    if intervals:
        out["ci95"] = (cal.binary_intervals(y_true, y_pred, proba[:, 1]) if binary
                       else {"accuracy": cal.wilson(int((y_pred == y_true).sum()), len(y_true))})
    if binary and threshold is not None:
        out["operating_point"] = cal.operating_point(y_true, proba[:, 1], threshold)
    return out


def format_with_ci(m: dict, key: str, *, digits: int = 4, missing: str = "n/a") -> str:
    """``0.9500 [0.910, 0.970]``: a metric and the 95% interval its evaluation wrote (if any)."""
    v = m.get(key)
    if v is None:
        return missing
    ci = (m.get("ci95") or {}).get(key)
    return f"{v:.{digits}f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def write_predictions(path, paths: list[str], y_true, outputs, classes: list[str], *, rows=None) -> None:
    """One row per image: path (and patient, source, slice when the sample record has them), true and
    predicted class (the predictor's decision rule), each class's probability and, with a shift
    guard, ``shift_score`` and ``in_distribution``. ``outputs``: an ``inference.Outputs`` or a
    probability array (then the prediction is the argmax)."""
    proba = np.asarray(getattr(outputs, "proba", outputs))
    labels = getattr(outputs, "labels", None)
    labels = proba.argmax(1) if labels is None else np.asarray(labels)
    shift = getattr(outputs, "shift_score", None)
    accepted = getattr(outputs, "in_distribution", None)
    extra = [k for k in ("patient", "source", "slice") if rows and any(r.get(k) not in (None, "") for r in rows)]
    out = []
    for i, (p, t, pr) in enumerate(zip(paths, y_true, proba)):
        row = {"path": p, "true": classes[t] if t is not None else "", "pred": classes[int(labels[i])]}
        row.update({k: rows[i].get(k, "") for k in extra})
        row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, pr)})
        if shift is not None:
            row.update(shift_score=f"{float(shift[i]):.6f}", in_distribution=str(bool(accepted[i])).lower())
        out.append(row)
    fields = ["path", "true", "pred", *extra, *[f"prob_{c}" for c in classes]]
    _io.write_csv(path, out, fields + (["shift_score", "in_distribution"] if shift is not None else []))


def read_predictions(path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    rows = _io.read_csv(path, required=("path", "true", "pred"), what="predictions file")
    classes = [k[len("prob_"):] for k in (rows[0] if rows else {}) if k.startswith("prob_")]
    try:
        proba = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise CTTransferError(f"{path}: predictions file has non-numeric probabilities") from None
    return [r["path"] for r in rows], [r["true"] for r in rows], proba.reshape(len(rows), len(classes)), classes


def confusion_matrix_figure(cm, classes: list[str], title: str = ""):
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(4, 3.6))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict], title: str = ""):
    from matplotlib.figure import Figure

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for key, ax in (("loss", axes[0]), ("acc", axes[1])):
        train, val = [h[f"train_{key}"] for h in history], [h[f"val_{key}"] for h in history]
        if len(history) == 1:  # one fit (the linear probe): bars with their values, not empty axes
            bars = ax.bar(["train", "val"], [train[0], val[0]], color=["C0", "C1"])
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            ax.set_xlabel("single fit (no epochs)")
        else:
            ax.plot(ep, train, label="train", marker="o" if len(ep) < 12 else None)
            ax.plot(ep, val, label="val", marker="o" if len(ep) < 12 else None)
            ax.set_xlabel("epoch")
            ax.legend()
        ax.set_ylabel(key)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path, dpi: int = 110) -> None:
    """PNG through the atomic writer (no half-written image if the disk is full)."""
    with _io.atomic_open(Path(path), "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
