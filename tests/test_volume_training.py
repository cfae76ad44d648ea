"""Volumes as training data: a class folder holding NIfTI volumes, a multi-frame DICOM and a DICOM
series (all built here from real dataset slices with nibabel and pydicom) beside slice images is
split by patient and trained on; each training row is one selected slice of its volume, decoded as
``open_volume(...).rgb(i)`` + the run's preprocessing. Bad volumes are one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from ct_transfer import data as D
from ct_transfer.cli import main
from ct_transfer.data import volume as V
from ct_transfer.errors import ConfigError, CTTransferError

from .conftest import error_line
from .test_patients import INTERCEPT, dicom_slice, hu_of, write_series

SIZE = 64  # the volumes' slice size (px)
CAP = 4  # volume_slices: 6-slice volumes give at most 4 rows
CLASSES = ("COVID", "non-COVID")


def pictures_of(folder: Path, start: int, n: int = 6) -> list[np.ndarray]:
    files = sorted(folder.iterdir(), key=lambda p: int(p.stem.split("(")[1][:-1]))[start:start + n]
    return [np.asarray(Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)) for f in files]


def write_nifti(path: Path, pictures) -> Path:
    hu = np.stack([hu_of(g) for g in pictures])  # k, rows (anterior->posterior), cols (right->left)
    data = hu[:, ::-1, ::-1].transpose(2, 1, 0)  # RAS+: i left->right, j posterior->anterior, k up
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0])), path)
    return path


def write_multiframe(path: Path, pictures, patient: str) -> Path:
    ds = dicom_slice(pictures[0], 0, generate_uid())
    ds.NumberOfFrames = len(pictures)
    ds.PixelData = np.stack([(hu_of(g) - INTERCEPT).astype(np.int16) for g in pictures]).tobytes()
    ds.PatientID = patient
    ds.save_as(path)
    return path


def volume_names(k: int) -> list[str]:
    """Class ``k``'s ten scans (ten patients: the fewest a grouped split takes)."""
    return ([f"scan-{k}{j}.nii.gz" if j % 2 else f"scan-{k}{j}.nii" for j in range(6)]
            + [f"multi-{k}{j}.dcm" for j in (6, 7)] + [f"series-{k}{j}" for j in (8, 9)])


def volume_dataset(root: Path, data_dir: Path) -> Path:
    """Per class: six NIfTI volumes, two multi-frame DICOM files and two DICOM series folders, each
    of six real slices of that class, one patient each."""
    for k, cls in enumerate(CLASSES):
        folder = root / cls
        folder.mkdir(parents=True)
        for j, name in enumerate(volume_names(k)):
            pics = pictures_of(data_dir / cls, 100 + 12 * j)
            if name.startswith("scan"):
                write_nifti(folder / name, pics)
            elif name.startswith("multi"):
                write_multiframe(folder / name, pics, f"MF-{k}{j}")
            else:
                write_series(folder / name, pics, seed=10 * k + j)
    return root


@pytest.fixture(scope="module")
def volume_data(tmp_path_factory, data_dir) -> Path:
    """Read-only for tests: the volume dataset."""
    return volume_dataset(tmp_path_factory.mktemp("volumes") / "data", data_dir)


