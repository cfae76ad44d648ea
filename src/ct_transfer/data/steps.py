"""Preprocessing steps that remove what is not the patient (MONAI-style: small array -> array objects).

Each step takes and returns an ``H x W x 3`` uint8 array and is deterministic (no randomness: the
same file gives the same pixels in train, evaluate, predict, explain, export and serve).

- ``CropForeground("body")``: threshold + opening + largest connected component + bounding box with
  a margin (MONAI ``CropForeground``'s idea). The opening removes thin figure borders, text and
  arrows before the component is chosen, so they do not stretch the box.
- ``CropForeground("lung")``: the body box, then tightened to the dark (air) regions inside the
  filled body: the framing of the SARS-CoV-2 slices (lungs fill the picture).
- ``PercentileIntensity``: clip to per-image percentiles and rescale to 0..255 (window/level and
  contrast differences between sites).
- ``Clahe``: contrast-limited adaptive histogram equalisation (scikit-image).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..registry import CROPS, INTENSITIES  # noqa: F401  (the choices and their implementations)


MASK_SIZE = 256


def gray(arr: np.ndarray) -> np.ndarray:
    return arr if arr.ndim == 2 else arr.mean(axis=2).astype(np.uint8)


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _bbox(mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _grow(box, shape, margin: float):
    y0, y1, x0, x1 = box
    my, mx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
    return max(0, y0 - my), min(shape[0], y1 + my), max(0, x0 - mx), min(shape[1], x1 + mx)


def body_mask(g: np.ndarray) -> np.ndarray:
    """The patient's body: brighter than the (dark) background, without borders, text and arrows."""
    h, w = g.shape
    # Figure borders: a bright or dark frame line along an edge is not the patient.
    g = g.copy()
    b = max(2, round(min(h, w) * 0.015))
    g[:b, :] = 0
    g[-b:, :] = 0
    g[:, :b] = 0
    g[:, -b:] = 0
    thr = max(20.0, 0.25 * float(np.percentile(g, 99)))  # background is near black, tissue is not
    mask = g > thr
    r = max(2, round(min(h, w) * 0.015))  # opening breaks thin lines (borders, arrows, letters)
    # a square opening, as a row then a column pass (separable, same result, much faster)
    mask = ndi.binary_erosion(ndi.binary_erosion(mask, np.ones((1, 2 * r + 1), bool)), np.ones((2 * r + 1, 1), bool))
    mask = ndi.binary_dilation(ndi.binary_dilation(mask, np.ones((1, 2 * r + 1), bool)), np.ones((2 * r + 1, 1), bool))
    return ndi.binary_fill_holes(_largest(mask))


def lung_mask(g: np.ndarray, body: np.ndarray | None = None):
    """Dark regions (air) inside the body's convex hull, large components only; ``None`` if none.

    Otsu threshold inside the body. The hull, not the filled mask: a lung cut by the picture's edge
    is not a hole of the body ring, but it is inside the hull.
    """
    if body is None:
        body = body_mask(g)
    inside = g[body]
    if inside.size == 0:
        return None
    from skimage.filters import threshold_otsu
    from skimage.morphology import convex_hull_image

    thr = threshold_otsu(inside) if inside.max() > inside.min() else inside.max()
    hull = convex_hull_image(body)
    dark = ndi.binary_opening(hull & (g <= thr), iterations=2)
    labels, n = ndi.label(dark)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= 0.01 * body.sum())
    if len(keep) == 0:
        return None
    return np.isin(labels, keep)


def shows_lungs(arr: np.ndarray, *, size: int = 128, min_body: float = 0.15) -> bool:
    """Does this slice show the lungs? The body (``body_mask``) covers at least ``min_body`` of the
    picture and the lung crop finds lungs in it (dark regions covering >= 30% of the body's box:
    not bowel gas or the trachea). Found at <= ``size`` px: fast enough for every slice of a scan."""
    g = gray(arr)
    f = min(1.0, size / max(g.shape))
    if f < 1.0:
        g = np.asarray(Image.fromarray(g).resize((max(1, round(g.shape[1] * f)), max(1, round(g.shape[0] * f))),
                                                 Image.BILINEAR))
    body = body_mask(g)
    box = _bbox(body)
    if box is None or (box[1] - box[0]) * (box[3] - box[2]) < min_body * g.size:
        return False
    return CropForeground("lung")._lung_box(g, body) is not None


