"""Calibration and operating point: ECE, reliability diagram, temperature scaling, decision threshold,
and 95% intervals for metrics (Wilson for proportions, seeded bootstrap for F1 and AUC).

All fitted on val only; the threshold is then applied unchanged to test and external sets.
Probabilities stay probabilities: temperature scaling divides the logits, the threshold only
changes which class is *decided*.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CTTransferError

N_BINS = 15  # the usual ECE binning (Guo et al. 2017)
N_BOOT = 2000
BOOT_SEED = 0


# -- calibration -------------------------------------------------------------------------------
def expected_calibration_error(y_true, proba, *, n_bins: int = N_BINS) -> float:
    """ECE of the top-label confidence: sum over equal-width bins of |accuracy - confidence| x share."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true)
    conf = proba.max(1)
    correct = proba.argmax(1) == y_true
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_curve(y_true, proba, *, n_bins: int = N_BINS):
    """(mean confidence, accuracy, count) per non-empty bin of top-label confidence."""
    proba = np.asarray(proba, dtype=np.float64)
    conf = proba.max(1)
    correct = proba.argmax(1) == np.asarray(y_true)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    out = [(float(conf[bins == b].mean()), float(correct[bins == b].mean()), int((bins == b).sum()))
           for b in range(n_bins) if (bins == b).any()]
    return out


def reliability_figure(curves: dict, title: str = ""):
    """``curves``: {label: (y_true, proba)} -> a reliability diagram with each set's ECE."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect")
    for label, (y, p) in curves.items():
        pts = reliability_curve(y, p)
        ax.plot([c for c, _, _ in pts], [a for _, a, _ in pts], "o-", ms=3,
                label=f"{label} (ECE {expected_calibration_error(y, p):.3f})")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def fit_temperature(logits, y_true) -> float:
    """The temperature minimising the val negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true)
    if len(y) == 0:
        raise CTTransferError("calibration: the val subset is empty")

    def nll(log_t):
        return -log_softmax(logits / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(100.0)), method="bounded")
    return float(math.exp(res.x))


def choose_threshold(y_true, p_positive, *, sensitivity: float | None = None) -> float:
    """Decision threshold on the positive class's probability, chosen on val.

    Default: Youden's J (max sensitivity + specificity - 1). With ``sensitivity``: the highest
    threshold whose val sensitivity reaches it (the most specific such operating point).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true)
    if len(set(y.tolist())) < 2:
        raise CTTransferError("calibration: val holds one class only; no threshold can be chosen")
    fpr, tpr, thr = roc_curve(y, np.asarray(p_positive, dtype=np.float64))
    finite = np.isfinite(thr)  # roc_curve's first threshold is +inf (nothing positive)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if sensitivity is None:
        k = int(np.argmax(tpr - fpr))
    else:
        k = int(np.nonzero(tpr >= sensitivity - 1e-12)[0][0])
    return float(min(thr[k], 1.0))


def operating_point(y_true, p_positive, threshold: float) -> dict:
    """Sensitivity, specificity and accuracy when positive means p >= threshold (with 95% intervals)."""
    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(p_positive) >= threshold).astype(int)
    tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
    tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
    out = {"threshold": float(threshold), "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
           "accuracy": _ratio(tp + tn, len(y)), "confusion_matrix": [[tn, fp], [fn, tp]]}
    out["ci95"] = {"sensitivity": wilson(tp, tp + fn), "specificity": wilson(tn, tn + fp),
                   "accuracy": wilson(tp + tn, len(y))}
    return out


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


# -- intervals ---------------------------------------------------------------------------------
def wilson(k: int, n: int) -> list[float] | None:
    """95% Wilson score interval of k successes in n (scipy)."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _f1(y, pred, axis=-1):
    tp = ((pred == 1) & (y == 1)).sum(axis)
    fp = ((pred == 1) & (y == 0)).sum(axis)
    fn = ((pred == 0) & (y == 1)).sum(axis)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _auc(y, score, axis=-1):
    """Mann-Whitney AUC, vectorised over resamples (ties count one half through average ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=axis)
    n_pos = (y == 1).sum(axis)
    n_neg = (y == 0).sum(axis)
    u = (ranks * (y == 1)).sum(axis) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def bootstrap_ci(statistic, *arrays, n_resamples: int = N_BOOT, seed: int = BOOT_SEED) -> list[float] | None:
    """Seeded percentile bootstrap (scipy.stats.bootstrap, paired resampling of the images)."""
    import warnings

    from scipy.stats import bootstrap

    if len(arrays[0]) < 2:
        return None
    with warnings.catch_warnings():  # a degenerate distribution (e.g. AUC 1 in every resample) is an answer
        warnings.simplefilter("ignore")
        res = bootstrap(arrays, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                        method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if not (math.isfinite(lo) and math.isfinite(hi)) else [lo, hi]


def binary_intervals(y_true, y_pred, p_positive) -> dict:
    """95% intervals: Wilson for accuracy, precision, recall (sensitivity) and specificity; bootstrap for
    F1 and ROC-AUC."""
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(y_pred).astype(int)
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    tn, fn = int(((pred == 0) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    out = {"accuracy": wilson(tp + tn, len(y)), "precision": wilson(tp, tp + fp), "recall": wilson(tp, tp + fn),
           "specificity": wilson(tn, tn + fp), "f1": bootstrap_ci(_f1, y, pred)}
    both = 0 < y.sum() < len(y)
    out["roc_auc"] = bootstrap_ci(_auc, y, np.asarray(p_positive, dtype=np.float64)) if both else None
    return out
