"""Predict: classify images, folders (recursive) and DICOM files with a run's own preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

from . import _io
from .data import DEFAULT_WINDOW, DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom, read_dicom, read_input  # noqa: F401
from .errors import ConfigError, CTTransferError


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for images and DICOM files (by extension, or by
    the ``DICM`` preamble: DICOM files often have no extension). Hidden files and folders
    (``.ipynb_checkpoints/``, ``._x.png``, ``.DS_Store``) are skipped; names must be UTF-8 text."""
    import os

    from .data.split import check_name, shown

    out = []
    for item in inputs:
        p = Path(item)
        check_name(p)
        if p.is_dir():
            found = []
            for folder, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    f = Path(folder) / name
                    if name.startswith(".") or not f.is_file():
                        continue
                    if f.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS or is_dicom(f):
                        check_name(f)
                        found.append(f)
            if not found:
                raise CTTransferError(f"{shown(p)}: folder holds no images or DICOM files")
            out.extend(sorted(found))
        elif p.is_file():
            out.append(p)
        else:
            raise CTTransferError(f"{shown(p)}: no such file or folder")
    return out


def parse_window(text: str | None) -> tuple[float, float]:
    if not text:
        return DEFAULT_WINDOW
    try:
        w, l = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("window", text, "give WIDTH,LEVEL in HU, e.g. 1500,-600") from None
    if not (w > 0 and abs(w) < 1e6 and abs(l) < 1e6):
        raise ConfigError("window", text, "width must be > 0 and both finite")
    return w, l


def predict(run, inputs: list[str], *, batch_size: int = 64, progress: bool = False) -> list[dict]:
    """One dict per input file (folders expanded): path, predicted class, probability of each class."""
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be >= 1")
    paths = collect_inputs(inputs)
    rows = []
    chunks = range(0, len(paths), batch_size)
    if progress and len(paths) > batch_size:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="predict", unit="batch", disable=None)
    for start in chunks:
        chunk = paths[start:start + batch_size]
        for p, pred in zip(chunk, run.predict(chunk, batch_size=batch_size)):
            rows.append({"path": str(p), "pred": pred.label,
                         **{f"prob_{c}": v for c, v in pred.probabilities.items()}})
    return rows


def write_rows(rows: list[dict], out) -> None:
    out = Path(out)
    if out.suffix.lower() == ".json":
        _io.write_text(out, json.dumps(rows, indent=2) + "\n")
    else:
        _io.write_csv(out, rows)
