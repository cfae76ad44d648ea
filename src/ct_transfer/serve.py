"""``ct-transfer serve``: a small local web page (and JSON API) to try trained runs on scans.

Why FastAPI (on Starlette) + uvicorn rather than Gradio: a few small packages (FastAPI, Starlette,
uvicorn, pydantic, python-multipart) instead of Gradio's large dependency tree and bundled front end; a
plain HTML + vanilla JS page we control (no npm build; the page loads nothing from the internet);
the OpenAPI description of ``POST /api/predict`` comes for free (``/openapi.json``; the ``/docs``
viewer loads Swagger UI from a CDN, so it needs a connection); and the app is an
ordinary ASGI object, so tests run the real server on a loopback port and drive it with any HTTP
client or a real browser.

Safety: binds to 127.0.0.1 unless told otherwise and answers only to its own names and origin
(``Hosts``: DNS rebinding and cross-origin posts get 403); the request body is capped while it
streams in (413) and must keep arriving (408), a connection must send its headers in time; each
request has a budget of images, uncompressed bytes (all files and zips together) and decoded pixels
(``Limits``, ``Budget``), its files are read and decoded one at a time, and at most
``Limits.max_concurrent`` uploads are read and analysed at once, which bounds the server's memory
(docs/serve.md, "Memory bound"); images larger than ``data.decode.MAX_PIXELS`` are refused from their
header (decompression bombs); uploads are held in memory, or for large multipart parts in the
anonymous spooled temp files of Starlette (removed on close), never written anywhere else; every
user-fixable problem is a one-line message with a 4xx status, and any other failure is logged
here with its trace while the browser gets a generic 500 message.

Concurrency: each run has one lock around inference and explanation (pytorch-grad-cam's hooks
on the shared model are not thread-safe); decoding runs outside the lock in the thread pool.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at runtime and
# they name classes imported inside create_app
import asyncio
import base64
import io
import ipaddress
import logging
import threading
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from . import data as D
from .errors import ConfigError, CTTransferError
from .explain import METHODS
from .registry import EXPLAINERS
from .run import Run, load_run

log = logging.getLogger(__name__)

INSTALL_HINT = "ct-transfer serve needs FastAPI and uvicorn: pip install 'ct-transfer[serve]'"
EXTERNAL_KEYS = ("accuracy", "recall", "specificity", "f1", "roc_auc", "n")
WEB = Path(__file__).with_name("web")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may carry and how the server protects itself. Pixel limits per image come
    from the decoder (``D.decode.MAX_PIXELS``); docs/serve.md gives the memory bound they imply."""

    max_request_bytes: int = 100 * 2**20  # whole multipart body
    max_images: int = 200  # single slices (files, zip members included) per request
    scan_heatmaps: int = 3  # heat maps of a scan's most decisive slices
    max_zip_members: int = 2000  # entries in one zip, folders and skipped files included
    max_unpacked_bytes: int = 256 * 2**20  # uncompressed bytes of one request: every file and zip member
    max_request_pixels: int = 64_000_000  # decoded pixels of one request (a 512 x 512 CT slice: 0.26 M)
    max_concurrent: int = 2  # uploads read, decoded and analysed at once, process-wide
    explain_px: int = 512  # longest side of the image the heat map and overlay are computed on
    model_batch: int = 16  # images per forward pass (activation memory grows with it)
    explain_batch: int = 4  # images per Grad-CAM/LRP pass (a backward pass keeps every activation)
    preview_px: int = 320  # longest side of the overlay sent back
    queue_timeout_s: float = 120.0  # an upload waiting longer for a slot gets 503
    body_idle_s: float = 20.0  # a request body that pauses longer gets 408
    body_total_s: float = 300.0  # ... or that takes longer in all
    header_timeout_s: float = 20.0  # a connection must send a request's headers within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 64  # open connections and requests at once (uvicorn answers 503 beyond)


