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


T_BOUNDS = (0.05, 100.0)  # the search interval of the temperature
# Below these sizes the fit is noise, not calibration: a 15-bin ECE needs a few images per bin to
# mean anything, and with fewer than 10 images of a class one image moves that class's
# sensitivity (or specificity) by more than 10 points, so the chosen threshold is chance. On 12 val
# images (6 + 6) the temperature went to its bound (100: every probability 0.5) and was reported
# as an ECE "improvement" 0.24 -> 0.002 (issue #23).
MIN_VAL = 30
MIN_VAL_PER_CLASS = 10
CALIBRATION_STATUSES = ("fitted", "kept-uncalibrated", "refused")


class CalibrationRefused(CTTransferError):
    """Val cannot support a calibration; ``record`` says why (status ``refused``)."""

    def __init__(self, record: dict, *, force_hint: str = "force=True"):
        self.record = record
        super().__init__(self.describe(force_hint))

    def describe(self, force_hint: str) -> str:
        return f"calibration refused: {'; '.join(self.record['reasons'])} ({force_hint} fits anyway)"


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

    res = minimize_scalar(nll, bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])), method="bounded")
    return float(math.exp(res.x))


def at_bound(temperature: float, *, rel: float = 0.02) -> bool:
    """Did the search stop at (within 2 % of) an end of ``T_BOUNDS``? Then NLL was still falling:
    the val set is separated perfectly (T -> 0) or the model is at chance on it (T -> inf)."""
    lo, hi = T_BOUNDS
    return temperature <= lo * (1 + rel) or temperature >= hi * (1 - rel)


def val_size_problems(y_true, classes) -> list[str]:
    """Why val is too small to calibrate on (empty: large enough). See ``MIN_VAL``."""
    y = np.asarray(y_true).astype(int)
    counts = np.bincount(y, minlength=len(classes))
    out = []
    if len(y) < MIN_VAL:
        out.append(f"val has {len(y)} images; calibration needs at least {MIN_VAL} (a 15-bin ECE and a "
                   f"one-parameter fit on fewer are noise)")
    small = [k for k in range(len(classes)) if counts[k] < MIN_VAL_PER_CLASS]
    if small:
        out.append(", ".join(f"{int(counts[k])} {classes[k]}" for k in small) + f" image(s) in val; a threshold "
                   f"needs at least {MIN_VAL_PER_CLASS} per class (below that one image moves sensitivity or "
                   f"specificity by more than 10 points)")
    return out


def fingerprint(temperature: float, threshold: float | None) -> str:
    """A short, stable id of a calibration: results computed with another one are stale."""
    import hashlib
    import json

    text = json.dumps({"temperature": round(float(temperature), 10),
                       "threshold": None if threshold is None else round(float(threshold), 10)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_fingerprint(record: dict) -> str:
    """The calibration fingerprint of an external result (records written before fingerprints: from
    their temperature and threshold)."""
    used = record.get("calibration") or {}
    if isinstance(used, dict) and used.get("fingerprint"):
        return used["fingerprint"]
    return fingerprint(record.get("temperature", 1.0) or 1.0, record.get("threshold"))


def _softmax(logits, temperature: float = 1.0) -> np.ndarray:
    from .inference import softmax  # the one place logits become probabilities

    return softmax(logits, temperature).astype(np.float64)


def fit_calibration(logits, y_true, *, classes, sensitivity: float | None = None,
                    force: bool = False) -> dict:
    """Temperature and threshold fitted on val logits, with the checks that keep them from hurting.

    - val too small (``val_size_problems``): ``CalibrationRefused`` (its ``record`` has status
      ``refused``), unless ``force``;
    - temperature at a bound of ``T_BOUNDS``, or val ECE worse after scaling: the temperature stays
      1 (status ``kept-uncalibrated``; the threshold is then chosen on the unscaled probabilities),
      unless ``force``.
    Returns the calibration record: ``status``, ``reasons``, ``forced``, ``temperature``,
    ``threshold``, ``fitted_temperature``, ``val_ece_before`` / ``val_ece_after`` (with the kept
    temperature) / ``val_ece_fitted``, ``n_val``, ``n_val_per_class``, ``minimum`` and ``fingerprint``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(int)
    n_classes = len(classes)
    criterion = "youden" if sensitivity is None else f"sensitivity>={sensitivity}"
    base = {"criterion": criterion, "fitted_on": "val", "n_val": int(len(y)),
            "n_val_per_class": [int(c) for c in np.bincount(y, minlength=n_classes)],
            "minimum": {"n_val": MIN_VAL, "per_class": MIN_VAL_PER_CLASS}, "bounds": list(T_BOUNDS),
            "forced": bool(force)}
    problems = val_size_problems(y, classes)
    if problems and not force:
        record = {**base, "status": "refused", "reasons": problems, "temperature": 1.0, "threshold": None,
                  "fingerprint": fingerprint(1.0, None)}
        raise CalibrationRefused(record)
    before = _softmax(logits)
    fitted = fit_temperature(logits, y)
    ece_before = expected_calibration_error(y, before)
    ece_fitted = expected_calibration_error(y, _softmax(logits, fitted))
    reasons = list(problems)  # forced past them: still said
    if at_bound(fitted):
        reasons.append(f"the temperature reached the bound of its search ({fitted:.3g}, bounds "
                       f"{T_BOUNDS[0]}..{T_BOUNDS[1]}): val is separated perfectly or the model is at chance on it")
    if ece_fitted > ece_before:
        reasons.append(f"val ECE got worse with temperature {fitted:.3f} ({ece_before:.4f} -> {ece_fitted:.4f})")
    keep_fitted = force or not reasons[len(problems):]
    temperature = fitted if keep_fitted else 1.0
    after = _softmax(logits, temperature)
    threshold = choose_threshold(y, after[:, 1], sensitivity=sensitivity) if n_classes == 2 else None
    return {**base, "status": "fitted" if keep_fitted else "kept-uncalibrated", "reasons": reasons,
            "temperature": float(temperature), "threshold": threshold, "fitted_temperature": fitted,
            "val_ece_before": ece_before, "val_ece_after": expected_calibration_error(y, after),
            "val_ece_fitted": ece_fitted, "fingerprint": fingerprint(temperature, threshold)}


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