class CropForeground:
    """Crop to the body (``"body"``) or the lungs inside it (``"lung"``); a margin keeps the edge."""

    def __init__(self, kind: str = "body", margin: float = 0.03, min_fraction: float = 0.15):
        self.kind, self.margin, self.min_fraction = kind, float(margin), float(min_fraction)

    def box(self, arr: np.ndarray):
        """``(y0, y1, x0, x1)`` of the crop, or ``None`` when nothing sensible is found."""
        full = gray(arr)
        # the masks are found at <= 256 px (fast; the box is scaled back to full resolution)
        f = min(1.0, MASK_SIZE / max(full.shape))
        g = full if f == 1.0 else np.asarray(Image.fromarray(full).resize(
            (max(1, round(full.shape[1] * f)), max(1, round(full.shape[0] * f))), Image.BILINEAR))
        box = self._box(g)
        if box is None or f == 1.0:
            return box
        H, W = full.shape
        y0, y1, x0, x1 = box
        return (max(0, int(y0 / f)), min(H, int(math.ceil(y1 / f))), max(0, int(x0 / f)), min(W, int(math.ceil(x1 / f))))

    def _box(self, g: np.ndarray):
        h, w = g.shape
        body = body_mask(g)
        box = _bbox(body)
        # A "body" smaller than min_fraction of the picture is a label or an arrow, not a patient.
        if box is None or (box[1] - box[0]) * (box[3] - box[2]) < self.min_fraction * h * w:
            return None
        if self.kind == "lung":
            lung_box = self._lung_box(g, body)
            if lung_box is not None:
                box = lung_box
        return _grow(box, (h, w), self.margin)

    def _lung_box(self, g, body):
        """The box of the lungs (``lung_mask``), unless they are too small to be lungs."""
        lungs = lung_mask(g, body)
        box = None if lungs is None else _bbox(lungs)
        bb = _bbox(body)
        if box is None or (box[1] - box[0]) * (box[3] - box[2]) < 0.3 * (bb[1] - bb[0]) * (bb[3] - bb[2]):
            return None  # a bit of bowel gas or trachea, not the lungs
        return box

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        box = self.box(arr)
        if box is None:
            return arr
        y0, y1, x0, x1 = box
        return np.ascontiguousarray(arr[y0:y1, x0:x1])

    def describe(self) -> str:
        what = "body (threshold, opening, largest component)" if self.kind == "body" else \
            "lungs (dark regions inside the body, Otsu threshold)"
        return f"crop to the {what} with a {self.margin:.0%} margin"

    def __repr__(self):
        return f"CropForeground({self.kind!r}, margin={self.margin})"


class PercentileIntensity:
    """Clip to the image's ``low``/``high`` percentiles, rescale to 0..255 (grey, 3 equal channels)."""

    def __init__(self, low: float = 1.0, high: float = 99.0):
        self.low, self.high = float(low), float(high)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        g = gray(arr).astype(np.float32)
        lo, hi = np.percentile(g, [self.low, self.high])
        if hi <= lo:
            out = np.zeros_like(g, dtype=np.uint8)
        else:
            out = np.clip((g - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
        return np.repeat(out[..., None], 3, axis=2)

    def describe(self) -> str:
        return f"clip to the {self.low:g}th-{self.high:g}th percentile and rescale to 0..255"

    def __repr__(self):
        return f"PercentileIntensity({self.low}, {self.high})"


class Clahe:
    """Contrast-limited adaptive histogram equalisation (``skimage.exposure.equalize_adapthist``)."""

    def __init__(self, clip_limit: float = 0.01):
        self.clip_limit = float(clip_limit)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        from skimage.exposure import equalize_adapthist

        g = gray(arr)
        out = (equalize_adapthist(g, clip_limit=self.clip_limit) * 255.0).round().astype(np.uint8)
        return np.repeat(out[..., None], 3, axis=2)

    def describe(self) -> str:
        return f"CLAHE (scikit-image, clip limit {self.clip_limit:g})"

    def __repr__(self):
        return f"Clahe({self.clip_limit})"


def make_steps(crop: str, intensity: str) -> list:
    """The preprocessing steps of a crop and an intensity choice (see ``registry``), in that order."""
    return [step for step in (CROPS.create(crop), INTENSITIES.create(intensity)) if step is not None]
