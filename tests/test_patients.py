"""Scans and patients: DICOM series, multi-frame DICOM and NIfTI volumes that the tests build from
real dataset slices (pydicom, nibabel), predicted as one patient each; patient-level metrics from
split files with patient ids; bad series as one-line errors."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sklearn.metrics import accuracy_score, roc_auc_score

from ct_transfer import _io
from ct_transfer import patients as PT
from ct_transfer.cli import main
from ct_transfer.data import volume as V
from ct_transfer.errors import CTTransferError
from ct_transfer.evaluate import read_predictions
from ct_transfer.run import load_run

from .test_serve import browser  # noqa: F401  (the real headless chromium, shared)

CT = get_testdata_file("CT_small.dcm")
SIZE = 96
INTERCEPT = -1374.0  # stored = HU + 1374: the windowed slice (1500/-600) is the original picture again
UCSD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ucsd-covid-ct-dev"


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run[0])


@pytest.fixture(scope="module")
def pictures(data_dir):
    """Six real COVID slices, grey, squashed to 96 px: what each slice of the test scans shows."""
    files = sorted((data_dir / "COVID").iterdir(), key=lambda p: int(p.stem.split("(")[1][:-1]))[20:26]
    return [np.asarray(Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)) for f in files]


def hu_of(g: np.ndarray) -> np.ndarray:
    """The HU a picture stands for in the lung window (width 1500, level -600), on integers."""
    return np.rint(g.astype(np.float64) * 1500 / 255) - 1350


def dicom_slice(g, z, uid, *, modality="CT", instance=1, size=None, orientation=(1, 0, 0, 0, 1, 0)):
    ds = copy.deepcopy(pydicom.dcmread(CT))
    raw = (hu_of(g) - INTERCEPT).astype(np.int16)
    if size:
        raw = np.resize(raw, size)
    ds.Rows, ds.Columns = raw.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = raw.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, INTERCEPT
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [-40.0, -40.0, float(z)]
    ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
    ds.InstanceNumber = instance
    ds.Modality = modality
    ds.PatientID = "PT-" + uid[-6:]
    return ds


def write_series(folder: Path, pictures, *, uid=None, z0=-120.0, spacing=2.5, seed=0, **kw) -> list[Path]:
    """A DICOM series of ``pictures`` (inferior first) under shuffled file names, InstanceNumber
    running the wrong way; returns the files in true scan order."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    names = np.random.default_rng(seed).permutation(len(pictures))
    files = []
    for k, g in enumerate(pictures):
        f = folder / f"IM{names[k]:04d}-{uid[-4:]}.dcm"
        dicom_slice(g, z0 + k * spacing, uid, instance=len(pictures) - k, **kw).save_as(f)
        files.append(f)
    return files


def write_pngs(folder: Path, pictures) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, g in enumerate(pictures):
        out.append(folder / f"slice{k}.png")
        Image.fromarray(g).save(out[-1])
    return out


def one_by_one(run, files) -> np.ndarray:
    return np.stack([run.predict_proba([str(f)])[0] for f in files])


def test_dicom_series_order_hu_and_one_patient_row(run, pictures, tmp_path):
    files = write_series(tmp_path / "series", pictures)
    vol = V.open_volume(tmp_path / "series")
    assert vol.kind == "dicom-series" and len(vol) == 6 and vol.shape == (SIZE, SIZE)
    assert vol.slice_names == [f.name for f in files]  # position order, not names or InstanceNumber
    assert sorted(vol.slice_names) != vol.slice_names
    assert vol.positions == pytest.approx([-120 + 2.5 * k for k in range(6)]) and vol.spacing == pytest.approx(2.5)
    for i, g in enumerate(pictures):
        np.testing.assert_array_equal(vol.hu(i), hu_of(g))
        np.testing.assert_array_equal(vol.rgb(i), np.repeat(g[:, :, None], 3, axis=2))

    pp = run.predict_patient(tmp_path / "series", max_slices=64)
    assert pp.used == list(range(6)) and all(pp.lung)  # every slice shows lungs
    singles = one_by_one(run, write_pngs(tmp_path / "pngs", pictures))
    got = np.array([[s["probabilities"][c] for c in run.classes] for s in pp.slices])
    np.testing.assert_allclose(got, singles, atol=1e-5)
    assert pp.probability == pytest.approx(singles[:, 1].mean(), abs=1e-6)  # default: the mean
    assert pp.label == run.classes[int(pp.probability >= 0.5)]
    assert [s["label"] for s in pp.slices] == [run.decide(p) for p in singles]
    assert pp.patient.startswith("PT-")
    # the session's run has a shift guard (fitted by fit): the share of used slices it flags
    assert pp.flagged_share == pytest.approx(np.mean([not s["in_distribution"] for s in pp.slices]))
    # a cap: evenly spaced among the lung slices, first and last kept, recorded
    assert run.predict_patient(tmp_path / "series", max_slices=3).used == [0, 2, 5]


