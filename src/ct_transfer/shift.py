"""Shift guard: "this scan is unlike what the run was trained on" (issue #21).

A model trained at one hospital is confidently wrong at another, and its own confidence cannot
warn (max-softmax is *more* confident on the other hospital's slices). The guard scores every image
by how far its backbone features lie from the training images' features:

- ``DETECTORS``: the registry of scores (higher = less like the training images): ``mahalanobis``
  (class-conditional, shared Ledoit–Wolf covariance, on the pooled features the head sees),
  ``mahalanobis-multi`` (the same on several backbone stages, standardised and summed, as FRODO,
  MIDL 2019), ``mahalanobis-blocks`` (the same on the stem, every block and the head's input:
  FRODO's "all layers"), ``knn`` (k-th nearest training neighbour of the normalised pooled
  features, Sun et al. 2022), ``knn-blocks`` (the nearest training image on the stem's, every
  block's and the head's features: the default, docs/shift.md), ``energy`` and ``msp`` (from
  the logits alone; msp is the baseline that fails here).
- ``ShiftGuard``: an ``nn.Module`` whose fitted state is buffers (``RUN/guard.safetensors``, facts in
  ``RUN/guard.json``); ``forward(features, logits) -> score`` is pure torch, so the export carries it
  as a second output. The threshold accepts ``accept`` (default 95%) of the val images
  (split-conformal order statistic).
- ``FeatureTap``: forward hooks that pool the tapped maps during the model's own forward (one pass;
  with TTA the un-flipped pass is scored).
- ``fit_guard`` (fitted on the run's TRAIN images, threshold on val; never on an external set),
  ``load_guard``, ``scores`` (per image) and ``check_shift`` (set level: share flagged, a two-sample
  test against the val scores, a histogram, a verdict), ``risk_coverage`` (selective prediction).

Why not pytorch-ood (installed) for the detectors: its ``Mahalanobis`` inverts an un-shrunk
covariance (ill-conditioned for 1280 features from ~2000 images) and keeps its state in plain
attributes; its ``KNN`` searches with scikit-learn (not in a torch graph, so no ONNX export); and
importing it costs ~10 s (it imports all its losses), which ``predict`` and ``serve`` would pay at
start. Energy and max-softmax are one line each. The tests check these scores against pytorch-ood's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import _io
from .errors import ConfigError, CTTransferError
from .config import DEFAULT_GUARD_ACCEPT, DEFAULT_SHIFT_GUARD
from .registry import DETECTORS

log = logging.getLogger(__name__)

GUARD_FILE, GUARD_FACTS = "guard.safetensors", "guard.json"
HEAD_INPUT = "feature_map"  # Classifier.feature_map: the map the head pools
LOGITS = ""  # the model itself: its output is the logits
DEFAULT_DETECTOR = DEFAULT_SHIFT_GUARD  # chosen by bench/shift.py (docs/shift.md)
DEFAULT_ACCEPT = DEFAULT_GUARD_ACCEPT



def list_detectors() -> list[str]:
    return list(DETECTORS.names())


def _check_detector(name) -> type:
    return DETECTORS.get(name)  # ConfigError("detector", name, "choose ...") when unknown


# -- detectors ---------------------------------------------------------------------------------
class _Detector(nn.Module):
    """``taps(model)``: module names whose pooled outputs it scores; ``fit(feats, y)`` a classmethod
    returning a fitted detector; ``forward(feats) -> score`` (higher = less like training)."""

    name = ""
    description = ""

    @staticmethod
    def taps(model) -> list[str]:
        return [HEAD_INPUT]

    def params(self) -> dict:
        """Settings that are not tensors (saved in guard.json)."""
        return {}

    @classmethod
    def empty(cls, state: dict, facts: dict) -> "_Detector":
        """An unfitted instance whose buffers have the shapes in ``state`` (then load_state_dict)."""
        raise NotImplementedError


def _whitened_means(feats: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Class means and a whitening matrix W (W^T W = the shared Ledoit–Wolf precision), float32."""
    from sklearn.covariance import LedoitWolf

    f = feats.double().numpy()
    yy = y.numpy()
    present = [c for c in range(num_classes) if (yy == c).any()]
    means = np.stack([f[yy == c].mean(0) for c in present])
    centred = f - means[np.searchsorted(present, yy)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, vals.max() * 1e-9)  # shrinkage keeps them positive; this guards round-off
    whiten = (vecs / np.sqrt(vals)).T  # W = diag(1/sqrt(s)) V^T: ||W (f - mu)||^2 = (f-mu)^T C^-1 (f-mu)
    return torch.from_numpy(means @ whiten.T).float(), torch.from_numpy(whiten).float()


