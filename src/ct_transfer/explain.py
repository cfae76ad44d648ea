"""Explain: CAM, Grad-CAM, Grad-CAM++ (pytorch-grad-cam) and LRP (zennit) heat maps with overlays."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .errors import ConfigError, CTTransferError, first_line

from .registry import EXPLAINERS  # noqa: E402

METHODS = EXPLAINERS.describe()  # {name: title}: the registered explanation methods


def find_layer(model, name: str | None):
    """The target layer: by default the feature map the head pools (last conv stage of any arch)."""
    if name is None:
        return model.feature_map
    modules = dict(model.named_modules())
    for candidate in (name, f"backbone.{name}"):
        if candidate in modules:
            return modules[candidate]
    raise ConfigError("target_layer", name, "no such module (e.g. backbone.blocks.5, feature_map)")


def check_layer(run, layer, name: str | None, method: str) -> None:
    """Grad-CAM needs an N x C x H x W map with H x W > 1: say so before decoding any image."""
    if name is None or method not in ("gradcam", "gradcampp"):
        return  # the default layer is the pooled feature map; CAM and LRP do not use a layer
    seen = {}

    def hook(module, inputs, output):  # returns None: a hook's return value would replace the output
        seen.setdefault("shape", getattr(output, "shape", None))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run.model.eval()(torch.zeros(1, 3, run.image_size, run.image_size, device=run.device))
    finally:
        handle.remove()
    shape = tuple(seen.get("shape") or ())
    if len(shape) != 4 or shape[2] * shape[3] < 2:
        got = "x".join(str(v) for v in shape) if shape else "no tensor"
        raise ConfigError("target_layer", name, f"output is {got}, not a spatial N x C x H x W map; choose a "
                          "convolutional layer, e.g. feature_map")


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
    EXPLAINERS.check(method)
    model.eval()
    layer = target_layer if target_layer is not None else model.feature_map
    size = x.shape[-2:]
    if method in ("gradcam", "gradcampp"):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
        with cls(model=model, target_layers=[layer]) as cam:
            try:
                # the input carries a gradient so frozen backbones (strategy frozen) still give one
                maps = cam(input_tensor=x.detach().clone().requires_grad_(True),
                           targets=[ContrastiveTarget(t) for t in targets])
            except (ValueError, IndexError, RuntimeError) as exc:  # e.g. a layer without a spatial map
                raise CTTransferError(f"target_layer: {METHODS[method]} needs a layer with a spatial (N x C x H x W) "
                                      f"output ({first_line(exc, 80)})") from None
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
        raise CTTransferError(f"method=lrp: not supported for this architecture ({type(exc).__name__}: "
                              f"{first_line(exc, 100)})") from None
    return _normalise(relevance.sum(1).detach().numpy(), positive=True)


def overlay_array(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Heat map (jet, resized to the image) blended over the grey image: ``H x W x 3`` uint8."""
    from matplotlib import colormaps

    heat = resize_map(heat, image.shape) if heat.shape != image.shape[:2] else heat
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


MIN_PANEL_PX = 256  # smaller images are shown enlarged by a whole factor (each pixel a k x k block)


