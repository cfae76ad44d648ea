"""The deterministic preprocessing every stage shares (train, evaluate, predict, explain, export,
serve): full-resolution RGB -> steps -> resize to the model's size. Recorded in the run's config.

MONAI-style: each step is a small object with ``__call__(array) -> array``; ``Preprocess`` composes
them and is itself a value (frozen dataclass) whose ``key`` identifies cached results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .decode import DEFAULT_WINDOW, as_rgb_array


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size x size`` like Keras ``target_size`` (no crop); PIL bilinear antialiases."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """Decoded RGB -> (steps) -> ``image_size`` square uint8. ``window``: DICOM width/level in HU."""

    image_size: int
    window: tuple[float, float] = DEFAULT_WINDOW

    def steps(self) -> list:
        """The array -> array steps before the resize (none yet in the paper's protocol)."""
        return []

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        for step in self.steps():
            arr = step(arr)
        return resize_array(arr, self.image_size)

    def load(self, obj) -> np.ndarray:
        """A path, PIL image, array or bytes -> the model's input (``S x S x 3`` uint8)."""
        return self(as_rgb_array(obj, self.window))

    @property
    def key(self) -> str:
        """Identifies the output for caching: every field that changes the pixels."""
        return "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        if "window" in d:
            d["window"] = tuple(float(v) for v in d["window"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return (f"decode to 8-bit RGB (alpha, palette and metadata dropped; DICOM: HU, window "
                f"{self.window[0]:g}/{self.window[1]:g}); squash to {self.image_size}x{self.image_size}, "
                "bilinear (PIL), no crop")
