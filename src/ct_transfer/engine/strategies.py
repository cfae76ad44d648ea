"""Fine-tuning strategies: which parameters train (``full``, ``partial``, ``frozen``, ``linear``)."""

from __future__ import annotations

import torch.nn as nn

from ..errors import ConfigError
from ..registry import STRATEGIES


def parameter_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's stages in order (stem first), from timm's own group_matcher."""
    from timm.models import group_parameters

    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def default_freeze_until(backbone: nn.Module) -> int:
    return max(0, len(parameter_groups(backbone)) // 2 - 1)


def apply_strategy(model, strategy: str, freeze_until: int | None = None) -> dict:
    """Set requires_grad; returns what was frozen (modules whose params are all frozen stay in eval)."""
    STRATEGIES.check(strategy)
    for p in model.parameters():
        p.requires_grad_(True)
    if strategy == "full":
        return {"frozen_groups": 0, "frozen_params": 0}
    groups = parameter_groups(model.backbone)
    head_only = strategy in ("frozen", "linear")
    if head_only:
        upto = len(groups) - 1
    else:
        upto = default_freeze_until(model.backbone) if freeze_until is None else int(freeze_until)
        if not 0 <= upto < len(groups) - 1:
            raise ConfigError("freeze_until", freeze_until,
                              f"choose 0..{len(groups) - 2} for {model.backbone.__class__.__name__}")
    frozen = {n for g in groups[:upto + 1] for n in g}
    params = dict(model.backbone.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    if head_only:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return {"frozen_groups": upto + 1, "frozen_params": int(sum(params[n].numel() for n in frozen))}


def set_train_mode(model, *, bn_stats: str = "train") -> None:
    """train() for trainable parts; frozen modules (all params frozen) stay in eval (BN stats fixed).
    ``bn_stats="frozen"``: every BatchNorm layer stays in eval, so its running statistics remain the
    ones the features (and a probe-initialised head) were computed with; augmented batches would
    otherwise move them away from what un-augmented evaluation images produce."""
    model.train()
    for module in model.backbone.modules():
        own = list(module.parameters(recurse=False))
        if (own and not any(p.requires_grad for p in own)) or (
                bn_stats == "frozen" and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            module.eval()
