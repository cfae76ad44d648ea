"""``ct-transfer serve``: a small local web page (and JSON API) to try trained runs on scans.

Why FastAPI (on Starlette) + uvicorn rather than Gradio: a few small packages (FastAPI, Starlette,
uvicorn, pydantic, python-multipart) instead of Gradio's large dependency tree and bundled front end; a
plain HTML + vanilla JS page we control (no npm build; the page loads nothing from the internet);
the OpenAPI description of ``POST /api/predict`` comes for free (``/openapi.json``; the ``/docs``
viewer loads Swagger UI from a CDN, so it needs a connection); and the app is an
ordinary ASGI object, so tests run the real server on a loopback port and drive it with any HTTP
client or a real browser.

Safety: binds to 127.0.0.1 unless told otherwise; the request body is capped while it streams in
(413); zips are checked for member count and declared and actual uncompressed size before and
while reading (zip bombs); images larger than ``data.decode.MAX_PIXELS`` are refused from their
header (decompression bombs); uploads are held in memory, or for large multipart parts in the
anonymous spooled temp files of Starlette (removed on close), never written anywhere else; every
user-fixable problem is a one-line message with a 4xx status, and any other failure is logged
here with its trace while the browser gets a generic 500 message.

Concurrency: each run has one lock around inference and explanation (pytorch-grad-cam's hooks
on the shared model are not thread-safe); decoding runs outside the lock in the thread pool.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at runtime and
# they name classes imported inside create_app
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
    """What one request may carry. Pixel limits come from the decoder (``D.decode.MAX_PIXELS``)."""

    max_request_bytes: int = 100 * 2**20  # whole multipart body
    max_images: int = 200  # files, zip members included, per request
    max_zip_members: int = 2000  # entries in one zip, folders and skipped files included
    max_zip_bytes: int = 512 * 2**20  # uncompressed total of one zip
    preview_px: int = 320  # longest side of the overlay sent back


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
    return {k: cfg[k] for k in keys if k in cfg}


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
    if not internal:
        warnings.append("This run has no recorded validation or test metrics.")
    return {"name": name, "model": cfg.get("model"), "weights": str(cfg.get("weights")),
            "data": cfg.get("data"), "classes": run.classes, "image_size": run.image_size,
            "preprocess": run.preprocess.describe(), "recipe": _recipe(cfg),
            "temperature": run.temperature, "threshold": run.threshold,
            "positive_class": run.classes[1] if len(run.classes) == 2 else None,
            "internal": internal, "external": external, "warnings": warnings}


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def _wanted_member(info: zipfile.ZipInfo) -> bool:
    parts = Path(info.filename).parts
    if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return False
    suffix = Path(info.filename).suffix.lower()
    return suffix in D.IMAGE_EXTENSIONS + D.DICOM_EXTENSIONS or suffix == ""  # DICOM often has none


def expand_zip(data: bytes, name: str, limits: Limits) -> list[tuple[str, bytes]]:
    """The image/DICOM members of a zip, read in memory with the zip-bomb limits."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UploadError(f"{name}: not a readable zip file ({exc})") from None
    if len(infos) > limits.max_zip_members:
        raise UploadError(f"{name}: zip has {len(infos)} entries, more than the {limits.max_zip_members} "
                          "allowed", 413)
    members = [i for i in infos if _wanted_member(i)]
    declared = sum(i.file_size for i in members)
    if declared > limits.max_zip_bytes:
        raise UploadError(f"{name}: zip unpacks to {declared / 2**20:.0f} MB, more than the "
                          f"{limits.max_zip_bytes // 2**20} MB allowed (zip bomb?)", 413)
    out, total = [], 0
    for info in members:
        try:
            with zf.open(info) as fh:  # sizes in the header can lie: read at most what is left
                content = fh.read(limits.max_zip_bytes - total + 1)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise UploadError(f"{name}/{info.filename}: cannot read from the zip ({exc})") from None
        total += len(content)
        if total > limits.max_zip_bytes:
            raise UploadError(f"{name}: zip unpacks to more than the {limits.max_zip_bytes // 2**20} MB "
                              "allowed (zip bomb?)", 413)
        out.append((f"{name}/{info.filename}", content))
    if not out:
        raise UploadError(f"{name}: zip holds no images or DICOM files")
    return out


