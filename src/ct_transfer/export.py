"""Export: ONNX or ``torch.export`` (.pt2) with the normalisation inside, checked against PyTorch.

The exported graph takes ``N x 3 x S x S`` float32 RGB in [0, 1] (the 1/255 rescale done by the
caller), applies the model's mean/std, test-time flips and the run's temperature itself and returns
the calibrated class probabilities — the predictor's, so the parity check compares the file with
``Run.predict``'s own numbers, not with a copy of the graph. A JSON file beside the export (and the
ONNX ``metadata_props``) carries everything needed to decide: the classes, the decision rule and
threshold, the preprocessing done before the graph, and the provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import _io
from . import data as D
from .errors import CTTransferError, first_line
from .inference import calibrated, tta_logits
from .rundir import RunDir

FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".torchscript": "torchscript"}  # torchscript: deprecated in PyTorch


class Exported(nn.Module):
    """The predictor as one graph: normalisation, TTA, temperature, softmax; with a shift guard also
    its score (a second output, from the same forward pass: the guard's hooks are traced with it)."""

    def __init__(self, predictor):
        super().__init__()
        self.model, self.tta = predictor.model, predictor.tta
        self.register_buffer("mean", torch.tensor(predictor.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(predictor.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(predictor.temperature), dtype=torch.float32))
        self.guard = predictor.guard.cpu() if predictor.guard is not None else None
        # the guard's hooks live as long as the wrapper, so tracing records them with the model
        self.tap = predictor.guard.tapping(self.model) if predictor.guard is not None else None

    def forward(self, image):
        x = (image - self.mean) / self.std
        if self.tap is not None:
            self.tap.clear()
        probabilities = calibrated(tta_logits(self.model, x, self.tta), self.temperature)
        return probabilities if self.tap is None else (probabilities, self.tap.score())


def sample_images(run, n: int = 32) -> tuple[torch.Tensor, str]:
    """Up to ``n`` of the run's own test images (uint8) for the parity check, else seeded noise."""
    rows = [r for r in run.split if r["subset"] == "test"][:n]
    data = run.config.get("data")
    folders = [data] if isinstance(data, str) else list(data or [])
    if rows and folders and all(Path(d).is_dir() for d in folders):

        cache = D.ImageCache(run.preprocess)
        arr, kept, _ = cache.load_many([D.row_input(r, D.data_root(data)) for r in rows], on_bad="skip")
        if kept:
            return torch.from_numpy(arr), "test images"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 3, run.image_size, run.image_size), generator=g, dtype=torch.uint8), \
        "random images (the run's data folder is not here)"


