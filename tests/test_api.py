"""The Python API on the real dataset: fit without an output folder, predict on paths, arrays,
PIL images and DICOM, explain, save/load round trip, export, callbacks, config validation, the
bounded image cache, and the README's notebook example run as written."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import ct_transfer as ct
from ct_transfer.cli import main
from ct_transfer.data import MemoryCache

from .conftest import ROOT

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def api_run(data_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        cfg = ct.TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", epochs=2, limit=24)
        run = ct.fit(cfg, progress=False)
    finally:
        os.chdir(before)
    return run, cfg, cwd


def test_fit_without_out_writes_nothing_and_returns_a_run(api_run):
    run, cfg, cwd = api_run
    assert list(cwd.iterdir()) == []  # out=None: nothing written anywhere we can see
    assert run.directory is None and cfg.out is None
    test = run.metrics["test"]
    assert 0 <= test["accuracy"] <= 1 and test["n"] == sum(r["subset"] == "test" for r in run.split)
    assert [h["epoch"] for h in run.history] == [1, 2]
    assert run.config["image_size"] == 64 and cfg.image_size is None  # resolved copy, config never mutated


def test_predict_on_path_array_pil_bytes_and_dicom(api_run, data_dir, tmp_path, capsys):
    run, _, _ = api_run
    f = data_dir / "COVID" / "Covid (5).png"
    arr = ct.read_image(f)
    preds = run.predict([str(f), arr, Image.open(f), f.read_bytes(), CT])
    assert len(preds) == 5
    for p in preds:
        assert p.label in run.classes and sum(p.probabilities.values()) == pytest.approx(1, abs=1e-5)
    # the same image given four ways gives the same probabilities
    for p in preds[1:4]:
        for c in run.classes:
            assert p.probabilities[c] == pytest.approx(preds[0].probabilities[c], abs=1e-6)
    # a grey array (H x W) and a float [0, 1] array are the same image too
    grey = arr[:, :, 0]
    for other in (grey, grey.astype(np.float32) / 255.0):
        assert run.predict(other)[0].probabilities["COVID"] == pytest.approx(preds[0].probabilities["COVID"], abs=1e-6)
    # DICOM through the API equals DICOM through the CLI on the saved run
    path = run.save(tmp_path / "saved")
    assert main(["predict", "--run", str(path), CT, "--out", str(tmp_path / "p.json")]) == 0
    import json

    cli = json.loads((tmp_path / "p.json").read_text())[0]
    assert cli["prob_COVID"] == pytest.approx(preds[4].probabilities["COVID"], abs=1e-6)


def test_save_load_round_trip_gives_identical_probabilities(api_run, data_dir, tmp_path):
    run, _, _ = api_run
    files = [str(data_dir / "COVID" / "Covid (9).png"), str(data_dir / "non-COVID" / "Non-Covid (9).png"), CT]
    path = run.save(tmp_path / "lite0")
    for name in ("config.json", "split.csv", "history.csv", "best.safetensors", "metrics.json", "predictions_test.csv"):
        assert (path / name).is_file(), name
    again = ct.load_run(path)
    np.testing.assert_array_equal(run.predict_proba(files), again.predict_proba(files))
    assert again.metrics["test"] == run.metrics["test"] and again.classes == run.classes
    assert again.config["model"] == "EfficientNetLite0"


def test_explain_and_export_from_the_api(api_run, data_dir, tmp_path):
    run, _, _ = api_run
    f = str(data_dir / "COVID" / "Covid (5).png")
    ex = run.explain(f, method="gradcam")
    image = ct.read_image(f)
    assert ex.heatmap.shape == image.shape[:2] and ex.overlay.shape == image.shape and ex.overlay.dtype == np.uint8
    assert ex.label in run.classes and 0 <= ex.heatmap.min() and ex.heatmap.max() <= 1
    assert len(run.explain([f, CT], method="cam")) == 2
    info = run.export(tmp_path / "model.pt2")
    assert info["format"] == "pt2" and info["parity"]["max_abs_diff_probabilities"] < 1e-4
    assert (tmp_path / "model.pt2.json").is_file()


def test_callbacks_see_every_epoch_and_can_stop(data_dir):
    seen = []

    class Record(ct.Callback):
        def on_epoch_end(self, state, row):
            seen.append((row["epoch"], state.model is not None))

    run = ct.fit(ct.TrainConfig(data=str(data_dir), model="EfficientNetLite0", epochs=5, limit=8),
                 callbacks=[Record(), ct.StopWhen(lambda row, model: row["epoch"] >= 2)], progress=False)
    assert seen == [(1, True), (2, True)] and run.metrics["epochs"] == 2


def test_config_is_frozen_and_errors_name_the_parameter():
    cfg = ct.TrainConfig(data="d", model="EfficientNetLite0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    for bad, needle in ((dict(lr=float("nan")), "lr=nan"), (dict(epochs=0), "epochs=0"),
                        (dict(dropout=1.0), "dropout=1.0"), (dict(image_size=7), "image_size=7"),
                        (dict(strategy="x"), "strategy=x"), (dict(device="tpu"), "device=tpu"),
                        (dict(threads=-1), "threads=-1"), (dict(limit=-3), "limit=-3"),
                        (dict(freeze_until=2), "freeze_until=2")):
        with pytest.raises(ct.ConfigError, match=re.escape(needle)):
            ct.TrainConfig(data="d", model="EfficientNetLite0", **bad)
    with pytest.raises(ct.ConfigError, match="image_size=64: choose 71"):
        ct.TrainConfig(data="d", model="Xception", image_size=64).resolved()


def test_memory_cache_is_bounded():
    cache = MemoryCache(max_bytes=10_000)
    for i in range(20):
        cache.put(i, np.zeros(1_000, np.uint8))
    assert cache.nbytes <= 10_000 and len(cache) == 10
    assert cache.get(0) is None and cache.get(19) is not None  # least recently used went first
    cache.put("big", np.zeros(20_000, np.uint8))  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.nbytes <= 10_000


def test_readme_python_example_runs_as_written(tmp_path, data_dir):
    """The README's "Python API" block, executed from a folder beside ../shared like a checkout."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    scan = data_dir / "COVID" / "Covid (3).png"
    (work / "scan.png").write_bytes(scan.read_bytes())
    (work / "slice.dcm").write_bytes(open(CT, "rb").read())
    before = os.getcwd()
    os.chdir(work)
    try:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(before)
    assert (work / "runs" / "lite0" / "best.safetensors").is_file() and (work / "model.onnx").is_file()
    assert isinstance(namespace["run"], ct.Run)
