"""Registries: one place for every plug-in choice (crops, intensities, augmentations, strategies,
explanation methods, test-time augmentation, slice-to-patient aggregators, shift detectors).

As in timm's ``_registry.py``, a choice is looked up by name and listed for the CLI's help and the
web page's API. Unlike timm, an entry names its implementation as ``"module:attribute"`` and is
imported only when it is first used, so listing the choices (``--help``, option validation) stays
cheap. Third-party code adds its own with ``REGISTRY.register(name, obj_or_target, help=...)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    help: str = ""
    target: Any = None  # an object, or "module:attribute" imported on first use, or None
    kwargs: dict = field(default_factory=dict)  # bound when the target is called through ``create``

    def load(self):
        if isinstance(self.target, str) and ":" in self.target:
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        return self.target


class Registry:
    """Named choices of one kind (``kind`` is the parameter they are given as)."""

    def __init__(self, kind: str, entries=()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        for e in entries:
            self.register(e.name, e.target, help=e.help, **e.kwargs)

    def register(self, name: str, target=None, *, help: str = "", **kwargs):
        """Add a choice: an object, a ``"module:attribute"`` string, or None (a choice that needs no
        implementation); ``kwargs`` are bound when ``create`` calls it."""
        if not isinstance(name, str) or not name or name in self._entries:
            raise ValueError(f"{self.kind}: cannot register {name!r} (empty or already registered)")
        self._entries[name] = Entry(name, help, target, dict(kwargs))
        return target

    # -- lookup ----------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name) -> str:
        """``name`` if registered, else ``ConfigError(kind, name, "choose a, b, c")``."""
        if name not in self._entries:
            raise ConfigError(self.kind, name, f"choose {', '.join(self._entries)}")
        return name

    def entry(self, name) -> Entry:
        return self._entries[self.check(name)]

    def get(self, name):
        """The registered object (imported on first use)."""
        return self.entry(name).load()

    def create(self, name, **kwargs):
        """Call the registered factory with the entry's bound arguments and ``kwargs``; None for a
        choice without an implementation (e.g. ``none``)."""
        entry = self.entry(name)
        target = entry.load()
        return None if target is None else target(**{**entry.kwargs, **kwargs})

    def describe(self) -> dict[str, str]:
        """``{name: help}``, in registration order (what the CLI's help and the web API list)."""
        return {n: e.help for n, e in self._entries.items()}

    def __repr__(self):
        return f"Registry({self.kind}: {', '.join(self._entries)})"


def _e(name, target=None, help="", **kwargs) -> Entry:
    return Entry(name, help, target, kwargs)


# The lung box gets a wider margin: the SARS-CoV-2 framing keeps the chest wall.
CROPS = Registry("crop", [
    _e("none", help="no crop"),
    _e("body", "ct_transfer.data.steps:CropForeground", "crop to the patient's body", kind="body", margin=0.03),
    _e("lung", "ct_transfer.data.steps:CropForeground", "crop to the lungs", kind="lung", margin=0.08),
])
INTENSITIES = Registry("intensity", [
    _e("none", help="no intensity step"),
    _e("percentile", "ct_transfer.data.steps:PercentileIntensity", "per-image 1st-99th percentile stretch"),
    _e("clahe", "ct_transfer.data.steps:Clahe", "contrast-limited adaptive histogram equalisation"),
])
AUGMENTATIONS = Registry("augmentation", [
    _e("paper", "ct_transfer.data.transforms:paper_augmentation",
       "the paper's: rotation 36 deg, shifts 0.2, both flips, brightness 0.8-1"),
    _e("domain", "ct_transfer.data.transforms:domain_augmentation",
       "for domain shift: zoom/crop, contrast/gamma, blur, noise, JPEG"),
])
STRATEGIES = Registry("strategy", [
    _e("full", "ct_transfer.engine.loop:_full_epochs", "every parameter trains"),
    _e("partial", "ct_transfer.engine.loop:_full_epochs", "the early stages stay frozen (freeze_until)"),
    _e("frozen", "ct_transfer.engine.loop:_frozen_epochs", "only the head trains, on cached pooled features"),
    _e("linear", "ct_transfer.engine.loop:_linear_epochs",
       "linear probe: logistic regression on frozen features, one convex fit"),
])
EXPLAINERS = Registry("method", [
    _e("gradcam", help="Grad-CAM"),
    _e("gradcampp", help="Grad-CAM++"),
    _e("cam", help="CAM"),
    _e("lrp", help="LRP"),
])
TTAS = Registry("tta", [
    _e("none", help="the image as it is"),
    _e("flips", help="mean logits of the image and its horizontal and vertical flips"),
])
# few-label site adaptation (ct_transfer.adapt); kind "method" is its parameter's name, as the
# explainers' is theirs, so it stays out of ALL (keyed by kind)
ADAPT_METHODS = Registry("method", [
    _e("head", help="refit the linear head on the N slices' features (backbone unchanged; seconds)"),
    _e("finetune", help="refit the head, then fine-tune (later half of the backbone + head) on the N slices"),
    _e("both", help="refit the head, then fine-tune on the start run's training images and the N slices, "
                    "every source counting equally"),
])
# filled by ct_transfer.patients (its module registers its entries)
AGGREGATORS = Registry("aggregator")
# the shift guard's scores (ct_transfer.shift; higher = less like the training images); docs/shift.md
# compares them on SARS-CoV-2 test vs UCSD-dev and chose the default (shift.DEFAULT_DETECTOR)
DETECTORS = Registry("detector", [
    _e("mahalanobis", "ct_transfer.shift:Mahalanobis",
       "Mahalanobis distance of the head's pooled features (class means, shared Ledoit-Wolf covariance)"),
    _e("mahalanobis-multi", "ct_transfer.shift:MultiMahalanobis",
       "Mahalanobis on every backbone stage's pooled features, standardised and summed"),
    _e("mahalanobis-blocks", "ct_transfer.shift:BlockMahalanobis",
       "Mahalanobis on the stem's, every block's and the head's pooled features, standardised and summed"),
    _e("knn", "ct_transfer.shift:KNN", "k-th nearest training neighbour of the normalised pooled features"),
    _e("knn-blocks", "ct_transfer.shift:BlockKNN",
       "nearest training neighbour of the stem's, every block's and the head's normalised pooled features"),
    _e("energy", "ct_transfer.shift:Energy", "energy of the logits (-logsumexp)"),
    _e("msp", "ct_transfer.shift:MaxSoftmax", "minus the maximum softmax probability (the baseline)"),
])

ALL = {r.kind: r for r in (CROPS, INTENSITIES, AUGMENTATIONS, STRATEGIES, EXPLAINERS, TTAS, AGGREGATORS, DETECTORS)}