class UploadError(CTTransferError):
    """A request the server refuses as a whole; ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def require_extras() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if find_spec(m) is None]
    if missing:
        raise CTTransferError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


# ---------------------------------------------------------------------------------------------
# Runs and their cards
# ---------------------------------------------------------------------------------------------


class Served:
    """A loaded run, its card and the lock that serialises its model."""

    def __init__(self, name: str, run: Run):
        self.name, self.run = name, run
        self.lock = threading.Lock()
        self.card = run_card(name, run)


def load_runs(paths) -> dict[str, Served]:
    """Each run directory loaded once; named by its folder (made unique when two share a name)."""
    if not paths:
        raise ConfigError("run", "", "give at least one run directory")
    runs: dict[str, Served] = {}
    for p in paths:
        run = load_run(p)
        name = base = Path(p).resolve().name or "run"
        i = 2
        while name in runs:
            name, i = f"{base}-{i}", i + 1
        runs[name] = Served(name, run)
        log.info("loaded %s: %s from %s", name, run.config.get("model"), run.directory)
    return runs


def read_external(directory) -> list[dict]:
    """``RUN/external/<name>/metrics.json`` -> [{name, data, metrics}]; unreadable ones are skipped
    with a log line (the card says what it could read)."""
    from . import _io

    root = Path(directory) / "external" if directory else None
    if root is None or not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        try:
            doc = _io.read_json(path, what="external metrics")
            metrics = doc["metrics"]
            if not isinstance(metrics, dict) or "accuracy" not in metrics:
                raise KeyError("metrics.accuracy")
        except (CTTransferError, KeyError, TypeError) as exc:
            log.warning("%s: skipped (%s)", path, exc)
            continue
        out.append({"name": str(doc.get("name") or folder.name), "data": str(doc.get("data", "")),
                    "metrics": _metric_row(metrics), "independent": doc.get("independent") is not False,
                    "why": str((doc.get("independence") or {}).get("why", ""))})
    return out


def _metric_row(m: dict) -> dict:
    """The numbers a card shows, with their 95% intervals when the run recorded them."""
    ci = m.get("ci95") or {}
    row = {k: m.get(k) for k in EXTERNAL_KEYS if k in m}
    row["ci95"] = {k: list(v) for k, v in ci.items() if k in row and isinstance(v, (list, tuple)) and len(v) == 2}
    return row


def _recipe(cfg: dict) -> dict:
    if isinstance(cfg.get("recipe"), dict):
        return cfg["recipe"]
    keys = ("epochs", "batch_size", "lr", "dropout", "augment", "strategy", "seed", "split_preset", "limit")
    if cfg.get("strategy") == "linear":  # one convex fit on fixed features: no epochs, batches or dropout
        keys = ("strategy", "image_size", "seed", "split_preset", "limit")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def run_card(name: str, run: Run) -> dict:
    """What the page shows about a run: model, recipe, data, calibration, internal + external metrics."""
    cfg, metrics = run.config, run.metrics or {}
    internal = {s: _metric_row(metrics[s]) for s in ("val", "test") if isinstance(metrics.get(s), dict)}
    external = read_external(run.directory)
    warnings = [f"Not an external validation: '{e['name']}' shares near-duplicate images with the training data "
                f"({e['why']})." for e in external if not e["independent"]]
    if not any(e["independent"] for e in external):
        warnings.append("No external validation: the metrics below come from held-out images of the "
                        "training dataset only. Expect lower accuracy on another hospital's scans.")
    for e in external:  # an interval that includes a coin's accuracy: no evidence the model works there
        acc, ci = e["metrics"].get("accuracy"), e["metrics"].get("ci95", {}).get("accuracy")
        chance = 1 / len(run.classes)
        if acc is not None and ci and ci[0] <= chance <= ci[1]:
            warnings.append(f"External accuracy at chance on {e['name']}: {acc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], "
                            f"the 95% interval includes {chance:.2g}. Do not rely on this run for scans like those.")
    from .calibration import T_BOUNDS, at_bound

    if run.temperature is not None and run.temperature != 1.0 and at_bound(run.temperature):
        warnings.append(f"Calibration: the temperature ({run.temperature:.3g}) sits at the bound of its search "
                        f"{list(T_BOUNDS)}: val was too small or too easy to fit it, and the probabilities shown "
                        "are squeezed towards " + ("0.5." if run.temperature > 1 else "0 and 1."))
    calibration = metrics.get("calibration")
    if isinstance(calibration, dict) and calibration.get("reasons"):  # what `calibrate` recorded
        warnings.append(f"Calibration {calibration.get('status', '')}: " + "; ".join(map(str, calibration["reasons"])))
    if not internal:
        warnings.append("This run has no recorded validation or test metrics.")
    recipe = cfg.get("recipe")
    return {"name": name, "model": cfg.get("model"), "weights": str(cfg.get("weights")),
            "data": cfg.get("data"), "classes": run.classes, "image_size": run.image_size,
            "preprocess": run.preprocess.describe(), "recipe": _recipe(cfg),
            "recipe_name": Path(recipe).name if isinstance(recipe, str) and recipe else None,
            "strategy": cfg.get("strategy", "full"),
            "temperature": run.temperature, "threshold": run.threshold,
            "positive_class": run.classes[1] if len(run.classes) == 2 else None,
            "internal": internal, "external": external, "warnings": warnings,
            "model_card": _model_card(run)}


def _model_card(run: Run) -> str | None:
    """The run's model card as Markdown (``modelcard``), shown on the page; None for a run without a folder."""
    from .modelcard import model_card

    if run.directory is None:
        return None
    try:
        return model_card(run.directory)
    except CTTransferError as exc:
        log.warning("%s: no model card (%s)", run.directory, exc)
        return None


