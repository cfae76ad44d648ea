"""Patients: slice probabilities -> one probability and one decision per patient.

The model classifies slices; a scan (a DICOM series, a NIfTI volume, a folder of one patient's
slices) or a patient of a split file gets one answer from its slices' calibrated probabilities of
the positive class through an **aggregator** from ``registry.AGGREGATORS`` (registered here):

- ``mean``: the mean slice probability;
- ``max``: the most positive slice (one suspicious slice decides);
- ``topk``: the mean of the ``k`` most positive slices (``k`` fixed, or chosen on val patients);
- ``logistic``: a logistic regression on the sorted slice probabilities' quantiles (min, quartiles,
  max, mean; as logits), fitted on val patients.

Thresholds are applied at the level they were fitted for: a slice's label uses the run's slice
threshold (``run.decide``); a patient's label uses a patient-level threshold fitted on val patients
(``fit_patient_decision``; Youden's J), or ``p >= 0.5`` when none was fitted. The fitted choice
(aggregator, its parameters, the threshold, what it was chosen on) is ``RUN/patients.json``, apart
from the training options.

Binary runs only (the positive class is ``classes[1]``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _io
from .errors import ConfigError, CTTransferError
from .registry import AGGREGATORS

log = logging.getLogger(__name__)

PATIENTS_FILE = "patients.json"
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
TOPK_CHOICES = (1, 2, 3, 5, 8, 13)


# ---------------------------------------------------------------------------------------------
# Aggregators (a registry: one place, listed by the CLI's help and the API)
# ---------------------------------------------------------------------------------------------


class Aggregator:
    """Slice probabilities of the positive class (1-D) -> one patient probability."""

    name = ""
    fitted_on_val = False  # does ``fit`` learn anything from val patients

    def __call__(self, p: np.ndarray) -> float:
        raise NotImplementedError

    def fit(self, patients: list[np.ndarray], y: np.ndarray) -> "Aggregator":
        return self

    def params(self) -> dict:
        return {}

    def describe(self) -> str:
        return self.name


class Mean(Aggregator):
    name = "mean"

    def __call__(self, p):
        return float(np.mean(p))


class Max(Aggregator):
    name = "max"

    def __call__(self, p):
        return float(np.max(p))


class TopK(Aggregator):
    """Mean of the ``k`` most positive slices (all of them when fewer); ``fit`` picks ``k`` from
    ``TOPK_CHOICES`` by val-patient AUC (ties: the smaller ``k``)."""

    name = "topk"
    fitted_on_val = True

    def __init__(self, k: int = 3):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError("k", k, "top-k needs an integer k >= 1")
        self.k = k

    def __call__(self, p):
        p = np.sort(np.asarray(p, dtype=np.float64))[::-1]
        return float(p[:self.k].mean())

    def fit(self, patients, y):
        best = None
        for k in TOPK_CHOICES:
            score = _auc(y, [TopK(k)(p) for p in patients])
            if best is None or score > best[0] + 1e-12:
                best = (score, k)
        self.k = best[1]
        return self

    def params(self):
        return {"k": self.k}

    def describe(self):
        return f"topk (k={self.k})"


class QuantileLogistic(Aggregator):
    """Logistic regression on the logits of the slice probabilities' quantiles and mean."""

    name = "logistic"
    fitted_on_val = True

    def __init__(self, coef: list[float] | None = None, intercept: float = 0.0, C: float = 1.0):
        self.coef = None if coef is None else [float(c) for c in coef]
        self.intercept, self.C = float(intercept), float(C)

    @staticmethod
    def features(p) -> np.ndarray:
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
        f = np.append(np.quantile(p, QUANTILES), p.mean())
        return np.log(f / (1 - f))

    def fit(self, patients, y):
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            raise CTTransferError("logistic aggregator: val patients of both classes are needed to fit it")
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(np.stack([self.features(p) for p in patients]), y)
        self.coef, self.intercept = [float(c) for c in lr.coef_[0]], float(lr.intercept_[0])
        return self

    def __call__(self, p):
        if self.coef is None:
            raise CTTransferError("logistic aggregator: not fitted (fit it on val patients first)")
        z = float(np.dot(self.coef, self.features(p)) + self.intercept)
        return float(1.0 / (1.0 + np.exp(-z)))

    def params(self):
        return {"coef": self.coef, "intercept": self.intercept, "C": self.C}


for _cls, _help in ((Mean, "mean slice probability"), (Max, "the most positive slice"),
                   (TopK, f"mean of the k most positive slices (k from {TOPK_CHOICES} chosen on val patients)"),
                   (QuantileLogistic, "logistic regression on the slice probabilities' quantiles, fitted on val "
                                      "patients")):
    AGGREGATORS.register(_cls.name, _cls, help=_help)


