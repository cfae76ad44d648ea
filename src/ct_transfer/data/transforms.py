"""Batch transforms (MONAI style: small composable objects; here they act on whole batches on the
device, with independent random parameters per image drawn from a ``torch.Generator``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class ToFloat:
    """uint8 0..255 -> float 0..1 (the paper's 1/255 rescale)."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype

    def __call__(self, x, generator=None):
        return x.to(self.dtype).div_(255.0)

    def __repr__(self):
        return "ToFloat()"


class Normalize:
    """The model's own mean/std (from timm's pretrained_cfg)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x, generator=None):
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _uniform(n, low, high, generator, device):
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


class RandomAffine:
    """Rotation, shift and flips with independent parameters per image, one grid_sample per batch.

    Matches Keras ``ImageDataGenerator(rotation_range, width/height_shift_range, horizontal_flip,
    vertical_flip)`` with its default ``fill_mode='nearest'`` (border padding here).
    """

    def __init__(self, degrees=36.0, shift=0.2, hflip=True, vflip=True):
        self.degrees, self.shift, self.hflip, self.vflip = float(degrees), float(shift), hflip, vflip

    def __call__(self, x, generator=None):
        n, dev = x.shape[0], x.device
        angle = _uniform(n, -self.degrees, self.degrees, generator, dev) * (math.pi / 180.0)
        tx = _uniform(n, -self.shift, self.shift, generator, dev) * 2.0  # grid coords span 2
        ty = _uniform(n, -self.shift, self.shift, generator, dev) * 2.0
        ones = torch.ones(n, device=dev)
        sx = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -ones, ones) if self.hflip else ones
        sy = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -ones, ones) if self.vflip else ones
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, tx], dim=1),
            torch.stack([sin * sx, cos * sy, ty], dim=1),
        ], dim=1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self):
        return f"RandomAffine(degrees={self.degrees}, shift={self.shift}, hflip={self.hflip}, vflip={self.vflip})"


class RandomBrightness:
    """Multiply each image by a factor in [low, high] (Keras ``brightness_range``)."""

    def __init__(self, low=0.8, high=1.0):
        self.low, self.high = float(low), float(high)

    def __call__(self, x, generator=None):
        factor = _uniform(x.shape[0], self.low, self.high, generator, x.device).to(x.dtype)
        return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def __repr__(self):
        return f"RandomBrightness({self.low}, {self.high})"


def paper_augmentation() -> Compose:
    """The paper's train-time augmentation (applied after the 1/255 rescale)."""
    return Compose([RandomAffine(36.0, 0.2, True, True), RandomBrightness(0.8, 1.0)])


def batch_transform(mean, std, augment: bool) -> Compose:
    steps = [ToFloat()]
    if augment:
        steps += paper_augmentation().transforms
    steps.append(Normalize(mean, std))
    return Compose(steps)