# ---------------------------------------------------------------------------------------------
# Uploads: read lazily, one file at a time, against the request's budget
# ---------------------------------------------------------------------------------------------


def _wanted_member(info: zipfile.ZipInfo) -> bool:
    parts = Path(info.filename).parts
    if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return False
    suffix = Path(info.filename).suffix.lower()
    if info.filename.lower().endswith((".nii", ".nii.gz")):
        return True  # NIfTI volumes
    # DICOM often has no extension, or is named by its UID (1.2.840....123)
    return suffix in D.IMAGE_EXTENSIONS + D.DICOM_EXTENSIONS or suffix == "" or suffix[1:].isdigit()


class Budget:
    """What one request has used so far: files, uncompressed bytes (plain files and zip members
    together, across every zip) and decoded pixels. Counting the whole request, not each zip,
    is what keeps three small zip bombs from adding up."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.images = self.bytes = self.pixels = 0

    def add_images(self, n: int) -> None:
        if self.images + n > self.limits.max_images:
            raise UploadError(f"more than {self.limits.max_images} images in one request; send fewer", 413)
        self.images += n

    def bytes_left(self) -> int:
        return self.limits.max_unpacked_bytes - self.bytes

    def add_bytes(self, n: int, name: str) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_unpacked_bytes:
            raise UploadError(f"{name}: the upload unpacks to more than the {_mb(self.limits.max_unpacked_bytes)} "
                              "allowed per request, all files and zips together (zip bomb?)", 413)

    def take_pixels(self, n: int, name: str) -> None:
        """A file whose pixels would pass the request's budget is refused (the others are answered)."""
        if self.pixels + n > self.limits.max_request_pixels:
            raise CTTransferError(f"{name}: {n:,} px would pass the {self.limits.max_request_pixels:,} px one request "
                                  "may decode; send it in another request")
        self.pixels += n


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def _is_zip(name: str, head: bytes) -> bool:
    return name.lower().endswith(".zip") or (head[:4] == b"PK\x03\x04" and not D.decode.is_dicom_bytes(head))


def _zip_members(fh, name: str, limits: Limits, budget: Budget):
    """The image/DICOM members of a zip, read one at a time with the zip-bomb limits; sizes in the
    header are checked before reading and the bytes actually read are counted while reading."""
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UploadError(f"{name}: not a readable zip file ({' '.join(str(exc).split())})") from None
    if len(infos) > limits.max_zip_members:
        raise UploadError(f"{name}: zip has {len(infos)} entries, more than the {limits.max_zip_members} "
                          "allowed", 413)
    members = [i for i in infos if _wanted_member(i)]
    if not members:
        raise UploadError(f"{name}: zip holds no images or DICOM files")
    budget.add_images(len(members))
    declared = sum(i.file_size for i in members)
    if declared > budget.bytes_left():
        raise UploadError(f"{name}: zip unpacks to {_mb(declared)}, more than the {_mb(budget.bytes_left())} "
                          f"left of the {_mb(limits.max_unpacked_bytes)} allowed per request (zip bomb?)", 413)
    for info in members:
        try:
            with zf.open(info) as member:  # sizes in the header can lie: read at most what is left
                content = member.read(budget.bytes_left() + 1)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError, EOFError) as exc:
            raise UploadError(f"{name}/{info.filename}: cannot read from the zip "
                              f"({' '.join(str(exc).split())})") from None
        budget.add_bytes(len(content), name)
        yield f"{name}/{info.filename}", content
        del content  # before the next member is read: one member's bytes at a time


def iter_uploads(uploads, limits: Limits, budget: Budget):
    """(name, bytes) per image, zips replaced by their members, read lazily so that only one file's
    bytes are held at a time. ``uploads``: (name, file object or bytes) pairs."""
    if not uploads:
        raise UploadError("no file uploaded")
    for name, fh in uploads:
        fh = io.BytesIO(fh) if isinstance(fh, (bytes, bytearray)) else fh
        fh.seek(0)
        head = fh.read(132)
        fh.seek(0)
        if _is_zip(name, head):
            yield from _zip_members(fh, name, limits, budget)
            continue
        budget.add_images(1)
        data = fh.read(budget.bytes_left() + 1)
        budget.add_bytes(len(data), name)
        yield name, data
        del data


DICOM_HEADER_BYTES = 256 * 2**10  # where a DICOM file must state its image size


