"""Recipes: named sets of ``TrainConfig`` values (``paper`` = the paper's protocol, the defaults),
or a YAML/JSON file of the same keys (what ``tune`` writes). Explicit options override a recipe;
the run's config.json records the full resolved values and the recipe's name."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .config import TrainConfig
from . import _io
from .errors import ConfigError, CTTransferError, show

# Each recipe lists only what differs from TrainConfig's defaults (which are the paper's protocol).
RECIPES: dict[str, dict] = {
    "paper": {},
    # A convex linear probe on fixed ImageNet features (engine/probe.py): seconds to a minute or two
    # on a laptop CPU at 224 px, decoding included. Use with an ImageNet-pretrained model.
    "linear-probe": {"weights": "imagenet", "strategy": "linear", "image_size": 224, "augment": False},
    # The CPU fast path (docs/performance.md): the head starts from the linear probe, the first
    # stages stay frozen in eval mode (no backward through the largest activations), every BatchNorm
    # keeps its ImageNet statistics (augmented batches moved them away from what the probe head was
    # fitted on: val 0.93 -> 0.73 in the first epoch), one-cycle AdamW at 3x the paper's rate, light
    # dropout and label smoothing, 20 epochs at 224 px instead of 100 at 64. No progressive
    # resizing: its small first sizes did not pay back here. A weight average (EMA, decay 0.995 per
    # step) smooths the noisy epoch-to-epoch val curve, and predictions average the image with its
    # two flips (measured: test 0.9795 -> 0.9877 at the last epochs).
    "cpu-fast": {"weights": "imagenet", "strategy": "partial", "head_init": "probe", "bn_stats": "frozen",
                 "image_size": 224, "epochs": 20, "optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.01,
                 "schedule": "onecycle", "dropout": 0.2, "label_smoothing": 0.1, "ema": 0.995, "tta": "flips"},
    # For models that must work on other hospitals' scans (docs/generalization.md): ImageNet weights,
    # the lungs cropped and intensities standardised per image (framing and window differ between
    # sites), augmentation for domain shift, a larger input, AdamW + cosine, label smoothing and a
    # moderate dropout (0.8 starves the head), fewer epochs (overfitting one site is the failure).
    "transfer": {
        "weights": "imagenet", "image_size": 224, "epochs": 30, "batch_size": 32,
        "optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05, "schedule": "cosine",
        "label_smoothing": 0.1, "dropout": 0.3,
        "crop": "lung", "intensity": "percentile", "augmentation": "domain",
    },
}

_NOT_IN_RECIPES = {"data", "model", "out", "recipe"}  # what a run is about, not how it is trained


MAX_YAML_BYTES = 1 << 20  # a recipe or search space is a few lines


def read_yaml(path, *, what: str = "YAML file"):
    """A small YAML (or JSON) file through one reader: anchors/aliases refused (an alias bomb expands
    to gigabytes once used), keys must be text, any failure one line naming the file."""
    import yaml

    path = Path(path)
    text = _io.read_text(path, what=what, max_bytes=MAX_YAML_BYTES + 1)
    if len(text.encode("utf-8", "replace")) > MAX_YAML_BYTES:
        raise CTTransferError(f"{path}: {what} is larger than {MAX_YAML_BYTES // 1024} KB")

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise CTTransferError(f"{path}: line {event.start_mark.line + 1}: YAML aliases (*name) are not "
                                      f"allowed in a {what}; write the value out")
            return super().compose_node(parent, index)

    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            values = yaml.load(text, Loader=_NoAliases)  # noqa: S506 (a SafeLoader subclass)
    except CTTransferError:
        raise
    except RecursionError:
        raise CTTransferError(f"{path}: not a readable {what} (nested too deeply)") from None
    except Exception as exc:  # yaml/json raise many types
        raise CTTransferError(f"{path}: not a readable {what} ({' '.join(str(exc).split())[:100]})") from None
    if isinstance(values, dict):
        odd = [k for k in values if not isinstance(k, str)]
        if odd:
            raise CTTransferError(f"{path}: key {show(odd[0])} is {type(odd[0]).__name__}, not an option name (text)")
    return values


def load_recipe(recipe: str) -> dict:
    """A recipe name or a .yaml/.yml/.json file -> validated ``{field: value}``."""
    if recipe in RECIPES:
        return dict(RECIPES[recipe])
    path = Path(recipe)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError("recipe", recipe, f"choose {', '.join(RECIPES)} or a .yaml/.json recipe file")
    if not path.is_file():
        raise CTTransferError(f"{path}: recipe file not found")
    values = read_yaml(path, what="recipe file")
    if not isinstance(values, dict):
        raise CTTransferError(f"{path}: a recipe file holds a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)} - _NOT_IN_RECIPES
    unknown = sorted(set(values) - known)
    if unknown:
        raise CTTransferError(f"{path}: unknown option(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})")
    return values


def config_from_recipe(recipe: str | None, /, **options) -> TrainConfig:
    """``TrainConfig`` from a recipe, with ``options`` overriding it. A bad value that came from the
    recipe file is reported as ``FILE: key: value: why`` (not as a command-line flag)."""
    if recipe is None:
        return TrainConfig(**options)
    values = load_recipe(recipe)
    try:
        return TrainConfig(**{**values, **options, "recipe": recipe})
    except ConfigError as exc:
        if exc.param in values and exc.param not in options:
            raise CTTransferError(f"{recipe}: {exc.param}: {show(values[exc.param])}: {exc.why}") from None
        raise


def write_recipe(path, values: dict) -> None:
    """Write a recipe file (YAML) that ``train --recipe-file`` reads back."""
    import yaml

    from . import _io

    clean = {k: v for k, v in values.items() if k not in _NOT_IN_RECIPES}
    _io.write_text(path, yaml.safe_dump(clean, sort_keys=True))
