"""`ct-transfer serve`: the real server (the CLI in a subprocess on a free loopback port) driven by an
HTTP client and by a real headless browser (Playwright + Debian's chromium), on a real trained run,
real dataset slices and pydicom's real CT slice."""

from __future__ import annotations

import base64
import csv
import io
import logging
import os
import shutil
import socket
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from ct_transfer import _io
from ct_transfer.cli import build_parser, main
from ct_transfer.evaluate import compute_metrics
from ct_transfer.run import load_run

from .serving import free_port, memory_mb, reset_peak, serve_process, zero_png, zero_zip

ROOT = Path(__file__).resolve().parents[1]
CT = get_testdata_file("CT_small.dcm")
UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
CHROMIUM = Path(os.environ.get("CT_TRANSFER_CHROMIUM", "/usr/bin/chromium"))
MAX_UPLOAD_MB = 8  # the test server's request limit (--max-upload-mb)
CALIBRATION = {"temperature": 2.0, "threshold": 0.8}


# ---------------------------------------------------------------------------------------------
# Runs, server, inputs
# ---------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    p = k / n
    centre, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


@pytest.fixture(scope="module")
def runs(trained_run, tmp_path_factory):
    """Two served runs made from the session's trained run (copied, never changed in place):
    ``plain`` (no calibration, no external validation) and ``calibrated`` (temperature 2,
    threshold 0.8, and an external result measured here on 20 real UCSD val images)."""
    root = tmp_path_factory.mktemp("served")
    plain, calibrated = root / "plain", root / "calibrated"
    shutil.copytree(trained_run[0], plain)
    shutil.copytree(trained_run[0], calibrated)
    cfg = _io.read_json(calibrated / "config.json")
    # "paper": the recipe of TrainConfig's defaults, which the fixture's run used (with its epochs/limit)
    _io.write_json(calibrated / "config.json", {**cfg, "calibration": CALIBRATION, "recipe": "paper"})
    run = load_run(calibrated)
    rows = [r for r in _io.read_csv(UCSD / "SPLIT.csv") if r["subset"] == "val"]
    picked = [r for c in ("COVID", "non-COVID") for r in [r for r in rows if r["class"] == c][:10]]
    y = np.array([run.classes.index(r["class"]) for r in picked])
    proba = run.predict_proba([str(UCSD / r["path"]) for r in picked])
    m = compute_metrics(y, proba, run.classes)
    m["ci95"] = {"accuracy": wilson(int(round(m["accuracy"] * m["n"])), m["n"])}
    (calibrated / "external" / "ucsd-val-20").mkdir(parents=True)
    _io.write_json(calibrated / "external" / "ucsd-val-20" / "metrics.json",
                   {"name": "ucsd-val-20", "data": str(UCSD), "metrics": m})
    return {"plain": plain, "calibrated": calibrated, "external": m}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`ct-transfer serve` in a subprocess: its own TMPDIR (checked empty later) and a small upload limit."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
    with serve_process([runs["plain"], runs["calibrated"]], log_path=log_path, env={"TMPDIR": str(tmp)},
                       args=["--max-upload-mb", MAX_UPLOAD_MB], start_timeout=120) as srv:
        yield {**srv, "tmp": tmp}


@pytest.fixture(scope="module")
def slices(data_dir):
    return [sorted((data_dir / c).iterdir())[i] for c in ("COVID", "non-COVID") for i in (0, 5)]


def post(server, files, timeout=120, **form):
    """multipart POST /api/predict; ``files``: paths or (name, bytes)."""
    parts = []
    for f in files:
        name, data = (f.name, f.read_bytes()) if isinstance(f, Path) else f
        parts.append(("files", (name, data, "application/octet-stream")))
    return httpx.post(server["url"] + "/api/predict", files=parts, data=form, timeout=timeout)


def probs(result, classes):
    return [result["probabilities"][c] for c in classes]


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb's signature)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def mr_dicom() -> bytes:
    ds = pydicom.dcmread(CT)
    ds.Modality = "MR"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def chance_warnings(runs) -> list[str]:
    """The card's warning for the calibrated run's 20 external images: at chance when the accuracy's
    95% interval includes 0.5 (20 images give a wide interval; computed, not assumed)."""
    lo, hi = runs["external"]["ci95"]["accuracy"]
    if not lo <= 0.5 <= hi:
        return []
    return [f"External accuracy at chance on ucsd-val-20: {runs['external']['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], "
            "the 95% interval includes 0.5. Do not rely on this run for scans like those."]