def declared_pixels(data: bytes, name: str) -> int:
    """The pixels a file will decode to, from its header alone (0 when it cannot tell: the decoder
    then says why the file is unreadable). DICOM: every frame, as the decoder reads them all; its
    size must be stated in the first ``DICOM_HEADER_BYTES`` (Rows and Columns come long before the
    pixels), because pydicom parses a large file without a readable header element by element
    (seconds per MB of zeros) before it can fail."""
    if D.decode.is_dicom_bytes(data) or name.lower().endswith(D.DICOM_EXTENSIONS):
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data[:DICOM_HEADER_BYTES]), stop_before_pixels=True, force=True)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
            samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
        except Exception:  # noqa: BLE001 (a damaged header: see below)
            rows = cols = 0
        if rows and cols:
            return rows * cols * frames * samples
        if len(data) > DICOM_HEADER_BYTES:
            raise CTTransferError(f"{name}: not a readable DICOM file (no image size in its first "
                                  f"{DICOM_HEADER_BYTES // 1024} KB)")
        return 0
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            pixels = image.size[0] * image.size[1]
        # above the per-image limit the decoder refuses the file from its header, with its own message
        return pixels if pixels <= D.decode.MAX_PIXELS else 0
    except Exception:  # noqa: BLE001 (not an image: the decoder says so)
        return 0


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def png_data_url(arr: np.ndarray, max_side: int | None = None) -> str:
    from PIL import Image

    image = Image.fromarray(arr)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bounded(arr: np.ndarray, max_side: int) -> np.ndarray:
    """``arr`` with its longest side at most ``max_side`` (aspect kept; smaller images unchanged)."""
    from PIL import Image

    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR), dtype=np.uint8)


def parse_window_field(text: str | None) -> tuple[float, float] | None:
    """The ``window`` form field, ``WIDTH,LEVEL`` in HU (None or empty: the run's window)."""
    if text is None or not text.strip():
        return None
    try:
        width, level = (float(v) for v in text.split(","))
    except ValueError:
        width = level = float("nan")
    if not (0 < width < 1e5 and abs(level) < 1e5):  # also false for NaN
        raise UploadError(f"window={text[:40]}: give WIDTH,LEVEL in HU, width > 0, e.g. 1500,-600", 400)
    return width, level


def analyse(served: Served, uploads, *, method: str = "gradcam", overlay: bool = True,
            limits: Limits = Limits(), window: tuple[float, float] | None = None) -> dict:
    """Decode, predict (calibrated) and explain uploaded files; per-file problems are listed.
    ``window``: DICOM width/level in HU for this request (default: the run's).

    Memory: files are read and decoded one at a time; each full-resolution image is reduced at once
    to the model's input (what ``predict`` computes from it) and a copy whose longest side is
    ``limits.explain_px`` (what the heat map and overlay are drawn on), so a request holds small
    arrays only, whatever the size of its images. Raises ``UploadError`` (4xx) for the request as a
    whole: over a limit, or no file could be decoded.
    """
    import torch

    if method not in METHODS:
        raise UploadError(f"method={method}: choose {', '.join(METHODS)}", 400)
    from .data.volume import scans_in_items

    run = served.run
    window = tuple(window) if window else tuple(run.preprocess.window)
    budget = Budget(limits)
    inputs, shown, names, sizes, errors, dicom = [], [], [], [], [], []

    def add_slice(name, data):
        try:
            budget.take_pixels(declared_pixels(data, name), name)
            arr = D.decode_any(data, name, window)
            dicom.append(D.decode.is_dicom_bytes(data) or name.lower().endswith(D.DICOM_EXTENSIONS))
        except CTTransferError as exc:
            errors.append({"name": name, "error": " ".join(str(exc).split())})
            return
        inputs.append(run.predictor.load_images([arr]))  # exactly what predict computes from it
        shown.append(bounded(arr, limits.explain_px) if overlay else None)
        names.append(name)
        sizes.append([int(arr.shape[1]), int(arr.shape[0])])

    scan_files = []  # DICOM and NIfTI files: maybe the slices of a scan (kept as bytes, within the budget)
    for name, data in iter_uploads(uploads, limits, budget):
        if D.decode.is_dicom_bytes(data) or name.lower().endswith(D.DICOM_EXTENSIONS + (".nii", ".nii.gz")):
            scan_files.append((name, data))
        else:
            add_slice(name, data)
        del data
    volumes, singles, scan_errors = scans_in_items(scan_files) if scan_files else ([], [], [])
    errors += scan_errors
    for name, data in singles:  # lone DICOM slices stay single images
        add_slice(name, data)
    patients = []
    for volume in volumes:
        try:
            budget.take_pixels(len(volume) * volume.shape[0] * volume.shape[1], volume.name)
            patients.append(analyse_scan(served, volume, method=method, overlay=overlay, limits=limits))
        except UploadError:
            raise
        except CTTransferError as exc:  # e.g. a slice that cannot be decoded
            errors.append({"name": volume.name, "error": " ".join(str(exc).split())})
    del scan_files, singles, volumes
    if not inputs and not patients:
        raise UploadError("; ".join(e["error"] for e in errors[:5]) + (" …" if len(errors) > 5 else ""))
    results = []
    if not inputs:
        return {"run": served.name, "classes": run.classes, "method": method if overlay else None,
                "window": list(window), "threshold": run.threshold, "temperature": run.temperature,
                "positive_class": run.classes[1] if len(run.classes) == 2 else None,
                "results": results, "patients": patients, "errors": errors}
    x = torch.cat(inputs)
    del inputs
    with served.lock:  # one model, shared hooks: one request at a time per run
        predictions = run.predictor.as_predictions(run.predictor.outputs(x, batch_size=limits.model_batch))
        for i, (name, pred) in enumerate(zip(names, predictions)):
            results.append({"name": name, "label": pred.label, "probabilities": pred.probabilities,
                            "shift_score": pred.shift_score, "in_distribution": pred.in_distribution,
                            "size": sizes[i], "dicom": bool(dicom[i]),
                            "input": png_data_url(x[i].permute(1, 2, 0).numpy())})
        if overlay:  # a few at a time: each overlay becomes a small PNG before the next ones are made
            step = limits.explain_batch
            for start in range(0, len(results), step):
                from .explain import overlay_array

                images = shown[start:start + step]
                explanations = run.explain(images, method=method)
                shown[start:start + step] = [None] * len(explanations)
                for row, ex, image in zip(results[start:start + step], explanations, images):
                    # the page stacks the coloured heat map on the image with an opacity the user sets
                    row.update(overlay=png_data_url(ex.overlay, limits.preview_px), explained_class=ex.label,
                               image=png_data_url(image, limits.preview_px),
                               heatmap=png_data_url(overlay_array(image, ex.heatmap, alpha=1.0), limits.preview_px))
    return {"run": served.name, "classes": run.classes, "method": method if overlay else None,
            "window": list(window),
            "threshold": run.threshold, "temperature": run.temperature,
            "positive_class": run.classes[1] if len(run.classes) == 2 else None,
            "shift_guard": None if run.guard is None else {"detector": run.guard.name,
                                                           "threshold": float(run.guard.threshold)},
            "results": results, "patients": patients, "errors": errors}


