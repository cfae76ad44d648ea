"""Predict: classify images, folders (recursive) and DICOM files with a run's own preprocessing; scans
(DICOM series, multi-frame DICOM, NIfTI, zips of a series) give one patient row each as well."""

from __future__ import annotations

import json
from pathlib import Path

from . import _io
from . import data as D
from .data import DEFAULT_WINDOW, DICOM_EXTENSIONS, IMAGE_EXTENSIONS, is_dicom, read_dicom, read_input  # noqa: F401
from .errors import ConfigError, CTTransferError
from .progress import track


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


def collect_scans(inputs: list[str], *, by_patient: bool = False) -> tuple[list[Path], list]:
    """(slice files, volumes). A volume is a NIfTI file, a zip, a multi-frame DICOM file, or the
    DICOM files of one series (two or more sharing a SeriesInstanceUID) in a folder; every other
    file is a slice of its own. ``by_patient``: every folder given is one patient's scan (a folder of
    slice images included)."""
    from .data.volume import dicom_volumes, is_nifti_name, open_volumes, path_source

    files, volumes = [], []
    for item in inputs:
        p, before = Path(item), len(volumes)
        if p.is_file() and (is_nifti_name(p.name) or p.suffix.lower() == ".zip"):
            volumes.extend(open_volumes(p))
            continue
        if p.is_dir() and by_patient:
            volumes.extend(open_volumes(p))
            continue
        if p.is_dir():  # NIfTI volumes inside a folder: each one a scan
            volumes.extend(v for f in sorted(p.rglob("*")) if f.is_file() and is_nifti_name(f.name)
                           for v in open_volumes(f))
        try:
            found = collect_inputs([item])
        except CTTransferError:
            if p.is_dir() and len(volumes) > before:  # a folder of NIfTI files only
                continue
            raise
        dicoms = [f for f in found if D.is_dicom(f)]
        if not dicoms:
            files.extend(found)
            continue
        series = dicom_volumes([path_source(f) for f in dicoms], str(p))
        single = {v.files[0] for v in series if v.kind == "dicom-series" and len(v) == 1}
        volumes.extend(v for v in series if not (v.kind == "dicom-series" and len(v) == 1))
        files.extend(f for f in found if not D.is_dicom(f) or str(f) in single)
    return files, volumes


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
    return _predict_files(run, collect_inputs(inputs), batch_size=batch_size, progress=progress)


def _predict_files(run, paths: list[Path], *, batch_size: int, progress: bool) -> list[dict]:
    rows = []
    chunks = range(0, len(paths), batch_size)
    for start in track(chunks, desc="predict", total=len(paths), enabled=progress and len(paths) > batch_size,
                       size=lambda start: len(paths[start:start + batch_size])):
        chunk = paths[start:start + batch_size]
        for p, pred in zip(chunk, run.predict(chunk, batch_size=batch_size)):
            row = {"path": str(p), "pred": pred.label, **{f"prob_{c}": v for c, v in pred.probabilities.items()}}
            if pred.shift_score is not None:  # the run's shift guard: is this image like its training images?
                row.update(shift_score=pred.shift_score, in_distribution=pred.in_distribution)
            rows.append(row)
    return rows


def predict_scans(run, inputs: list[str], *, batch_size: int = 64, progress: bool = False, by_patient: bool = False,
                  max_slices: int | None = None) -> tuple[list[dict], list]:
    """Slices and scans: (one row per slice file and per slice used of each scan, one
    ``patients.PatientPrediction`` per scan). See ``collect_scans`` for what is a scan."""
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be >= 1")
    if max_slices is not None and max_slices < 1:
        raise ConfigError("max_slices", max_slices, "must be >= 1")
    files, volumes = collect_scans(inputs, by_patient=by_patient)
    rows = _predict_files(run, files, batch_size=batch_size, progress=progress)
    patients = []
    from .patients import predict_volume

    for v in volumes:
        pp = predict_volume(run, v, max_slices=max_slices, batch_size=min(batch_size, 32))
        patients.append(pp)
        for s, r in zip(pp.slices, pp.slice_rows()):
            rows.append({"path": v.files[s["index"]] if v.files else v.name, "pred": r["pred"],
                         **{f"prob_{c}": s["probabilities"][c] for c in run.classes},
                         "patient": pp.patient, "slice": s["index"], "position_mm": r["position_mm"]})
    if patients and rows:  # one column set for the whole table
        for r in rows:
            r.setdefault("patient", "")
            r.setdefault("slice", "")
            r.setdefault("position_mm", "")
    return rows, patients


def patients_path(out) -> Path:
    """Where the patient rows go beside a predictions file: ``p.csv`` -> ``p.patients.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.patients{out.suffix}")


def write_rows(rows: list[dict], out) -> None:
    out = Path(out)
    if out.suffix.lower() == ".json":
        _io.write_text(out, json.dumps(rows, indent=2) + "\n")
    else:
        _io.write_csv(out, rows)