def test_predict_cli_series_zip_and_two_series(trained_run, run, pictures, tmp_path, capsys):
    a = write_series(tmp_path / "two", pictures[:4], seed=1)
    b = write_series(tmp_path / "two", pictures[2:], z0=300.0, spacing=5.0, seed=2)
    vols = V.open_volumes(tmp_path / "two")
    assert sorted(len(v) for v in vols) == [4, 4]
    by_uid = {v.files[0]: v for v in vols}
    assert [Path(f).name for f in by_uid[str(a[0])].files] == [f.name for f in a]
    assert [Path(f).name for f in by_uid[str(b[0])].files] == [f.name for f in b]
    with pytest.raises(CTTransferError, match="holds 2 scans"):
        V.open_volume(tmp_path / "two")

    zpath = tmp_path / "series.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in a:
            zf.write(f, f"export/{f.stem}")  # DICOM files without an extension
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(trained_run[0]), str(tmp_path / "two"), str(zpath), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    patients = list(csv.DictReader(open(tmp_path / "p.patients.csv")))
    slices = list(csv.DictReader(open(out)))
    assert len(patients) == 3 and len(slices) == 12 and "patients (mean" in printed
    zipped = [p for p in patients if p["kind"] == "dicom-series" and p["source"].endswith("series.zip")]
    assert len(zipped) == 1 and zipped[0]["slices_used"] == "4"
    singles = one_by_one(run, write_pngs(tmp_path / "pngs", pictures[:4]))
    from_zip = [r for r in slices if r["path"].startswith(str(zpath))]
    assert [int(r["slice"]) for r in from_zip] == [0, 1, 2, 3]
    np.testing.assert_allclose([float(r["prob_COVID"]) for r in from_zip], singles[:, 1], atol=1e-5)
    assert float(zipped[0]["prob_COVID"]) == pytest.approx(singles[:, 1].mean(), abs=1e-5)


def test_multiframe_dicom_every_frame(run, pictures, tmp_path):
    ds = dicom_slice(pictures[0], 0, generate_uid())
    frames = np.stack([(hu_of(g) - INTERCEPT).astype(np.int16) for g in pictures])
    ds.NumberOfFrames = len(pictures)
    ds.PixelData = frames.tobytes()
    path = tmp_path / "multi.dcm"
    ds.save_as(path)
    with pytest.raises(CTTransferError, match="multi-frame DICOM .6 frames.: a volume"):
        run.predict_proba([str(path)])  # never silently its middle frame
    vol = V.open_volume(path)
    assert vol.kind == "dicom-multiframe" and len(vol) == 6
    for i, g in enumerate(pictures):
        np.testing.assert_array_equal(vol.hu(i), hu_of(g))
    pp = run.predict_patient(path)
    singles = one_by_one(run, write_pngs(tmp_path / "pngs", pictures))
    np.testing.assert_allclose([s["probabilities"]["COVID"] for s in pp.slices], singles[:, 1], atol=1e-5)


