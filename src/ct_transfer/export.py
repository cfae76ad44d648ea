"""Export: ONNX or TorchScript with the preprocessing inside, checked against PyTorch on test images.

The exported graph takes ``N x 3 x S x S`` float32 RGB in [0, 1] (the 1/255 rescale done by the
caller), applies the model's mean/std itself and returns class probabilities. A JSON file beside the
export documents the input size, mean/std, classes and how the images were decoded and resized.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import data as D
from .errors import CTTransferError


class Exported(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image):
        return torch.softmax(self.model((image - self.mean) / self.std), dim=1)


def sample_test_images(run, n: int = 32) -> torch.Tensor:
    """Up to ``n`` of the run's own test images (uint8), for the parity check."""
    from .train import load_subset

    run_dir = Path(run.checkpoint).parent
    rows = [r for r in D.read_split(run_dir / "split.csv") if r["subset"] == "test"][:n]
    x, _, _, _ = load_subset(rows, "test", run.classes, run.config["data"], run.image_size, on_bad="skip")
    if len(x) == 0:
        raise CTTransferError(f"{run_dir}: no readable test images for the parity check")
    return x


def export(run, fmt: str, out, n_check: int = 32) -> dict:
    """Write the export and its JSON sidecar; returns the parity report."""
    if fmt not in ("onnx", "torchscript"):
        raise CTTransferError(f"--format {fmt}: choose onnx or torchscript")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Exported(run.model, run.mean, run.std).eval()
    x = sample_test_images(run, n_check).float() / 255.0
    with torch.no_grad():
        reference = wrapper(x).numpy()
    example = x[:2]
    if fmt == "onnx":
        torch.onnx.export(wrapper, (example,), str(out), input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"image": x.numpy()})[0]
    else:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example)
        traced.save(str(out))
        loaded = torch.jit.load(str(out))
        with torch.no_grad():
            got = loaded(x).numpy()
    max_diff = float(np.abs(got - reference).max())
    info = {
        "format": fmt, "file": out.name, "model": run.config["model"], "timm_name": run.config.get("timm_name"),
        "classes": run.classes, "input": {"name": "image", "shape": ["N", 3, run.image_size, run.image_size],
                                          "dtype": "float32", "range": "[0, 1] RGB (pixel / 255)"},
        "inside_the_graph": {"mean": list(run.mean), "std": list(run.std), "output": "softmax probabilities"},
        "decode": "any image -> 8-bit RGB (alpha, palette and metadata dropped); DICOM -> HU -> lung window 1500/-600",
        "resize": f"squash to {run.image_size}x{run.image_size}, bilinear (PIL), no crop",
        "parity": {"images": int(len(x)), "max_abs_diff_probabilities": max_diff},
    }
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(info, indent=2) + "\n")
    if fmt == "onnx":  # the same description travels inside the file (metadata_props)
        import onnx

        proto = onnx.load(str(out))
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in info.items() if k != "parity"})
        onnx.save(proto, str(out))
    return info


def cmd_export(args):
    from .train import load_run

    run = load_run(args.run)
    info = export(run, args.format, args.out)
    print(f"wrote {args.out} (+ {Path(args.out).name}.json)")
    print(f"parity on {info['parity']['images']} test images: max |p_export - p_torch| = "
          f"{info['parity']['max_abs_diff_probabilities']:.2e}")


def add_cli(sub) -> None:
    p = sub.add_parser("export", help="export a run to ONNX or TorchScript, with a parity check")
    p.add_argument("--run", required=True)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
