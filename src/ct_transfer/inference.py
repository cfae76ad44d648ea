"""The inference core: the only code that turns images into probabilities and labels.

``Predictor`` holds what a trained model needs at the point of use: the preprocessing, the
normalisation, test-time flips, the temperature, the decision threshold and (once fitted) the shift
guard. ``Run.predict``, evaluation (internal and external), ``explain``, the web server and the
export all go through it, so a calibrated run cannot answer differently on different paths.

Parameters (what the run was trained with: model, preprocessing, TTA) stay in ``config.json``;
the *fitted* state (temperature, threshold, calibration facts, guard facts) lives apart in
``RUN/predictor.json``, as scikit-learn keeps ``coef_`` apart from ``get_params()``. Runs saved
before predictor.json existed keep their calibration in config.json and still load.

Training's per-epoch validation uses the same batched forward (``predict_logits``), without
temperature or threshold (those are fitted after training).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import data as D
from . import models as M
from .errors import ConfigError, CTTransferError

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"


def autocast(enabled: bool, device: str = "cpu"):
    kind = str(device).split(":")[0]
    return torch.autocast(device_type=kind, dtype=torch.bfloat16) if enabled else nullcontext()


def tta_logits(model, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits for a normalised batch; ``flips``: the mean logits of the image and its
    horizontal and vertical flips (the paper's augmentation has both flips, so the model has seen
    them). Averaging logits keeps temperature scaling and thresholds working as without it."""
    logits = model(x)
    if tta == "flips":
        logits = (logits + model(x.flip(-1)) + model(x.flip(-2))) / 3
    return logits