def expand_uploads(files: list[tuple[str, bytes]], limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) per uploaded file, zips replaced by their image members."""
    if not files:
        raise UploadError("no file uploaded")
    items = []
    for name, data in files:
        if name.lower().endswith(".zip") or (data[:4] == b"PK\x03\x04" and not D.decode.is_dicom_bytes(data)):
            items.extend(expand_zip(data, name, limits))
        else:
            items.append((name, data))
        if len(items) > limits.max_images:
            raise UploadError(f"more than {limits.max_images} images in one request; send fewer", 413)
    return items


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


def analyse(served: Served, items: list[tuple[str, bytes]], *, method: str = "gradcam", overlay: bool = True,
            limits: Limits = Limits()) -> dict:
    """Decode, predict (calibrated) and explain uploaded files; per-file decoding errors are listed.

    Raises ``UploadError`` (422) when no file could be decoded.
    """
    if method not in METHODS:
        raise UploadError(f"method={method}: choose {', '.join(METHODS)}", 400)
    run = served.run
    arrays, names, errors = [], [], []
    for name, data in items:
        try:
            arrays.append(D.decode_any(data, name, run.preprocess.window))
            names.append(name)
        except CTTransferError as exc:
            errors.append({"name": name, "error": " ".join(str(exc).split())})
    if not arrays:
        raise UploadError("; ".join(e["error"] for e in errors[:5]) + (" …" if len(errors) > 5 else ""))
    with served.lock:  # one model, shared hooks: one request at a time per run
        outputs = run.predictor.predict_outputs(arrays)
        explanations = run.explain(arrays, method=method) if overlay else [None] * len(arrays)
    results = []
    for name, arr, pred, ex in zip(names, arrays, run.predictor.as_predictions(outputs), explanations):
        row = {"name": name, "label": pred.label, "probabilities": pred.probabilities,
               "shift_score": pred.shift_score, "in_distribution": pred.in_distribution,
               "size": [int(arr.shape[1]), int(arr.shape[0])],
               "input": png_data_url(run.preprocess.load(arr))}
        if ex is not None:
            row.update(overlay=png_data_url(ex.overlay, limits.preview_px), explained_class=ex.label)
        results.append(row)
    return {"run": served.name, "classes": run.classes, "method": method if overlay else None,
            "threshold": run.threshold, "temperature": run.temperature,
            "positive_class": run.classes[1] if len(run.classes) == 2 else None,
            "results": results, "errors": errors}


# ---------------------------------------------------------------------------------------------
# The ASGI app
# ---------------------------------------------------------------------------------------------


class _Guard:
    """Pure ASGI middleware: caps the request body while it streams in (413) and turns any
    unexpected exception into a generic 500 (trace in the server log, never in the response)."""

    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = refused = False

        async def send_tracked(message):
            nonlocal started
            if refused:  # the 413 already went out; drop what the app answers to the cut-off body
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await _json(send_tracked, 413, self._too_large())
        seen = 0

        async def receive_capped():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not refused:
                # answer now: the body parser turns any error of its stream into a generic 400
                if not started:
                    await _json(send_tracked, 413, self._too_large())
                refused = True
                raise UploadError(self._too_large(), 413)
            return message

        try:
            await self.app(scope, receive_capped, send_tracked)
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


def create_app(runs: dict[str, Served], *, limits: Limits = Limits()):
    """The FastAPI app serving ``runs`` (from ``load_runs``): page, run cards and ``/api/predict``."""
    require_extras()
    from typing import Literal

    from fastapi import FastAPI, File, Form, UploadFile
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
    app.add_middleware(_Guard, max_bytes=limits.max_request_bytes)

    @app.exception_handler(CTTransferError)
    async def _user_error(request, exc):
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=getattr(exc, "status", 422))

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
    async def predict(files: list[UploadFile] = File(..., description="PNG/JPEG/TIFF/DICOM files or .zip"),
                      run: str | None = Form(None, description=f"run name (default: the first: {names[0]})"),
                      method: Literal[tuple(METHODS)] = Form("gradcam"),
                      overlay: bool = Form(True, description="compute the heat-map overlay")):
        """Per file: predicted class (calibrated decision), class probabilities, the preprocessed input
        (PNG data URL) and the heat-map overlay. Files that cannot be decoded are listed in ``errors``;
        when none can be, the answer is 422. Limits: 413."""
        served = runs.get(run or names[0])
        if served is None:
            raise UploadError(f"run={run}: not served here; choose {', '.join(names)}", 404)
        try:
            uploaded = [(Path(f.filename or "upload").name or "upload", await f.read()) for f in files]
        finally:
            for f in files:
                await f.close()
        items = expand_uploads(uploaded, limits)
        return await run_in_threadpool(analyse, served, items, method=method, overlay=overlay, limits=limits)

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

    class FileError(BaseModel):
        name: str
        error: str = Field(description="one-line reason, e.g. 'x.dcm: DICOM modality is MR, not CT'")

    class Answer(BaseModel):
        run: str
        classes: list[str]
        method: str | None = Field(description="explanation method, null when overlay=false")
        threshold: float | None = Field(description="decision threshold on p(positive_class); null = argmax")
        temperature: float
        positive_class: str | None
        results: list[Result]
        errors: list[FileError] = Field(description="files that could not be decoded (the others are answered)")

    class Problem(BaseModel):
        detail: str | list[dict] = Field(description="one-line message for the user (a list of field errors "
                                                      "when a form field itself is malformed)")

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


def serve(run_paths, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()) -> None:
    """Load the runs once and serve them until interrupted."""
    require_extras()
    import uvicorn

    if not 0 < port < 65536:
        raise ConfigError("port", port, "choose 1..65535")
    _check_bind(host, port)  # before the slow model loading
    app = create_app(load_runs(run_paths), limits=limits)
    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine can upload scans (no login, no TLS)", host)
    log.info("ct-transfer serve: http://%s:%d/ (API docs at /docs); Ctrl+C stops", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
