"""Batch transforms (MONAI style: small composable objects; here they act on whole batches on the
device, with independent random parameters per image drawn from a ``torch.Generator``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import AUGMENTATIONS  # the choices (re-exported by ``data``)


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


def _chance(n, p, generator, device):
    return torch.rand(n, generator=generator, device=device) < p


class RandomResizedCrop:
    """Zoom into a random box (area ``scale``, aspect ``ratio``) resized back to the full size,
    with a small rotation and a horizontal flip: framing and zoom differ between sites."""

    def __init__(self, scale=(0.55, 1.0), ratio=(3 / 4, 4 / 3), degrees=10.0, hflip=True):
        self.scale, self.ratio, self.degrees, self.hflip = tuple(scale), tuple(ratio), float(degrees), hflip

    def __call__(self, x, generator=None):
        n, dev = x.shape[0], x.device
        area = _uniform(n, *self.scale, generator, dev)
        log_r = _uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator, dev)
        aspect = torch.exp(log_r)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # box size as a fraction of the image
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = _uniform(n, 0.0, 1.0, generator, dev) * (1 - w) * 2 - (1 - w)  # centre keeps the box inside
        cy = _uniform(n, 0.0, 1.0, generator, dev) * (1 - h) * 2 - (1 - h)
        angle = _uniform(n, -self.degrees, self.degrees, generator, dev) * (math.pi / 180.0)
        flip = torch.where(_chance(n, 0.5, generator, dev), -1.0, 1.0) if self.hflip else torch.ones(n, device=dev)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * w * flip, -sin * h, cx], dim=1),
            torch.stack([sin * w * flip, cos * h, cy], dim=1),
        ], dim=1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self):
        return f"RandomResizedCrop(scale={self.scale}, ratio={self.ratio}, degrees={self.degrees})"


class RandomContrastGamma:
    """Contrast around each image's mean (factor in ``contrast``), then gamma (in ``gamma``): other
    windows and display curves."""

    def __init__(self, contrast=(0.7, 1.3), gamma=(0.7, 1.5)):
        self.contrast, self.gamma = tuple(contrast), tuple(gamma)

    def __call__(self, x, generator=None):
        n, dev = x.shape[0], x.device
        c = _uniform(n, *self.contrast, generator, dev).to(x.dtype).view(-1, 1, 1, 1)
        lg = _uniform(n, math.log(self.gamma[0]), math.log(self.gamma[1]), generator, dev)
        g = torch.exp(lg).to(x.dtype).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean).clamp(0.0, 1.0)
        return x.clamp_min(1e-6).pow(g)

    def __repr__(self):
        return f"RandomContrastGamma(contrast={self.contrast}, gamma={self.gamma})"


class RandomBlur:
    """Gaussian blur with sigma in ``sigma`` (px) for a fraction ``p`` of the images (soft kernels)."""

    def __init__(self, sigma=(0.3, 1.5), p=0.3):
        self.sigma, self.p = tuple(sigma), float(p)

    def __call__(self, x, generator=None):
        n, c, hh, ww = x.shape
        dev = x.device
        sigma = _uniform(n, *self.sigma, generator, dev)
        on = _chance(n, self.p, generator, dev)
        radius = int(math.ceil(3 * self.sigma[1]))
        t = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        delta = (t == 0).float()[None].expand(n, -1)
        k = torch.where(on[:, None], k, delta).to(x.dtype)  # off: identity kernel
        k = k.repeat_interleave(c, 0)  # one kernel per image channel (grouped conv)
        y = x.reshape(1, n * c, hh, ww)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
        return y.reshape(n, c, hh, ww)

    def __repr__(self):
        return f"RandomBlur(sigma={self.sigma}, p={self.p})"


class RandomNoise:
    """Additive Gaussian noise (std in ``std``, on the 0..1 scale) for a fraction ``p`` of the images."""

    def __init__(self, std=(0.005, 0.04), p=0.3):
        self.std, self.p = tuple(std), float(p)

    def __call__(self, x, generator=None):
        n, dev = x.shape[0], x.device
        std = _uniform(n, *self.std, generator, dev) * _chance(n, self.p, generator, dev)
        noise = torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.dtype)
        return (x + noise * std.to(x.dtype).view(-1, 1, 1, 1)).clamp(0.0, 1.0)

    def __repr__(self):
        return f"RandomNoise(std={self.std}, p={self.p})"


# The JPEG standard's luminance quantisation table (ITU-T T.81, Annex K), quality 50.
_JPEG_Q = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m  # orthonormal DCT-II: coeffs = M @ block @ M.T


class RandomJPEG:
    """JPEG-like degradation for a fraction ``p`` of the images: 8x8 block DCT, quantisation with
    the standard luminance table at a random quality in ``quality``, inverse DCT (no chroma
    subsampling, no entropy coding: those do not change the pixels further). Figures in the UCSD
    set were JPEG-compressed when the papers were made."""

    def __init__(self, quality=(20, 80), p=0.3):
        self.quality, self.p = tuple(quality), float(p)

    def __call__(self, x, generator=None):
        n, c, hh, ww = x.shape
        dev = x.device
        q = _uniform(n, *self.quality, generator, dev)
        on = _chance(n, self.p, generator, dev)
        # libjpeg's quality -> table scaling
        scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0
        table = (_JPEG_Q.to(dev)[None] * scale.view(-1, 1, 1)).clamp_min(1.0)  # n x 8 x 8
        ph, pw = (-hh) % 8, (-ww) % 8
        y = F.pad(x.float(), (0, pw, 0, ph), mode="replicate") * 255.0 - 128.0
        H, W = y.shape[2:]
        blocks = y.reshape(n, c, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5)  # n c by bx 8 8
        m = _dct_matrix().to(dev)
        coef = m @ blocks @ m.T
        t = table.view(n, 1, 1, 1, 8, 8)
        coef = torch.round(coef / t) * t
        out = (m.T @ coef @ m).permute(0, 1, 2, 4, 3, 5).reshape(n, c, H, W)[:, :, :hh, :ww]
        out = ((out + 128.0) / 255.0).clamp(0.0, 1.0).to(x.dtype)
        return torch.where(on.view(-1, 1, 1, 1), out, x)

    def __repr__(self):
        return f"RandomJPEG(quality={self.quality}, p={self.p})"


def domain_augmentation() -> Compose:
    """For domain shift: framing/zoom, window/contrast, scanner sharpness and noise, compression."""
    return Compose([RandomResizedCrop(), RandomContrastGamma(), RandomBlur(), RandomNoise(), RandomJPEG()])


def augmentation(preset: str) -> Compose:
    """The registered augmentation ``preset`` (``registry.AUGMENTATIONS``)."""
    return AUGMENTATIONS.create(preset)


def paper_augmentation() -> Compose:
    """The paper's train-time augmentation (applied after the 1/255 rescale)."""
    return Compose([RandomAffine(36.0, 0.2, True, True), RandomBrightness(0.8, 1.0)])


def batch_transform(mean, std, augment: bool, preset: str = "paper") -> Compose:
    steps = [ToFloat()]
    if augment:
        steps += augmentation(preset).transforms
    steps.append(Normalize(mean, std))
    return Compose(steps)
