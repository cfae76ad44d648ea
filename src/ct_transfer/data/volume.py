"""Volumes: one CT scan as a stream of axial slices, from a DICOM series, a multi-frame DICOM file,
a NIfTI file or a folder of slice images of one patient.

A ``Volume`` knows its slices' order and positions from headers only; ``hu(i)`` and ``rgb(i)``
decode one slice when asked, so a 600-slice scan never sits in memory (a 512x512x600 float64
volume would be 1.2 GB). Order is along the scan axis, inferior to superior:

- DICOM series: ``ImagePositionPatient`` projected on the slice normal (row x column direction
  cosines), never the file names (scanners and PACS exports name files in any order). Hounsfield
  units from pydicom's modality LUT (``RescaleSlope``/``RescaleIntercept``), then the run's window.
- multi-frame DICOM: every frame (ordered by the per-frame positions when the file has them).
- NIfTI (``.nii``, ``.nii.gz``, nibabel): the voxel values (scaled by ``scl_slope``/``scl_inter``)
  as HU, in the orientation nibabel's ``as_closest_canonical`` gives (RAS+, axial slices along the
  third axis), shown as a radiologist reads an axial slice (anterior up, patient's right on the
  left). The reorientation is applied per slice (``as_closest_canonical`` itself would load the
  whole array to flip it).
- a folder of slice images: natural order of the file names (``slice2`` before ``slice10``); no
  HU, no positions.

A folder holding several DICOM series gives one volume per ``SeriesInstanceUID``. Non-CT
modalities, slices of different sizes or orientations, missing slices (a gap between neighbours
larger than ``GAP_FACTOR`` x the median spacing), slices sharing a position and empty folders are
one-line ``CTTransferError``s.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import CTTransferError, first_line
from .decode import (DEFAULT_WINDOW, DICOM_EXTENSIONS, IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, is_dicom_bytes,
                     window_hu)

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GAP_FACTOR = 1.5  # a gap between neighbouring slices larger than this x the median spacing: missing slices
MAX_SLICES = 64  # default cap on the slices a patient decision uses (evenly spaced among the lung slices)
KINDS = ("dicom-series", "dicom-multiframe", "nifti", "images")


def is_nifti_name(name: str) -> bool:
    return str(name).lower().endswith(NIFTI_SUFFIXES)


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


# A DICOM file is read from a path or from bytes (zip members, uploads): ``(name, opener)``.
Source = tuple[str, Callable[[], object]]


def path_source(path: Path) -> Source:
    return str(path), lambda: str(path)


def bytes_source(name: str, data: bytes) -> Source:
    return name, lambda: io.BytesIO(data)


@dataclass
class Volume:
    """One scan, slices in scan order (index 0 = most inferior). Decodes a slice when asked."""

    kind: str
    name: str  # what the user gave (folder, file, zip member prefix), for messages and tables
    patient: str  # PatientID when the file has one, else the name
    series: str  # SeriesInstanceUID ("" when none)
    slice_names: list[str]  # per slice: file name, or "file#frame"
    positions: list[float] | None  # per slice: mm along the scan axis (None: unknown)
    shape: tuple[int, int]  # rows, columns
    _read: Callable[[int], np.ndarray] = field(repr=False)
    has_hu: bool = True  # images of a folder are already 8-bit pictures
    files: list[str] = field(default_factory=list)  # the file each slice comes from (paths or zip members)

    def __len__(self) -> int:
        return len(self.slice_names)

    @property
    def spacing(self) -> float | None:
        """Median distance between neighbouring slices (mm), when positions are known."""
        if not self.positions or len(self.positions) < 2:
            return None
        return float(np.median(np.diff(self.positions)))

    def hu(self, i: int) -> np.ndarray:
        """Slice ``i`` in Hounsfield units, float64 (one slice at a time) ``rows x columns``."""
        if not self.has_hu:
            raise CTTransferError(f"{self.name}: slice images have no Hounsfield units")
        return self._read(i)

    def rgb(self, i: int, window=DEFAULT_WINDOW) -> np.ndarray:
        """Slice ``i`` as the model's decoded input: ``H x W x 3`` uint8 (HU through ``window``)."""
        if not self.has_hu:
            return self._read(i)
        return window_hu(self._read(i), window)

    def iter_rgb(self, indices=None, window=DEFAULT_WINDOW) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, rgb)`` one slice at a time (a generator: one slice in memory)."""
        for i in range(len(self)) if indices is None else indices:
            yield int(i), self.rgb(int(i), window)

    def describe(self) -> str:
        where = f", {self.spacing:.2f} mm apart" if self.spacing else ""
        return f"{self.kind} {self.name}: {len(self)} slices of {self.shape[1]}x{self.shape[0]} px{where}"


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def open_volumes(path: str | os.PathLike) -> list[Volume]:
    """Every scan at ``path``: a DICOM series folder (several series -> several volumes), a
    multi-frame DICOM file, a NIfTI file, a zip of any of these, or a folder of slice images
    (one patient). Problems are one-line ``CTTransferError``s."""
    path = Path(path)
    if path.is_file():
        name = path.name.lower()
        if is_nifti_name(name):
            return [open_nifti(path)]
        if name.endswith(".zip"):
            return volumes_from_items(read_zip(path), str(path))
        if name.endswith(DICOM_EXTENSIONS) or _file_is_dicom(path):
            return dicom_volumes([path_source(path)], str(path))
        raise CTTransferError(f"{path}: not a volume (give a DICOM series folder, a multi-frame DICOM, "
                              "a .nii/.nii.gz file or a .zip of a series)")
    if not path.is_dir():
        raise CTTransferError(f"{path}: no such file or folder")
    try:
        files = sorted((p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: _natural_key(p.relative_to(path).as_posix()))
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot list ({(exc.strerror or str(exc)).lower()})") from None
    dicoms = [p for p in files if p.suffix.lower() in DICOM_EXTENSIONS or (
        p.suffix.lower() not in IMAGE_EXTENSIONS and not is_nifti_name(p.name) and _file_is_dicom(p))]
    niftis = [p for p in files if is_nifti_name(p.name)]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    out = []
    if dicoms:
        out += dicom_volumes([path_source(p) for p in dicoms], str(path))
    out += [open_nifti(p) for p in niftis]
    if images and not out:
        out.append(image_folder(images, str(path)))
    elif images:
        log.warning("%s: %d image file(s) beside the DICOM/NIfTI volumes skipped", path, len(images))
    if not out:
        raise CTTransferError(f"{path}: folder holds no DICOM files, NIfTI volumes or slice images")
    return out


def open_volume(path: str | os.PathLike) -> Volume:
    """The one scan at ``path`` (a folder of several series is an error naming them)."""
    vols = open_volumes(path)
    if len(vols) > 1:
        raise CTTransferError(f"{path}: holds {len(vols)} scans ({', '.join(v.name for v in vols[:4])}"
                              f"{' …' if len(vols) > 4 else ''}); give one, or use open_volumes")
    return vols[0]


def _file_is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return is_dicom_bytes(fh.read(132))
    except OSError:
        return False


def read_zip(path: Path, *, max_members: int = 5000, max_bytes: int = 2 * 2**30) -> list[tuple[str, bytes]]:
    """The members of a zip (folders, hidden files and ``__MACOSX`` left out), with size limits."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and not any(
                p.startswith(".") or p == "__MACOSX" for p in Path(i.filename).parts)]
            if len(infos) > max_members or sum(i.file_size for i in infos) > max_bytes:
                raise CTTransferError(f"{path}: zip holds more than {max_members} files or "
                                      f"{max_bytes // 2**30} GB")
            return [(f"{path}/{i.filename}", zf.read(i)) for i in infos]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CTTransferError(f"{path}: not a readable zip file ({first_line(exc, 80)})") from None