def list_aggregators() -> list[str]:
    return list(AGGREGATORS.names())


def make_aggregator(name: str, **params) -> Aggregator:
    AGGREGATORS.check(name)
    try:
        return AGGREGATORS.create(name, **params)
    except TypeError as exc:
        raise ConfigError("aggregator", name, f"bad parameters {sorted(params)} ({exc})") from None


def _auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------
# The patient decision (aggregator + patient-level threshold), saved as RUN/patients.json
# ---------------------------------------------------------------------------------------------


@dataclass
class PatientDecision:
    """How slice probabilities become a patient's probability and label."""

    aggregator: Aggregator = field(default_factory=Mean)
    threshold: float | None = None  # on the patient probability; None: p >= 0.5
    fitted: dict = field(default_factory=dict)  # what it was chosen on (n val patients, scores)

    def probability(self, p_slices) -> float:
        p = np.asarray(p_slices, dtype=np.float64)
        if p.size == 0:
            raise CTTransferError("no slices to decide on")
        return self.aggregator(p)

    def label_index(self, probability: float) -> int:
        return int(probability >= (0.5 if self.threshold is None else self.threshold))

    def describe(self) -> str:
        rule = "p >= 0.5" if self.threshold is None else f"p >= {self.threshold:.4f} (fitted on val patients)"
        return f"{self.aggregator.describe()}, {rule}"

    def to_dict(self) -> dict:
        return {"aggregator": self.aggregator.name, "params": self.aggregator.params(),
                "threshold": self.threshold, **({"fitted": self.fitted} if self.fitted else {})}

    @classmethod
    def from_dict(cls, d: dict, where: str = PATIENTS_FILE) -> "PatientDecision":
        try:
            agg = make_aggregator(d["aggregator"], **(d.get("params") or {}))
            thr = d.get("threshold")
            if thr is not None and not (isinstance(thr, (int, float)) and 0 <= thr <= 1):
                raise ValueError("threshold must be in [0, 1] or null")
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CTTransferError(f"{where}: not a valid patient decision ({exc})") from None
        return cls(agg, None if thr is None else float(thr), dict(d.get("fitted") or {}))


def load_patient_decision(run) -> PatientDecision:
    """The run's fitted patient decision (``RUN/patients.json``), else the mean and p >= 0.5."""
    path = Path(run.directory) / PATIENTS_FILE if getattr(run, "directory", None) else None
    if path is None or not path.is_file():
        return PatientDecision()
    return PatientDecision.from_dict(_io.read_json(path, what="patient decision"), str(path))


def save_patient_decision(run, decision: PatientDecision) -> Path:
    if run.directory is None:
        raise CTTransferError("run has no directory; save it first")
    path = Path(run.directory) / PATIENTS_FILE
    _io.write_json(path, decision.to_dict())
    return path


# ---------------------------------------------------------------------------------------------
# Patients of split rows
# ---------------------------------------------------------------------------------------------


def patient_id(row: dict) -> str | None:
    """A split row's patient (``patient`` column; UCSD's SPLIT.csv, ``--split-groups``), or None."""
    p = row.get("patient")
    return str(p) if p not in (None, "") else None


def has_patients(rows: list[dict]) -> bool:
    return bool(rows) and all(patient_id(r) is not None for r in rows)


