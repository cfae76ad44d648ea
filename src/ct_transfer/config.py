"""``TrainConfig``: every training option, its default, its help text and its check, in one place.

The dataclass is frozen and validated once at construction; the CLI generates ``train`` and
``experiment`` flags from its fields (``cli.add_config_flags``), so a default lives only here.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .errors import ConfigError

STRATEGIES = ("full", "partial", "frozen")
SPLIT_PRESETS = ("stratified", "paper")
ON_BAD = ("error", "skip")
MAX_IMAGE_SIZE = 1024  # beyond this a 2-core/24 GB machine cannot hold the decoded set or a batch
MIN_IMAGE_SIZE = 32  # the networks downsample 32x; some archs need more (models.ModelSpec.min_size)
RANGE_WHY = {
    "image_size": " (the networks downsample 32x; larger sizes are also checked against free memory)",
    "threads": " (the cores this machine has)",
}


def _opt(default, help: str, **meta):
    """A field with CLI metadata: ``flag`` (override name), ``choices``, ``cli=False`` to hide it."""
    kw = {"default_factory": default} if callable(default) and not isinstance(default, type) else {"default": default}
    return field(metadata={"help": help, **meta}, **kw)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str = _opt(MISSING, "dataset folder, one sub-folder per class", required=True)
    model: str = _opt(MISSING, "paper name (see `ct-transfer models`) or any timm name", required=True)
    out: str | None = _opt(None, "run directory (Python API: None writes nothing)")
    weights: str = _opt("none", "none | imagenet | PATH to a timm state dict")
    split_file: str | None = _opt(None, "split CSV (path,class,subset) to reuse")
    split_preset: str = _opt("stratified", "split made when no --split-file is given", choices=SPLIT_PRESETS)
    split_seed: int = _opt(0, "seed of the split")
    epochs: int = _opt(100, "training epochs")
    image_size: int | None = _opt(None, "input size in px (default: the model table's: 64; Xception 71; "
                                        "InceptionResNetV2 75)")
    batch_size: int = _opt(32, "batch size")
    lr: float = _opt(1e-4, "Adam learning rate")
    dropout: float = _opt(0.8, "dropout before the linear head")
    seed: int = _opt(0, "seed of initialisation, augmentation and batch order")
    limit: int | None = _opt(None, "at most N images per class (quick trials)")
    augment: bool = _opt(True, "the paper's augmentation", flag="--no-augment")
    strategy: str = _opt("full", "fine-tuning strategy", choices=STRATEGIES)
    freeze_until: int | None = _opt(None, "partial: last frozen stage (timm parameter group, 0 = stem)")
    frozen_views: int = _opt(2, "frozen + augmentation: augmented views cached per image")
    positive: str | None = _opt(None, "positive class (default COVID if present)")
    on_bad: str = _opt("error", "unreadable images: stop, or skip and list them", choices=ON_BAD)
    cache_dir: str | None = _opt(None, "on-disk cache of decoded images, keyed by file content")
    channels_last: bool = _opt(True, "channels-last memory format", flag="--no-channels-last")
    bf16: bool = _opt(False, "bfloat16 autocast (fp32 master weights; default on CUDA)")
    compile: bool = _opt(False, "torch.compile the model")
    threads: int | None = _opt(None, "torch threads (default: all cores)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")

    def __post_init__(self):
        _validate(self)

    # -- conversions -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Known keys only (a run's config.json also holds derived keys such as timm_name)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def resolved(self) -> "TrainConfig":
        """Defaults that depend on the model filled in (image size), checked against the model."""
        from .models import resolve

        spec = resolve(self.model)
        size = self.image_size or spec.image_size
        if size < spec.min_size:
            raise ConfigError("image_size", size, f"choose {spec.min_size}..{MAX_IMAGE_SIZE} for {spec.name}")
        return replace(self, image_size=int(size))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: TrainConfig) -> None:
    for name in ("data", "model"):
        v = getattr(c, name)
        if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
            raise ConfigError(name, v, "required")
    ints = {"epochs": (1, 100_000), "batch_size": (1, 65_536), "seed": (0, 2**31 - 1), "split_seed": (0, 2**31 - 1),
            "frozen_views": (1, 64)}
    optional_ints = {"limit": (1, 10**9), "freeze_until": (0, 1000), "image_size": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
                     "threads": (1, os.cpu_count() or 1)}
    for name, (lo, hi) in {**ints, **optional_ints}.items():
        v = getattr(c, name)
        if v is None and name in optional_ints:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            raise ConfigError(name, v, f"choose an integer in {lo}..{hi}" + RANGE_WHY.get(name, ""))
    if not isinstance(c.lr, (int, float)) or isinstance(c.lr, bool) or not math.isfinite(c.lr) or not 0 < c.lr <= 10:
        raise ConfigError("lr", c.lr, "choose a finite number in (0, 10]")
    if not isinstance(c.dropout, (int, float)) or not math.isfinite(c.dropout) or not 0 <= c.dropout < 1:
        raise ConfigError("dropout", c.dropout, "choose a number in [0, 1)")
    for name, allowed in (("strategy", STRATEGIES), ("split_preset", SPLIT_PRESETS), ("on_bad", ON_BAD)):
        if getattr(c, name) not in allowed:
            raise ConfigError(name, getattr(c, name), f"choose {', '.join(allowed)}")
    for name in ("out", "split_file", "positive", "cache_dir"):
        v = getattr(c, name)
        if v is not None and (not isinstance(v, (str, os.PathLike)) or not str(v).strip() or "\x00" in str(v)):
            raise ConfigError(name, v, "give a non-empty text value (or leave it out)")
    _validate_weights(c.weights)
    for name in ("augment", "channels_last", "bf16", "compile"):
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(name, getattr(c, name), "choose true or false")
    _validate_device(c.device)
    if c.cache_dir is not None and os.path.exists(c.cache_dir) and not os.path.isdir(c.cache_dir):
        raise ConfigError("cache_dir", c.cache_dir, "exists and is not a folder")
    if c.out is not None and os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ConfigError("out", c.out, "exists and is not a folder")
    if c.strategy != "partial" and c.freeze_until is not None:
        raise ConfigError("freeze_until", c.freeze_until, "only with strategy=partial")


def _validate_weights(weights) -> None:
    if not isinstance(weights, (str, os.PathLike)) or not str(weights).strip():
        raise ConfigError("weights", weights, "choose none, imagenet or a weights file path")
    if str(weights) in ("none", "imagenet"):
        return
    if not os.path.isfile(weights):
        raise ConfigError("weights", weights, "no such file (choose none, imagenet or a weights file path)")


def _validate_device(device) -> None:
    import torch

    if device in ("auto", "cpu"):
        return
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "no CUDA device is available here (choose auto or cpu)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError("device", device, f"choose cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return
    raise ConfigError("device", device, "choose auto, cpu, cuda or cuda:N")


def config_fields():
    """(name, type annotation, default, metadata) of every option, for CLI generation."""
    return [f for f in fields(TrainConfig)]
