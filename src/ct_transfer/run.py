"""``Run``: a trained model together with its preprocessing, classes, config and results.

What ``fit`` returns and ``load_run`` reads back: call it on scans (``predict``), ask why
(``explain``), evaluate it on other data, ``save`` it, ``export`` it. It owns its run directory
through ``RunDir`` (atomic writes); checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import data as D
from . import models as M
from .errors import ConfigError, CTTransferError
from .evaluate import compute_metrics, confusion_matrix_figure, curves_figure, save_figure, write_predictions
from .inference import PREDICTOR_FILE, Calibration, Prediction, Predictor, read_calibration
from .patients import has_patients, patient_metrics
from .rundir import RunDir

log = logging.getLogger(__name__)


__all__ = ["Run", "Prediction", "load_run", "check_run_config"]


class Run:
    """A trained model and what it was trained with (``config``), its results (``metrics``,
    ``history``, ``split``) and its ``predictor`` (the inference core: every answer comes from it)."""

    def __init__(self, *, model, config: dict, classes: list[str], preprocess: D.Preprocess, metrics=None,
                 history=None, split=None, directory=None, device: str = "cpu", checkpoint: str | None = None,
                 calibration: Calibration | None = None, guard=None):
        self.model, self.config, self.classes, self.preprocess = model, dict(config), list(classes), preprocess
        self.metrics = metrics or {}
        self.history = history or []
        self.split = split or []
        self.directory = Path(directory) if directory else None
        self.device = device
        self.checkpoint = checkpoint
        # fitted after training (temperature, threshold; the shift guard): apart from the options
        self.predictor = Predictor(model, classes=classes, preprocess=preprocess, tta=self.config.get("tta", "none"),
                                   calibration=calibration or Calibration.from_dict(self.config.get("calibration")),
                                   guard=guard, device=device, channels_last=self.config.get("channels_last", True),
                                   bf16=self.config.get("bf16", False))
        self.config.pop("calibration", None)  # lives in predictor.json now
        # the predictions of the last evaluate_subsets call, per subset: (paths, labels, Outputs, rows)
        self.predictions: dict[str, tuple] = {}

    def __repr__(self):
        test = self.metrics.get("test")
        acc = test.get("accuracy") if isinstance(test, dict) else None
        where = f" at {self.directory}" if self.directory else ""
        return (f"Run({self.config.get('model')}, weights={self.config.get('weights')}, "
                f"test accuracy={round(acc, 4) if isinstance(acc, (int, float)) else None}{where})")

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    # the predictor's fitted state and parts, read through the run for convenience
    temperature = property(lambda self: self.predictor.temperature)

    @property
    def guard(self):
        """The shift guard (``shift.ShiftGuard``) or None: a run saved before guards."""
        return self.predictor.guard

    @guard.setter
    def guard(self, value):
        self.predictor.guard = value
    threshold = property(lambda self: self.predictor.threshold)
    tta = property(lambda self: self.predictor.tta)
    mean = property(lambda self: self.predictor.mean)
    std = property(lambda self: self.predictor.std)
    transform = property(lambda self: self.predictor.transform)

    # -- inference (all through the predictor) ---------------------------------------------
    def load_images(self, inputs) -> torch.Tensor:
        """Paths (images, DICOM), arrays, PIL images or bytes -> ``N x 3 x S x S`` uint8 tensor."""
        return self.predictor.load_images(inputs)

    def predict_proba(self, inputs, *, batch_size: int = 64) -> np.ndarray:
        return self.predictor.predict_outputs(inputs, batch_size=batch_size).proba

    def predict(self, inputs, *, batch_size: int = 64) -> list[Prediction]:
        """One ``Prediction(label, {class: probability}, shift_score, in_distribution)`` per input."""
        return self.predictor.predict(inputs, batch_size=batch_size)

    def predict_patients(self, path, *, max_slices: int | None = None, batch_size: int = 32) -> list:
        """Every scan at ``path`` (DICOM series folder, multi-frame DICOM, NIfTI, zip of a series, a
        folder of one patient's slice images) -> one ``patients.PatientPrediction`` per scan."""
        from .patients import predict_patients

        return predict_patients(self, path, max_slices=max_slices, batch_size=batch_size)

    def predict_patient(self, path, *, max_slices: int | None = None, batch_size: int = 32):
        """The one scan at ``path`` -> a ``patients.PatientPrediction`` (probability, label, slices used,
        per-slice table, share flagged by the shift guard)."""
        from .data.volume import open_volume
        from .patients import predict_volume

        return predict_volume(self, open_volume(path), max_slices=max_slices, batch_size=batch_size)

    def patient_decision(self):
        """How this run turns slice probabilities into a patient's (``RUN/patients.json`` or the mean)."""
        from .patients import load_patient_decision

        fitted = getattr(self, "_patient_decision", None)  # fitted here, not saved yet
        return fitted if fitted is not None else load_patient_decision(self)

    def fit_patients(self, val=None, *, sensitivity: float | None = None, save: bool = True):
        """Choose the patient aggregator and fit a patient-level threshold on val patients (split rows
        with a ``patient`` column); saved as ``RUN/patients.json``."""
        from .patients import fit_patient_decision, has_patients, save_patient_decision

        if val is None:
            if not self.split:
                raise CTTransferError(f"{self.directory}: this run has no split.csv; cannot find its val patients")
            val = self._load(self.split, "val", D.data_root(self.config["data"]), "split")
        if not has_patients(val.rows):
            raise CTTransferError("val subset: rows have no patient ids (a split file with a patient column)")
        proba = self.predictor.outputs(val.x).proba
        decision = fit_patient_decision(val.rows, val.y.cpu().numpy(), proba, sensitivity=sensitivity)
        self._patient_decision = decision
        if save and self.directory is not None:
            save_patient_decision(self, decision)
        return decision

    def decide(self, proba) -> str:
        """The predicted class of one probability row, by the predictor's decision rule."""
        return self.predictor.label(proba)

    def explain(self, inputs, *, method: str = "gradcam", target_layer: str | None = None):
        """Heat map (full resolution, [0, 1]) and an RGB overlay; one ``Explanation`` per input,
        or a single one when a single input is given."""
        from .explain import explain_images

        single = not isinstance(inputs, (list, tuple))
        items = _as_list(inputs)
        full = [D.as_rgb_array(x, self.preprocess.window) for x in items]
        result = explain_images(self, full, method=method, target_layer=target_layer)
        return result[0] if single else result

    # -- evaluation ------------------------------------------------------------------------
    def predict_subsets(self, subsets: dict) -> dict:
        """The predictor's outputs for already-decoded subsets (``.x``, ``.y``, ``.rows``):
        ``{name: (paths, labels, Outputs, rows)}``; with several sources the paths are ``source/path``."""
        out = {}
        for name, sub in subsets.items():
            res = self.predictor.outputs(sub.x)
            names, ids = D.source_ids(sub.rows)
            paths = [f"{names[i]}/{r['path']}" if len(names) > 1 else r["path"] for i, r in zip(ids, sub.rows)]
            out[name] = (paths, sub.y.cpu().tolist(), res, list(sub.rows))
        return out

    def score(self, y, outputs, rows) -> dict:
        """Metrics of one subset's predictor outputs (per source too when it mixes datasets)."""
        y = np.asarray(y)
        result = compute_metrics(y, outputs.proba, self.classes, threshold=self.threshold)
        names, ids = D.source_ids(rows)
        if len(names) > 1:  # several datasets: each one's metrics beside the pooled ones
            result["per_source"] = {
                s: compute_metrics(y[ids == i], outputs.proba[ids == i], self.classes, threshold=self.threshold)
                for i, s in enumerate(names)}
        if len(self.classes) == 2 and has_patients(rows):  # patient ids known: per patient too
            result["patients"] = patient_metrics(rows, y, outputs.proba, self.classes, self.patient_decision())
        if outputs.shift_score is not None:  # selective prediction: accuracy on what the guard accepts
            from .shift import risk_coverage

            result["selective"] = risk_coverage(y, outputs.labels, outputs.shift_score,
                                                threshold=float(self.guard.threshold))
        return result

    def evaluate_subsets(self, subsets: dict, *, write: bool = False) -> dict:
        """Metrics for already-decoded subsets (``.x``, ``.y``, ``.rows``); the predictions are kept in
        ``self.predictions`` (``write_outputs`` writes them). Uses the run's temperature; with a
        threshold, adds its operating point."""
        predictions = self.predict_subsets(subsets)
        self.predictions.update(predictions)
        return {name: self.score(y, res, rows) for name, (_, y, res, rows) in predictions.items()}

    def _load(self, rows, name: str, data, where: str) -> "_Loaded":
        x, y, kept, _ = D.load_subset(rows, name, self.classes, data, self.preprocess, on_bad="skip")
        if len(kept) == 0:
            raise CTTransferError(f"{where}: the {name} subset is empty")
        return _Loaded(x, y, kept)

    def evaluate(self, *, data=None, split_file=None, subsets=("val", "test")) -> dict:
        """Re-evaluate on the run's split (or another split file / data folder)."""
        data = D.data_root(data or self.config.get("data"))
        roots = list(data.values()) if isinstance(data, dict) else [data]
        if not data or any(not Path(r).is_dir() for r in roots):
            raise CTTransferError(f"{data}: dataset folder not found (give data=)")
        rows = D.read_split(split_file, data) if split_file else self.split
        if not rows:
            raise CTTransferError("split_file: this run has no split; give one")
        missing = [r["path"] for r in rows if r["subset"] in subsets and not D.row_exists(r, data)]
        if missing:
            raise CTTransferError(f"{data}: {len(missing)} of the split's images are missing here, e.g. {missing[0]}")
        loaded = {name: self._load(rows, name, data, split_file or "split") for name in subsets}
        result = self.evaluate_subsets(loaded)
        self.metrics = {**self.metrics, **result}
        return self.metrics

    def calibrate(self, val=None, *, sensitivity: float | None = None, save: bool = True, force: bool = False,
                  refresh_external: bool = True) -> dict:
        """Fit temperature scaling and a decision threshold on val (Youden's J, or the most specific
        threshold reaching ``sensitivity``), with ``calibration.fit_calibration``'s checks: a val too
        small raises ``CalibrationRefused`` (nothing changes), a temperature at its bound or a worse
        val ECE keeps the temperature at 1 (status ``kept-uncalibrated``); ``force`` overrides both.
        The record goes to the predictor (``predictor.json``) and ``metrics["calibration"]``; with
        ``save``, external results computed with another calibration are re-evaluated (data
        present) or marked stale (``external.refresh_external``)."""
        from . import calibration as cal
        from .config import check_sensitivity

        if sensitivity is not None:  # the same check as train's --sensitivity, before any work
            sensitivity = check_sensitivity(sensitivity)
            if len(self.classes) != 2:
                raise ConfigError("sensitivity", sensitivity, f"a decision threshold needs two classes; this run has "
                                  f"{len(self.classes)} ({', '.join(self.classes)}): leave it out")
        if val is None:
            if not self.split:
                raise CTTransferError(f"{self.directory}: this run has no split.csv; cannot find its val subset")
            val = self._load(self.split, "val", self.config["data"], "split")
        y = val.y.cpu().numpy()
        logits = self.predictor.forward(val.x)[0].numpy().astype(np.float64)
        record = cal.fit_calibration(logits, y, classes=self.classes, sensitivity=sensitivity, force=force)
        for reason in record["reasons"]:
            log.warning("calibration %s: %s", "forced" if force else record["status"], reason)
        self.predictor.calibration = Calibration.from_dict(record)
        self.metrics = {**(self.metrics or {}), "calibration": record}
        if save and self.directory is not None:
            self.save_predictor()
            if refresh_external:
                from .external import refresh_external as refresh

                record = {**record, "external": refresh(self)}
        log.info("calibration on val (%s): temperature %.3f, threshold %s, ECE %.4f -> %.4f", record["status"],
                 record["temperature"], "argmax" if record["threshold"] is None else f"{record['threshold']:.4f}",
                 record["val_ece_before"], record["val_ece_after"])
        return record

    def save_predictor(self, directory=None) -> Path:
        """``predictor.json``: the fitted state (calibration, guard facts) and the provenance."""
        from . import _io
        from .provenance import provenance

        path = Path(directory or self.directory) / PREDICTOR_FILE
        _io.write_json(path, {**self.predictor.fitted_state(), "provenance": provenance()})
        return path

    def evaluate_external(self, data, *, name: str | None = None, class_map=None, split_file=None,
                          subset: str | None = None, write: bool = True, allow_shared: bool = False,
                          near_duplicates: bool = True) -> dict:
        """Metrics on another folder-per-class dataset; written to ``RUN/external/NAME/``. A set sharing
        files with the run's data is refused (``allow_shared``: labelled not independent instead);
        ``near_duplicates=False`` skips the perceptual-hash check (files are always compared)."""
        from .external import evaluate_external

        return evaluate_external(self, data, name=name, class_map=class_map, split_file=split_file,
                                 subset=subset, write=write, allow_shared=allow_shared,
                                 near_duplicates=near_duplicates)

    # -- files -----------------------------------------------------------------------------
    def write_outputs(self, directory=None) -> None:
        """metrics.json, predictions per subset, confusion matrix and curves into the run directory."""
        rd = RunDir(directory or self.directory)
        for name, (paths, y, res, rows) in self.predictions.items():
            write_predictions(rd / f"predictions_{name}.csv", paths, y, res, self.classes, rows=rows)
        if self.metrics:
            rd.write_metrics(self.metrics)
        curves = {n: (np.asarray(y), res.proba) for n, (_, y, res, _) in self.predictions.items() if n in ("val", "test")}
        if curves:
            from .calibration import reliability_figure

            t = "" if self.temperature == 1.0 else f" · T={self.temperature:.2f}"
            save_figure(reliability_figure(curves, f"{self.config.get('model')} · reliability{t}"),
                        rd / "reliability.png")
        if "test" in self.metrics:
            save_figure(confusion_matrix_figure(self.metrics["test"]["confusion_matrix"], self.classes,
                                                f"{self.config.get('model')} · test"), rd / "confusion_matrix.png")
        if self.history:
            title = f"{self.config.get('model')} · weights={Path(str(self.config.get('weights'))).name} · " \
                    f"seed {self.config.get('seed')}"
            save_figure(curves_figure(self.history, title), rd / "curves.png")
        if rd.is_run():  # the model card follows what the run now records
            from .modelcard import write_model_card

            write_model_card(rd.path)

    def save(self, path) -> Path:
        """Write the whole run (config, split, history, best.safetensors, metrics, predictions, plots) to ``path``."""
        from ._io import ensure_writable_dir

        rd = RunDir(ensure_writable_dir(path))
        rd.write_config({**self.config, "out": str(rd.path)})
        if self.split:
            D.write_split(self.split, rd / "split.csv")
        rd.write_history(self.history)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        rd.save_best({"model": state, "classes": self.classes, "epoch": self.metrics.get("best_epoch", 0)})
        if self.guard is not None:
            self.guard.save(rd.path)
        self.save_predictor(rd.path)
        self.write_outputs(rd.path)
        self.directory = rd.path
        return rd.path

    def export(self, path, *, format: str | None = None, n_check: int = 32) -> dict:
        """ONNX (``.onnx``) or ``torch.export`` (``.pt2``) with the normalisation inside; parity checked."""
        from .export import export

        return export(self, path, format=format, n_check=n_check)


class _Loaded(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    rows: list


def _as_list(inputs) -> list:
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    return [inputs]


def _number(v, lo, hi, *, lo_open=False) -> bool:
    import math

    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (lo < v if lo_open else lo <= v) and v <= hi)


def check_run_config(cfg: dict, path) -> dict:
    """What ``load_run`` uses from config.json, checked: a damaged or edited file is one line naming it."""
    from .config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, TTAS
    from .errors import ConfigError

    def bad(why):
        return CTTransferError(f"{path}: not a valid run config ({why})")

    model = cfg.get("model")
    if not isinstance(model, str):
        raise bad("no model name")
    try:
        M.resolve(model)
    except ConfigError as exc:
        raise bad(f"model {exc.value}: {exc.why}") from None
    if not _number(cfg.get("dropout", 0.8), 0, 1) or cfg.get("dropout", 0.8) == 1:
        raise bad("dropout must be a number in [0, 1)")
    pre = cfg.get("preprocess") or {"image_size": cfg.get("image_size") or M.resolve(model).image_size}
    if not isinstance(pre, dict):
        raise bad("preprocess must be an object")
    size, window = pre.get("image_size"), pre.get("window", D.DEFAULT_WINDOW)
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise bad(f"image_size must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if (not isinstance(window, (list, tuple)) or len(window) != 2 or not _number(window[0], 0, 1e6, lo_open=True)
            or not _number(window[1], -1e6, 1e6)):
        raise bad("window must be [width > 0, level]")
    cal = cfg.get("calibration") or {}
    if not isinstance(cal, dict) or not _number(cal.get("temperature", 1.0), 0, 1e6, lo_open=True) or not (
            cal.get("threshold") is None or _number(cal.get("threshold"), 0, 1)):
        raise bad("calibration needs a temperature > 0 and a threshold in [0, 1] or null")
    for key in ("channels_last", "bf16"):
        if not isinstance(cfg.get(key, False), bool):
            raise bad(f"{key} must be true or false")
    if cfg.get("tta", "none") not in TTAS:
        raise bad(f"tta must be one of {', '.join(TTAS)}")
    data = cfg.get("data")
    if data is not None and not (isinstance(data, str) or (isinstance(data, list) and data
                                                           and all(isinstance(d, str) for d in data))):
        raise bad("data must be a folder path (or a list of them)")
    crop, intensity = pre.get("crop", "none"), pre.get("intensity", "none")
    if crop not in D.CROPS or intensity not in D.INTENSITIES:
        raise bad(f"preprocess crop must be one of {', '.join(D.CROPS)} and intensity one of {', '.join(D.INTENSITIES)}")
    return D.Preprocess(image_size=size, window=(float(window[0]), float(window[1])), crop=crop, intensity=intensity)


def load_run(path, *, checkpoint: str | None = None, device: str = "cpu") -> Run:
    """Read a run directory written by ``fit`` or ``Run.save``. ``checkpoint``: a file name in it
    (default: best.safetensors, else best.pt of runs written before it, else last.pt)."""
    from . import _io
    from .rundir import CHECKPOINTS

    rd = RunDir(path).check()
    cfg = rd.read_config()
    preprocess = check_run_config(cfg, rd / "config.json")
    found = rd / checkpoint if checkpoint and (rd / checkpoint).is_file() else rd.checkpoint()
    if found is None:
        raise CTTransferError(f"{rd.path}: no checkpoint ({' / '.join(CHECKPOINTS)})")
    ckpt_name = found.name
    ckpt = _io.load_checkpoint(rd / ckpt_name, map_location="cpu", keys=("model", "classes"))
    classes = ckpt["classes"]
    if not isinstance(classes, (list, tuple)) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise CTTransferError(f"{rd / ckpt_name}: not a ct-transfer checkpoint (classes must be 2+ names)")
    model = M.create_model(cfg["model"], weights="none", num_classes=len(classes), dropout=cfg.get("dropout", 0.8))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise CTTransferError(f"{rd / ckpt_name}: checkpoint does not fit {cfg['model']} (another architecture?)") from None
    model.eval().to(device)
    split = D.read_split(rd / "split.csv") if (rd / "split.csv").is_file() else []
    from .shift import load_guard

    guard = load_guard(rd.path)
    if guard is None:  # said once, at load; predictions then carry no shift score
        log.info("%s: no shift guard (saved before guards): predictions carry no shift score; fit one with "
                 "the command `ct-transfer guard` or shift.fit_guard(run)", rd.path)
    return Run(model=model, config=cfg, classes=list(classes), preprocess=preprocess, metrics=rd.read_metrics(),
               history=rd.read_history(), split=split, directory=rd.path, device=device,
               checkpoint=str(rd / ckpt_name), calibration=read_calibration(rd.path, cfg), guard=guard)