@pytest.mark.parametrize("layout", ["ras", "lps-descending"])
def test_nifti_orientation_and_hu(run, pictures, tmp_path, layout):
    """The same scan stored two ways: RAS+ (as_closest_canonical leaves it) and LPS with the slices
    stored superior first (it flips three axes); both read back as the pictures, inferior first."""
    hu = np.stack([hu_of(g) for g in pictures])  # k, rows (anterior->posterior), cols (right->left)
    if layout == "ras":
        data = hu[:, ::-1, ::-1].transpose(2, 1, 0)  # i: left->right, j: posterior->anterior, k: up
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
    else:
        data = hu[::-1].transpose(2, 1, 0)  # i: right->left, j: anterior->posterior, k: superior first
        affine = np.diag([-0.7, -0.7, -2.5, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), affine)
    path = tmp_path / f"{layout}.nii.gz"
    nib.save(img, path)
    canonical = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    vol = V.open_volume(path)
    assert vol.kind == "nifti" and len(vol) == 6 and vol.spacing == pytest.approx(2.5)
    for i, g in enumerate(pictures):
        np.testing.assert_array_equal(vol.hu(i), hu_of(g))
        np.testing.assert_array_equal(vol.hu(i), canonical[:, :, i].T[::-1, ::-1])
    pp = run.predict_patient(path)
    singles = one_by_one(run, write_pngs(tmp_path / "pngs", pictures))
    np.testing.assert_allclose([s["probabilities"]["COVID"] for s in pp.slices], singles[:, 1], atol=1e-5)