def analyse_scan(served: Served, volume, *, method: str, overlay: bool, limits: Limits) -> dict:
    """One scan: the patient row, a strip of the slices used (thumbnail, p(positive), label) and the
    heat maps of the ``limits.scan_heatmaps`` slices that speak most for the patient's label."""
    from .data.volume import select_slices
    from .patients import predict_volume

    run = served.run
    selection = select_slices(volume)  # decoding and lung masks: no model, outside the lock
    with served.lock:
        pp = predict_volume(run, volume, selection=selection)
        decisive = pp.decisive(limits.scan_heatmaps)
        arrays = [bounded(volume.rgb(pp.slices[j]["index"], run.preprocess.window), limits.explain_px)
                  for j in decisive]
        explanations = run.explain(arrays, method=method) if overlay and arrays else [None] * len(arrays)
    pos = run.classes[1]
    strip = [{"index": s["index"], "name": s["name"], "position_mm": s["position_mm"],
              "probability": s["probabilities"][pos], "label": s["label"],
              "in_distribution": s["in_distribution"],
              "thumb": png_data_url(run.preprocess.load(volume.rgb(s["index"], run.preprocess.window)), 96)}
             for s in pp.slices]
    heat = []
    for j, ex in zip(decisive, explanations):
        item = {"index": pp.slices[j]["index"], "probability": pp.slices[j]["probabilities"][pos]}
        if ex is not None:
            item.update(overlay=png_data_url(ex.overlay, limits.preview_px), explained_class=ex.label)
        heat.append(item)
    return {"name": volume.name, "patient": pp.patient, "kind": pp.kind, "label": pp.label,
            "probability": pp.probability, "positive_class": pos, "decision": pp.decision,
            "slices_total": pp.n_slices, "slices_used": len(pp.used), "flagged_share": pp.flagged_share,
            "slices": strip, "decisive": heat}


# ---------------------------------------------------------------------------------------------
# The ASGI app
# ---------------------------------------------------------------------------------------------


