"""Decoding: any image file or DICOM slice to one fixed ``H x W x 3`` uint8 RGB array.

Alpha, palette, ICC profile, bit depth and file metadata are dropped, so the RGB/RGBA encoding
difference between the classes of the original SARS-CoV-2 download cannot leak into a model.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CTTransferError, first_line

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
DEFAULT_WINDOW = (1500.0, -600.0)  # lung window: width, level (HU)
MAX_PIXELS = 40_000_000  # a decompression bomb is refused before decoding (a CT slice is ~0.3 MP)
MAX_FILE_BYTES = 256 * 1024 * 1024


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> ``H x W x 3`` uint8. Alpha, palette, ICC profile and bit depth are dropped."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # full 16-bit range onto 8 bits
        elif mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr / 257.0 if arr.max() > 255 else arr
        else:  # float or out-of-range integers: stretch what is there
            arr = np.nan_to_num(arr)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """Decode fully (truncated files fail here, not later); bombs and non-images are one-line errors."""
    if not data:
        raise CTTransferError(f"{name}: cannot decode image (empty file)")
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise CTTransferError(f"{name}: image is {w}x{h} px, more than the {MAX_PIXELS:,} px allowed "
                                  "(decompression bomb?)")
        if w < 1 or h < 1:
            raise CTTransferError(f"{name}: image has no pixels")
        image.load()
        return image
    except CTTransferError:
        raise
    except Image.DecompressionBombError:
        raise CTTransferError(f"{name}: image is larger than the {MAX_PIXELS:,} px allowed (decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise CTTransferError(f"{name}: not an image file (PNG, JPEG, BMP, TIFF or DICOM)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise CTTransferError(f"{name}: cannot decode image ({first_line(exc, 100)})") from None


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Image bytes -> ``H x W x 3`` uint8; odd modes PIL cannot convert are one-line errors too."""
    image = decode_bytes(data, name)
    try:
        return to_rgb_array(image)
    except Exception as exc:  # e.g. a mode without an RGB conversion
        raise CTTransferError(f"{name}: cannot convert {image.mode} image to RGB ({first_line(exc, 80)})") from None