@pytest.fixture(scope="module")
def volume_run(volume_data):
    """A tiny run on the volume dataset: EfficientNetLite0, 48 px, 1 epoch, grouped split."""
    from ct_transfer import TrainConfig, fit

    root = volume_data
    out = root.parent / "run"
    cfg = TrainConfig(data=str(root), model="EfficientNetLite0", out=str(out), epochs=1, image_size=48,
                      split_preset="grouped", volume_slices=CAP, seed=0)
    run = fit(cfg, progress=False)
    return root, out, run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_volumes_are_split_by_patient_with_their_slices(volume_run):
    root, out, _ = volume_run
    rows = read_csv(out / "split.csv")
    vol_rows = [r for r in rows if r["slice"] != ""]
    volumes = {r["path"] for r in vol_rows}
    assert volumes == {f"{c}/{n}" for k, c in enumerate(CLASSES) for n in volume_names(k)}
    for path in volumes:  # the rows of a volume: its selected slices (the cap), one patient, one subset
        mine = [r for r in vol_rows if r["path"] == path]
        vol = V.training_volume(root / path)
        used = V.select_slices(vol, max_slices=CAP).used
        assert sorted(int(r["slice"]) for r in mine) == used and len(used) <= CAP < len(vol)
        assert {r["patient"] for r in mine} == {vol.patient} and len({r["subset"] for r in mine}) == 1
    patients = {r["patient"] for r in vol_rows}
    assert {"MF-06", "MF-17", "scan-00", "scan-15"} <= patients and sum(p.startswith("PT-") for p in patients) == 4
    assert len(patients) == 20
    by_patient: dict[str, set] = {}
    for r in rows:
        if r["patient"]:
            by_patient.setdefault(r["patient"], set()).add(r["subset"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert len(rows) == len(vol_rows)
    config = json.loads((out / "config.json").read_text())
    assert config["volume_slices"] == CAP  # the cap is recorded with the run


def test_decoded_training_slice_equals_the_volume_slice(volume_run):
    """What training reads (memory cache and disk store) is ``open_volume(path).rgb(i)`` through the
    run's window, then the run's preprocessing: the same uint8 array."""
    from ct_transfer.engine.data import load_subset_stored
    from ct_transfer.run import load_run

    root, out, _ = volume_run
    run = load_run(out)
    rows = D.read_split(out / "split.csv", root)
    for subset in ("train", "val", "test"):
        x, _, kept, _ = D.load_subset(rows, subset, run.classes, root, run.preprocess)
        xs, _, kept_s, _ = load_subset_stored(rows, subset, run.classes, root, run.preprocess, out.parent / "store")
        assert kept == kept_s and np.array_equal(x.numpy(), xs[:].numpy())
        for k, r in enumerate(kept):
            if r.get("slice"):
                want = run.preprocess(V.open_volume(root / r["path"]).rgb(int(r["slice"]), run.preprocess.window))
                np.testing.assert_array_equal(x[k].numpy().transpose(1, 2, 0), want)
    assert any(r.get("slice") for r in rows if r["subset"] == "train")


def test_predictions_and_metrics_per_patient(volume_run):
    _, out, _ = volume_run
    metrics = json.loads((out / "metrics.json").read_text())
    split = {(r["path"], r["slice"]): r["patient"] for r in read_csv(out / "split.csv")}
    for subset in ("val", "test"):
        preds = read_csv(out / f"predictions_{subset}.csv")
        assert preds and all(p["patient"] == split[(p["path"], p["slice"])] for p in preds)
        patients = metrics[subset]["patients"]
        assert patients["n_patients"] == len({p["patient"] for p in preds}) >= 2
        assert patients["n_slices"] == len(preds)


@pytest.mark.parametrize("bad", ["corrupt-nifti", "2d-nifti", "mr-multiframe"])
def test_bad_training_volume_is_a_one_line_error(bad, data_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for f in sorted((data_dir / cls).iterdir())[::120][:6]:
            shutil.copy(f, root / cls / f.name)
    if bad == "corrupt-nifti":
        good = write_nifti(tmp_path / "good.nii.gz", pictures_of(data_dir / "COVID", 200))
        target = root / "COVID" / "broken.nii.gz"
        target.write_bytes(good.read_bytes()[:300])
    elif bad == "2d-nifti":
        target = root / "COVID" / "flat.nii"
        nib.save(nib.Nifti1Image(hu_of(pictures_of(data_dir / "COVID", 200, 1)[0]).astype(np.int16), np.eye(4)),
                 target)
    else:
        target = write_multiframe(root / "COVID" / "mr.dcm", pictures_of(data_dir / "COVID", 200), "MR-1")
        import pydicom

        ds = pydicom.dcmread(target)
        ds.Modality = "MR"
        ds.save_as(target)
    with pytest.raises(CTTransferError, match=target.name):
        D.scan_folder(root)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--data", str(root), "--model", "EfficientNetLite0", "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--image-size", "32", "--split-preset", "grouped"]) == 2
    line = error_line(capsys.readouterr().err)
    assert target.name in line and {"corrupt-nifti": "NIfTI", "2d-nifti": "3-D", "mr-multiframe": "MR"}[bad] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_split_cli_caps_the_slices_and_refuses_a_per_slice_split(volume_data, tmp_path, capsys):
    root = volume_data
    with pytest.raises(ConfigError, match="grouped"):
        D.split_folder(root, "stratified", volume_slices=CAP)
    with pytest.raises(ConfigError, match="volume_slices"):
        D.scan_folder(root, volume_slices=0)
    out = tmp_path / "split.csv"  # the duplicate check decodes every row, volume slices included
    assert main(["split", "--data", str(root), "--out", str(out), "--split-preset", "grouped",
                 "--volume-slices", "2"]) == 0
    assert "exact duplicates (same decoded pixels) across subsets: 0" in capsys.readouterr().out
    rows = read_csv(out)
    for path in {r["path"] for r in rows}:
        slices = [int(r["slice"]) for r in rows if r["path"] == path]
        assert slices == V.select_slices(V.training_volume(root / path), max_slices=2).used and len(slices) == 2


def test_a_folder_of_two_series_is_refused(tmp_path, data_dir):
    root = tmp_path / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        shutil.copy(sorted((data_dir / cls).iterdir())[0], root / cls)
    pics = pictures_of(data_dir / "COVID", 200)
    write_series(root / "COVID" / "two", pics[:3], seed=1)
    write_series(root / "COVID" / "two", pics[3:], seed=2, z0=0.0)
    with pytest.raises(CTTransferError, match="two: holds 6 DICOM slices of 2 series"):
        D.scan_folder(root)


def test_decoding_streams_slices_and_opens_each_volume_once(tmp_path, data_dir, monkeypatch):
    """A 48-slice 256 px scan (NIfTI .nii.gz and multi-frame DICOM): selecting and decoding its
    slices never allocates anything near the whole volume in float64, and one decode pass opens the
    NIfTI file once."""
    import tracemalloc

    import nibabel

    from ct_transfer.data.cache import ImageCache, MemoryCache
    from ct_transfer.data.preprocess import Preprocess

    files = sorted((data_dir / "COVID").iterdir(), key=lambda p: int(p.stem.split("(")[1][:-1]))[300:348]
    pics = [np.asarray(Image.open(f).convert("L").resize((256, 256), Image.BILINEAR)) for f in files]
    whole = 256 * 256 * len(pics) * 8  # the scan in float64: 25 MB
    scans = [write_nifti(tmp_path / "big.nii.gz", pics), write_multiframe(tmp_path / "big.dcm", pics, "BIG")]
    opened = []
    real_load = nibabel.load
    monkeypatch.setattr(nibabel, "load", lambda *a, **kw: opened.append(a[0]) or real_load(*a, **kw))
    for scan in scans:
        opened.clear()
        tracemalloc.start()
        try:
            used, _, n = V.training_slices(scan, max_slices=8)
            cache = ImageCache(Preprocess(48), None, memory=MemoryCache(0))
            arr, kept, bad = cache.load_many([V.SliceRef(scan, i) for i in used])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 48 and len(used) == 8 and kept == list(range(8)) and not bad and arr.shape == (8, 3, 48, 48)
        assert peak < whole / 4, (scan.name, peak)
        if scan.suffix == ".gz":
            assert len(opened) == 2  # once to select the slices, once for the decode pass