def group_patients(rows: list[dict], y) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(patient ids in first-seen order, each patient's row indices, each patient's class index:
    its slices' majority class). Source and patient together name a patient (several datasets)."""
    y = np.asarray(y)
    order: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        order.setdefault((r.get("source") or "", patient_id(r)), []).append(i)
    ids = [f"{s}/{p}" if s else p for s, p in order]
    index = [np.asarray(v) for v in order.values()]
    labels = np.array([int(np.bincount(y[ix]).argmax()) for ix in index], dtype=np.int64)
    return ids, index, labels


def patient_probabilities(index: list[np.ndarray], p_positive, decision: PatientDecision) -> np.ndarray:
    p = np.asarray(p_positive, dtype=np.float64)
    return np.array([decision.probability(p[ix]) for ix in index], dtype=np.float64)


def patient_metrics(rows: list[dict], y, proba, classes: list[str], decision: PatientDecision | None = None) -> dict:
    """``compute_metrics`` on one row per patient (its aggregated probability), with 95% intervals,
    ``n_patients``/``n_slices``, the aggregator and, given a fitted patient threshold, its
    operating point. Decisions in the main block: p >= 0.5, like the slice block's argmax."""
    from .evaluate import compute_metrics

    if len(classes) != 2:
        raise CTTransferError(f"patient decisions need two classes, not {len(classes)}")
    decision = decision or PatientDecision()
    ids, index, labels = group_patients(rows, y)
    p = patient_probabilities(index, np.asarray(proba)[:, 1], decision)
    m = compute_metrics(labels, np.stack([1 - p, p], axis=1), classes, threshold=decision.threshold)
    m.update(n_patients=len(ids), n_slices=int(len(rows)), aggregator=decision.aggregator.describe(),
             threshold=decision.threshold)
    return m


def patient_table(rows: list[dict], y, proba, classes: list[str], decision: PatientDecision | None = None) -> list[dict]:
    """One row per patient: id, true class, slices, probability, label."""
    decision = decision or PatientDecision()
    ids, index, labels = group_patients(rows, y)
    p = patient_probabilities(index, np.asarray(proba)[:, 1], decision)
    return [{"patient": pid, "true": classes[t], "slices": len(ix), f"prob_{classes[1]}": f"{pp:.6f}",
             "pred": classes[decision.label_index(pp)]} for pid, ix, t, pp in zip(ids, index, labels, p)]


def fit_patient_decision(rows: list[dict], y, proba, *, aggregators=None, folds: int = 5,
                         sensitivity: float | None = None, seed: int = 0) -> PatientDecision:
    """Choose the aggregator on val patients and fit a patient-level threshold.

    Each aggregator is scored by val-patient AUC; those that learn from val (``topk``'s k,
    ``logistic``) are scored on out-of-fold predictions (``folds``-fold, stratified), so fitting
    does not flatter them. Ties go to the earlier in ``AGGREGATORS`` (the simpler). The chosen one
    is refitted on all val patients; the threshold is Youden's J (or the most specific reaching
    ``sensitivity``) on its val-patient probabilities.
    """
    from sklearn.model_selection import StratifiedKFold

    from .calibration import choose_threshold

    names = list(aggregators or AGGREGATORS.names())
    ids, index, labels = group_patients(rows, y)
    if len(np.unique(labels)) < 2 or np.bincount(labels).min() < 2:
        raise CTTransferError(f"val patients: {len(ids)} patient(s), too few of one class to fit a patient decision")
    p_pos = np.asarray(proba, dtype=np.float64)[:, 1]
    per_patient = [p_pos[ix] for ix in index]
    scores = {}
    for name in names:
        agg = make_aggregator(name)
        if agg.fitted_on_val:
            k = int(min(folds, np.bincount(labels).min()))
            oof = np.zeros(len(ids))
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(ids)), labels):
                fitted = make_aggregator(name).fit([per_patient[i] for i in tr], labels[tr])
                oof[te] = [fitted(per_patient[i]) for i in te]
            score = oof
        else:
            score = np.array([agg(p) for p in per_patient])
        scores[name] = _auc(labels, score)
    best = max(names, key=lambda n: (scores[n], -names.index(n)))
    agg = make_aggregator(best).fit(per_patient, labels)
    p = np.array([agg(q) for q in per_patient])
    threshold = float(choose_threshold(labels, p, sensitivity=sensitivity))
    fitted = {"on": "val patients", "n_patients": len(ids), "n_slices": int(len(rows)),
              "criterion": "val-patient AUC (out-of-fold for fitted aggregators)",
              "threshold_criterion": "youden" if sensitivity is None else f"sensitivity>={sensitivity}",
              "val_auc": {n: (None if np.isnan(s) else round(s, 6)) for n, s in scores.items()}}
    log.info("patient decision on %d val patients: %s (AUC %s), threshold %.4f", len(ids), agg.describe(),
             ", ".join(f"{n} {s:.3f}" for n, s in scores.items()), threshold)
    return PatientDecision(agg, threshold, fitted)


# ---------------------------------------------------------------------------------------------
# Scans -> patients
# ---------------------------------------------------------------------------------------------


