"""``TrainConfig``: every training option, its default, its help text and its check, in one place.

The dataclass is frozen and validated once at construction; the CLI generates ``train`` and
``experiment`` flags from its fields (``cli.add_config_flags``), so a default lives only here.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .errors import ConfigError
from .registry import AUGMENTATIONS, CROPS, DETECTORS, INTENSITIES, STRATEGIES, TTAS  # noqa: F401  (choices)

HEAD_INITS = ("random", "probe")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
SPLIT_PRESETS = ("stratified", "paper", "grouped")
BN_STATS = ("train", "frozen")
BALANCES = ("none", "sources")
ON_BAD = ("error", "skip")
STORES = ("auto", "memory", "disk")  # data/store.py; engine/data.py decides
SHIFT_GUARDS = (*DETECTORS.names(), "none")
DEFAULT_SHIFT_GUARD = "knn-blocks"  # chosen by bench/shift_variants.py on SARS-CoV-2 val vs UCSD train patients (docs/shift.md)
DEFAULT_GUARD_ACCEPT = 0.95  # the guard's threshold accepts this share of the val images
# Names the command line lists, kept here, in a module that imports no torch, so that
# `ct-transfer --help` stays fast; the modules that implement them import these.
FINETUNE_DEFAULTS = {"steps": 20, "batch_size": 8, "lr": 3e-4}  # adapt.py; what bench/site_adaptation.py measured
GRID_PRESETS = ("paper", "offline")  # experiment.PRESETS: which models a grid trains
NEAR_DUPLICATE_THRESHOLD = 32  # data/groups.py: 256-bit pHash Hamming distance of near-duplicates
MAX_IMAGE_SIZE = 1024  # beyond this a 2-core/24 GB machine cannot hold the decoded set or a batch
MIN_IMAGE_SIZE = 32  # the networks downsample 32x; some archs need more (models.ModelSpec.min_size)
RANGE_WHY = {
    "image_size": " (the networks downsample 32x; larger sizes are also checked against free memory)",
    "threads": " (the cores this machine has)",
    "workers": " (at most 4 processes per core of this machine)",
}


def _opt(default, help: str, **meta):
    """A field with CLI metadata: ``flag`` (override name), ``choices``, ``cli=False`` to hide it."""
    kw = {"default_factory": default} if callable(default) and not isinstance(default, type) else {"default": default}
    return field(metadata={"help": help, **meta}, **kw)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str | list[str] = _opt(MISSING, "dataset folder, one sub-folder per class; repeat --data to train on "
                                          "several datasets together (each split on its own)", required=True,
                                 multiple=True)
    model: str = _opt(MISSING, "paper name (see `ct-transfer models`) or any timm name", required=True)
    out: str | None = _opt(None, "run directory (Python API: None writes nothing)")
    weights: str = _opt("none", "none | imagenet | PATH to a timm state dict | a ct-transfer run (folder or "
                                 "best.safetensors) to start from: its backbone, and its head when the classes match")
    split_file: str | list[str] | None = _opt(None, "split CSV (path,class,subset) to reuse; with several --data "
                                                    "one per dataset in the same order ('-' = preset split), or "
                                                    "one file with a source column (default: made by --split-preset)", multiple=True)
    class_map: str | None = _opt(None, "rename classes of the datasets, e.g. 'CT_COVID=COVID,CT_NonCOVID=non-COVID' "
                                       "(default: the folder names)")
    split_preset: str = _opt("stratified", "split made when no --split-file is given", choices=SPLIT_PRESETS)
    split_seed: int = _opt(0, "seed of the split")
    split_groups: str | None = _opt(None, "grouped split: CSV path,group (or path,...,patient) keeping each "
                                          "group in one subset, besides near-duplicates (default: "
                                          "near-duplicates only)")
    volume_slices: int = _opt(16, "at most N slices per volume (NIfTI, multi-frame DICOM, DICOM series folder "
                                  "in a class folder) become training rows: its lung slices, evenly spaced")
    epochs: int = _opt(100, "training epochs")
    image_size: int | None = _opt(None, "input size in px (default: the model table's: 64; Xception 71; "
                                        "InceptionResNetV2 75)")
    batch_size: int = _opt(32, "batch size")
    lr: float = _opt(1e-4, "learning rate (peak rate for onecycle)")
    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _opt(0.0, "weight decay (decoupled for adamw)")
    schedule: str = _opt("constant", "learning-rate schedule over all steps", choices=SCHEDULES)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    dropout: float = _opt(0.8, "dropout before the linear head")
    seed: int = _opt(0, "seed of initialisation, augmentation and batch order")
    limit: int | None = _opt(None, "at most N images per class, for quick trials (default: all)")
    augment: bool = _opt(True, "train-time augmentation (--no-augment: none)")
    augmentation: str = _opt("paper", "augmentation preset: paper = the paper's (rotation, shift, flips, "
                                      "brightness); domain = for domain shift (zoom/crop, contrast, gamma, blur, "
                                      "noise, JPEG)", choices=AUGMENTATIONS)
    crop: str = _opt("none", "crop before resizing: body = the patient's body, lung = the lungs inside it",
                     choices=CROPS)
    intensity: str = _opt("none", "per-image intensity standardisation", choices=INTENSITIES)
    strategy: str = _opt("full", "fine-tuning strategy (linear: a convex linear probe on fixed features, "
                                 "seconds; epochs are ignored)", choices=STRATEGIES)
    head_init: str = _opt("random", "full/partial: start the head from a linear probe (probe) or at random",
                          choices=HEAD_INITS)
    resize_from: int | None = _opt(None, "progressive resizing: first epoch at this size (px), growing to "
                                         "--image-size by mid-training (second half at full size; default: off)")
    bn_stats: str = _opt("train", "BatchNorm statistics while fine-tuning: train = updated from augmented batches "
                                  "(the paper's Keras behaviour); frozen = every BN layer keeps its ImageNet "
                                  "statistics (its scale and shift still learn)", choices=BN_STATS)
    ema: float = _opt(0.0, "full/partial: keep an exponential moving average of the weights with this decay per "
                           "step (timm's ModelEmaV3); validation, best.safetensors and the final model use the average; "
                           "0 = off")
    tta: str = _opt("none", "test-time augmentation: flips = the mean logits of the image and its horizontal and "
                            "vertical flips, in validation, evaluation, predict, serve and export alike",
                    choices=TTAS)
    balance: str = _opt("none", "several --data: sources = every source counts equally (each epoch draws as many "
                                "training images from each as the smallest has, the linear probe weights them "
                                "so, and the epoch is chosen on the mean of the per-source val accuracies)",
                        choices=BALANCES)
    freeze_until: int | None = _opt(None, "partial: last frozen stage (timm parameter group, 0 = stem; default: the "
                                          "first half of the stages)")
    frozen_views: int = _opt(2, "frozen + augmentation: augmented views cached per image")
    positive: str | None = _opt(None, "positive class (default COVID if present)")
    on_bad: str = _opt("error", "unreadable images: stop, or skip and list them", choices=ON_BAD)
    cache_dir: str | None = _opt(None, "on-disk cache of decoded images, keyed by file content (default: "
                                      "memory only)")
    store: str = _opt("auto", "where decoded images live while training: memory (one array), disk (a store file "
                              "per subset under --cache-dir, else the user cache, read per batch: memory stays "
                              "flat at any dataset size), or auto = memory when the estimate fits, else disk",
                      choices=STORES)
    channels_last: bool = _opt(True, "channels-last (NHWC) memory format for the model and batches, faster "
                                     "convolutions on most CPUs and GPUs; --no-channels-last: NCHW")
    bf16: bool | None = _opt(None, "bfloat16 autocast with fp32 master weights; --no-bf16 turns it off "
                                   "(default: on with CUDA, off on CPU)")
    compile: bool = _opt(False, "torch.compile the model (drops the last partial batch: static shapes)")
    compile_mode: str = _opt("default", "torch.compile mode (reduce-overhead: CUDA graphs)", choices=COMPILE_MODES)
    checkpoint_every: int = _opt(1, "write last.pt (resume state) every N epochs and at the end; best.safetensors "
                                    "only on improvement; both written by a background thread")
    threads: int | None = _opt(None, "torch threads (default: all cores); with --workers N the total, split "
                                     "evenly between the workers")
    workers: int = _opt(1, "data-parallel worker processes for this one run (torch.distributed, gloo over "
                           "loopback, DDP): each trains on its shard of every epoch with batch_size images per "
                           "step, so the effective batch is batch_size x workers (lr unchanged); full and partial "
                           "strategies; 1 = one process, no torch.distributed")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    calibrate: bool = _opt(False, "fit temperature scaling and a decision threshold on val after training")
    sensitivity: float | None = _opt(None, "with --calibrate: threshold reaching this val sensitivity "
                                           "(default: Youden's J)")
    force_calibration: bool = _opt(False, "with --calibrate: fit even on a val subset too small for it (under 30 "
                                          "images or 10 per class) and keep the fitted temperature even when it "
                                          "reaches its bound or makes val ECE worse (the reasons are recorded)")
    log: str | None = _opt(None, "experiment trackers, comma-separated: tensorboard (RUN/tensorboard), mlflow "
                                 "(params, per-epoch and final metrics, plots) (default: none, history.csv only)")
    mlflow_uri: str | None = _opt(None, "with --log mlflow: the tracking store (default sqlite:///RUN/mlruns.db; "
                                        "any MLflow tracking URI, e.g. http://host:5000)")
    shift_guard: str = _opt(DEFAULT_SHIFT_GUARD, "shift guard fitted after training on the train images (threshold: "
                                           "accept 95% of val): every prediction says whether its image is like "
                                           "the training images (docs/shift.md); none = no guard",
                            choices=SHIFT_GUARDS)
    recipe: str | None = _opt(None, "the recipe these values came from (a name or a file; see recipes.py)", cli=False)

    def __post_init__(self):
        # one dataset stays a plain string (as before); several become a list
        for name in ("data", "split_file"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                object.__setattr__(self, name, str(v[0]) if len(v) == 1 else [str(x) for x in v])
        for name in ("data", "split_file", "split_groups", "weights", "out", "cache_dir"):
            if isinstance(getattr(self, name), os.PathLike):  # Path objects from notebooks: config.json holds text
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        _validate(self)

    @property
    def datasets(self) -> list[str]:
        """The dataset folders (one or more)."""
        return [self.data] if isinstance(self.data, (str, os.PathLike)) else list(self.data)

    @property
    def split_files(self) -> list[str | None]:
        """One split file (or None) per dataset; a single file for several datasets has a source column."""
        if self.split_file is None:
            return [None] * len(self.datasets)
        files = [self.split_file] if isinstance(self.split_file, str) else list(self.split_file)
        return [None if f in ("", "-") else f for f in files]

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
        if self.resize_from is not None and not spec.min_size <= self.resize_from <= size:
            raise ConfigError("resize_from", self.resize_from, f"choose {spec.min_size}..{size} (the image size)")
        return replace(self, image_size=int(size))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: TrainConfig) -> None:
    v = c.model
    if not isinstance(v, (str, os.PathLike)) or not str(v).strip():
        raise ConfigError("model", v, "required")
    for v in c.datasets:
        if not isinstance(v, (str, os.PathLike)) or not str(v).strip() or "\x00" in str(v):
            raise ConfigError("data", v, "required")
    real = [os.path.realpath(v) for v in c.datasets]
    for k, v in enumerate(c.datasets):  # one folder twice (also spelled differently) is one source
        if real[k] in real[:k]:
            raise ConfigError("data", v, f"given twice (the same folder as {c.datasets[real.index(real[k])]}); "
                              "give each dataset once")
    n_split = len([c.split_file] if isinstance(c.split_file, str) else c.split_file or [])
    if n_split > 1 and n_split != len(c.datasets):
        raise ConfigError("split_file", c.split_file, f"give one per dataset in data= ({len(c.datasets)}) or one file "
                                                      "with a source column")
    if c.class_map is not None:
        parse_class_map(c.class_map)
    ints = {"epochs": (1, 100_000), "batch_size": (1, 65_536), "seed": (0, 2**31 - 1), "split_seed": (0, 2**31 - 1),
            "frozen_views": (1, 64), "checkpoint_every": (1, 100_000), "volume_slices": (1, 100_000),
            "workers": (1, 4 * (os.cpu_count() or 1))}
    optional_ints = {"limit": (1, 10**9), "freeze_until": (0, 1000), "image_size": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
                     "resize_from": (32, MAX_IMAGE_SIZE),
                     "threads": (1, os.cpu_count() or 1)}
    for name, (lo, hi) in {**ints, **optional_ints}.items():
        v = getattr(c, name)
        if v is None and name in optional_ints:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            raise ConfigError(name, v, _kind(v, "an integer") + f"choose an integer in {lo}..{hi}"
                              + RANGE_WHY.get(name, ""))
    if not _is_number(c.lr) or not 0 < c.lr <= 10:
        raise ConfigError("lr", c.lr, _kind(c.lr, "a number") + "choose a finite number in (0, 10]")
    if not _is_number(c.dropout) or not 0 <= c.dropout < 1:
        raise ConfigError("dropout", c.dropout, _kind(c.dropout, "a number") + "choose a number in [0, 1)")
    for name, lo, hi in (("weight_decay", 0.0, 1.0), ("label_smoothing", 0.0, 0.5)):
        v = getattr(c, name)
        if not _is_number(v) or not lo <= v <= hi:
            raise ConfigError(name, v, _kind(v, "a number") + f"choose a number in [{lo}, {hi}]")
    for name, allowed in (("strategy", STRATEGIES), ("split_preset", SPLIT_PRESETS), ("on_bad", ON_BAD), ("store", STORES),
                          ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("head_init", HEAD_INITS),
                          ("bn_stats", BN_STATS), ("tta", TTAS), ("balance", BALANCES), ("compile_mode", COMPILE_MODES), ("crop", CROPS), ("intensity", INTENSITIES),
                          ("augmentation", AUGMENTATIONS), ("shift_guard", SHIFT_GUARDS)):
        v = getattr(c, name)
        if not isinstance(v, str) or v not in allowed:  # a recipe's list or mapping is not a choice
            raise ConfigError(name, v, ("" if isinstance(v, str) else _kind(v, "a name"))
                              + f"choose {', '.join(allowed)}")
    if c.sensitivity is not None:
        check_sensitivity(c.sensitivity)
    if c.split_groups is not None and c.split_preset != "grouped" and not c.split_file:
        raise ConfigError("split_groups", c.split_groups, "only with split_preset=grouped")
    if c.log is not None:
        from .tracking import parse_loggers

        if parse_loggers(c.log) and c.out is None:
            raise ConfigError("log", c.log, "needs out (the run directory the trackers write into)")
    for name in ("out", "positive", "cache_dir", "split_groups", "mlflow_uri"):
        v = getattr(c, name)
        if v is not None and not _text(v):
            raise ConfigError(name, v, "give a non-empty text value (or leave it out)")
    split_files = c.split_file if isinstance(c.split_file, (list, tuple)) else [c.split_file]
    for v in split_files:  # one per dataset ("-": that dataset's preset split)
        if v is not None and not _text(v):
            raise ConfigError("split_file", v, "give a non-empty text value (or leave it out)")
    _validate_weights(c.weights)
    for name in ("augment", "channels_last", "bf16", "compile", "calibrate", "force_calibration"):
        if not isinstance(getattr(c, name), bool) and not (name == "bf16" and c.bf16 is None):
            raise ConfigError(name, getattr(c, name), "choose true or false")
    _validate_device(c.device)
    if c.cache_dir is not None and os.path.exists(c.cache_dir) and not os.path.isdir(c.cache_dir):
        raise ConfigError("cache_dir", c.cache_dir, "exists and is not a folder")
    if c.out is not None and os.path.exists(c.out) and not os.path.isdir(c.out):
        raise ConfigError("out", c.out, "exists and is not a folder")
    if not _is_number(c.ema) or not 0 <= c.ema < 1:
        raise ConfigError("ema", c.ema, _kind(c.ema, "a number") + "choose a decay in [0, 1) (0 = off; e.g. 0.995)")
    if c.batch_size == 1 and c.strategy in ("full", "partial") and c.bn_stats == "train":
        # BatchNorm in train mode normalises each channel over the batch: one image gives zero
        # variance, PyTorch refuses it, and an epoch of such batches would train nothing
        raise ConfigError("batch_size", 1, f"strategy {c.strategy} trains BatchNorm layers, which need at least 2 "
                          "images per batch; choose 2 or more (or bn_stats=frozen)")
    if c.ema and c.strategy not in ("full", "partial"):
        raise ConfigError("ema", c.ema, "only with strategy full or partial")
    if c.head_init == "probe" and c.strategy not in ("full", "partial"):
        raise ConfigError("head_init", c.head_init, "only with strategy full or partial")
    if c.workers > 1 and c.strategy not in ("full", "partial"):
        raise ConfigError("workers", c.workers, f"strategy {c.strategy} trains only the head on features cached "
                          "once, in one process; choose strategy full or partial, or workers=1")
    if c.workers > 1 and c.out is None:
        raise ConfigError("out", c.out, f"workers={c.workers} needs a run directory (worker 0 writes the run there)")
    if c.strategy != "partial" and c.freeze_until is not None:
        raise ConfigError("freeze_until", c.freeze_until, "only with strategy=partial")


def check_sensitivity(value) -> float:
    """The one check of a target sensitivity (train --sensitivity, calibrate --sensitivity, API)."""
    if not _is_number(value) or not 0 < value <= 1:
        raise ConfigError("sensitivity", value, _kind(value, "a number") + "choose a number in (0, 1]")
    return float(value)


def _is_number(v) -> bool:
    """A finite int or float; a bool is not a number here (``dropout: false`` in a recipe)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v, expected: str) -> str:
    """Why a value of the wrong type is wrong, before the allowed range: a recipe's ``batch_size: "8"``
    is text, not the integer 8 its message would otherwise show."""
    if isinstance(v, str):
        return f"is text ({v!r}), not {expected}; "
    if isinstance(v, bool):
        return f"is {str(v).lower()}, not {expected}; "
    if v is None or not isinstance(v, (int, float)):
        return f"is {type(v).__name__}, not {expected}; "
    return ""


