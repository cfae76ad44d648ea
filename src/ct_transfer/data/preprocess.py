"""The deterministic preprocessing every stage shares (train, evaluate, predict, explain, export,
serve): full-resolution RGB -> steps -> resize to the model's size. Recorded in the run's config.

MONAI-style: each step is a small object with ``__call__(array) -> array``; ``Preprocess`` composes
them and is itself a value (frozen dataclass) whose ``key`` identifies cached results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .decode import DEFAULT_WINDOW, as_rgb_array
from .steps import CROPS, INTENSITIES, make_steps


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size x size`` like Keras ``target_size`` (no crop); PIL bilinear antialiases."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


@dataclass(frozen=True)
class Preprocess:
    """Decoded RGB -> (steps) -> ``image_size`` square uint8. ``window``: DICOM width/level in HU.

    ``crop`` (none | body | lung) and ``intensity`` (none | percentile | clahe): see ``steps.py``;
    both ``none`` is the paper's protocol.
    """

    image_size: int
    window: tuple[float, float] = DEFAULT_WINDOW
    crop: str = "none"
    intensity: str = "none"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ConfigError("crop", self.crop, f"choose {', '.join(CROPS)}")
        if self.intensity not in INTENSITIES:
            raise ConfigError("intensity", self.intensity, f"choose {', '.join(INTENSITIES)}")

    def steps(self) -> list:
        """The array -> array steps before the resize (none in the paper's protocol): crop, then intensity."""
        return make_steps(self.crop, self.intensity)

    def crop_box(self, arr: np.ndarray):
        """``(y0, y1, x0, x1)`` of ``arr`` (decoded, full resolution) that the model sees."""
        for step in self.steps():
            if hasattr(step, "box"):
                box = step.box(arr)
                if box is not None:
                    return box
        return 0, arr.shape[0], 0, arr.shape[1]

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        for step in self.steps():
            arr = step(arr)
        return resize_array(arr, self.image_size)

    def load(self, obj) -> np.ndarray:
        """A path, PIL image, array or bytes -> the model's input (``S x S x 3`` uint8)."""
        return self(as_rgb_array(obj, self.window))

    @property
    def key(self) -> str:
        """Identifies the output for caching: every field that changes the pixels (steps left at
        ``none`` are omitted, so caches made before the steps existed stay valid)."""
        items = {k: v for k, v in asdict(self).items() if not (k in ("crop", "intensity") and v == "none")}
        return "|".join(f"{k}={v}" for k, v in sorted(items.items()))

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
        steps = "".join(f"{s.describe()}; " for s in self.steps())
        return (f"decode to 8-bit RGB (alpha, palette and metadata dropped; DICOM: HU, window "
                f"{self.window[0]:g}/{self.window[1]:g}); {steps}squash to {self.image_size}x{self.image_size}, "
                "bilinear (PIL)" + ("" if self.crop != "none" else ", no crop"))