@dataclass
class PatientPrediction:
    """One scan's answer: the patient's probability and label, and the slices behind it."""

    name: str  # what was given (folder, file, series)
    patient: str
    kind: str  # dicom-series | dicom-multiframe | nifti | images
    classes: list[str]
    probability: float  # of the positive class (classes[1]), aggregated
    label: str
    decision: str  # the aggregator and the patient threshold
    n_slices: int  # in the scan
    used: list[int]  # slice indices used (scan order, 0 = most inferior)
    lung: list[bool]  # per slice of the scan: shows lungs
    slices: list[dict]  # per slice used: index, name, position_mm, probabilities, label, in_distribution
    flagged_share: float | None  # share of used slices the shift guard flags (None: no guard)
    seconds: dict  # decode, select, infer, total

    def row(self) -> dict:
        """The patient row of a table."""
        return {"patient": self.patient, "source": self.name, "kind": self.kind, "pred": self.label,
                f"prob_{self.classes[1]}": round(self.probability, 6), "slices_used": len(self.used),
                "slices_total": self.n_slices,
                "flagged_share": None if self.flagged_share is None else round(self.flagged_share, 4),
                "decision": self.decision}

    def slice_rows(self) -> list[dict]:
        """The per-slice table (slices used), with the patient beside each."""
        out = []
        for s in self.slices:
            row = {"patient": self.patient, "source": self.name, "slice": s["index"], "name": s["name"],
                   "position_mm": "" if s["position_mm"] is None else round(s["position_mm"], 3), "pred": s["label"]}
            row.update({f"prob_{c}": round(v, 6) for c, v in s["probabilities"].items()})
            if s.get("in_distribution") is not None:
                row["in_distribution"] = s["in_distribution"]
            out.append(row)
        return out

    def decisive(self, k: int = 3) -> list[int]:
        """Indices (into ``slices``) of the ``k`` slices that speak most for the patient's label."""
        p = np.array([s["probabilities"][self.classes[1]] for s in self.slices])
        order = np.argsort(-p if self.label == self.classes[1] else p, kind="stable")
        return [int(i) for i in order[:k]]


def _slice_outputs(run, arrays: list[np.ndarray]):
    """Calibrated probabilities, and the shift guard's in-distribution flags (None without a guard),
    from the run's predictor (the one inference core)."""
    predictor = getattr(run, "predictor", None)
    if predictor is None:  # a Run-like object without the core: probabilities only
        return run.predict_proba(arrays, batch_size=max(1, len(arrays))), None
    out = predictor.outputs(predictor.load_images(arrays))
    return np.asarray(out.proba), (None if out.in_distribution is None else np.asarray(out.in_distribution))


def predict_volume(run, volume, *, max_slices: int | None = None, decision: PatientDecision | None = None,
                   batch_size: int = 32, selection=None) -> PatientPrediction:
    """One scan -> a ``PatientPrediction``: lung slices selected (``data.volume.select_slices``), each
    decoded with the run's window and preprocessing and classified (streamed, ``batch_size`` at a
    time), then aggregated (the run's ``patients.json`` or the mean)."""
    from .data.volume import MAX_SLICES, select_slices

    if len(run.classes) != 2:
        raise CTTransferError(f"patient decisions need a two-class run, not {len(run.classes)} classes")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be >= 1")
    decision = decision or load_patient_decision(run)
    t0 = time.perf_counter()
    sel = selection or select_slices(volume, max_slices=MAX_SLICES if max_slices is None else max_slices)
    window = run.preprocess.window
    probs, flags, t_decode, t_infer = [], [], 0.0, 0.0
    for start in range(0, len(sel.used), batch_size):
        t1 = time.perf_counter()
        arrays = [volume.rgb(i, window) for i in sel.used[start:start + batch_size]]
        t2 = time.perf_counter()
        p, ind = _slice_outputs(run, arrays)
        t_infer += time.perf_counter() - t2
        t_decode += t2 - t1
        probs.append(p)
        flags.append(ind)
    proba = np.concatenate(probs) if probs else np.zeros((0, 2))
    in_dist = None if any(f is None for f in flags) or not flags else np.concatenate(flags)
    p_patient = decision.probability(proba[:, 1])
    slices = []
    for j, i in enumerate(sel.used):
        slices.append({"index": int(i), "name": volume.slice_names[i],
                       "position_mm": None if volume.positions is None else float(volume.positions[i]),
                       "probabilities": {c: float(v) for c, v in zip(run.classes, proba[j])},
                       "label": run.decide(proba[j]),
                       "in_distribution": None if in_dist is None else bool(in_dist[j])})
    seconds = {"decode": round(sel.seconds_decode + t_decode, 3), "select": round(sel.seconds_select, 3),
               "infer": round(t_infer, 3), "total": round(time.perf_counter() - t0, 3)}
    return PatientPrediction(
        name=volume.name, patient=volume.patient, kind=volume.kind, classes=list(run.classes),
        probability=float(p_patient), label=run.classes[decision.label_index(p_patient)],
        decision=decision.describe(), n_slices=len(volume), used=list(sel.used), lung=list(sel.lung),
        slices=slices, flagged_share=None if in_dist is None else float(1.0 - in_dist.mean()), seconds=seconds)


def predict_patients(run, path, **kwargs) -> list[PatientPrediction]:
    """Every scan at ``path`` (a series folder, several series, a NIfTI file, a zip of a series,
    a folder of one patient's slice images) -> one ``PatientPrediction`` each."""
    from .data.volume import open_volumes

    return [predict_volume(run, v, **kwargs) for v in open_volumes(path)]