def resolve_format(out: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = FORMATS.get(out.suffix.lower())
        if fmt is None:
            raise CTTransferError(f"{out}: give a .onnx or .pt2 file name (or format=)")
    if fmt not in FORMATS.values():
        raise CTTransferError(f"format={fmt}: choose {', '.join(FORMATS.values())}")
    named = FORMATS.get(out.suffix.lower())
    if named is not None and named != fmt:
        raise CTTransferError(f"{out}: the name says {named} but the format is {fmt}; use a {fmt} file name")
    return fmt


def export(run, out, *, format: str | None = None, n_check: int = 32) -> dict:
    """Write the export and its JSON sidecar atomically; returns the description with the parity."""
    out = Path(out)
    fmt = resolve_format(out, format)
    for target in (out, out.with_name(out.name + ".json")):
        if run.directory is not None:
            RunDir(run.directory).refuse_output(target)
        _io.check_writable(target, folder=False)
    from .provenance import provenance

    run.model.to("cpu").eval()
    predictor = run.predictor
    predictor.device = "cpu"
    wrapper = Exported(predictor).eval()
    guard = predictor.guard
    x_u8, source = sample_images(run, n_check)
    x = x_u8.float() / 255.0
    ref = predictor.outputs(x_u8)  # what Run.predict answers for these images
    try:
        got = {"onnx": _export_onnx, "pt2": _export_pt2, "torchscript": _export_torchscript}[fmt](wrapper, x, out)
    except CTTransferError:
        raise
    except Exception as exc:
        raise CTTransferError(f"{out}: export failed ({first_line(exc, 120)})") from None
    finally:
        if wrapper.tap is not None:
            wrapper.tap.remove()  # the run's model keeps no hooks
    got_proba, got_score = _as_pair(got)
    parity = {"images": int(len(x)), "on": source,
              "max_abs_diff_probabilities": float(np.abs(got_proba - ref.proba).max())}
    if guard is not None:  # relative: Mahalanobis scores run to the thousands
        parity["max_rel_diff_shift_score"] = float((np.abs(got_score - ref.shift_score) /
                                                    np.maximum(np.abs(ref.shift_score), 1e-6)).max())
        parity["same_in_distribution"] = bool(((got_score <= float(guard.threshold)) == ref.in_distribution).all())
    info = {
        "format": fmt, "file": out.name, "model": run.config.get("model"), "timm_name": run.config.get("timm_name"),
        "classes": run.classes, "input": {"name": "image", "shape": ["N", 3, run.image_size, run.image_size],
                                          "dtype": "float32", "range": "[0, 1] RGB (pixel / 255)"},
        "inside_the_graph": {"mean": list(run.mean), "std": list(run.std), "tta": run.tta,
                             "temperature": float(predictor.temperature),
                             "output": "calibrated probabilities: softmax(logits / temperature)"},
        "decision": predictor.fitted_state()["decision"], "threshold": predictor.threshold,
        "positive_class": run.classes[1] if len(run.classes) == 2 else None,
        "calibration": predictor.calibration.to_dict(), "provenance": provenance(),
        "preprocess": run.preprocess.to_dict(), "preprocess_text": run.preprocess.describe(),
        "preprocess_steps": [repr(step) for step in run.preprocess.steps()],  # done before the graph
        "outputs": ["probabilities"] + (["shift_score"] if guard is not None else []),
        "shift_guard": None if guard is None else {
            **guard.describe(), "output": "shift_score",
            "rule": "in_distribution = shift_score <= threshold (higher: less like the training images)"},
        "parity": parity,
    }
    if fmt == "onnx":  # the same description travels inside the file (metadata_props)
        import onnx

        proto = onnx.load(str(out))
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in info.items() if k != "parity"})
        _io.write_bytes(out, proto.SerializeToString())
    _io.write_json(out.with_name(out.name + ".json"), info)
    return info


def _as_pair(out):
    """(probabilities, shift scores or None) as numpy, from the graph's one or two outputs."""
    if isinstance(out, (tuple, list)):
        return tuple(np.asarray(o.detach().numpy() if isinstance(o, torch.Tensor) else o) for o in out)
    return np.asarray(out.detach().numpy() if isinstance(out, torch.Tensor) else out), None


def _export_onnx(wrapper, x, out: Path):
    import onnxruntime as ort

    import os
    import tempfile

    # a unique name in the target folder: never an existing file of the user's (it is removed after)
    fd, name = tempfile.mkstemp(prefix=f".{out.name[:100]}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    names = ["probabilities"] + (["shift_score"] if wrapper.tap is not None else [])
    try:
        torch.onnx.export(wrapper, (x[:2],), str(tmp), input_names=["image"], output_names=names,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}, dynamo=False)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = tuple(session.run(names, {"image": x.numpy()}))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return got


def _export_pt2(wrapper, x, out: Path) -> np.ndarray:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(wrapper, (x[:2],), dynamic_shapes={"image": {0: batch}})
    with _io.atomic_open(out, "wb") as fh:
        torch.export.save(program, fh)
    loaded = torch.export.load(str(out))
    with torch.no_grad():
        return loaded.module()(x)


def _export_torchscript(wrapper, x, out: Path) -> np.ndarray:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # kept for existing users; .pt2 replaces it
        traced = torch.jit.trace(wrapper, x[:2])
        with _io.atomic_open(out, "wb") as fh:
            torch.jit.save(traced, fh)
        return torch.jit.load(str(out))(x)
