"""Predict, DICOM, explain and export on a trained run, the real dataset and real DICOM files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import pydicom
from pydicom.data import get_testdata_file
from PIL import Image

from ct_transfer import explain as X
from ct_transfer import predict as P
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError
from ct_transfer.evaluate import read_predictions
from ct_transfer.run import load_run

from .conftest import error_line

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run[0])


def test_predict_equals_evaluate_on_the_test_images(trained_run, run, data_dir, tmp_path, capsys):
    out, _ = trained_run
    paths, true, proba, classes = read_predictions(out / "predictions_test.csv")
    files = [str(data_dir / p) for p in paths]
    assert main(["predict", "--run", str(out), *files, "--out", str(tmp_path / "p.csv")]) == 0
    _, _, got, got_classes = read_predictions_csv(tmp_path / "p.csv")
    assert got_classes == classes
    np.testing.assert_allclose(got, proba, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert "wrote" in capsys.readouterr().out
    rows = P.predict(run, files[:3])
    assert [r["pred"] for r in rows] == [classes[i] for i in proba[:3].argmax(1)]


def read_predictions_csv(path):
    import csv

    rows = list(csv.DictReader(open(path)))
    classes = [k[5:] for k in rows[0] if k.startswith("prob_")]
    return ([r["path"] for r in rows], [r["pred"] for r in rows],
            np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]), classes)


def test_predict_folder_recursive_and_json(trained_run, data_dir, tmp_path):
    folder = tmp_path / "scans" / "nested"
    folder.mkdir(parents=True)
    for f in sorted((data_dir / "COVID").iterdir())[:3]:
        shutil.copy(f, folder / f.name)
    shutil.copy(CT, folder / "slice.dcm")
    assert main(["predict", "--run", str(trained_run[0]), str(tmp_path / "scans"), "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == 4 and any(r["path"].endswith("slice.dcm") for r in rows)
    for r in rows:
        assert r["prob_COVID"] + r["prob_non-COVID"] == pytest.approx(1.0, abs=1e-5)


def test_dicom_hounsfield_and_lung_window():
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = P.read_dicom(P.Path(CT))
    assert img.shape == (*ds.pixel_array.shape, 3) and img.dtype == np.uint8
    lo, hi = -600 - 750, -600 + 750
    np.testing.assert_array_equal(img[..., 0][hu <= lo], 0)
    np.testing.assert_array_equal(img[..., 0][hu >= hi], 255)
    inside = (hu > lo) & (hu < hi)
    np.testing.assert_allclose(img[..., 0][inside], np.rint((hu[inside] - lo) / 1500 * 255), atol=1)
    narrow = P.read_dicom(P.Path(CT), P.parse_window("400,40"))
    assert not np.array_equal(narrow, img)
    with pytest.raises(CTTransferError, match="window=wide"):  # the library names the parameter
        P.parse_window("wide")


def test_bad_dicom_files_give_one_line_errors(trained_run, tmp_path, capsys):
    mr = get_testdata_file("MR_small.dcm")
    empty = pydicom.dcmread(CT)
    del empty.PixelData
    no_pixels = tmp_path / "no_pixels.dcm"
    empty.save_as(no_pixels)
    ds = pydicom.dcmread(CT)
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    compressed = tmp_path / "jpegls.dcm"
    ds.save_as(compressed, enforce_file_format=True)
    for path, needle in ((mr, "not CT"), (no_pixels, "no pixel data"), (compressed, "JPEG-LS")):
        assert main(["predict", "--run", str(trained_run[0]), str(path)]) == 2
        err = error_line(capsys.readouterr().err)
        assert needle in err, err


@pytest.mark.parametrize("method", sorted(X.METHODS))
def test_explain_heatmaps_are_informative_and_image_sized(run, data_dir, tmp_path, method):
    files = [str(data_dir / "COVID" / "Covid (5).png"), str(data_dir / "non-COVID" / "Non-Covid (5).png"), CT]
    results = X.explain_files(run, files, method=method, out_dir=tmp_path)
    for f, r in zip(files, results):
        image = P.read_input(P.Path(f))
        assert r["heatmap"].shape == image.shape[:2]
        assert r["heatmap"].std() > 0.01 and 0 <= r["heatmap"].min() and r["heatmap"].max() <= 1
        overlay = Image.open(r["overlay"])
        assert overlay.size[0] > 300 and np.asarray(overlay).std() > 10


def test_explain_cli_and_target_layer(trained_run, data_dir, tmp_path, capsys):
    f = str(data_dir / "COVID" / "Covid (7).png")
    assert main(["explain", "--run", str(trained_run[0]), f, "--method", "gradcampp", "--out", str(tmp_path),
                 "--target-layer", "blocks.5"]) == 0
    assert (tmp_path / "Covid_7__gradcampp.png").is_file()
    assert main(["explain", "--run", str(trained_run[0]), f, "--out", str(tmp_path), "--target-layer", "nope"]) == 2
    assert "--target-layer nope" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity(trained_run, tmp_path, fmt, capsys):
    target = tmp_path / f"model.{fmt}"
    assert main(["export", "--run", str(trained_run[0]), "--format", fmt, "--out", str(target)]) == 0
    info = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert info["parity"]["images"] > 0 and info["parity"]["max_abs_diff_probabilities"] < 1e-4
    assert info["inside_the_graph"]["mean"] == [0.5, 0.5, 0.5] and info["input"]["shape"][2] == 64
    assert "max |p_export - p_torch|" in capsys.readouterr().out
    if fmt == "onnx":  # the file runs on its own, with the documented input
        import onnxruntime as ort

        x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
        session = ort.InferenceSession(str(target))
        p = session.run(None, {"image": x})[0]
        meta = session.get_modelmeta().custom_metadata_map
        assert json.loads(meta["classes"]) == ["non-COVID", "COVID"] and "mean" in meta["inside_the_graph"]
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_bad_run_directories(trained_run, tmp_path, capsys, data_dir):
    f = str(data_dir / "COVID" / "Covid (1).png")
    assert main(["predict", "--run", str(tmp_path / "nope"), f]) == 2
    assert "not a run directory" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(trained_run[0], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"] = "MobileNetV3Large"
    (other / "config.json").write_text(json.dumps(cfg))
    for cmd in (["predict", "--run", str(other), f], ["export", "--run", str(other), "--out", str(tmp_path / "m.onnx")]):
        assert main(cmd) == 2
        err = error_line(capsys.readouterr().err)
        assert "another architecture" in err
    (other / "best.safetensors").write_bytes(b"broken")
    (other / "last.pt").unlink()
    assert main(["predict", "--run", str(other), f]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["predict", "--run", str(trained_run[0]), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["predict", "--run", str(trained_run[0]), f, "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
