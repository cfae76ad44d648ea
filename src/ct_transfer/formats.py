"""Weight files other tools read: the fine-tuned network as a plain timm checkpoint (safetensors).

``export_timm`` writes the run's backbone and head under timm's own tensor names, so that a timm
user needs nothing of ct-transfer::

    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=2,
                              pretrained_cfg_overlay=dict(file="lite0.safetensors", num_classes=2))

(``num_classes`` in the overlay too: otherwise timm drops the head as a mismatched ImageNet
classifier and loads the backbone only.) The JSON beside it holds what the weights do not: the
classes in order, the input size, mean/std and preprocessing, the run's temperature and threshold.
Our head is timm's own (global average pooling, dropout, linear), so the logits are the same; an
architecture whose timm head differs (MobileNetV3's extra 1280-channel conv) is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import _io
from .errors import CTTransferError, first_line

log = logging.getLogger(__name__)


def timm_state_dict(run) -> tuple[dict, str]:
    """The run's weights under timm's names for ``timm_name`` with ``len(classes)`` outputs, and the
    classifier's name; a one-line error when timm's model has other tensors than ours."""
    import timm

    timm_name = run.config.get("timm_name") or _timm_name(run.config["model"])
    k = len(run.classes)
    with torch.device("meta"):  # names and shapes only
        target = timm.create_model(timm_name, pretrained=False, num_classes=k)
    classifier = target.pretrained_cfg.get("classifier") or "classifier"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    ours = run.model.state_dict()
    out = {name.removeprefix("backbone."): t for name, t in ours.items() if name.startswith("backbone.")}
    out[f"{classifier}.weight"], out[f"{classifier}.bias"] = ours["fc.weight"], ours["fc.bias"]
    want = target.state_dict()
    extra, missing = sorted(set(want) - set(out)), sorted(set(out) - set(want))
    bad_shape = [n for n in set(want) & set(out) if tuple(want[n].shape) != tuple(out[n].shape)]
    if extra or missing or bad_shape:
        what = (f"timm's {timm_name} has tensors ours lacks ({', '.join(extra[:3])})" if extra else
                f"ours has tensors timm's {timm_name} lacks ({', '.join(missing[:3])})" if missing else
                f"tensor shapes differ ({', '.join(sorted(bad_shape)[:3])})")
        raise CTTransferError(f"{run.config['model']}: cannot be a plain timm checkpoint: {what}; "
                              "export to ONNX or .pt2 instead")
    return {n: t.detach().to("cpu").contiguous() for n, t in out.items()}, classifier


def _timm_name(model: str) -> str:
    from .models import resolve

    return resolve(model).timm_name


def export_timm(run, path, *, n_check: int = 16) -> dict:
    """Write ``path`` (.safetensors, timm's tensor names) and ``path.json``; the file is loaded back
    through ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` and its logits compared
    with the run's model on up to ``n_check`` of the run's test images (recorded as ``parity``)."""
    import timm
    from safetensors.torch import save

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CTTransferError(f"{path}: give a .safetensors file name (timm reads that format)")
    _io.check_writable(path, folder=False)
    state, classifier = timm_state_dict(run)
    timm_name = run.config.get("timm_name") or _timm_name(run.config["model"])
    classes = list(run.classes)
    meta = {"format": "timm", "timm_name": timm_name, "classes": json.dumps(classes)}
    tmp = path.with_name(f".{path.name}.check.safetensors")  # checked before it replaces anything
    try:
        _io.write_bytes(tmp, save(state, metadata=meta))
        model = timm.create_model(timm_name, pretrained=True, num_classes=len(classes),
                                  pretrained_cfg_overlay=dict(file=str(tmp), num_classes=len(classes))).eval()
        parity = _parity(run, model, n_check)
        if parity["max_abs_diff_logits"] > 1e-4:
            raise CTTransferError(f"{path}: the timm model's logits differ from the run's by "
                                  f"{parity['max_abs_diff_logits']:.2e} (not written)")
        tmp.replace(path)
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot write ({_io.why(exc)})") from None
    except CTTransferError:
        raise
    except Exception as exc:  # timm's loader: report it, keep nothing half-done
        raise CTTransferError(f"{path}: timm could not load the export ({first_line(exc)})") from None
    finally:
        tmp.unlink(missing_ok=True)
    info = {"format": "timm safetensors", "file": path.name, "timm_name": timm_name, "classifier": classifier,
            "num_classes": len(classes), "classes": classes,
            "positive_class": classes[1] if len(classes) == 2 else None,
            "load": (f"timm.create_model({timm_name!r}, pretrained=True, num_classes={len(classes)}, "
                     f"pretrained_cfg_overlay=dict(file={path.name!r}, num_classes={len(classes)}))"),
            "input": {"image_size": run.image_size, "mean": list(run.mean), "std": list(run.std),
                      "preprocess": run.preprocess.to_dict(), "tta": run.tta},
            "decision": {"temperature": run.temperature, "threshold": run.threshold,
                         "rule": "softmax(logits / temperature); positive when p(positive) >= threshold, "
                                 "else argmax"},
            "parity": parity}
    _io.write_json(path.with_name(path.name + ".json"), info)
    log.info("wrote %s (timm %s, %d classes); logits match the run's within %.1e on %d %s", path, timm_name,
             len(classes), parity["max_abs_diff_logits"], parity["images"], parity["on"])
    return info


@torch.inference_mode()
def _parity(run, model, n: int) -> dict:
    from .export import sample_images

    x_u8, where = sample_images(run, n)
    x = run.transform(x_u8, None)  # the run's own input pipeline (uint8 -> float, mean/std)
    ours = run.model.eval().to("cpu")(x)
    theirs = model(x)
    return {"images": int(len(x_u8)), "on": where,
            "max_abs_diff_logits": float((ours - theirs).abs().max())}