def volumes_from_items(items: list[tuple[str, bytes]], name: str) -> list[Volume]:
    """Volumes from in-memory files (a zip's members, uploads): DICOM series by series, NIfTI
    files, else the images as one patient's slices."""
    dicoms = [(n, d) for n, d in items if is_dicom_bytes(d) or n.lower().endswith(DICOM_EXTENSIONS)]
    niftis = [(n, d) for n, d in items if is_nifti_name(n)]
    images = [(n, d) for n, d in items if n.lower().endswith(IMAGE_EXTENSIONS)]
    out = []
    if dicoms:
        out += dicom_volumes([bytes_source(n, d) for n, d in dicoms], name)
    out += [open_nifti(n, data=d) for n, d in niftis]
    if images and not out:
        images.sort(key=lambda t: _natural_key(t[0]))
        data = dict(images)
        names = [n for n, _ in images]
        first = decode_image(images[0][1], images[0][0])
        out.append(Volume("images", name, Path(name).name, "", names, None, first.shape[:2],
                          lambda i: decode_image(data[names[i]], names[i]), has_hu=False, files=names))
    if not out:
        raise CTTransferError(f"{name}: holds no DICOM files, NIfTI volumes or slice images")
    return out


def image_folder(paths: list[Path], name: str) -> Volume:
    """A folder of one patient's slice images, in natural file-name order."""
    from .decode import read_image

    paths = sorted(paths, key=lambda p: _natural_key(p.as_posix()))
    first = read_image(paths[0])
    return Volume("images", name, Path(name).name, "", [p.name for p in paths], None, first.shape[:2],
                  lambda i: read_image(paths[i]), has_hu=False, files=[str(p) for p in paths])


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def _dcmread(source: Source, *, header_only: bool):
    import pydicom

    name, opener = source
    try:
        return pydicom.dcmread(opener(), stop_before_pixels=header_only, force=True)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise CTTransferError(f"{name}: not a readable DICOM file ({first_line(exc, 100)})") from None


