"""Predict: run a trained run on new images, folders or DICOM files, with the training preprocessing."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .errors import CTTransferError
from .evaluate import predict_proba

DICOM_EXTENSIONS = (".dcm", ".dicom")
DEFAULT_WINDOW = (1500.0, -600.0)  # lung window: width, level (HU)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for images and DICOM files."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and (
                f.suffix.lower() in D.IMAGE_EXTENSIONS + DICOM_EXTENSIONS))
            if not found:
                raise CTTransferError(f"{p}: folder holds no images or DICOM files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise CTTransferError(f"{p}: no such file or folder")
    return out


def parse_window(text: str | None) -> tuple[float, float]:
    if not text:
        return DEFAULT_WINDOW
    try:
        w, l = (float(v) for v in text.split(","))
    except ValueError:
        raise CTTransferError(f"--window {text}: give WIDTH,LEVEL in HU, e.g. 1500,-600") from None
    if w <= 0:
        raise CTTransferError(f"--window {text}: width must be > 0")
    return w, l


def read_dicom(path: Path, window=DEFAULT_WINDOW) -> np.ndarray:
    """CT DICOM -> Hounsfield units (rescale slope/intercept) -> window -> ``H x W x 3`` uint8."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise CTTransferError(f"{path}: not a readable DICOM file ({str(exc).splitlines()[0][:100]})") from None
    modality = str(getattr(ds, "Modality", "")).upper()
    if modality and modality != "CT":
        raise CTTransferError(f"{path}: DICOM modality is {modality}, not CT")
    if "PixelData" not in ds:
        raise CTTransferError(f"{path}: DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise CTTransferError(f"{path}: cannot decode DICOM pixel data ({name}; a decoder plugin may be missing: "
                              f"{str(exc).splitlines()[0][:80]})") from None
    if pixels.ndim == 3:  # multi-frame: the middle slice
        pixels = pixels[pixels.shape[0] // 2]
    hu = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    width, level = window
    lo = level - width / 2
    gray = np.clip((hu - lo) / width, 0.0, 1.0) * 255.0
    gray = np.rint(gray).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_input(path: Path, window=DEFAULT_WINDOW) -> np.ndarray:
    """Full-resolution ``H x W x 3`` uint8 of an image or a DICOM file."""
    return read_dicom(path, window) if is_dicom(path) else D.read_image(path)


def load_batch(paths: list[Path], image_size: int, window=DEFAULT_WINDOW) -> torch.Tensor:
    """Preprocess like training: decode to RGB, squash to ``image_size`` (images through the cache)."""
    cache = D.ImageCache(image_size)
    arrs = [D.resize_array(read_dicom(p, window), image_size) if is_dicom(p) else cache.get(p) for p in paths]
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrs).transpose(0, 3, 1, 2)))


def predict(run, inputs: list[str], batch_size: int = 64, window=DEFAULT_WINDOW, progress: bool = False) -> list[dict]:
    """One dict per input: path, predicted class, probability of each class."""
    if batch_size < 1:
        raise CTTransferError(f"--batch-size {batch_size}: must be >= 1")
    paths = collect_inputs(inputs)
    rows = []
    chunks = range(0, len(paths), batch_size)
    if progress and len(paths) > batch_size:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predict", unit="batch", disable=None)
    for start in chunks:
        chunk = paths[start:start + batch_size]
        proba = predict_proba(run.model, load_batch(chunk, run.image_size, window), run.transform)
        for p, pr in zip(chunk, proba):
            rows.append({"path": str(p), "pred": run.classes[int(pr.argmax())],
                         **{f"prob_{c}": float(v) for c, v in zip(run.classes, pr)}})
    return rows


def write_rows(rows: list[dict], out: str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".json":
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, out)


def cmd_predict(args):
    from .train import load_run

    run = load_run(args.run)
    rows = predict(run, args.inputs, args.batch_size, parse_window(args.window), progress=True)
    if not args.out or len(rows) <= 50:
        width = min(70, max(len(r["path"]) for r in rows))
        print(f"{'path':<{width}}  {'pred':<12}" + "".join(f"{'p(' + c + ')':>14}" for c in run.classes))
        for r in rows:
            print(f"{r['path'][-width:]:<{width}}  {r['pred']:<12}" + "".join(f"{r['prob_' + c]:>14.4f}" for c in run.classes))
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {args.out} ({len(rows)} images)")


def add_cli(sub) -> None:
    p = sub.add_parser("predict", help="classify new images, folders or DICOM files with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or DICOM files")
    p.add_argument("--out", help="predictions file (.csv or .json)")
    p.add_argument("--window", help="DICOM window WIDTH,LEVEL in HU (default 1500,-600: lung)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_predict)
