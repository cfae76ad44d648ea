"""Evaluate: batched inference, metrics from sklearn.metrics, per-image predictions, plots."""

from __future__ import annotations

import csv
import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from .errors import CTTransferError


def autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if enabled else nullcontext()


@torch.inference_mode()
def predict_proba(model, images_u8: torch.Tensor, transform, batch_size: int = 256,
                  bf16: bool = False, device: str = "cpu", channels_last: bool = True) -> np.ndarray:
    """Class probabilities (softmax) for ``N x 3 x S x S`` uint8 images, in batches."""
    model.eval()
    out = []
    for start in range(0, len(images_u8), batch_size):
        x = transform(images_u8[start:start + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(bf16, device):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


def compute_metrics(y_true, proba, classes: list[str]) -> dict:
    """Accuracy, precision, recall, F1, specificity, ROC-AUC and the confusion matrix.

    Binary: the positive class is ``classes[1]``; ``confusion_matrix`` is [[tn, fp], [fn, tp]].
    More classes: macro averages, one-vs-rest AUC, the full matrix, no specificity.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
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
    return out


def write_predictions(path, paths: list[str], y_true, proba, classes: list[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "true", "pred"] + [f"prob_{c}" for c in classes])
        for p, t, pr in zip(paths, y_true, proba):
            w.writerow([p, classes[t] if t is not None else "", classes[int(np.argmax(pr))]] + [f"{v:.6f}" for v in pr])
    os.replace(tmp, path)


def read_predictions(path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, rows = rows[0], rows[1:]
    classes = [h[len("prob_"):] for h in header[3:]]
    proba = np.array([[float(v) for v in r[3:]] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    return [r[0] for r in rows], [r[1] for r in rows], proba, classes


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plot_confusion_matrix(cm, classes: list[str], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4, 3.6))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for key, ax in (("loss", axes[0]), ("acc", axes[1])):
        ax.plot(ep, [h[f"train_{key}"] for h in history], label="train")
        ax.plot(ep, [h[f"val_{key}"] for h in history], label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_run(run_dir, data_dir=None, split_file=None, progress: bool = False) -> dict:
    """Re-evaluate a run's best checkpoint on its val and test subsets; rewrites metrics.json."""
    from . import train as train_mod

    run = train_mod.load_run(run_dir)
    cfg = run.config
    data_dir = data_dir or cfg["data"]
    rows = train_mod.prepare_rows(cfg, data_dir=data_dir, split_file=split_file or Path(run_dir) / "split.csv")
    metrics_path = Path(run_dir) / "metrics.json"
    old = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    result = train_mod.evaluate_subsets(run.model, rows, run.classes, cfg, data_dir, Path(run_dir), progress)
    for key in ("train_seconds", "epochs", "model", "weights", "image_size", "seed", "strategy", "best_epoch"):
        if key in old:
            result[key] = old[key]
    write_json(metrics_path, {**old, **result})
    return {**old, **result}


def check_run_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CTTransferError(f"{run_dir}: not a run directory (no config.json)")
    return run_dir