def _floats(value, n: int, name: str, tag: str):
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise CTTransferError(f"{name}: {tag} is not {n} numbers") from None
    if len(out) != n or not np.all(np.isfinite(out)):
        raise CTTransferError(f"{name}: {tag} is not {n} numbers")
    return out


@dataclass
class _Header:
    source: Source
    series: str
    patient: str
    rows: int
    cols: int
    frames: int
    orientation: list[float] | None
    position: list[float] | None
    instance: int | None


def _header(source: Source) -> _Header:
    name = source[0]
    ds = _dcmread(source, header_only=True)
    try:
        modality = str(getattr(ds, "Modality", "") or "").upper()
        if modality and modality != "CT":
            raise CTTransferError(f"{name}: DICOM modality is {modality[:16]}, not CT")
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        if rows < 1 or cols < 1:
            raise CTTransferError(f"{name}: DICOM image has no pixels (Rows {rows}, Columns {cols})")
        if rows * cols > MAX_PIXELS:
            raise CTTransferError(f"{name}: DICOM image is {cols}x{rows} px, more than the {MAX_PIXELS:,} allowed")
        iop = getattr(ds, "ImageOrientationPatient", None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        inst = getattr(ds, "InstanceNumber", None)
        return _Header(source, str(getattr(ds, "SeriesInstanceUID", "") or ""),
                       str(getattr(ds, "PatientID", "") or ""), rows, cols,
                       max(1, int(getattr(ds, "NumberOfFrames", 1) or 1)),
                       _floats(iop, 6, name, "ImageOrientationPatient") if iop is not None else None,
                       _floats(ipp, 3, name, "ImagePositionPatient") if ipp is not None else None,
                       int(inst) if inst not in (None, "") else None)
    except CTTransferError:
        raise
    except Exception as exc:  # a damaged element fails when it is converted
        raise CTTransferError(f"{name}: not a readable DICOM header ({first_line(exc, 100)})") from None


def _normal(orientation: list[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _hu_of(ds, pixels: np.ndarray, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    from .decode import check_rescale

    check_rescale(ds, name)  # the same rescale checks as a single slice
    hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if hu.ndim != 2:
        raise CTTransferError(f"{name}: DICOM pixel data is not a 2-D grey slice (shape {hu.shape})")
    return hu


def _decode_error(ds, name: str, exc: Exception) -> CTTransferError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    label = " ".join(str(getattr(syntax, "name", syntax)).split())
    return CTTransferError(f"{name}: cannot decode DICOM pixel data ({label}; a decoder plugin may be "
                           f"missing: {first_line(exc, 80)})")


def _read_slice(source: Source) -> np.ndarray:
    name = source[0]
    ds = _dcmread(source, header_only=False)
    if "PixelData" not in ds:
        raise CTTransferError(f"{name}: DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise _decode_error(ds, name, exc) from None
    return _hu_of(ds, pixels, name)


def dicom_volumes(sources: list[Source], name: str) -> list[Volume]:
    """DICOM files -> one volume per series (``SeriesInstanceUID``); a multi-frame file is a volume
    of its own. Headers only are read here."""
    if not sources:
        raise CTTransferError(f"{name}: no DICOM files")
    headers = [_header(s) for s in sources]
    out = []
    for h in headers:
        if h.frames > 1:
            out.append(_multiframe(h))
    by_series: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        if h.frames == 1:
            by_series[h.series].append(h)
    for uid, hs in by_series.items():
        label = name if len(by_series) == 1 else f"{name} (series {uid or 'without UID'})"
        out.append(_series(hs, label, uid))
    return out


def _series(hs: list[_Header], name: str, uid: str) -> Volume:
    sizes = sorted({(h.rows, h.cols) for h in hs})
    if len(sizes) > 1:
        raise CTTransferError(f"{name}: slices of different sizes in one series "
                              f"({', '.join(f'{c}x{r}' for r, c in sizes[:3])} px)")
    if all(h.orientation is not None and h.position is not None for h in hs):
        ref = np.asarray(hs[0].orientation)
        odd = [h for h in hs if not np.allclose(h.orientation, ref, atol=1e-3)]
        if odd:
            raise CTTransferError(f"{odd[0].source[0]}: slice orientation {np.round(odd[0].orientation, 3).tolist()} "
                                  f"differs from the series' {np.round(ref, 3).tolist()}")
        normal = _normal(hs[0].orientation)
        z = np.array([float(np.dot(normal, h.position)) for h in hs])
        order = np.argsort(z, kind="stable")
        positions = [float(v) for v in z[order]]
        _check_spacing(positions, [hs[i].source[0] for i in order], name)
    elif all(h.instance is not None for h in hs):  # no geometry: the scanner's numbering
        log.warning("%s: no ImagePositionPatient/ImageOrientationPatient; ordered by InstanceNumber", name)
        order = np.argsort([h.instance for h in hs], kind="stable")
        positions = None
    else:
        raise CTTransferError(f"{name}: cannot order the slices (no ImagePositionPatient and no InstanceNumber)")
    ordered = [hs[i] for i in order]
    sources = [h.source for h in ordered]
    return Volume("dicom-series", name, ordered[0].patient or Path(name).name, uid,
                  [Path(s[0]).name for s in sources], positions, (hs[0].rows, hs[0].cols),
                  lambda i: _read_slice(sources[i]), files=[s[0] for s in sources])


def _check_spacing(positions: list[float], names: list[str], name: str) -> None:
    if len(positions) < 2:
        return
    gaps = np.diff(positions)
    same = np.flatnonzero(gaps < 1e-3)
    if len(same):
        k = int(same[0])
        raise CTTransferError(f"{name}: two slices at the same position {positions[k]:.2f} mm "
                              f"({Path(names[k]).name}, {Path(names[k + 1]).name}): a duplicate or a second series")
    median = float(np.median(gaps))
    big = np.flatnonzero(gaps > GAP_FACTOR * median)
    if len(big):
        k = int(big[0])
        raise CTTransferError(f"{name}: missing slices: a gap of {gaps[k]:.2f} mm between {positions[k]:.2f} and "
                              f"{positions[k + 1]:.2f} mm (median spacing {median:.2f} mm; "
                              f"{len(big)} gap(s) over {GAP_FACTOR}x)")


def _multiframe(h: _Header) -> Volume:
    """Every frame of a multi-frame CT file, one at a time (``pydicom.pixels.pixel_array(index=)``)."""
    from pydicom.pixels import pixel_array

    source, name = h.source, h.source[0]
    ds = _dcmread(source, header_only=True)
    positions = None
    try:  # per-frame positions (enhanced CT); else the file's frame order
        per_frame = ds.PerFrameFunctionalGroupsSequence
        normal = _normal(_floats(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                 .ImageOrientationPatient, 6, name, "ImageOrientationPatient"))
        z = [float(np.dot(normal, _floats(f.PlanePositionSequence[0].ImagePositionPatient, 3, name,
                                          "ImagePositionPatient"))) for f in per_frame]
        if len(z) == h.frames:
            positions = z
    except (AttributeError, IndexError, KeyError):
        positions = None
    order = list(range(h.frames))
    if positions is not None:
        order = [int(i) for i in np.argsort(positions, kind="stable")]
        positions = [positions[i] for i in order]
        _check_spacing(positions, [f"{name}#{i}" for i in order], name)
    rescale = _shared_rescale(ds)

    def read(i: int) -> np.ndarray:
        try:  # from a file or bytes: pydicom reads only the frame asked for
            pixels = pixel_array(source[1](), index=order[i])
        except Exception as exc:
            raise _decode_error(ds, name, exc) from None
        if rescale is not None:  # enhanced CT keeps the rescale in a functional group
            return pixels.astype(np.float64) * rescale[0] + rescale[1]
        return _hu_of(ds, pixels, name)

    return Volume("dicom-multiframe", name, h.patient or Path(name).name, h.series,
                  [f"{Path(name).name}#{i}" for i in order], positions, (h.rows, h.cols), read,
                  files=[name] * h.frames)


def _shared_rescale(ds):
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return None  # top level: pydicom's modality LUT applies it
    try:
        t = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        return float(t.RescaleSlope), float(t.RescaleIntercept)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------


def open_nifti(path, *, data: bytes | None = None) -> Volume:
    """A NIfTI volume (nibabel): axial slices in the orientation ``as_closest_canonical`` gives."""
    import nibabel as nib
    from nibabel.orientations import io_orientation

    name = str(path)
    try:
        if data is None:
            img = nib.load(name, keep_file_open=True)  # one open file: slices read in order stay cheap (.gz)
        else:
            raw = data
            if name.lower().endswith(".gz") or raw[:2] == b"\x1f\x8b":
                import gzip

                raw = gzip.decompress(raw)
            img = nib.Nifti1Image.from_bytes(raw)
        shape = img.shape
        affine = img.affine
    except FileNotFoundError:
        raise CTTransferError(f"{name}: file not found") from None
    except Exception as exc:  # nibabel's ImageFileError, gzip, struct errors ...
        raise CTTransferError(f"{name}: not a readable NIfTI file ({first_line(exc, 100)})") from None
    if len(shape) < 3 or any(s < 1 for s in shape[:3]) or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        raise CTTransferError(f"{name}: NIfTI image has shape {tuple(shape)}; need a 3-D volume")
    ornt = io_orientation(affine)  # per input axis: the closest output axis (R, A, S) and its direction
    if np.isnan(ornt).any():
        raise CTTransferError(f"{name}: NIfTI affine has no usable orientation")
    axis = {int(ornt[a, 0]): (a, int(ornt[a, 1])) for a in range(3)}  # output axis -> (input axis, flip)
    (ax_r, f_r), (ax_a, f_a), (ax_s, f_s) = axis[0], axis[1], axis[2]
    n = shape[ax_s]
    rows, cols = shape[ax_a], shape[ax_r]
    if rows * cols > MAX_PIXELS:
        raise CTTransferError(f"{name}: NIfTI slice is {cols}x{rows} px, more than the {MAX_PIXELS:,} allowed")
    zooms = img.header.get_zooms()
    spacing = float(zooms[ax_s]) if len(zooms) > ax_s else 1.0
    proxy = img.dataobj

    def read(i: int) -> np.ndarray:
        index = [slice(None)] * 3 + [0] * (len(shape) - 3)
        index[ax_s] = i if f_s > 0 else n - 1 - i  # canonical slice i: inferior first
        try:
            sl = np.asarray(proxy[tuple(index)], dtype=np.float64)
        except Exception as exc:
            raise CTTransferError(f"{name}: cannot read slice {i} ({first_line(exc, 100)})") from None
        if ax_r > ax_a:  # the two in-plane axes in file order -> (R, A)
            sl = sl.T
        sl = sl[::f_r, ::f_a]  # flip an axis that runs left or posterior
        # canonical (R, A) -> an axial picture: rows anterior -> posterior, columns right -> left
        return np.ascontiguousarray(sl.T[::-1, ::-1])

    return Volume("nifti", name, Path(name).name.split(".")[0], "", [f"{Path(name).name}#{i}" for i in range(n)],
                  [float(i * spacing) for i in range(n)], (rows, cols), read, files=[name] * n)


# ---------------------------------------------------------------------------------------------
# Slice selection
# ---------------------------------------------------------------------------------------------


def evenly_spaced(indices: list[int], maximum: int) -> list[int]:
    """At most ``maximum`` of ``indices``, evenly spaced (first and last kept)."""
    if maximum < 1:
        raise CTTransferError(f"max_slices={maximum}: must be >= 1")
    if len(indices) <= maximum:
        return list(indices)
    picks = np.unique(np.rint(np.linspace(0, len(indices) - 1, maximum)).astype(int))
    return [indices[i] for i in picks]


@dataclass
class Selection:
    """Which slices a patient decision uses, and why."""

    used: list[int]  # slice indices fed to the model, in scan order
    lung: list[bool]  # per slice of the volume: does it show the lungs
    fallback: bool  # no slice showed lungs: evenly spaced among all slices
    max_slices: int
    seconds_decode: float = 0.0
    seconds_select: float = 0.0


def select_slices(volume: Volume, *, max_slices: int = MAX_SLICES, window=DEFAULT_WINDOW) -> Selection:
    """The slices that show the lungs (``steps.shows_lungs``: body found, lungs inside it, as the
    lung crop finds them), then at most ``max_slices`` of them, evenly spaced along the scan. The
    lungs are looked for in the lung window (HU volumes) whatever window the run uses. When no slice
    shows lungs, ``max_slices`` evenly spaced slices of the whole scan are used (``fallback``)."""
    import time

    from .steps import shows_lungs

    if max_slices < 1:
        raise CTTransferError(f"max_slices={max_slices}: must be >= 1")
    lung, t_decode, t_select = [], 0.0, 0.0
    for i in range(len(volume)):
        t0 = time.perf_counter()
        rgb = volume.rgb(i, DEFAULT_WINDOW)
        t1 = time.perf_counter()
        lung.append(bool(shows_lungs(rgb)))
        t_decode, t_select = t_decode + t1 - t0, t_select + time.perf_counter() - t1
    candidates = [i for i, v in enumerate(lung) if v]
    fallback = not candidates
    if fallback:
        log.warning("%s: no slice shows lungs; using %d evenly spaced slices of all %d", volume.name,
                    min(max_slices, len(volume)), len(volume))
        candidates = list(range(len(volume)))
    return Selection(evenly_spaced(candidates, max_slices), lung, fallback, max_slices, t_decode, t_select)


def scans_in_items(items: list[tuple[str, bytes]]) -> tuple[list[Volume], list[tuple[str, bytes]], list[dict]]:
    """Uploaded files -> (scans, single slices, errors). Scans: NIfTI files, multi-frame DICOM
    files, and the DICOM files of one series (two or more sharing a ``SeriesInstanceUID``); a scan
    that cannot be used (MR, mixed sizes, missing slices ...) is one error entry, the others go on.
    Every other file stays a single slice (a DICOM file whose header is unreadable too: decoding it
    says why)."""
    volumes, singles, errors = [], [], []
    by_series: dict[str, list[_Header]] = defaultdict(list)
    for n, d in items:
        if is_nifti_name(n):
            try:
                volumes.append(open_nifti(n, data=d))
            except CTTransferError as exc:
                errors.append({"name": n, "error": " ".join(str(exc).split())})
        elif is_dicom_bytes(d) or n.lower().endswith(DICOM_EXTENSIONS):
            try:
                h = _header(bytes_source(n, d))
            except CTTransferError:
                singles.append((n, d))
                continue
            if h.frames > 1:
                try:
                    volumes.append(_multiframe(h))
                except CTTransferError as exc:
                    errors.append({"name": n, "error": " ".join(str(exc).split())})
            else:
                by_series[h.series].append(h)
        else:
            singles.append((n, d))
    data = dict(items)
    for uid, hs in by_series.items():
        if len(hs) < 2:
            singles.append((hs[0].source[0], data[hs[0].source[0]]))
            continue
        folder = os.path.commonpath([h.source[0] for h in hs]) or hs[0].source[0]
        label = folder if len(by_series) == 1 else f"{folder} (series …{uid[-8:]})"
        try:
            volumes.append(_series(hs, label, uid))
        except CTTransferError as exc:
            errors.append({"name": label, "error": " ".join(str(exc).split())})
    return volumes, singles, errors


# ---------------------------------------------------------------------------------------------
# Volumes as training data: a split row ``path`` + ``slice``
# ---------------------------------------------------------------------------------------------

VOLUME_SLICES = 16  # default cap on the training rows one volume gives (evenly spaced lung slices)


@dataclass(frozen=True)
class SliceRef:
    """Slice ``index`` (scan order, as ``Volume``) of the training volume at ``path``: a NIfTI file, a
    multi-frame DICOM file or a DICOM series folder. What a split row with a ``slice`` decodes."""

    path: Path
    index: int

    def __str__(self) -> str:
        return f"{self.path}#{self.index}"


def is_volume_path(path: str | os.PathLike) -> bool:
    """Can a split row's ``path`` with a ``slice`` be a volume: a folder, a NIfTI or a DICOM file."""
    p = Path(path)
    return is_nifti_name(p.name) or p.suffix.lower() in DICOM_EXTENSIONS or p.is_dir()


def series_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder as training data: its own ``.dcm``/``.dicom`` files, not
    those of sub-folders (``scan_folder`` lists those on their own)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DICOM_EXTENSIONS)


def training_volume(path: str | os.PathLike) -> Volume:
    """The one CT volume a training row names: a NIfTI file, a multi-frame DICOM file or a series
    folder (``series_files``). Slice images are not volumes here (each image is a row of its own)."""
    path = Path(path)
    if path.is_dir():
        files = series_files(path)
        vols = dicom_volumes([path_source(p) for p in files], str(path)) if files else []
    elif path.is_file():
        vols = open_volumes(path)
    else:
        raise CTTransferError(f"{path}: volume not found")
    vols = [v for v in vols if v.kind != "images"]
    if len(vols) != 1:
        raise CTTransferError(f"{path}: holds {len(vols)} CT volumes; a training volume is one NIfTI file, one "
                              "multi-frame DICOM file or one folder per DICOM series")
    return vols[0]


def volume_signature(path: str | os.PathLike) -> str:
    """What identifies a volume's content for caches: size and mtime of its file (a series folder:
    of each of its DICOM files)."""
    path = Path(path)
    try:
        files = series_files(path) if path.is_dir() else [path]
        stats = [(f.name, f.stat()) for f in files]
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot read ({(exc.strerror or str(exc)).lower()})") from None
    return "|".join(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in stats)


_SELECTED: dict = {}  # (resolved path, signature, cap) -> (slice indices, patient): a volume is scanned once per process


def training_slices(path: str | os.PathLike, *, max_slices: int = VOLUME_SLICES) -> tuple[list[int], str, int]:
    """(slice indices, patient, number of slices) a training volume gives: its lung slices
    (``select_slices``, one slice in memory at a time), at most ``max_slices`` evenly spaced."""
    key = (os.path.realpath(path), volume_signature(path), int(max_slices))
    if key not in _SELECTED:
        vol = training_volume(path)
        sel = select_slices(vol, max_slices=max_slices)
        if len(_SELECTED) > 10_000:
            _SELECTED.clear()
        _SELECTED[key] = (list(sel.used), vol.patient, len(vol))
    return _SELECTED[key]


class VolumeReader:
    """Decodes ``SliceRef``s, keeping the last volume open: rows come sorted by path, so each volume
    is opened once per decode pass (headers read once; a ``.nii.gz`` read forward)."""

    def __init__(self):
        self._open: tuple[str, str, Volume] | None = None

    def volume(self, path: Path, signature: str | None = None) -> Volume:
        real = os.path.realpath(path)
        signature = volume_signature(path) if signature is None else signature
        opened = self._open  # one read of the attribute: another thread may replace it meanwhile
        if opened is None or opened[:2] != (real, signature):
            opened = self._open = (real, signature, training_volume(path))
        return opened[2]

    def rgb(self, ref: SliceRef, window=DEFAULT_WINDOW, signature: str | None = None) -> np.ndarray:
        vol = self.volume(ref.path, signature)
        if not 0 <= ref.index < len(vol):
            raise CTTransferError(f"{ref.path}: slice {ref.index} asked for; the volume has {len(vol)} "
                                  f"(0..{len(vol) - 1})")
        return vol.rgb(ref.index, window)