class Hosts:
    """The ``Host`` names this server answers to: loopback names, the address it is bound to, and
    the names it was asked to allow (``allow_host``). A DNS-rebinding page reaches the server under
    its own name (``Host: evil.example``), which is not among them. An IP literal cannot be
    rebound, so a server bound to every address (``0.0.0.0``) accepts its IP addresses too."""

    LOOPBACK = ("localhost", "127.0.0.1", "::1")

    def __init__(self, bind: str = "127.0.0.1", allow: tuple[str, ...] = ()):
        self.any = "*" in allow
        self.any_ip = bind in ("0.0.0.0", "::", "")
        self.names = {_bare_host(h) for h in (*self.LOOPBACK, bind, *allow) if h and h != "*"}

    def allows(self, host: str) -> bool:
        if self.any or host in self.names or host.endswith(".localhost"):  # *.localhost is loopback in browsers
            return True
        return self.any_ip and _is_ip(host)


def _bare_host(value: str) -> str:
    """``Host`` header or origin netloc -> the lower-case host without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _Guard:
    """Pure ASGI middleware in front of everything:

    - ``Host`` must be a name this server answers to and ``Origin``, when sent, this server's own
      origin (403 otherwise: DNS rebinding, cross-origin posts);
    - uploads (POST) wait for one of ``limits.max_concurrent`` analysis slots *before* their body is
      read, so at most that many bodies are being read and decoded at once (503 after
      ``limits.queue_timeout_s``); a waiting request holds only what the server's socket buffers;
    - the body is capped while it streams in (413) and must keep arriving (408 after
      ``limits.body_idle_s`` without data or ``limits.body_total_s`` in all);
    - any unexpected exception becomes a generic 500 (trace in the server log, never in the response).
    """

    def __init__(self, app, *, limits: Limits, hosts: Hosts):
        self.app, self.limits, self.hosts = app, limits, hosts
        self.max_bytes = limits.max_request_bytes
        self.slots = None  # made in the server's event loop, on first use

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key, value)
        problem = self._refused(headers)
        if problem:
            return await _json(send, 403, problem)
        if scope.get("method") != "POST":
            return await self._handle(scope, receive, send, headers)
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.limits.max_concurrent)
        try:
            await asyncio.wait_for(self.slots.acquire(), self.limits.queue_timeout_s)
        except asyncio.TimeoutError:
            return await _json(send, 503, f"the server is busy with {self.limits.max_concurrent} other uploads "
                                          "for too long; try again in a moment")
        try:
            await self._handle(scope, receive, send, headers)
        finally:
            self.slots.release()

    def _refused(self, headers: dict) -> str | None:
        raw_host = headers.get(b"host")
        host = _bare_host(raw_host.decode("latin-1")) if raw_host is not None else None
        if host is not None and not self.hosts.allows(host):
            shown = " ".join(raw_host.decode("latin-1").split())[:100]
            return (f"Host {shown}: not a name this server answers to (a DNS-rebinding page?); "
                    f"start it with --allow-host {_bare_host(shown) or 'NAME'} to allow it")
        origin = headers.get(b"origin")
        if origin is not None:
            text = " ".join(origin.decode("latin-1").split())[:100]
            scheme, _, netloc = text.partition("://")
            if scheme not in ("http", "https") or raw_host is None or netloc.lower() != raw_host.decode("latin-1").lower():
                return f"Origin {text or 'null'}: requests from another web page's origin are refused"
        return None

    async def _handle(self, scope, receive, send, headers):
        loop = asyncio.get_running_loop()
        started = refused = body_done = False

        async def send_tracked(message):
            nonlocal started
            if refused:  # the 4xx already went out; drop what the app answers to the cut-off body
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await _json(send_tracked, 413, self._too_large())
        seen = 0
        deadline = loop.time() + self.limits.body_total_s

        async def refuse(status, text):
            nonlocal refused
            # answer now: the body parser turns any error of its stream into a generic 400
            if not started and not refused:
                await _json(send_tracked, status, text)
            refused = True
            raise UploadError(text, status)

        async def receive_guarded():
            nonlocal seen, body_done
            if body_done:  # after the body: the app waits for a disconnect, no timeout applies
                return await receive()
            wait = min(self.limits.body_idle_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                await refuse(408, f"the request body arrived too slowly (no data for {self.limits.body_idle_s:g} s, "
                                  f"or not complete within {self.limits.body_total_s:g} s)")
            seen += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.max_bytes:
                await refuse(413, self._too_large())
            return message

        try:
            await self.app(scope, receive_guarded, send_tracked)
        except UploadError:  # the cut-off body, already answered
            pass
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _json(send_tracked, 500, "internal error: the server could not process this request "
                                               "(details are in the server log)")

    def _too_large(self) -> str:
        return f"upload is larger than the {self.max_bytes // 2**20} MB allowed per request"


async def _json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(runs: dict[str, Served], *, limits: Limits = Limits(), hosts: Hosts | None = None):
    """The FastAPI app serving ``runs`` (from ``load_runs``): page, run cards and ``/api/predict``.
    ``hosts``: the ``Host`` names it answers to (default: loopback names only)."""
    require_extras()
    from typing import Literal

    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    from . import __version__

    if not runs:
        raise ConfigError("run", "", "give at least one run directory")
    names = list(runs)
    app = FastAPI(title="ct-transfer serve", version=__version__,
                  description="Classify CT slices with trained ct-transfer runs. Research use only, "
                              "not a medical device.")
    app.add_middleware(_Guard, limits=limits, hosts=hosts or Hosts())

    @app.exception_handler(CTTransferError)
    async def _user_error(request, exc):
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=getattr(exc, "status", 422))

    @app.exception_handler(RequestValidationError)
    async def _bad_field(request, exc):  # one line, like every other refusal: "method: Input should be ..."
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": " ".join("; ".join(parts).split())[:500]}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/api/health", summary="Liveness: the names of the runs served")
    async def health():
        return {"status": "ok", "runs": names}

    @app.get("/api/runs", summary="The card of every run: model, recipe, data, calibration, metrics")
    async def cards():
        return {"runs": [runs[n].card for n in names],
                "limits": {"max_request_mb": limits.max_request_bytes / 2**20, "max_images": limits.max_images,
                           "max_pixels": D.decode.MAX_PIXELS},
                "methods": EXPLAINERS.describe()}  # the page lists the registered explanation methods

    @app.get("/api/options", summary="Every registered choice (crops, strategies, methods, ...) with its help")
    async def options():
        from .registry import ALL

        return {kind: reg.describe() for kind, reg in ALL.items()}

    models = _api_models()
    problem = {"model": models["Problem"]}

    @app.post("/api/predict", summary="Classify uploaded images, DICOM files or zips of them",
              response_model=models["Answer"],
              responses={400: problem, 404: problem, 413: problem, 422: problem, 500: problem})
    async def predict(files: list[UploadFile] = File(..., description="PNG/JPEG/TIFF/DICOM/NIfTI files or .zip"),
                      run: str | None = Form(None, description=f"run name (default: the first: {names[0]})"),
                      method: Literal[tuple(METHODS)] = Form("gradcam"),
                      overlay: bool = Form(True, description="compute the heat-map overlay"),
                      window: str | None = Form(None, description="DICOM window WIDTH,LEVEL in HU, e.g. "
                                                                  "400,40 (default: the run's, lung 1500,-600)")):
        """Per file: predicted class (calibrated decision), class probabilities, the preprocessed input
        (PNG data URL) and the heat-map overlay. Files that cannot be decoded are listed in ``errors``;
        when none can be, the answer is 422. Limits: 413."""
        served = runs.get(run or names[0])
        if served is None:
            raise UploadError(f"run={run}: not served here; choose {', '.join(names)}", 404)
        # the parts stay where Starlette put them (memory, or a spooled temp file above 1 MB) and are
        # read one at a time by ``analyse`` in a worker thread, never all at once
        wl = parse_window_field(window)  # a bad window is refused before any decoding
        uploads = [(Path(f.filename or "upload").name or "upload", f.file) for f in files]
        try:
            return await run_in_threadpool(analyse, served, uploads, method=method, overlay=overlay, limits=limits,
                                           window=wl)
        finally:
            for f in files:
                await f.close()

    return app


def _api_models() -> dict:
    """The documented shapes of ``/api/predict`` (OpenAPI at ``/openapi.json`` and ``/docs``)."""
    from pydantic import BaseModel, Field

    class Result(BaseModel):
        name: str = Field(description="file name (zip members: archive.zip/inner/path)")
        label: str = Field(description="predicted class: argmax, or p(positive) >= threshold when one is set")
        probabilities: dict[str, float] = Field(description="calibrated (softmax of logits / temperature)")
        size: list[int] = Field(description="decoded width and height in px")
        input: str = Field(description="the model's input (decoded, DICOM windowed, resized) as a PNG data URL")
        overlay: str | None = Field(None, description="heat map over the image, PNG data URL (overlay=true)")
        explained_class: str | None = Field(None, description="the class the heat map explains (the predicted one)")
        shift_score: float | None = Field(None, description="shift guard score (higher: less like the training "
                                                             "images); null when the run has no guard")
        in_distribution: bool | None = Field(None, description="false: unlike the training images, do not trust "
                                                               "the label; null when the run has no guard")
        dicom: bool = Field(False, description="a DICOM file (window applies)")
        image: str | None = Field(None, description="the decoded image, PNG data URL (overlay=true)")
        heatmap: str | None = Field(None, description="the heat map alone, jet colours, PNG data URL (overlay=true)")

    class FileError(BaseModel):
        name: str
        error: str = Field(description="one-line reason, e.g. 'x.dcm: DICOM modality is MR, not CT'")

    class ScanSlice(BaseModel):
        index: int = Field(description="slice index in scan order (0 = most inferior)")
        name: str
        position_mm: float | None = Field(None, description="position along the scan axis")
        probability: float = Field(description="calibrated p(positive class) of this slice")
        label: str = Field(description="the slice's own decision (the run's slice threshold)")
        in_distribution: bool | None = Field(None, description="shift guard's verdict; null without a guard")
        thumb: str = Field(description="the model's input for this slice, PNG data URL (<= 96 px)")

    class Decisive(BaseModel):
        index: int
        probability: float
        overlay: str | None = Field(None, description="heat map over the slice, PNG data URL (overlay=true)")
        explained_class: str | None = None

    class Patient(BaseModel):
        name: str = Field(description="the scan: upload name, zip folder, series")
        patient: str = Field(description="PatientID of the DICOM files, else the scan's name")
        kind: str = Field(description="dicom-series | dicom-multiframe | nifti")
        label: str = Field(description="patient decision: aggregated probability >= the patient threshold")
        probability: float = Field(description="aggregated p(positive class)")
        positive_class: str
        decision: str = Field(description="aggregator and patient-level threshold")
        slices_total: int
        slices_used: int = Field(description="lung slices used (at most 64, evenly spaced)")
        flagged_share: float | None = Field(None, description="share of used slices the shift guard flags")
        slices: list[ScanSlice]
        decisive: list[Decisive] = Field(description="the slices that speak most for the label, with heat maps")

    class Answer(BaseModel):
        run: str
        classes: list[str]
        method: str | None = Field(description="explanation method, null when overlay=false")
        threshold: float | None = Field(description="decision threshold on p(positive_class); null = argmax")
        temperature: float
        positive_class: str | None
        shift_guard: dict | None = Field(None, description="{detector, threshold} of the run's shift guard; "
                                         "null: the run has none (fit one with `ct-transfer guard`)")
        window: list[float] = Field(description="DICOM window used, [width, level] in HU")
        results: list[Result]
        patients: list[Patient] = Field([], description="scans (DICOM series, multi-frame DICOM, NIfTI): one each")
        errors: list[FileError] = Field(description="files that could not be decoded (the others are answered)")

    class Problem(BaseModel):
        detail: str = Field(description="one-line message for the user")

    return {"Answer": Answer, "Problem": Problem}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bind(host: str, port: int) -> None:
    """A taken port or an unknown host is a one-line error now, not uvicorn's exit after start-up."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError("host", host, f"cannot resolve ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError("port", port, f"cannot listen on {host}:{port} ({exc.strerror or exc}; "
                                  "is another server running there?)") from None