def cli_predict(run_dir, files, tmp_path):
    out = tmp_path / "cli.csv"
    assert main(["predict", "--run", str(run_dir), *map(str, files), "--out", str(out)]) == 0
    return {Path(r["path"]).name: r for r in csv.DictReader(open(out))}


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------


def test_api_equals_cli_predict_on_slices_and_dicom(server, runs, slices, tmp_path):
    files = [*slices, Path(CT)]
    resp = post(server, files, run="plain", overlay="false")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["errors"] == [] and body["threshold"] is None and body["temperature"] == 1.0
    cli = cli_predict(runs["plain"], files, tmp_path)
    run = load_run(runs["plain"])
    assert [r["name"] for r in body["results"]] == [f.name for f in files]
    for r, f in zip(body["results"], files):
        expected = cli[f.name]
        np.testing.assert_allclose(probs(r, run.classes), [float(expected[f"prob_{c}"]) for c in run.classes],
                                   atol=1e-5)
        assert r["label"] == expected["pred"]
        assert r["overlay"] is None
        # the preprocessed input shown is exactly what the model saw
        np.testing.assert_array_equal(decode_data_url(r["input"]), run.preprocess.load(str(f)))
    assert body["results"][-1]["size"] == [128, 128]  # CT_small.dcm


def test_calibrated_run_and_cards(server, runs, slices):
    body = post(server, slices, run="calibrated", overlay="false").json()
    run = load_run(runs["calibrated"])
    assert run.temperature == 2.0 and run.threshold == 0.8
    assert body["threshold"] == 0.8 and body["temperature"] == 2.0 and body["positive_class"] == "COVID"
    expected = run.predict(slices)
    for r, e in zip(body["results"], expected):
        np.testing.assert_allclose(probs(r, run.classes), [e.probabilities[c] for c in run.classes], atol=1e-5)
        assert r["label"] == e.label == run.decide(probs(r, run.classes))
    plain = post(server, slices, run="plain", overlay="false").json()
    assert not np.allclose([probs(r, run.classes) for r in plain["results"]],
                           [probs(r, run.classes) for r in body["results"]])  # temperature changed them

    api = httpx.get(server["url"] + "/openapi.json").json()
    form = api["components"]["schemas"]["Body_predict_api_predict_post"]["properties"]
    assert set(form) == {"files", "run", "method", "overlay", "window"}
    assert {"200", "413", "422", "500"} <= set(api["paths"]["/api/predict"]["post"]["responses"])

    cards = {c["name"]: c for c in httpx.get(server["url"] + "/api/runs").json()["runs"]}
    assert list(cards) == ["plain", "calibrated"]
    assert cards["plain"]["external"] == [] and "No external validation" in cards["plain"]["warnings"][0]
    assert cards["plain"]["internal"]["test"]["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])
    ext = cards["calibrated"]["external"]
    assert cards["calibrated"]["warnings"] == chance_warnings(runs) and [e["name"] for e in ext] == ["ucsd-val-20"]
    assert cards["plain"]["recipe_name"] is None and cards["calibrated"]["recipe_name"] == "paper"
    assert ext[0]["metrics"]["accuracy"] == pytest.approx(runs["external"]["accuracy"])
    assert ext[0]["metrics"]["n"] == 20 and ext[0]["metrics"]["ci95"]["accuracy"] == pytest.approx(
        runs["external"]["ci95"]["accuracy"])
    assert cards["calibrated"]["model"] == "EfficientNetLite0" and cards["calibrated"]["recipe"]["epochs"] == 2
    # each card carries the run's model card: the plain run says plainly it has no external validation
    plain_card = cards["plain"]["model_card"]
    assert plain_card.startswith("# Model card: plain") and "external validation (no other hospital" in plain_card


def test_overlays_for_every_method(server, runs, slices):
    run = load_run(runs["plain"])
    for method in ("gradcam", "gradcampp", "cam", "lrp"):
        body = post(server, slices[:1], run="plain", method=method).json()
        r = body["results"][0]
        assert body["method"] == method
        ex = run.explain(str(slices[0]), method=method)
        expected = Image.fromarray(ex.overlay)
        expected.thumbnail((320, 320), Image.BILINEAR)
        # the server is another process (its own torch threads): gradients may differ in the last
        # float bits, which can move a few overlay pixels by a grey level or two after rounding
        got = decode_data_url(r["overlay"]).astype(int)
        assert got.shape == np.asarray(expected).shape
        assert np.abs(got - np.asarray(expected).astype(int)).max() <= 4
        assert r["explained_class"] == ex.label


def test_zip_of_a_folder(server, slices):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in slices:
            zf.write(f, f"scans/{f.parent.name}/{f.name}")
        zf.write(CT, "scans/dicom/IM0001")  # DICOM files often have no extension
        zf.writestr("scans/README.txt", "not an image: skipped")
        zf.writestr("__MACOSX/scans/._x.png", "resource fork: skipped")
    body = post(server, [("folder.zip", buf.getvalue())], run="plain", overlay="false").json()
    single = post(server, [*slices, Path(CT)], run="plain", overlay="false").json()
    assert [r["name"] for r in body["results"]] == [f"folder.zip/scans/{f.parent.name}/{f.name}" for f in slices] + [
        "folder.zip/scans/dicom/IM0001"]
    for a, b in zip(body["results"], single["results"]):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_bad_uploads_are_4xx_with_a_message_and_the_server_keeps_serving(server, slices):
    truncated = slices[0].read_bytes()[:3000]
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(2001):
            zf.writestr(f"x/{i}.png", b"")
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.dcm", "w", force_zip64=True) as fh:
            block = bytes(2**24)
            for _ in range(33):  # 528 MB of zeros, ~0.5 MB compressed
                fh.write(block)
    cases = [
        ("truncated.png", truncated, 422, "truncated.png: cannot decode image"),
        ("notes.txt", b"these are not pixels", 422, "notes.txt: not an image file"),
        ("knee.dcm", mr_dicom(), 422, "knee.dcm: DICOM modality is MR, not CT"),
        ("bomb.png", png_claiming(10_000, 10_000), 422, "more than the 40,000,000 px allowed (decompression bomb?)"),
        ("bigger-bomb.png", png_claiming(100_000, 100_000), 422, "decompression bomb"),
        ("many.zip", many.getvalue(), 413, "many.zip: zip has 2001 entries"),
        ("zeros.zip", huge.getvalue(), 413, ("zeros.zip: zip unpacks to 528 MB, more than the 256 MB left of the "
                                             "256 MB allowed per request")),
        ("broken.zip", b"PK\x03\x04" + bytes(100), 422, "broken.zip: not a readable zip file"),
        ("large.png", os.urandom((MAX_UPLOAD_MB + 1) * 2**20), 413, f"larger than the {MAX_UPLOAD_MB} MB allowed"),
    ]
    for name, data, status, message in cases:
        resp = post(server, [(name, data)], run="plain")
        assert resp.status_code == status, (name, resp.text)
        detail = resp.json()["detail"]
        assert message in detail, (name, detail)
        assert "Traceback" not in resp.text and "\n" not in detail
        assert httpx.get(server["url"] + "/api/health").json()["status"] == "ok"
    # a chunked body (no Content-Length) is cut off while it streams in
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="stream.png"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB + 1):
            yield os.urandom(2**20)
        yield b"\r\n--b--\r\n"
    resp = httpx.post(server["url"] + "/api/predict", content=chunks(), timeout=60,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    assert resp.request.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.request.headers
    assert resp.status_code == 413 and f"larger than the {MAX_UPLOAD_MB} MB" in resp.json()["detail"]
    # one bad file among good ones: the good ones are answered, the bad one is listed
    body = post(server, [slices[0], ("knee.dcm", mr_dicom())], run="plain", overlay="false").json()
    assert [r["name"] for r in body["results"]] == [slices[0].name]
    assert body["errors"] == [{"name": "knee.dcm", "error": "knee.dcm: DICOM modality is MR, not CT"}]
    # unknown run / method: 4xx with a message
    assert post(server, slices[:1], run="nope").status_code == 404
    resp = post(server, slices[:1], method="saliency")
    assert resp.status_code == 422 and "gradcam" in resp.text
    assert post(server, slices[:1]).status_code == 200


def test_concurrent_requests_do_not_mix_results(server, data_dir):
    files = [sorted((data_dir / c).iterdir())[i] for c in ("COVID", "non-COVID") for i in range(20, 25)]
    files = files * 2  # 20 requests

    def one(f):
        body = post(server, [f], run="plain", method="gradcam").json()
        return body["results"][0]

    sequential = [one(f) for f in files[:10]]
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent = list(pool.map(one, files))
    for i, r in enumerate(concurrent):
        expected = sequential[i % 10]
        assert r["name"] == expected["name"]
        assert r["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert r["label"] == expected["label"] and r["input"] == expected["input"]
        np.testing.assert_allclose(decode_data_url(r["overlay"]).astype(int),
                                   decode_data_url(expected["overlay"]).astype(int), atol=1)


def test_uploads_leave_no_files_and_no_traceback(server, slices):
    # > 1 MB: Starlette spools this part to a temp file (in the server's TMPDIR), removed on close
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(30):
            zf.write(slices[i % len(slices)], f"batch/{i}_{slices[i % len(slices)].name}")
    assert len(buf.getvalue()) > 2**20
    assert post(server, [("batch.zip", buf.getvalue())], overlay="false").status_code == 200
    assert list(server["tmp"].iterdir()) == []
    assert "Traceback" not in server["log"].read_text()


def test_unexpected_errors_are_a_generic_500_logged_on_the_server(runs, slices):
    import torch
    import uvicorn

    from ct_transfer.serve import Served, create_app

    run = load_run(runs["plain"])
    run.model.fc = torch.nn.Linear(3, 2)  # a broken model: torch raises a shape error inside inference
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ct_transfer.serve").addHandler(handler)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app({"broken": Served("broken", run)}), host="127.0.0.1",
                                       port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        resp = post({"url": f"http://127.0.0.1:{port}"}, slices[:1])
        assert resp.status_code == 500
        assert resp.json() == {"detail": "internal error: the server could not process this request "
                                         "(details are in the server log)"}
        assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in records)
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        logging.getLogger("ct_transfer.serve").removeHandler(handler)


def test_cli_errors_and_safe_default(monkeypatch, capsys, runs):
    assert build_parser().parse_args(["serve", "--run", "x"]).host == "127.0.0.1"
    assert main(["serve", "--run", str(runs["plain"]), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "ct-transfer: error: --port 70000: choose 1..65535"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--run", str(runs["plain"]), "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"ct-transfer: error: --port {port}: cannot listen on 127.0.0.1:{port}")
    assert main(["serve", "--run", "/nonexistent/run"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    from ct_transfer import serve as S

    real = S.find_spec
    monkeypatch.setattr(S, "find_spec", lambda name: None if name == "fastapi" else real(name))
    assert main(["serve", "--run", str(runs["plain"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ct-transfer: error: ct-transfer serve needs FastAPI and uvicorn: "
                          "pip install 'ct-transfer[serve]'") and "\n" not in err


# ---------------------------------------------------------------------------------------------
# Browser
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--no-first-run"])
        yield b
        b.close()


def test_browser_upload_predict_sort_csv_and_errors(browser, server, runs, slices, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_selector("#card h2")
    assert page.inner_text("#card h2") == "Run plain"
    assert "No external validation" in page.inner_text("#card .warning")
    assert page.locator("#card table.metrics tbody tr").count() == 2  # internal val, test

    files = [*slices, Path(CT)]
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 5", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    cli = cli_predict(runs["plain"], files, tmp_path)
    rows = page.locator("#results tbody tr")
    shown = {rows.nth(i).locator("td.file").inner_text(): rows.nth(i) for i in range(5)}
    assert set(shown) == {f.name for f in files}
    for name, row in shown.items():
        assert row.locator("td.pred").inner_text() == cli[name]["pred"]
        assert float(row.locator("td.prob[data-class='COVID']").inner_text()) == pytest.approx(
            float(cli[name]["prob_COVID"]), abs=1e-4)
        assert row.locator("td.rule").inner_text() == "argmax"
    widths = page.eval_on_selector_all("#results img.overlay", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 5 and all(w > 0 for w in widths)
    assert page.eval_on_selector_all("#results img.input", "els => els.map(e => e.naturalWidth)") == [64] * 5

    screenshot = os.environ.get("CT_TRANSFER_SCREENSHOT")  # docs/serve.png is made with this set
    page.screenshot(path=screenshot or str(tmp_path / "serve.png"), full_page=True)

    # sort by p(COVID): ascending, then descending
    page.click("th[data-key='p:COVID']")
    values = [float(t) for t in page.locator("#results td.prob[data-class='COVID']").all_inner_texts()]
    assert values == sorted(values)
    page.click("th[data-key='p:COVID']")
    values = [float(t) for t in page.locator("#results td.prob[data-class='COVID']").all_inner_texts()]
    assert values == sorted(values, reverse=True)

    with page.expect_download() as download:
        page.click("#csv")
    table = list(csv.DictReader(open(download.value.path())))
    assert sorted(r["file"] for r in table) == sorted(f.name for f in files)
    for r in table:
        assert float(r["prob_COVID"]) == pytest.approx(float(cli[r["file"]]["prob_COVID"]), abs=1e-5)

    # bad uploads: a message on the page, the results stay, the server keeps answering
    bad = tmp_path / "truncated.png"
    bad.write_bytes(slices[0].read_bytes()[:3000])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(10_000, 10_000))
    for f, message in ((bad, "truncated.png: cannot decode image"), (bomb, "decompression bomb")):
        page.set_input_files("#files", str(f))
        page.wait_for_function("m => document.querySelector('#messages').innerText.includes(m)", arg=message)
        assert page.locator("#results tbody tr").count() == 5
    assert httpx.get(server["url"] + "/api/health").status_code == 200

    # the other run, with its calibration and external result on the card
    page.select_option("#run", "calibrated")
    assert page.inner_text("#card h2") == "Run calibrated"
    assert page.locator("#card .warning").all_inner_texts() == chance_warnings(runs)
    assert "external: ucsd-val-20" in page.inner_text("#card table.metrics")
    # drag and drop: a real file dropped on the drop zone (DataTransfer built in the page)
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/png" }));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true }));
    }""", [slices[0].name, base64.b64encode(slices[0].read_bytes()).decode()])
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 6", timeout=60_000)
    dropped = page.locator("#results tbody tr", has_text="calibrated")
    assert dropped.locator("td.rule").inner_text() == "p(COVID) ≥ 0.800"
    expected = load_run(runs["calibrated"]).predict([slices[0]])[0]
    assert dropped.locator("td.pred").inner_text() == expected.label
    assert page_errors == []
    page.close()


# ---------------------------------------------------------------------------------------------
# Hostile use (issue #22): memory bound, Host/Origin, slow clients, formula cells
# ---------------------------------------------------------------------------------------------

from .serving import MEMORY_BOUND_MB


def test_hostile_uploads_stay_under_the_memory_bound(server, slices):
    """The issue's uploads: a 38 KB all-zero 6300x6300 PNG three times in one request, the same from
    three clients at once, and three 0.4 MB zips of 400 MB each. The server's peak resident memory
    (VmHWM, reset before) stays within MEMORY_BOUND_MB of what it held before."""
    pid = server["proc"].pid
    assert post(server, slices[:1], run="plain").status_code == 200  # warm: Grad-CAM imported
    before = memory_mb(pid)["rss"]
    if not reset_peak(pid):
        pytest.skip("/proc/PID/clear_refs cannot be written here: the peak cannot be reset")
    png = zero_png(6300)
    assert len(png) < 40_000
    resp = post(server, [(f"zero{i}.png", png) for i in range(3)], run="plain")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    [answered] = body["results"]  # 39.7 M px each: the request's 64 M px decode budget admits one
    assert answered["name"] == "zero0.png" and answered["size"] == [6300, 6300]
    assert max(decode_data_url(answered["overlay"]).shape[:2]) == 320
    assert [e["name"] for e in body["errors"]] == ["zero1.png", "zero2.png"]
    assert all("would pass the 64,000,000 px one request may decode" in e["error"] for e in body["errors"])
    with ThreadPoolExecutor(max_workers=3) as pool:  # two analysis slots: the third waits
        statuses = list(pool.map(lambda _: post(server, [(f"z{i}.png", png) for i in range(3)]).status_code,
                                 range(3)))
    assert statuses == [200, 200, 200]
    bomb = zero_zip(400)
    assert len(bomb) < 500_000
    resp = post(server, [(f"bomb{i}.zip", bomb) for i in range(3)])
    assert resp.status_code == 413
    assert resp.json()["detail"] == ("bomb0.zip: zip unpacks to 400 MB, more than the 256 MB left of the 256 MB "
                                     "allowed per request (zip bomb?)")
    # the budget is the request's, not each zip's: 3 x 100 MB passes one at a time, not together
    hundred = zero_zip(100)
    resp = post(server, [(f"z{i}.zip", hundred) for i in range(3)])
    assert resp.status_code == 413 and resp.json()["detail"].startswith(
        "z2.zip: zip unpacks to 100 MB, more than the 56 MB left of the 256 MB allowed per request")
    peak = memory_mb(pid)["peak"]
    assert peak - before <= MEMORY_BOUND_MB, (before, peak)
    assert httpx.get(server["url"] + "/api/health").status_code == 200


def test_rebinding_host_and_cross_origin_requests_are_refused(server, slices):
    url, port = server["url"], server["url"].rsplit(":", 1)[1]
    evil = {"host": "evil.example"}
    for method, path in (("GET", "/api/runs"), ("GET", "/"), ("POST", "/api/predict")):
        resp = httpx.request(method, url + path, headers=evil)
        assert resp.status_code == 403
        assert resp.json() == {"detail": "Host evil.example: not a name this server answers to (a DNS-rebinding "
                                         "page?); start it with --allow-host evil.example to allow it"}
    for origin in ("http://evil.example", "null", f"http://localhost:{int(port) + 1}"):
        resp = httpx.post(url + "/api/predict", headers={"origin": origin}, timeout=60,
                          files=[("files", (slices[0].name, slices[0].read_bytes()))], data={"overlay": "false"})
        assert resp.status_code == 403, origin
        assert resp.json()["detail"].startswith(f"Origin {origin}: requests from another web page's origin")
    # the server's own names: loopback names, with or without port, and its own origin
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(url + "/api/health", headers={"host": host}).status_code == 200, host
    resp = httpx.post(url + "/api/predict", headers={"origin": url}, timeout=60,
                      files=[("files", (slices[0].name, slices[0].read_bytes()))], data={"overlay": "false"})
    assert resp.status_code == 200


def test_allowed_hosts_and_the_cli_flag(capsys, runs):
    from ct_transfer.serve import Hosts

    default = Hosts()
    assert [default.allows(h) for h in ("localhost", "127.0.0.1", "::1", "app.localhost", "evil.example",
                                        "192.168.1.5")] == [True, True, True, True, False, False]
    lan = Hosts("0.0.0.0", ("ct.lab.example",))
    assert [lan.allows(h) for h in ("192.168.1.5", "ct.lab.example", "evil.example")] == [True, True, False]
    assert Hosts("127.0.0.1", ("*",)).allows("anything.example")
    assert main(["serve", "--run", str(runs["plain"]), "--allow-host", "http://x.example/"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ct-transfer: error: --allow-host http://x.example/: give a host name or address (e.g. ct.lab.example), "
        "without scheme, port or path, or * for any")


def test_slow_clients_are_timed_out(runs):
    """A connection that never finishes its headers is closed; a body that stops arriving gets 408."""
    import uvicorn

    from ct_transfer.serve import Limits, Served, create_app, server_config

    limits = Limits(header_timeout_s=1, body_idle_s=1, keep_alive_s=1)
    port = free_port()
    srv = uvicorn.Server(server_config(create_app({"plain": Served("plain", load_run(runs["plain"]))},
                                                  limits=limits), host="127.0.0.1", port=port, limits=limits))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            t0 = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t0 < 8
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            answer = b""
            while b"}" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"detail": "the request body arrived too slowly (no data for 1 s' in answer
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


# browsers send a file name's quotes as %22 (HTML's form encoding), so the names avoid them
FORMULA_NAMES = ["=HYPERLINK(A1,B1).png", "-2+3.png", "+cmd.png", "@SUM(A1).png"]


def test_formula_like_file_names_are_text_in_predict_csv(runs, slices, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in FORMULA_NAMES:
        shutil.copy(slices[0], tmp_path / name)
    assert main(["predict", "--run", str(runs["plain"]), "--out", "p.csv", "--", *FORMULA_NAMES]) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        raw = list(csv.reader(fh))
    assert [r[0] for r in raw[1:]] == ["'" + n for n in FORMULA_NAMES]  # shown as text by spreadsheets
    assert all(float(r[raw[0].index("prob_COVID")]) >= 0 for r in raw[1:])  # numbers stay numbers
    assert [r["path"] for r in _io.read_csv(tmp_path / "p.csv")] == FORMULA_NAMES  # read back as written


def test_browser_csv_download_neutralises_formula_names(browser, server, slices, tmp_path):
    files = []
    for name in FORMULA_NAMES:
        shutil.copy(slices[0], tmp_path / name)
        files.append(str(tmp_path / name))
    page = browser.new_page(accept_downloads=True)
    page.goto(server["url"] + "/")
    page.wait_for_selector("#card h2")
    page.uncheck("#overlay")
    page.set_input_files("#files", files)
    page.wait_for_function(f"document.querySelectorAll('#results tbody tr').length === {len(files)}",
                           timeout=120_000)
    with page.expect_download() as download:
        page.click("#csv")
    with open(download.value.path(), newline="") as fh:
        raw = list(csv.reader(fh))
    page.close()
    header = raw[0]
    assert sorted(r[header.index("file")] for r in raw[1:]) == sorted("'" + n for n in FORMULA_NAMES)
    for r in raw[1:]:  # probabilities stay plain numbers
        assert 0 <= float(r[header.index("prob_COVID")]) <= 1 and not r[header.index("prob_COVID")].startswith("'")


def test_shift_guard_in_the_api_and_a_warning_on_the_page(browser, server, runs, slices):
    """The run's shift guard through the JSON API (the same score and flag as the Python API) and,
    in a real browser, a per-image warning apart from the prediction for another hospital's slice."""
    run = load_run(runs["plain"])
    ucsd = sorted((UCSD / "non-COVID").iterdir())[::40][:6]
    files = [*ucsd, *slices[:2]]
    expected = {f.name: p for f, p in zip(files, run.predict(files))}
    flagged = [f for f in files if not expected[f.name].in_distribution]
    accepted = [f for f in files if expected[f.name].in_distribution]
    assert flagged and accepted and all(f in ucsd for f in flagged[:1])
    body = post(server, files, run="plain", overlay="false").json()
    assert body["shift_guard"]["threshold"] == pytest.approx(float(run.guard.threshold))
    for r in body["results"]:
        assert r["shift_score"] == pytest.approx(expected[r["name"]].shift_score, rel=1e-5)
        assert r["in_distribution"] == expected[r["name"]].in_distribution

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server["url"] + "/")
    page.wait_for_selector("#card h2")
    page.select_option("#run", "plain")
    page.uncheck("#overlay")  # the guard's score does not depend on the heat map; quicker
    page.set_input_files("#files", [str(f) for f in (flagged[0], accepted[0])])
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 2", timeout=120_000)
    rows = page.locator("#results tbody tr")
    shown = {rows.nth(i).locator("td.file").inner_text(): rows.nth(i) for i in range(2)}
    warn = shown[flagged[0].name].locator("td.shift .shift-warning")
    assert warn.count() == 1 and "Unlike this run's training images" in warn.inner_text()
    assert "Unlike" not in shown[flagged[0].name].locator("td.pred").inner_text()  # apart from the label
    assert shown[accepted[0].name].locator("td.shift").inner_text() == "yes"
    assert shown[accepted[0].name].locator(".shift-warning").count() == 0


def test_heat_map_layers_blend_to_the_overlay_and_window_field(server, runs, slices):
    """The page's opacity slider stacks `heatmap` on `image`: at the server's alpha (0.45) that is the
    overlay; the `window` field re-windows DICOM files like `predict --window`."""
    from ct_transfer.explain import overlay_array

    run = load_run(runs["plain"])
    body = post(server, [slices[0], Path(CT)], run="plain").json()
    png, dcm = body["results"]
    assert body["window"] == [1500.0, -600.0] and not png["dicom"] and dcm["dicom"]
    image, heat, overlay = (decode_data_url(png[k]).astype(float) for k in ("image", "heatmap", "overlay"))
    assert image.shape == heat.shape == overlay.shape
    assert np.abs(0.55 * image + 0.45 * heat - overlay).max() <= 6  # thumbnails of blended vs blended thumbnails
    ex = run.explain(str(slices[0]))
    expected = Image.fromarray(overlay_array(np.asarray(Image.open(slices[0]).convert("RGB")), ex.heatmap, alpha=1.0))
    expected.thumbnail((320, 320), Image.BILINEAR)
    assert np.abs(heat - np.asarray(expected).astype(float)).mean() < 2

    body = post(server, [Path(CT)], run="plain", overlay="false", window="400,40").json()
    [r] = body["results"]
    assert body["window"] == [400.0, 40.0]
    windowed = run.predict_proba([pydicom_array(CT, (400.0, 40.0))])[0]
    np.testing.assert_allclose(probs(r, run.classes), windowed, atol=1e-5)
    assert not np.allclose(probs(r, run.classes), probs(dcm, run.classes))  # the window changed the input
    for bad in ("400", "0,40", "abc,1", "nan,nan"):
        resp = post(server, [Path(CT)], run="plain", window=bad)
        assert resp.status_code == 400 and resp.json()["detail"].startswith(f"window={bad}: give WIDTH,LEVEL")


def pydicom_array(path, window):
    from ct_transfer.data import read_dicom

    return read_dicom(path, window)


def test_browser_card_zoom_opacity_and_dicom_window(browser, server, runs, slices, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_selector("#card h2")
    assert "no named recipe" in page.inner_text("#card dl")
    page.select_option("#run", "calibrated")
    facts = page.inner_text("#card dl")
    assert "paper — epochs 2" in facts and "limit 60" in facts
    page.select_option("#run", "plain")

    page.set_input_files("#files", [str(slices[0]), CT])
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 2", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")

    # opacity: the heat layer follows the slider
    heat = page.locator("#results tbody tr").first.locator("img.heat")
    assert float(heat.evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.45)
    page.locator("#opacity").fill("0.8")
    assert float(heat.evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.8)
    assert page.inner_text("#opacity-value") == "0.80"

    # zoom: a click opens the image large, Escape closes it
    small = page.locator("#results tbody tr").first.locator(".stack").bounding_box()
    page.locator("#results tbody tr").first.locator(".stack").click()
    page.wait_for_selector("dialog#zoom[open]")
    big = page.locator("#zoom-body .stack").bounding_box()
    assert big["width"] > 1.5 * small["width"]
    assert float(page.locator("#zoom-body img.heat").evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.8)
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#zoom:not([open])", state="attached")
    page.locator("#results img.input").first.click()
    page.wait_for_selector("dialog#zoom[open] img.zoomed")
    page.locator("dialog#zoom").click()
    page.wait_for_selector("dialog#zoom:not([open])", state="attached")

    # window/level: the DICOM row is re-requested with the mediastinal window, the PNG row stays
    dicom_row = page.locator("#results tbody tr", has_text=Path(CT).name)
    png_row = page.locator("#results tbody tr", has_text=slices[0].name)
    assert "window 1500 / -600 HU" in dicom_row.inner_text()
    before = {"dicom": dicom_row.locator("img.input").get_attribute("src"),
              "png": png_row.locator("img.input").get_attribute("src")}
    page.select_option("#window-preset", "400,40")
    assert page.input_value("#window-width") == "400" and page.input_value("#window-level") == "40"
    page.click("#window-apply")
    page.wait_for_function("document.querySelector('#results tbody').innerText.includes('window 400 / 40 HU')",
                           timeout=120_000)
    assert page.locator("#results tbody tr").count() == 2
    assert dicom_row.locator("img.input").get_attribute("src") != before["dicom"]
    assert png_row.locator("img.input").get_attribute("src") == before["png"]
    run = load_run(runs["plain"])
    expected = run.predict_proba([pydicom_array(CT, (400.0, 40.0))])[0]
    shown = float(dicom_row.locator("td.prob[data-class='COVID']").inner_text())
    assert shown == pytest.approx(expected[run.classes.index("COVID")], abs=1e-4)
    assert page_errors == []
    page.close()