def overlay_figure(image: np.ndarray, heat: np.ndarray, title: str, *, dpi: int = 100):
    """The input beside the overlay at the image's own resolution (one image pixel = one figure pixel,
    or a k x k block for images under ``MIN_PANEL_PX``), with a colour bar giving the heat map's scale;
    titled with the prediction. Save it with ``dpi=fig.dpi`` to keep the pixels exact."""
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    k = max(1, -(-MIN_PANEL_PX // max(h, w)))  # ceil: whole-pixel enlargement only
    ph, pw = h * k, w * k
    gap, top, bar = 8, 34, 70  # px: between the panels, title band, colour bar with its labels
    width, height = 2 * pw + gap + bar, ph + top
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax_in = fig.add_axes((0, 0, pw / width, ph / height))
    ax_ov = fig.add_axes(((pw + gap) / width, 0, pw / width, ph / height))
    cax = fig.add_axes(((2 * pw + gap + 10) / width, 0.1 * ph / height, 12 / width, 0.8 * ph / height))
    ax_in.imshow(image, interpolation="nearest")
    ax_ov.imshow(image, interpolation="nearest")
    shown = ax_ov.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    for ax in (ax_in, ax_ov):
        ax.axis("off")
    bar_ = fig.colorbar(shown, cax=cax)
    bar_.set_label("relevance (0-1)", fontsize=7)
    bar_.ax.tick_params(labelsize=7)
    size = f"{w}x{h} px" + (f", shown x{k}" if k > 1 else "")
    fig.text(0.5 * pw / width, 1 - 4 / height, f"input ({size})", ha="center", va="top", fontsize=8)
    fig.text((pw + gap + 0.5 * pw) / width, 1 - 4 / height, title, ha="center", va="top", fontsize=8, wrap=True)
    return fig


def resize_map(heat: np.ndarray, shape) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(heat))[None, None].float()
    return F.interpolate(t, size=tuple(shape[:2]), mode="bilinear", align_corners=False)[0, 0].numpy()


def place_map(heat: np.ndarray, shape, box) -> np.ndarray:
    """The model's heat map back on the full image: inside the crop box, zero outside it."""
    y0, y1, x0, x1 = box
    if (y0, x0) == (0, 0) and (y1, x1) == tuple(shape[:2]):
        return resize_map(heat, shape)
    full = np.zeros(shape[:2], np.float32)
    full[y0:y1, x0:x1] = resize_map(heat, (y1 - y0, x1 - x0))
    return full


class Explanation(NamedTuple):
    label: str
    probability: float
    heatmap: np.ndarray  # full resolution, [0, 1]
    overlay: np.ndarray  # H x W x 3 uint8
    method: str

    @property
    def title(self) -> str:
        text = f"{METHODS[self.method]} · pred {self.label} (p={self.probability:.3f})"
        return text + (" · no positive evidence" if self.heatmap.max() == self.heatmap.min() else "")


def explain_images(run, images: list[np.ndarray], *, method: str = "gradcam", target_layer: str | None = None,
                   batch_size: int = 16) -> list[Explanation]:
    """Explanations of full-resolution ``H x W x 3`` uint8 images (preprocessed like training)."""
    EXPLAINERS.check(method)
    layer = find_layer(run.model, target_layer)
    check_layer(run, layer, target_layer, method)
    # hooks and zennit run on the CPU (inference per image is cheap); a GPU run keeps its model there
    model = run.model if str(run.device) == "cpu" else copy.deepcopy(run.model).cpu()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x_u8 = D.stack([run.preprocess(a) for a in chunk])
        res = run.predictor.outputs(x_u8)  # the run's probabilities and decision rule (threshold, TTA)
        proba, preds = res.proba, res.labels.tolist()
        maps = heatmaps(model, run.transform(x_u8), method, preds, layer)  # explains the decided class
        for image, pred, p, heat in zip(chunk, preds, proba, maps):
            full = place_map(heat, image.shape, run.preprocess.crop_box(image))
            out.append(Explanation(run.classes[pred], float(p[pred]), full, overlay_array(image, full), method))
    return out


def explain_files(run, paths: list[Path], *, method: str, out_dir, target_layer: str | None = None,
                  names: list[str] | None = None) -> list[dict]:
    """Overlay PNGs (input beside heat map) for image/DICOM files; returns what was written."""
    from ._io import ensure_writable_dir
    from .evaluate import save_figure

    EXPLAINERS.check(method)
    check_layer(run, find_layer(run.model, target_layer), target_layer, method)  # before any decoding
    out_dir = ensure_writable_dir(out_dir)
    stems = output_stems(paths, names)
    results = []
    for i, p in enumerate(paths):
        image = D.read_input(p, run.preprocess.window)
        ex = explain_images(run, [image], method=method, target_layer=target_layer)[0]
        target = out_dir / f"{stems[i]}_{method}.png"
        fig = overlay_figure(image, ex.heatmap, ex.title)
        save_figure(fig, target, dpi=fig.dpi)
        results.append({"path": str(p), "pred": ex.label, "prob": ex.probability, "overlay": str(target),
                        "heatmap": ex.heatmap})
    return results


def output_stems(paths, names: list[str] | None = None) -> list[str]:
    """One output name per input, never shared: the file's stem in safe characters, and where two
    inputs would get the same name (``a/scan.png`` and ``b/scan.png``, ``scan.png`` and ``scan.dcm``,
    two non-Latin names) a stable short hash of the input's resolved path is added to each."""
    import hashlib
    import os

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:100].lstrip(".") or "image"  # never a hidden file

    base = [safe(names[i]) if names else safe(Path(p).stem) for i, p in enumerate(paths)]
    keys = [os.fsencode(os.path.realpath(p)) if not names else str(names[i]).encode("utf-8", "surrogateescape")
            for i, p in enumerate(paths)]
    folded = [b.lower() for b in base]  # case-insensitive file systems: Scan and scan collide too
    out = []
    for b, f, key in zip(base, folded, keys):
        clash = sum(1 for g, k in zip(folded, keys) if g == f and k != key) > 0
        out.append(f"{b}-{hashlib.sha1(key).hexdigest()[:8]}" if clash else b)
    return out