def parse_class_map(text) -> dict[str, str]:
    """'A=B,C=D' -> {'A': 'B', 'C': 'D'} (a dataset's class folder name -> the run's class name).
    Each folder is mapped once: a repeated source is an error, not a silent overwrite."""
    if isinstance(text, dict):
        pairs = [(str(k), str(v)) for k, v in text.items()]
    else:
        if not isinstance(text, str):
            raise ConfigError("class_map", text, "write FOLDER=CLASS pairs separated by commas")
        pairs = []
        for part in text.split(","):
            if not part.strip():
                continue
            src, sep, dst = part.partition("=")
            if not sep or not src.strip() or not dst.strip():
                raise ConfigError("class_map", text, f"'{part.strip()}' is not FOLDER=CLASS; write FOLDER=CLASS pairs "
                                  "separated by commas, e.g. CT_COVID=COVID,CT_NonCOVID=non-COVID")
            pairs.append((src.strip(), dst.strip()))
    out: dict[str, str] = {}
    for src, dst in pairs:
        if src in out:
            raise ConfigError("class_map", text, f"folder '{src}' is mapped twice ({out[src]}, {dst}); map each once")
        out[src] = dst
    if not out:
        raise ConfigError("class_map", text, "empty; give FOLDER=CLASS pairs separated by commas")
    return out


def _text(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and bool(str(v).strip()) and "\x00" not in str(v)


def _validate_weights(weights) -> None:
    if not isinstance(weights, (str, os.PathLike)) or not str(weights).strip():
        raise ConfigError("weights", weights, "choose none, imagenet or a weights file path")
    if str(weights) in ("none", "imagenet"):
        return
    if os.path.isdir(weights):  # a ct-transfer run to start from
        from .models import run_folder_checkpoint

        run_folder_checkpoint(weights)
        return
    if not os.path.isfile(weights):
        raise ConfigError("weights", weights, "no such file (choose none, imagenet, a weights file or a run folder)")


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