class Mahalanobis(_Detector):
    name = "mahalanobis"
    """Squared Mahalanobis distance to the nearest class mean, shared Ledoit–Wolf covariance, on the
    pooled features the head sees (Lee et al. 2018, without input perturbation)."""

    description = "Mahalanobis distance of the head's pooled features (class means, shared Ledoit-Wolf covariance)"

    def __init__(self, centres: torch.Tensor, whiten: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", centres)  # class means, whitened: C x D
        self.register_buffer("whiten", whiten)  # D x D

    @classmethod
    def fit(cls, feats: list[torch.Tensor], y, num_classes: int):
        return cls(*_whitened_means(feats[0], y, num_classes))

    @classmethod
    def empty(cls, state, facts):
        return cls(torch.zeros(state["centres"].shape), torch.zeros(state["whiten"].shape))

    def distance(self, f: torch.Tensor) -> torch.Tensor:
        z = f.float() @ self.whiten.T
        return ((z.unsqueeze(1) - self.centres.unsqueeze(0)) ** 2).sum(-1).min(1).values

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.distance(feats[0])


def _stage_taps(model) -> list[str]:
    """The backbone's stages as timm lists them (feature_info), then the head's input."""
    info = getattr(model.backbone, "feature_info", None)
    names = []
    if info is not None:
        for item in (info.get_dicts() if hasattr(info, "get_dicts") else info):
            name = f"backbone.{item['module']}"
            try:
                model.get_submodule(name)
            except AttributeError:
                continue
            names.append(name)
    return names + [HEAD_INPUT]


class MultiMahalanobis(_Detector):
    name = "mahalanobis-multi"
    """Mahalanobis on every stage's pooled features, each standardised by its training scores (mean,
    std), summed (after FRODO, Çallı et al., MIDL 2019)."""

    description = "Mahalanobis on several backbone stages' pooled features, standardised and summed"

    def __init__(self, parts: list[Mahalanobis], loc: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @staticmethod
    def taps(model) -> list[str]:
        return _stage_taps(model)

    @classmethod
    def fit(cls, feats, y, num_classes: int):
        parts = [Mahalanobis(*_whitened_means(f, y, num_classes)) for f in feats]
        with torch.no_grad():
            d = torch.stack([p.distance(f) for p, f in zip(parts, feats)], 1)
        return cls(parts, d.mean(0), d.std(0).clamp(min=1e-6))

    @classmethod
    def empty(cls, state, facts):
        n = state["loc"].shape[0]
        parts = [Mahalanobis(torch.zeros(state[f"parts.{i}.centres"].shape), torch.zeros(state[f"parts.{i}.whiten"].shape))
                 for i in range(n)]
        return cls(parts, torch.zeros(n), torch.ones(n))

    def forward(self, feats):
        d = torch.stack([p.distance(f) for p, f in zip(self.parts, feats)], 1)
        return ((d - self.loc) / self.scale).sum(1)


def _block_taps(model) -> list[str]:
    """The stem, every block and the head's input (timm EfficientNet / MobileNet layout:
    ``backbone.bn1``, ``backbone.blocks.i.j``); other backbones: their stages (``_stage_taps``)."""
    try:
        blocks = model.get_submodule("backbone.blocks")
        model.get_submodule("backbone.bn1")
    except AttributeError:
        return _stage_taps(model)
    names = [f"backbone.blocks.{i}.{j}" for i, stage in enumerate(blocks) for j in range(len(stage))]
    return ["backbone.bn1", *names, HEAD_INPUT]


class BlockMahalanobis(MultiMahalanobis):
    name = "mahalanobis-blocks"
    """``mahalanobis-multi`` on every layer FRODO would take: the stem, every block (16 in
    EfficientNetLite0, not only the 5 stage ends of timm's feature_info) and the head's input.
    Its state is a few MB whatever the training set's size (``knn-blocks`` keeps every image);
    bench/shift_variants.py ranks it 11th of 71 variants, above ``mahalanobis-multi`` (docs/shift.md)."""

    description = "Mahalanobis on the stem's, every block's and the head's pooled features, standardised and summed"

    @staticmethod
    def taps(model) -> list[str]:
        return _block_taps(model)


class KNN(_Detector):
    name = "knn"
    """Distance to the k-th nearest training image, cosine on normalised pooled features (Sun et al.
    2022: k-NN OOD). The training features are a buffer: the export carries them."""

    description = "k-th nearest training neighbour of the head's normalised pooled features"
    k_default = 10
    # The bank is every training image's features, carried by the run and its export: capped so
    # that a 40k-slice training set keeps a guard of tens of MB (4096 x 3120 float32 = 51 MB), not
    # hundreds. Larger sets keep a seeded random subset of this many images (recorded in guard.json).
    max_bank = 4096

    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        self.k = int(k)
        self.register_buffer("bank", bank)

    @classmethod
    def _capped(cls, bank: torch.Tensor) -> torch.Tensor:
        if len(bank) <= cls.max_bank:
            return bank
        keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:cls.max_bank]
        return bank[keep.sort().values]

    @staticmethod
    def join(feats: list[torch.Tensor]) -> torch.Tensor:
        return nn.functional.normalize(feats[0].float(), dim=1)

    @classmethod
    def fit(cls, feats, y, num_classes: int):
        bank = cls._capped(cls.join(feats))
        return cls(bank, min(cls.k_default, len(bank)))

    @classmethod
    def empty(cls, state, facts):
        return cls(torch.zeros(state["bank"].shape), facts.get("k", cls.k_default))

    def params(self):
        return {"k": self.k, "bank": int(len(self.bank))}

    def forward(self, feats):
        sim = self.join(feats) @ self.bank.T
        return 1.0 - sim.topk(self.k, dim=1).values[:, -1]  # 1 - cosine of the k-th nearest


class BlockKNN(KNN):
    name = "knn-blocks"
    """k-NN on the stem's, every block's and the head's pooled features: each layer's vector
    L2-normalised, joined, normalised again (so 1 - cosine = 1 - the mean of the layers' cosines),
    distance to the NEAREST training image (k = 1). The highest AUROC of bench/shift_variants.py's
    variants on SARS-CoV-2 val vs UCSD's train patients (docs/shift.md); the training features
    (1952 x 3120 for EfficientNetLite0 on the paper split, 24 MB) are a buffer the export carries."""

    description = "nearest training neighbour of the stem's, every block's and the head's normalised pooled features"
    k_default = 1

    @staticmethod
    def taps(model) -> list[str]:
        return _block_taps(model)

    @staticmethod
    def join(feats: list[torch.Tensor]) -> torch.Tensor:
        parts = [nn.functional.normalize(f.float(), dim=1) for f in feats]  # every layer counts alike
        return nn.functional.normalize(torch.cat(parts, 1), dim=1)


class _LogitDetector(_Detector):
    """A detector that scores the logits alone: nothing to fit, nothing to store."""

    def __init__(self):
        super().__init__()

    @staticmethod
    def taps(model):
        return [LOGITS]

    @classmethod
    def fit(cls, feats, y, num_classes):
        return cls()

    @classmethod
    def empty(cls, state, facts):
        return cls()


class Energy(_LogitDetector):
    """Free energy of the logits, -logsumexp (Liu et al. 2020); pytorch-ood's EnergyBased.score."""

    name = "energy"
    description = "energy of the logits (-logsumexp)"

    def forward(self, feats):
        return -torch.logsumexp(feats[0].float(), dim=1)


class MaxSoftmax(_LogitDetector):
    """The baseline: minus the maximum softmax probability (Hendrycks & Gimpel 2017)."""

    name = "msp"
    description = "minus the maximum softmax probability (the model's own confidence; the baseline)"

    def forward(self, feats):
        return -torch.softmax(feats[0].float(), dim=1).max(1).values


# -- the guard ---------------------------------------------------------------------------------
class ShiftGuard(nn.Module):
    """A fitted detector, the module names it taps, its threshold and the val scores it was set on.

    ``forward(feats) -> score`` (pure torch: exported inside the graph); ``score > threshold`` means
    "not like the training images" (``in_distribution`` False)."""

    def __init__(self, detector: _Detector, *, taps: list[str], threshold: float, val_scores: torch.Tensor,
                 facts: dict | None = None):
        super().__init__()
        self.detector, self.taps = detector, list(taps)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("val_scores", val_scores.float())
        self.info = dict(facts or {})  # how it was fitted: accept, n_train, n_val, ...

    @property
    def name(self) -> str:
        return self.detector.name

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.detector(feats)

    def in_distribution(self, scores) -> np.ndarray:
        return np.asarray(scores) <= float(self.threshold)

    def describe(self) -> dict:
        return {"detector": self.name, "description": self.detector.description, "taps": self.taps,
                "threshold": float(self.threshold), **self.detector.params(), **self.info}

    def facts(self) -> dict:
        """What ``predictor.json`` records of the guard (the Predictor's guard interface)."""
        return {**self.describe(), "file": GUARD_FILE}

    def tapping(self, model) -> "FeatureTap":
        """The Predictor's guard interface: ``with guard.tapping(model) as tap: <forward>``, then
        ``tap.score()``: the guard's score of that forward pass (its first call: with TTA, the
        un-flipped image). One pass serves the prediction and the guard."""
        return FeatureTap(model, self.taps, guard=self)

    def save(self, folder) -> Path:
        from safetensors.torch import save

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _io.write_bytes(folder / GUARD_FILE, save(state))
        _io.write_json(folder / GUARD_FACTS, self.describe())
        return folder / GUARD_FILE


def load_guard(folder) -> ShiftGuard | None:
    """The guard saved in a run folder, or None when the run has none (saved before guards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    facts_file, state_file = folder / GUARD_FACTS, folder / GUARD_FILE
    if not facts_file.is_file() and not state_file.is_file():
        return None
    try:
        facts = json.loads(facts_file.read_text())
        state = load(state_file.read_bytes())
        cls = DETECTORS.get(facts["detector"])
        detector = cls.empty({k.removeprefix("detector."): v for k, v in state.items()}, facts)
        keep = {k: v for k, v in facts.items() if k not in ("detector", "description", "taps", "threshold", "k")}
        guard = ShiftGuard(detector, taps=facts["taps"], threshold=float(facts["threshold"]),
                           val_scores=torch.zeros(state["val_scores"].shape), facts=keep)
        guard.load_state_dict(state)
    except FileNotFoundError as exc:
        raise CTTransferError(f"{exc.filename}: missing (the guard needs both {GUARD_FILE} and {GUARD_FACTS})") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CTTransferError(f"{state_file}: not a valid shift guard ({type(exc).__name__}); refit it "
                              "(ct_transfer.shift.fit_guard)") from None
    return guard.eval()


# -- feature taps ------------------------------------------------------------------------------
class FeatureTap:
    """Forward hooks on ``names`` (modules of the model; ``""`` = the model's output): each keeps
    its module's output of the FIRST call after ``clear()``, globally average-pooled to N x C. With
    TTA the first call is the un-flipped image. Use as a context manager (hooks removed on exit),
    or keep it (the export's wrapper keeps its hooks while it is traced)."""

    def __init__(self, model: nn.Module, names: list[str], guard: "ShiftGuard | None" = None):
        self.names, self.guard = list(names), guard
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CTTransferError(f"taps: the model has no module '{name}' (a guard of another "
                                      "architecture?)") from None
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if name not in self.out:
                out = output.float()
                self.out[name] = out.mean((2, 3)) if out.dim() == 4 else out
        return hook

    def clear(self):
        self.out = {}

    def taken(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]

    def score(self) -> torch.Tensor:
        """The guard's score of what the hooks took (float32, on the features' device)."""
        feats = self.taken()
        return self.guard.to(feats[0].device)(feats)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.inference_mode()
def _tapped_features(model, images_u8, transform, taps, *, device, channels_last, bf16, batch_size=64):
    from .inference import autocast

    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in taps]
    with FeatureTap(model, taps) as tap:
        for start in range(0, len(images_u8), batch_size):
            x = transform(images_u8[start:start + batch_size].to(device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            tap.clear()
            with autocast(bf16, device):
                model(x)
            for i, f in enumerate(tap.taken()):
                parts[i].append(f.float().cpu())
    return [torch.cat(p) for p in parts]


# -- fitting -----------------------------------------------------------------------------------
def conformal_threshold(val_scores, accept: float) -> float:
    """The ceil((n + 1) * accept)-th smallest of the n val scores (the largest when that exceeds n).

    Split conformal: a new image exchangeable with the val images scores above it with probability
    at most 1 - accept, over the draw of val and the image. The plain ``accept`` quantile of val
    is one order statistic lower and has no such guarantee (it flagged 6.1% of SARS-CoV-2 test
    against 5.3% for this rule on the run of docs/shift.md)."""
    v = np.sort(np.asarray(val_scores, dtype=np.float64))
    if len(v) == 0:
        raise CTTransferError("no val images to set the guard's threshold on")
    k = min(math.ceil((len(v) + 1) * accept), len(v))
    return float(v[k - 1])


def _all_in(x, pool, chunk: int = 256) -> bool:
    """Is every image of ``x`` pixel-identical to one of ``pool``? (uint8 N x 3 x S x S tensors, or
    the disk store's ``StoredImages``: read in chunks, so a large store is never held whole; the scan
    stops once every image of ``x`` is found.)"""
    import hashlib

    def digests(t):
        for a in range(0, len(t), chunk):
            part = torch.as_tensor(t[a:a + chunk]).cpu()
            for img in part:
                yield hashlib.sha1(img.contiguous().numpy().tobytes()).digest()

    missing = set(digests(x))
    if not missing:
        return False
    for d in digests(pool):
        missing.discard(d)
        if not missing:
            return True
    return False


def _cross_fitted(cls, feats: list[torch.Tensor], y: torch.Tensor, num_classes: int, folds: int = 5) -> torch.Tensor:
    """Out-of-fold scores of the training images (seeded folds; at most ``folds``, at least 2 images fitted)."""
    n = len(y)
    k = max(2, min(folds, n // 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    scores = torch.empty(n)
    with torch.no_grad():
        for part in order.chunk(k):
            keep = torch.ones(n, dtype=torch.bool)
            keep[part] = False
            det = cls.fit([f[keep] for f in feats], y[keep], num_classes).eval()
            scores[part] = det([f[part] for f in feats]).float()
    return scores


def fit_guard(run, *, detector: str = DEFAULT_DETECTOR, train=None, val=None, accept: float = DEFAULT_ACCEPT,
              save: bool = True) -> ShiftGuard:
    """Fit ``run``'s shift guard on its TRAIN images, threshold on its val images, and attach it
    (``run.guard``; saved to the run folder with ``save``).

    ``train`` / ``val``: already-decoded subsets (``.x`` uint8 N x 3 x S x S, ``.y``), e.g. from
    ``fit``; by default the run's own split is loaded from its data folder. An adapted run (another
    site's labelled slices in its train split) refits the same way: the guard follows the split.
    ``accept``: the share of val images the threshold accepts (0.5..1). When every val image is also
    a train image (an adapted run's N labelled slices are both), the threshold is set on the train
    images' cross-fitted (out-of-fold) scores instead.
    """
    cls = _check_detector(detector)
    if not (isinstance(accept, (int, float)) and not isinstance(accept, bool) and 0.5 <= accept < 1):
        raise ConfigError("accept", accept, "choose a share in [0.5, 1), e.g. 0.95")
    if train is None or val is None:
        if not run.split:
            raise CTTransferError(f"{run.directory}: this run has no split.csv; cannot find its train images")
        from . import data as D

        data = run.config.get("data")
        roots = D.data_root(data) if data else None
        roots = list(roots.values()) if isinstance(roots, dict) else [roots]
        if not data or any(not Path(r).is_dir() for r in roots):
            raise CTTransferError(f"{data}: the run's data folder is not here (the guard is fitted on the run's "
                                  "train images; give train= and val= subsets)")
        train = train if train is not None else run._load(run.split, "train", data, "split")
        val = val if val is not None else run._load(run.split, "val", data, "split")
    taps = cls.taps(run.model)
    kw = dict(device=run.device, channels_last=run.config.get("channels_last", True), bf16=run.config.get("bf16", False))
    feats = _tapped_features(run.model, train.x, run.transform, taps, **kw)
    fitted = cls.fit(feats, train.y.cpu(), len(run.classes)).eval()
    probe = ShiftGuard(fitted, taps=taps, threshold=math.inf, val_scores=torch.zeros(0))
    if _all_in(val.x, train.x):
        # no val apart from train (an adapted run: its N labelled slices are both): scores of the
        # training images themselves are in-sample (0 for the nearest-neighbour detectors), so the
        # threshold's scores come from cross-fitting instead: each fold scored by a detector fitted
        # on the other folds
        val_scores, threshold_on = _cross_fitted(cls, feats, train.y.cpu(), len(run.classes)), "train, cross-fitted"
    else:
        val_feats = _tapped_features(run.model, val.x, run.transform, taps, **kw)
        with torch.no_grad():
            val_scores, threshold_on = probe(val_feats).float(), "val"
    threshold = conformal_threshold(val_scores.numpy(), accept)
    guard = ShiftGuard(fitted, taps=taps, threshold=threshold, val_scores=val_scores, facts={
        "accept": accept, "fitted_on": "train", "threshold_on": threshold_on, "threshold_rule": "conformal",
        "n_train": int(len(train.x)),
        "n_val": int(len(val.x)), "val_accepted": float((val_scores <= threshold).float().mean()),
        "image_size": run.image_size}).eval()
    run.predictor.guard = guard
    if save and run.directory is not None:
        guard.save(run.directory)
        run.save_predictor()  # predictor.json records the guard's facts
    log.info("shift guard %s fitted on %d train images; threshold %.4g accepts %.1f%% of %d %s images",
             detector, len(train.x), threshold, 100 * guard.info["val_accepted"], len(val_scores), threshold_on)
    return guard


def require_guard(run) -> ShiftGuard:
    guard = run.predictor.guard
    if guard is None:
        where = run.directory or "this run"
        raise CTTransferError(f"{where}: no shift guard (a run saved before guards); fit one with "
                              "ct_transfer.shift.fit_guard(run) or the command `ct-transfer guard`")
    return guard


def image_scores(run, images_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, guard scores) for decoded uint8 images, one pass (the run's TTA and temperature)."""
    require_guard(run)
    out = run.predictor.outputs(images_u8)
    return out.proba, out.shift_score


# -- set level and selective prediction ----------------------------------------------------------
def set_test(scores, val_scores, threshold: float, *, alpha: float = 0.01) -> dict:
    """Does a set of scores come from the val images' distribution? One-sided Mann–Whitney U (the new
    set scores higher) and the two-sample Kolmogorov–Smirnov test, share flagged, a verdict."""
    from scipy.stats import ks_2samp, mannwhitneyu

    scores, val_scores = np.asarray(scores, np.float64), np.asarray(val_scores, np.float64)
    if len(scores) == 0:
        raise CTTransferError("no images to check")
    flagged = float((scores > threshold).mean())
    val_flagged = float((val_scores > threshold).mean())
    mw = mannwhitneyu(scores, val_scores, alternative="greater")
    ks = ks_2samp(scores, val_scores)
    shifted = bool(mw.pvalue < alpha)
    verdict = (f"Unlike the run's training images: {100 * flagged:.0f}% of {len(scores)} images flagged "
               f"(val: {100 * val_flagged:.0f}%), Mann-Whitney p = {mw.pvalue:.1e}; do not trust these "
               "predictions without validating or adapting the model on this site's labelled slices."
               if shifted else
               f"Consistent with the run's training images: {100 * flagged:.0f}% of {len(scores)} images flagged "
               f"(val: {100 * val_flagged:.0f}%), Mann-Whitney p = {mw.pvalue:.3g} (alpha {alpha}); the run's "
               "internal figures may apply.")
    return {"n": int(len(scores)), "flagged": flagged, "val_flagged": val_flagged, "threshold": float(threshold),
            "test": "mann-whitney-u (one-sided: higher scores than val)", "p_value": float(mw.pvalue),
            "ks_statistic": float(ks.statistic), "ks_p_value": float(ks.pvalue), "alpha": alpha,
            "shifted": shifted, "verdict": verdict,
            "score_median": float(np.median(scores)), "val_score_median": float(np.median(val_scores))}


def risk_coverage(y_true, labels, scores, *, threshold: float | None = None, points: int = 20) -> dict:
    """Selective prediction: accuracy of the decided ``labels`` (class indices) on the images the
    guard accepts against the share accepted (accepted from the lowest score up), the area under the
    risk-coverage curve, and the operating point at the guard's ``threshold``."""
    y_true, pred, scores = np.asarray(y_true), np.asarray(labels), np.asarray(scores)
    correct = (pred == y_true).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    cum = np.cumsum(correct[order])
    n = len(y_true)
    curve = []
    for c in np.linspace(1.0 / points, 1.0, points):
        k = max(1, int(round(c * n)))
        curve.append({"coverage": round(k / n, 4), "accuracy": float(cum[k - 1] / k),
                      "score_at": float(scores[order[k - 1]])})
    out = {"n": int(n), "accuracy_all": float(correct.mean()) if n else float("nan"), "curve": curve,
           "aurc": float(np.mean([1 - cum[k - 1] / k for k in range(1, n + 1)])) if n else float("nan")}
    if threshold is not None:
        acc = scores <= threshold
        out["at_threshold"] = {"accepted": float(acc.mean()), "n_accepted": int(acc.sum()),
                               "accuracy_accepted": float(correct[acc].mean()) if acc.any() else None,
                               "accuracy_rejected": float(correct[~acc].mean()) if (~acc).any() else None}
    return out


def histogram_figure(scores, val_scores, threshold: float, title: str):
    """The set's scores against the val scores, with the threshold."""
    from matplotlib.figure import Figure

    scores, val_scores = np.asarray(scores), np.asarray(val_scores)
    both = np.concatenate([scores, val_scores])
    lo, hi = np.percentile(both, 0.5), np.percentile(both, 99.5)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ax.hist(np.clip(val_scores, lo, hi), bins=bins, density=True, alpha=0.55, label=f"run's val images ({len(val_scores)})")
    ax.hist(np.clip(scores, lo, hi), bins=bins, density=True, alpha=0.55, label=f"this set ({len(scores)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold (chosen on val)")
    ax.set_xlabel("shift score (higher = less like the training images)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def check_shift(run, data, *, out=None, alpha: float = 0.01, batch_size: int = 64) -> dict:
    """Set-level check of a folder of slices (labelled or not; searched recursively): per-image
    scores, share flagged, a two-sample test against the run's val scores, a verdict; with ``out``
    also ``shift.json``, ``shift_scores.csv`` and ``shift_hist.png`` there."""
    from .evaluate import save_figure
    from .predict import collect_inputs

    guard = require_guard(run)
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ConfigError("alpha", alpha, "choose a level in (0, 1), e.g. 0.01")
    folder = Path(data)
    if not folder.is_dir():
        raise CTTransferError(f"{folder}: no such folder")
    if out is not None:
        _io.check_writable(out)
    paths = collect_inputs([str(folder)])
    scores, kept, bad = [], [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        arrays, ok = [], []
        for p in chunk:
            try:
                arrays.append(run.preprocess.load(p))
                ok.append(p)
            except CTTransferError:
                bad.append(str(p))
        if arrays:
            from . import data as D

            _, s = image_scores(run, D.stack(arrays))
            scores.append(s)
            kept += ok
    if not kept:
        raise CTTransferError(f"{folder}: none of its {len(paths)} files could be read as an image")
    scores = np.concatenate(scores)
    result = {"data": str(folder), "detector": guard.name, "skipped": bad,
              **set_test(scores, guard.val_scores.numpy(), float(guard.threshold), alpha=alpha)}
    if out is not None:
        out = _io.ensure_writable_dir(out)
        rows = [{"path": str(p), "shift_score": float(s), "in_distribution": bool(s <= float(guard.threshold))}
                for p, s in zip(kept, scores)]
        _io.write_csv(out / "shift_scores.csv", rows)
        save_figure(histogram_figure(scores, guard.val_scores.numpy(), float(guard.threshold),
                                     f"{folder.name} vs val · {guard.name}"), out / "shift_hist.png")
        result["files"] = {"json": str(out / "shift.json"), "scores": str(out / "shift_scores.csv"),
                           "histogram": str(out / "shift_hist.png")}
        _io.write_json(out / "shift.json", result)
    log.info("shift check %s: %s", folder, result["verdict"])
    return result