def _http_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn times out idle
    keep-alive connections, but not one that never finishes sending its headers (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _headers_deadline = None
        _waiting_cycle = None

        def _arm(self):
            self._disarm()
            self._waiting_cycle = self.cycle
            self._headers_deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self):
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
                self._headers_deadline = None

        def _too_slow(self):
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data):
            super().data_received(data)
            if self.cycle is not self._waiting_cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return Protocol


def check_allowed_hosts(names) -> tuple[str, ...]:
    """``--allow-host`` values: host names or addresses (no scheme, path or port), or ``*`` for any."""
    out = []
    for name in names or ():
        bare = _bare_host(str(name))
        if name != "*" and (not bare or any(c in str(name) for c in "/@ \t?#") or ":" in bare and not _is_ip(bare)):
            raise ConfigError("allow_host", name, "give a host name or address (e.g. ct.lab.example), "
                                                  "without scheme, port or path, or * for any")
        out.append("*" if name == "*" else bare)
    return tuple(out)


def serve(run_paths, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          allow_hosts: tuple[str, ...] = ()) -> None:
    """Load the runs once and serve them until interrupted. ``allow_hosts``: names besides the
    loopback names and ``host`` that browsers may use to reach the server (``*``: any)."""
    require_extras()
    import uvicorn

    if not 0 < port < 65536:
        raise ConfigError("port", port, "choose 1..65535")
    hosts = Hosts(host, check_allowed_hosts(allow_hosts))
    _check_bind(host, port)  # before the slow model loading
    app = create_app(load_runs(run_paths), limits=limits, hosts=hosts)
    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine can upload scans (no login, no TLS)", host)
    log.info("ct-transfer serve: http://%s:%d/ (API docs at /docs); Ctrl+C stops", host, port)
    uvicorn.Server(server_config(app, host=host, port=port, limits=limits)).run()


def server_config(app, *, host: str, port: int, limits: Limits = Limits()):
    """uvicorn's configuration for ``app``: the header deadline, keep-alive and connection limits."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          http=_http_protocol(limits.header_timeout_s), timeout_keep_alive=limits.keep_alive_s,
                          limit_concurrency=limits.max_connections)
