"""Explain: CAM, Grad-CAM, Grad-CAM++ (pytorch-grad-cam) and LRP (zennit) heat maps with overlays."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CTTransferError
from .predict import DEFAULT_WINDOW, collect_inputs, load_batch, read_input

METHODS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "cam": "CAM", "lrp": "LRP"}


def find_layer(model, name: str | None):
    """The target layer: by default the feature map the head pools (last conv stage of any arch)."""
    if name is None:
        return model.feature_map
    modules = dict(model.named_modules())
    for candidate in (name, f"backbone.{name}"):
        if candidate in modules:
            return modules[candidate]
    raise CTTransferError(f"--target-layer {name}: no such module (e.g. backbone.blocks.5, feature_map)")


def _normalise(maps: np.ndarray, positive: bool = False) -> np.ndarray:
    """Scale each map to [0, 1]. ``positive``: keep only positive evidence, unless a map has none
    (then its raw range is shown rather than a blank map)."""
    out = np.zeros_like(maps, dtype=np.float32)
    for i, m in enumerate(maps):
        if positive and m.max() > 0:
            m = np.clip(m, 0, None)
        lo, hi = float(m.min()), float(m.max())
        out[i] = (m - lo) / (hi - lo) if hi > lo else 0.0
    return out


class ContrastiveTarget:
    """Logit of class c minus the mean logit: what softmax sees (a shared shift changes nothing).

    With a plain logit target a weakly trained binary model can give an all-negative map (blank
    after the ReLU); evidence for c *against* the other classes is what a reader asks for.
    """

    def __init__(self, category: int):
        self.category = category

    def __call__(self, output):
        return output[..., self.category] - output.mean(-1)


def heatmaps(model, x: torch.Tensor, method: str, targets: list[int], target_layer=None) -> np.ndarray:
    """``N x S x S`` maps in [0, 1] for normalised inputs ``x`` and the given class indices."""
    if method not in METHODS:
        raise CTTransferError(f"--method {method}: choose {', '.join(METHODS)}")
    model.eval()
    layer = target_layer if target_layer is not None else model.feature_map
    size = x.shape[-2:]
    if method in ("gradcam", "gradcampp"):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
        with cls(model=model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=x, targets=[ContrastiveTarget(t) for t in targets])
        return _normalise(maps)
    if method == "cam":
        # Zhou et al. 2016: the head is GAP -> linear, so CAM = sum_k w[c, k] * A_k exactly. Weights
        # are taken relative to the class mean (softmax ignores a shared shift): evidence for c
        # against the other classes, which a CAM of c alone can miss when all its weights agree.
        with torch.no_grad():
            fmap = model.features(x).float()
            weight = model.fc.weight.float()
            w = (weight - weight.mean(0, keepdim=True))[targets]
            maps = torch.einsum("nk,nkhw->nhw", w, fmap)
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return _normalise(maps.numpy(), positive=True)
    # LRP (epsilon for dense layers, z+ for convolutions, flat for the first layer). BatchNorm and
    # residual additions pass relevance by their gradient (no canonizer), an approximation.
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    try:
        with Gradient(model, EpsilonPlusFlat()) as attributor:
            onehot = torch.eye(model.fc.out_features)[targets]
            _, relevance = attributor(x.clone().requires_grad_(True), onehot)
    except Exception as exc:
        raise CTTransferError(f"--method lrp: not supported for this architecture ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:100]})") from None
    return _normalise(relevance.sum(1).detach().numpy(), positive=True)


def overlay(image: np.ndarray, heat: np.ndarray, path: Path, title: str) -> None:
    """Heat map (resized to the image) in jet over the grey image, titled, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.1))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(image)
    axes[1].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def resize_map(heat: np.ndarray, shape) -> np.ndarray:
    t = torch.from_numpy(heat)[None, None].float()
    return F.interpolate(t, size=tuple(shape[:2]), mode="bilinear", align_corners=False)[0, 0].numpy()


def explain(run, inputs: list[str], method: str, out_dir, target_layer: str | None = None,
            window=DEFAULT_WINDOW, batch_size: int = 16, names: list[str] | None = None) -> list[dict]:
    """Overlays for each input; returns path, prediction, probability, overlay file, heat map."""
    paths = collect_inputs(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = find_layer(run.model, target_layer)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = run.transform(load_batch(chunk, run.image_size, window))
        with torch.no_grad():
            proba = torch.softmax(run.model(x).float(), 1).numpy()
        preds = proba.argmax(1).tolist()
        maps = heatmaps(run.model, x, method, preds, layer)
        for j, (p, pred, heat) in enumerate(zip(chunk, preds, maps)):
            image = read_input(p, window)
            full = resize_map(heat, image.shape)
            stem = names[start + j] if names else re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem)
            target = out_dir / f"{stem}_{method}.png"
            title = f"{METHODS[method]} · pred {run.classes[pred]} (p={proba[j, pred]:.3f})"
            if heat.max() == heat.min():
                title += " · no positive evidence"
            overlay(image, full, target, title)
            results.append({"path": str(p), "pred": run.classes[pred], "prob": float(proba[j, pred]),
                            "overlay": str(target), "heatmap": full})
    return results


def cmd_explain(args):
    from .predict import parse_window
    from .train import load_run

    run = load_run(args.run)
    results = explain(run, args.inputs, args.method, args.out, args.target_layer, parse_window(args.window))
    for r in results:
        print(f"{r['path']}: {r['pred']} (p={r['prob']:.3f}) -> {r['overlay']}")


def add_cli(sub) -> None:
    p = sub.add_parser("explain", help="heat-map overlays (Grad-CAM, Grad-CAM++, CAM, LRP) for images")
    p.add_argument("--run", required=True)
    p.add_argument("inputs", nargs="+", help="image files, folders or DICOM files")
    p.add_argument("--method", choices=sorted(METHODS), default="gradcam")
    p.add_argument("--out", required=True, help="folder for the overlay PNGs")
    p.add_argument("--target-layer", help="module name (default: the feature map the head pools)")
    p.add_argument("--window", help="DICOM window WIDTH,LEVEL in HU (default 1500,-600)")
    p.set_defaults(func=cmd_explain)
