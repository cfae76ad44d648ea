"""Linear probe: a convex fit of the head on fixed backbone features (seconds, not epochs).

Pooled features of the *un-augmented* train images are standardised and fed to scikit-learn's
``LogisticRegression`` (L-BFGS, L2); the regularisation ``C`` is chosen on val over a small grid
(best val accuracy, ties to the lower val log-loss, then to the stronger regularisation). The
standardisation is folded into the fitted weights, which become the model's ``fc`` layer, so the
``Run``'s predict/evaluate/export path is unchanged and its probabilities equal sklearn's
``predict_proba`` on the same features.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("ct_transfer.engine")

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # strong to weak regularisation


@dataclass
class ProbeResult:
    C: float
    weight: np.ndarray  # K x D, acts on raw (un-standardised) pooled features
    bias: np.ndarray  # K
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    grid: list = field(default_factory=list)  # per C: val accuracy and log-loss
    solver_seconds: float = 0.0
    classifier: object = None  # the chosen sklearn pipeline (scaler + logistic regression)
    val_proba: np.ndarray | None = None  # the chosen classifier's val probabilities


def _log_loss(proba: np.ndarray, y: np.ndarray, w=None) -> float:
    return float(-np.average(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, None)), weights=w))


def _acc(proba: np.ndarray, y: np.ndarray, w=None) -> float:
    return float(np.average(proba.argmax(1) == y, weights=w))


def fit_probe(f_train, y_train, f_val, y_val, *, num_classes: int, c_grid=C_GRID, seed: int = 0,
              sample_weight=None, val_weight=None) -> ProbeResult:
    """Fit on train, choose ``C`` on val; returns the folded weights and what was chosen.
    ``sample_weight`` / ``val_weight``: per-image weights of the fit and of the val accuracy and
    loss (e.g. so that several sources count equally)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = np.asarray(f_train, dtype=np.float64), np.asarray(y_train)
    Xv, yv = np.asarray(f_val, dtype=np.float64), np.asarray(y_val)
    present = np.unique(y)
    if len(present) < 2:
        from ..errors import CTTransferError

        raise CTTransferError(f"linear probe: the train subset holds one class only ({present.tolist()})")
    t0 = time.perf_counter()
    best, grid = None, []
    for C in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is generous; a near-fit is fine
            clf.fit(X, y, logisticregression__sample_weight=sample_weight)
        pv = _full_proba(clf, Xv, num_classes)
        acc, loss = _acc(pv, yv, val_weight), _log_loss(pv, yv, val_weight)
        grid.append({"C": C, "val_acc": acc, "val_loss": round(loss, 6)})
        key = (acc, -loss)
        if best is None or key > best[0]:  # strict: ties keep the stronger regularisation
            best = (key, C, clf)
    _, C, clf = best
    weight, bias = fold(clf, num_classes)
    pt = _full_proba(clf, X, num_classes)
    pv = _full_proba(clf, Xv, num_classes)
    res = ProbeResult(C=C, weight=weight, bias=bias, train_loss=_log_loss(pt, y, sample_weight),
                      train_acc=_acc(pt, y, sample_weight), val_loss=_log_loss(pv, yv, val_weight),
                      val_acc=_acc(pv, yv, val_weight), grid=grid, solver_seconds=time.perf_counter() - t0,
                      classifier=clf, val_proba=pv)
    log.info("linear probe: C=%g val_acc %.4f (grid %s) in %.1fs", C, res.val_acc,
             ", ".join(f"{g['C']:g}:{g['val_acc']:.3f}" for g in grid), res.solver_seconds)
    return res


def _full_proba(clf, X, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a class absent from train gets probability 0)."""
    p = clf.predict_proba(X)
    out = np.zeros((len(X), num_classes))
    out[:, clf.classes_.astype(int)] = p
    return out


def fold(clf, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K x D weight, K bias) of a softmax layer on raw features equal to the scaler + LR pipeline.

    LR on z = (x - mu) / sigma: logit = w.z + b = (w / sigma).x + (b - w.(mu / sigma)). Binary LR
    has one logit z for class 1: softmax([-z/2, z/2]) gives sigmoid(z) for class 1, as sklearn does.
    """
    scaler, lr = clf[0], clf[-1]
    sigma = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    w_std, b_std = lr.coef_, lr.intercept_
    w = w_std / sigma
    b = b_std - (w_std * (scaler.mean_ / sigma)).sum(1)
    D = w.shape[1]
    weight = np.zeros((num_classes, D))
    bias = np.full(num_classes, -1e4)  # a class never seen in training gets no probability mass
    cls = lr.classes_.astype(int)
    if len(cls) == 2 and w.shape[0] == 1:
        weight[cls[0]], weight[cls[1]] = -w[0] / 2, w[0] / 2
        bias[cls[0]], bias[cls[1]] = -b[0] / 2, b[0] / 2
    else:
        weight[cls], bias[cls] = w, b
    return weight, bias


def load_into_fc(fc: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        fc.weight.copy_(torch.as_tensor(weight, dtype=fc.weight.dtype))
        fc.bias.copy_(torch.as_tensor(bias, dtype=fc.bias.dtype))