@torch.inference_mode()
def predict_logits(model, images_u8: torch.Tensor, transform, *, batch_size: int = 256, bf16: bool = False,
                   device: str = "cpu", channels_last: bool = True, tta: str = "none") -> torch.Tensor:
    """Logits (float32, on the CPU) for ``N x 3 x S x S`` uint8 images (``tta``: see ``tta_logits``)."""
    model.eval()
    out = []
    for start in range(0, len(images_u8), batch_size):
        x = transform(images_u8[start:start + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(bf16, device):
            logits = tta_logits(model, x, tta)
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


def predict_proba(model, images_u8: torch.Tensor, transform, *, temperature: float = 1.0, **kw) -> np.ndarray:
    """Class probabilities (softmax of logits / ``temperature``) for ``N x 3 x S x S`` uint8 images."""
    logits = predict_logits(model, images_u8, transform, **kw)
    if logits.numel() == 0:
        return np.zeros((0, 0), np.float32)
    return softmax(logits, temperature)


def calibrated(logits: torch.Tensor, temperature) -> torch.Tensor:
    """The one place probabilities come from logits: ``softmax(logits / T)`` (a torch op, so the
    export puts exactly this into its graph)."""
    return torch.softmax(logits / temperature, dim=1)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``calibrated`` for any logits (tensor or array), as float32 numpy."""
    return calibrated(torch.as_tensor(logits).float(), float(temperature)).numpy()


def decide(proba: np.ndarray, threshold: float | None) -> np.ndarray:
    """The one decision rule: with two classes and a threshold, the positive class (index 1) when its
    probability reaches it; otherwise argmax (scikit-learn's ``classes_[argmax]``)."""
    proba = np.asarray(proba)
    if proba.ndim != 2 or len(proba) == 0:
        return np.zeros(len(proba), dtype=np.int64)
    if threshold is not None and proba.shape[1] == 2:
        return (proba[:, 1] >= float(threshold)).astype(np.int64)
    return proba.argmax(1).astype(np.int64)


class Prediction(NamedTuple):
    """One input's answer. ``shift_score``/``in_distribution`` are None when the run has no guard."""

    label: str
    probabilities: dict[str, float]
    shift_score: float | None = None
    in_distribution: bool | None = None


@dataclass(frozen=True)
class Outputs:
    """A batch's answers, as arrays: logits, calibrated probabilities, decided class indices, and
    the shift guard's score and acceptance (None without a guard)."""

    logits: np.ndarray
    proba: np.ndarray
    labels: np.ndarray
    shift_score: np.ndarray | None = None
    in_distribution: np.ndarray | None = None


@dataclass
class Calibration:
    """Fitted on val by ``Run.calibrate``: temperature (1.0 = none) and decision threshold on the
    positive class's probability (None = argmax), with the facts of the fit."""

    temperature: float = 1.0
    threshold: float | None = None
    facts: dict | None = None  # criterion, n_val, ECE before/after, status, ...

    @property
    def fitted(self) -> bool:
        return self.facts is not None or self.temperature != 1.0 or self.threshold is not None

    def to_dict(self) -> dict:
        return {**(self.facts or {}), "temperature": float(self.temperature), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        d = dict(d or {})
        t, thr = d.pop("temperature", 1.0), d.pop("threshold", None)
        return cls(float(t), None if thr is None else float(thr), d or None)


class Predictor:
    """Images in, probabilities, labels (and shift scores) out: preprocessing, normalisation, TTA,
    temperature, threshold and the decision rule in one object.

    ``guard`` (issue #21, ``shift.ShiftGuard``) has ``tapping(model)``: a context whose forward hooks
    read the features of the forward pass run inside it, and whose ``score()`` is the guard's score
    of that pass's first call (the un-flipped image with TTA); and a ``threshold`` (a score above
    it is "unlike the training data").
    """

    def __init__(self, model, *, classes, preprocess: D.Preprocess, tta: str = "none",
                 calibration: Calibration | None = None, guard=None, device: str = "cpu",
                 channels_last: bool = True, bf16: bool = False):
        self.model, self.classes, self.preprocess = model, list(classes), preprocess
        self.tta, self.device, self.channels_last, self.bf16 = tta, device, channels_last, bf16
        self.calibration = calibration or Calibration()
        self.guard = guard
        self.mean, self.std = M.normalization(model)
        self.transform = D.batch_transform(self.mean, self.std, augment=False)

    def __repr__(self):
        return (f"Predictor({len(self.classes)} classes, {self.preprocess.image_size} px, tta={self.tta}, "
                f"T={self.temperature:g}, threshold={self.threshold}, guard={'yes' if self.guard else 'no'})")

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    # -- images ----------------------------------------------------------------------------
    def load_images(self, inputs) -> torch.Tensor:
        """Paths (images, DICOM), arrays, PIL images or bytes -> ``N x 3 x S x S`` uint8 tensor."""
        cache = D.ImageCache(self.preprocess)
        arrays = [cache.get(x) if isinstance(x, (str, Path)) and not D.is_dicom(Path(x)) else self.preprocess.load(x)
                  for x in inputs]
        return D.stack(arrays)

    # -- the forward pass ------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x_u8: torch.Tensor, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and guard scores) for uint8 images, batched; float32 on the CPU."""
        self.model.eval()
        logits, scores = [], []
        for start in range(0, len(x_u8), batch_size):
            x = self.transform(x_u8[start:start + batch_size].to(self.device))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.bf16, self.device):
                if self.guard is None:
                    lg, sc = tta_logits(self.model, x, self.tta), None
                else:
                    with self.guard.tapping(self.model) as tap:  # the same forward pass feeds the guard
                        lg = tta_logits(self.model, x, self.tta)
                    sc = tap.score()
            logits.append(lg.float().cpu())
            if sc is not None:
                scores.append(sc.float().cpu())
        n = len(self.classes)
        lg = torch.cat(logits) if logits else torch.zeros((0, n))
        return lg, (torch.cat(scores) if scores else None) if self.guard is not None else None

    def outputs(self, x_u8: torch.Tensor, *, batch_size: int = 256) -> Outputs:
        """Everything the run answers for a batch of uint8 images."""
        logits, scores = self.forward(x_u8, batch_size=batch_size)
        proba = self.proba(logits)
        shift = accepted = None
        if scores is not None:
            shift = scores.numpy().astype(np.float64)
            accepted = shift <= float(self.guard.threshold)
        return Outputs(logits.numpy(), proba, self.decide(proba), shift, accepted)

    def proba(self, logits) -> np.ndarray:
        if len(logits) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return softmax(logits, self.temperature)

    def decide(self, proba) -> np.ndarray:
        """Class indices by the run's one decision rule (see ``decide``)."""
        return decide(proba, self.threshold)

    def label(self, proba_row) -> str:
        return self.classes[int(decide(np.asarray(proba_row)[None], self.threshold)[0])]

    # -- user-facing -----------------------------------------------------------------------
    def predict_outputs(self, inputs, *, batch_size: int = 64) -> Outputs:
        """``outputs`` for paths, arrays, PIL images or bytes, decoded ``batch_size`` at a time."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be an integer >= 1")
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        parts = [self.outputs(self.load_images(inputs[i:i + batch_size]), batch_size=batch_size)
                 for i in range(0, len(inputs), batch_size)]
        if not parts:
            n = len(self.classes)
            return Outputs(np.zeros((0, n), np.float32), np.zeros((0, n), np.float32), np.zeros(0, np.int64))
        return concat(parts)

    def predict(self, inputs, *, batch_size: int = 64) -> list[Prediction]:
        """One ``Prediction`` per input (path, array, PIL image or bytes)."""
        return self.as_predictions(self.predict_outputs(inputs, batch_size=batch_size))

    def as_predictions(self, out: Outputs) -> list[Prediction]:
        res = []
        for i, p in enumerate(out.proba):
            shift = None if out.shift_score is None else float(out.shift_score[i])
            ok = None if out.in_distribution is None else bool(out.in_distribution[i])
            res.append(Prediction(self.classes[int(out.labels[i])], {c: float(v) for c, v in zip(self.classes, p)},
                                  shift, ok))
        return res

    # -- fitted state ----------------------------------------------------------------------
    def fitted_state(self) -> dict:
        """What ``predictor.json`` holds: the decision rule and everything fitted after training."""
        state = {"classes": self.classes, "positive_class": self.classes[1] if len(self.classes) == 2 else None,
                 "decision": ("threshold on p(positive)" if self.threshold is not None and len(self.classes) == 2
                              else "argmax"),
                 "tta": self.tta, "temperature": self.temperature, "threshold": self.threshold,
                 "calibration": self.calibration.to_dict() if self.calibration.fitted else None}
        if self.guard is not None and hasattr(self.guard, "facts"):
            state["guard"] = self.guard.facts()
        return state


def concat(parts: list[Outputs]) -> Outputs:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Outputs(*(cat(n) for n in ("logits", "proba", "labels", "shift_score", "in_distribution")))


def read_calibration(directory, config: dict) -> Calibration:
    """The run's fitted calibration: ``predictor.json``, else (runs saved before it) config.json's."""
    from . import _io

    path = Path(directory) / PREDICTOR_FILE if directory else None
    if path is not None and path.is_file():
        doc = _io.read_json(path, what="predictor file")
        cal = doc.get("calibration")
        if cal is not None:
            if (not isinstance(cal, dict) or not _positive(cal.get("temperature", 1.0))
                    or not (cal.get("threshold") is None or _unit(cal.get("threshold")))):
                raise CTTransferError(f"{path}: not a valid predictor file (calibration needs a temperature > 0 "
                                      "and a threshold in [0, 1] or null)")
            return Calibration.from_dict(cal)
    return Calibration.from_dict(config.get("calibration"))  # uncalibrated, or saved before predictor.json


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e6


def _unit(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