def test_folder_of_slice_images_is_one_patient(trained_run, run, pictures, tmp_path):
    files = write_pngs(tmp_path / "patient7", pictures)
    files[0].rename(tmp_path / "patient7" / "slice10.png")  # natural order: slice2 < slice10
    vol = V.open_volume(tmp_path / "patient7")
    assert vol.kind == "images" and vol.slice_names[-1] == "slice10.png" and vol.slice_names[0] == "slice1.png"
    out = tmp_path / "p.json"
    assert main(["predict", "--run", str(trained_run[0]), str(tmp_path / "patient7"), "--patient", "--out", str(out)]) == 0
    patients = json.loads((tmp_path / "p.patients.json").read_text())
    assert len(patients) == 1 and patients[0]["patient"] == "patient7" and patients[0]["slices_total"] == 6
    # without --patient the same folder is six independent slices, as before
    assert main(["predict", "--run", str(trained_run[0]), str(tmp_path / "patient7"), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 6


def test_bad_series_are_one_line_errors(trained_run, pictures, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    uid = generate_uid()
    write_series(mixed, pictures[:3], uid=uid)
    dicom_slice(pictures[3], 100, uid, size=(64, 64)).save_as(mixed / "odd.dcm")
    mr = tmp_path / "mr"
    write_series(mr, pictures[:3], modality="MR")
    gap = tmp_path / "gap"
    write_series(gap, pictures)[2].unlink()  # a slice missing in the middle
    tilted = tmp_path / "tilted"
    files = write_series(tilted, pictures[:3], uid=(uid2 := generate_uid()))
    dicom_slice(pictures[3], 200, uid2, orientation=(1, 0, 0, 0, 0, -1)).save_as(tilted / "sagittal.dcm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scan here")
    cases = ((mixed, "different sizes"), (mr, "modality is MR, not CT"), (gap, "missing slices: a gap of 5.00 mm"),
             (tilted, "orientation"), (empty, "holds no DICOM files, NIfTI volumes or slice images"))
    for folder, needle in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(["predict", "--run", str(trained_run[0]), str(folder), "--patient",
                     "--out", str(tmp_path / "x.csv")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
        with pytest.raises(CTTransferError, match=needle.split(":")[0]):
            V.open_volumes(folder)
    assert len(files) == 3


def test_aggregators_and_fitted_decision():
    rng = np.random.default_rng(0)
    # 40 synthetic patients: positives have two high slices among noise (max sees it, the mean hardly)
    p_slices, y = [], []
    for k in range(40):
        pos = k % 2
        p = rng.uniform(0.05, 0.6, size=12)
        if pos:
            p[rng.choice(12, 2, replace=False)] = rng.uniform(0.7, 0.95, size=2)
        p_slices.append(p)
        y.append(pos)
    rows = [{"path": f"{k}/{j}.png", "patient": f"p{k}"} for k, p in enumerate(p_slices) for j in range(len(p))]
    ys = np.repeat(y, 12)
    proba = np.concatenate(p_slices)
    proba = np.stack([1 - proba, proba], axis=1)
    assert PT.list_aggregators() == ["mean", "max", "topk", "logistic"]
    assert PT.make_aggregator("topk", k=2)(np.array([0.1, 0.9, 0.5])) == pytest.approx(0.7)
    decision = PT.fit_patient_decision(rows, ys, proba)
    assert decision.aggregator.name in ("max", "topk", "logistic") and decision.fitted["n_patients"] == 40
    assert decision.fitted["val_auc"]["max"] > decision.fitted["val_auc"]["mean"]
    again = PT.PatientDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    for p in p_slices[:5]:
        assert again.probability(p) == pytest.approx(decision.probability(p))
    with pytest.raises(CTTransferError, match="aggregator=median"):
        PT.make_aggregator("median")


def test_patient_metrics_equal_a_manual_computation(trained_run, tmp_path, data_dir):
    """evaluate on a split file with a patient column: metrics.json gets a ``patients`` block equal
    to aggregating predictions_test.csv by hand; a fitted patient decision is used by evaluate."""
    work = tmp_path / "run"
    shutil.copytree(trained_run[0], work)
    rows = _io.read_csv(work / "split.csv")
    for r in rows:  # test-made patients: neighbouring file numbers of one class
        r["patient"] = f"{r['class']}:{int(r['path'].split('(')[1].split(')')[0]) // 40}"
    split = tmp_path / "split_patients.csv"
    _io.write_csv(split, rows)
    assert main(["evaluate", "--run", str(work), "--split-file", str(split), "--data", str(data_dir)]) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    paths, true, proba, classes = read_predictions(work / "predictions_test.csv")
    patient = {r["path"]: r["patient"] for r in rows}
    by = {}
    for p, t, pr in zip(paths, true, proba):
        by.setdefault(patient[p], []).append((classes.index(t), pr[1]))
    y = np.array([v[0][0] for v in by.values()])
    p = np.array([np.mean([q for _, q in v]) for v in by.values()])
    m = metrics["test"]["patients"]
    assert m["n_patients"] == len(by) < m["n_slices"] == len(paths)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5), abs=1e-4)  # probabilities written to 6 places
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert m["aggregator"] == "mean" and m["ci95"]["accuracy"][0] < m["accuracy"] < m["ci95"]["accuracy"][1]
    # fit on val patients (saved as patients.json), then evaluate uses it
    run = load_run(work)
    run.split = _io.read_csv(split)
    decision = run.fit_patients()
    assert (work / "patients.json").is_file() and decision.threshold is not None
    again = run.evaluate(split_file=str(split), data=str(data_dir))
    assert again["test"]["patients"]["operating_point"]["threshold"] == pytest.approx(decision.threshold)


def test_ucsd_val_patients_external(trained_run, tmp_path):
    """UCSD's SPLIT.csv names patients: external evaluation reports them (56 val patients)."""
    work = tmp_path / "run"
    shutil.copytree(trained_run[0], work)
    assert main(["evaluate", "--run", str(work), "--data", str(UCSD), "--split-file", str(UCSD / "SPLIT.csv"),
                 "--subset", "val", "--name", "ucsd-val"]) == 0
    doc = json.loads((work / "external" / "ucsd-val" / "metrics.json").read_text())
    assert doc["metrics"]["n"] == 118 and doc["metrics"]["patients"]["n_patients"] == 56


# ---------------------------------------------------------------------------------------------
# serve: a zip of a series is one patient, on the API and on the page (a real browser)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_server(trained_run, tmp_path_factory):
    from .serving import serve_process

    with serve_process([trained_run[0]], log_path=tmp_path_factory.mktemp("scan-server") / "serve.log") as server:
        yield server["url"]


def series_zip(folder: Path, files: list[Path]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f"{folder.name}/{f.name}")
    return buf.getvalue()


def test_serve_zip_of_a_series_is_one_patient(scan_server, run, pictures, data_dir, tmp_path):
    import httpx

    files = write_series(tmp_path / "scan", pictures[:4])
    mr = write_series(tmp_path / "mr", pictures[:2], modality="MR")
    png = sorted((data_dir / "non-COVID").iterdir())[3]
    parts = [("files", ("scan.zip", series_zip(tmp_path / "scan", files), "application/zip")),
             ("files", ("mr.zip", series_zip(tmp_path / "mr", mr), "application/zip")),
             ("files", (png.name, png.read_bytes(), "image/png"))]
    body = httpx.post(scan_server + "/api/predict", files=parts, data={"overlay": "true"}, timeout=300).json()
    assert [r["name"] for r in body["results"]] == [png.name]  # the lone slice stays a slice
    assert len(body["patients"]) == 1 and "modality is MR, not CT" in body["errors"][0]["error"]
    p = body["patients"][0]
    expected = run.predict_patient(tmp_path / "scan")
    assert p["probability"] == pytest.approx(expected.probability, abs=1e-5) and p["label"] == expected.label
    assert [s["index"] for s in p["slices"]] == [0, 1, 2, 3] and p["slices_used"] == 4 == p["slices_total"]
    assert [s["probability"] for s in p["slices"]] == pytest.approx(
        [s["probabilities"]["COVID"] for s in expected.slices], abs=1e-5)
    assert len(p["decisive"]) == 3 and all(d["overlay"].startswith("data:image/png") for d in p["decisive"])
    top = [s["probability"] for s in p["slices"]]
    want = sorted(top, reverse=p["label"] == "COVID")[:3]
    assert [d["probability"] for d in p["decisive"]] == pytest.approx(want)


def test_browser_shows_the_series_as_a_patient(browser, scan_server, run, pictures, tmp_path):
    files = write_series(tmp_path / "scan", pictures)
    zpath = tmp_path / "scan.zip"
    zpath.write_bytes(series_zip(tmp_path / "scan", files))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(scan_server + "/")
    page.wait_for_selector("#card h2")
    assert page.locator("#patients-panel").is_hidden()
    page.set_input_files("#files", str(zpath))
    page.wait_for_selector("#patients article.patient", timeout=300_000)
    page.wait_for_function("[...document.querySelectorAll('#patients img')].every(i => i.complete && i.naturalWidth > 0)")
    expected = run.predict_patient(tmp_path / "scan")
    article = page.locator("#patients article.patient")
    assert float(article.locator(".patient-prob").inner_text()) == pytest.approx(expected.probability, abs=1e-4)
    assert article.locator(".patient-pred").inner_text() == expected.label
    strip = article.locator(".strip figure")
    assert strip.count() == 6
    assert [float(t) for t in strip.locator("figcaption").all_inner_texts()] == pytest.approx(
        [s["probabilities"]["COVID"] for s in expected.slices], abs=0.006)
    positive = [s["label"] == "COVID" for s in expected.slices]
    assert [("positive" in (c or "")) for c in strip.evaluate_all("els => els.map(e => e.className)")] == positive
    assert article.locator(".decisive img.overlay").count() == 3
    assert "6 of 6 slices used" in article.inner_text()
    assert "of slices flagged by the shift guard" in article.inner_text()  # the run has a guard
    assert page.locator("#results-panel").is_hidden()  # no single slices uploaded
    page.click("#clear-scans")
    assert page.locator("#patients-panel").is_hidden()
    assert errors == []
    page.close()


def test_dicom_slices_are_training_data_kept_by_patient(pictures, data_dir, tmp_path):
    """scan_folder lists DICOM slices; the grouped split keeps each patient's series in one subset
    and names the patient; a per-slice split of several slices of one patient is refused."""
    from ct_transfer import data as D
    from ct_transfer.errors import ConfigError

    root = tmp_path / "data"
    for cls, k in (("COVID", 0), ("non-COVID", 1)):
        for j in range(3):  # three patients per class, two slices each
            write_series(root / cls / f"patient{j}", pictures[2 * j:2 * j + 2], seed=k * 10 + j)
        for f in sorted((data_dir / cls).iterdir())[::60][:10]:  # far apart: no near-duplicates
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / cls / f.name)
    items, classes = D.scan_folder(root)  # each patient folder is a series: one volume, two slice rows
    assert sum(it.slice is not None for it in items) == 12 and len(items) == 32
    assert {it.path for it in items if it.slice is not None} == {f"{c}/patient{j}" for c in classes for j in range(3)}
    with pytest.raises(ConfigError, match="grouped"):
        D.split_folder(root, "stratified")
    rows = D.split_folder(root, "grouped", 0)
    dicom = [r for r in rows if r.get("slice") is not None]
    by_patient = {}
    for r in dicom:
        by_patient.setdefault(r["patient"], set()).add(r["subset"])
    assert len(by_patient) == 6 and all(len(s) == 1 for s in by_patient.values())
    assert all(r["patient"].startswith("PT-") for r in dicom)