def read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CTTransferError(f"{path}: file is {size / 2**20:.0f} MB, more than {MAX_FILE_BYTES // 2**20} MB")
        return path.read_bytes()
    except FileNotFoundError:
        raise CTTransferError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise CTTransferError(f"{path}: is a folder, not an image") from None
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot read ({(exc.strerror or str(exc)).lower()})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file at full resolution to ``H x W x 3`` uint8."""
    path = Path(path)
    return decode_image(read_bytes(path), str(path))


def is_dicom_bytes(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_dicom(path: Path) -> bool:
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_to_array(data: bytes, name: str, window=DEFAULT_WINDOW) -> np.ndarray:
    """CT DICOM -> Hounsfield units (pydicom's modality LUT) -> window -> ``H x W x 3`` uint8."""
    try:
        return _dicom_to_array(data, name, window)
    except CTTransferError:
        raise
    except Exception as exc:  # pydicom converts elements lazily: a damaged header fails anywhere
        raise CTTransferError(f"{name}: not a readable DICOM file ({first_line(exc, 100)})") from None


def _dicom_to_array(data: bytes, name: str, window) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise CTTransferError(f"{name}: not a readable DICOM file ({first_line(exc, 100)})") from None
    modality = str(getattr(ds, "Modality", "")).upper()
    if modality and modality != "CT":
        raise CTTransferError(f"{name}: DICOM modality is {modality[:16]}, not CT")
    if "PixelData" not in ds:
        raise CTTransferError(f"{name}: DICOM file has no pixel data")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    samples = max(1, int(getattr(ds, "SamplesPerPixel", 1) or 1))
    if rows < 1 or cols < 1:
        raise CTTransferError(f"{name}: DICOM image has no pixels (Rows {rows}, Columns {cols})")
    if rows * cols > MAX_PIXELS or rows * cols * frames * samples > 4 * MAX_PIXELS:
        raise CTTransferError(f"{name}: DICOM image is {cols}x{rows} px x {frames} frame(s), more than the "
                              f"{MAX_PIXELS:,} px per slice ({4 * MAX_PIXELS:,} in all) allowed")
    check_rescale(ds, name)
    if frames > 1:  # every frame is a slice of one scan: read as a volume, not as one picture
        raise CTTransferError(f"{name}: multi-frame DICOM ({frames} frames): a volume, not one slice "
                              "(predict reads it as one patient; API: ct_transfer.data.volume.open_volume)")
    try:
        pixels = ds.pixel_array
        if pixels.ndim == 3 and samples == 1:  # multi-frame: the middle slice, taken before the float64 LUT
            pixels = pixels[pixels.shape[0] // 2]
        hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = " ".join(str(getattr(syntax, "name", syntax)).split())  # a damaged UID may hold newlines
        raise CTTransferError(f"{name}: cannot decode DICOM pixel data ({label}; a decoder plugin may be "
                              f"missing: {first_line(exc, 80)})") from None
    if hu.ndim != 2 or hu.size == 0:
        raise CTTransferError(f"{name}: DICOM pixel data is not a 2-D grey slice (shape {hu.shape})")
    return window_hu(hu, window)


def window_hu(hu: np.ndarray, window=DEFAULT_WINDOW) -> np.ndarray:
    """Hounsfield units -> window (width, level) -> ``H x W x 3`` uint8 (one place for every reader)."""
    width, level = window
    lo = level - width / 2
    hu = np.nan_to_num(np.asarray(hu, dtype=np.float64), nan=lo, posinf=lo + width, neginf=lo)
    gray = np.rint(np.clip((hu - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


MAX_RESCALE_SLOPE = 1e4  # CT slopes are ~1 (0.5..2 seen); beyond this the HU values are meaningless
MAX_RESCALE_INTERCEPT = 1e6


def check_rescale(ds, name: str) -> None:
    """The stored-value -> HU mapping must be usable: a slope of 0, a non-finite or absurd slope or
    intercept is a one-line error (every pixel would land on one value or outside any window). A CT
    slice without rescale tags (and without a Modality LUT) is decoded with its stored values taken
    as HU, and a warning says so: some exporters store HU directly, others raw detector values."""
    has_slope, has_intercept = "RescaleSlope" in ds, "RescaleIntercept" in ds
    if not has_slope and not has_intercept:
        if "ModalityLUTSequence" not in ds:
            log.warning("%s: DICOM has no RescaleSlope/RescaleIntercept: its stored values are taken as HU "
                        "(check the window if the image looks wrong)", name)
        return
    try:
        slope = float(ds.RescaleSlope) if has_slope else 1.0
        intercept = float(ds.RescaleIntercept) if has_intercept else 0.0
    except (TypeError, ValueError, OverflowError):
        raise CTTransferError(f"{name}: DICOM RescaleSlope/RescaleIntercept are not numbers") from None
    if not np.isfinite(slope) or slope == 0 or abs(slope) > MAX_RESCALE_SLOPE:
        raise CTTransferError(f"{name}: DICOM RescaleSlope {slope:g} is unusable (choose a finite, non-zero value "
                              f"up to {MAX_RESCALE_SLOPE:g}; CT slopes are about 1)")
    if not np.isfinite(intercept) or abs(intercept) > MAX_RESCALE_INTERCEPT:
        raise CTTransferError(f"{name}: DICOM RescaleIntercept {intercept:g} is unusable (CT intercepts are about "
                              "-1024)")


def read_dicom(path, window=DEFAULT_WINDOW) -> np.ndarray:
    path = Path(path)
    return dicom_to_array(read_bytes(path), str(path), window)


def decode_any(data: bytes, name: str, window=DEFAULT_WINDOW) -> np.ndarray:
    """Bytes of an image or a DICOM file -> full-resolution ``H x W x 3`` uint8."""
    if is_dicom_bytes(data) or name.lower().endswith(DICOM_EXTENSIONS):
        return dicom_to_array(data, name, window)
    return decode_image(data, name)


def read_input(path, window=DEFAULT_WINDOW) -> np.ndarray:
    """Full-resolution ``H x W x 3`` uint8 of an image or a DICOM file."""
    path = Path(path)
    return decode_any(read_bytes(path), str(path), window)


def as_rgb_array(obj, window=DEFAULT_WINDOW) -> np.ndarray:
    """A path, bytes, PIL image or numpy array (H x W, H x W x 1/3/4; any dtype) -> ``H x W x 3`` uint8."""
    if isinstance(obj, (str, os.PathLike)):
        return read_input(obj, window)
    if isinstance(obj, Image.Image):
        return to_rgb_array(obj)
    if isinstance(obj, (bytes, bytearray)):
        return decode_any(bytes(obj), "<bytes>", window)
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # channels-first
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
            raise CTTransferError(f"array of shape {obj.shape}: expected H x W, H x W x 3 or H x W x 4")
        arr = arr[:, :, :3]
        if arr.dtype != np.uint8:
            f = np.nan_to_num(arr.astype(np.float64))
            if f.min() >= 0 and f.max() <= 1.0:
                f = f * 255.0  # floats in [0, 1]
            elif f.min() < 0 or f.max() > 255:
                lo, hi = float(f.min()), float(f.max())
                f = (f - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(f)
            arr = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    raise CTTransferError(f"{type(obj).__name__}: not an image (give a path, PIL image, numpy array or bytes)")
