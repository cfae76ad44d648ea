"""Calibration that cannot hurt silently (#23): refused on a val too small for it, the temperature
kept at 1 when it reaches its bound or makes val ECE worse, the outcome recorded, and external
results refreshed or marked stale after a new calibration. On the shared trained run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_transfer import calibration as cal
from ct_transfer.calibration import CalibrationRefused
from ct_transfer.cli import main
from ct_transfer.evaluate import read_predictions
from ct_transfer.inference import softmax
from ct_transfer.run import load_run

UCSD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


@pytest.fixture()
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run[0], dst)
    return dst


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


class _Val:  # what Run.calibrate reads from a val subset
    def __init__(self, x, y):
        self.x, self.y = x, torch.as_tensor(y)


def _ucsd(run, cls_offset: int, per_class: int):
    """``per_class`` real UCSD slices of each of the run's classes, starting at ``cls_offset``."""
    paths, y = [], []
    for k, c in enumerate(run.classes):
        files = sorted(f for f in (UCSD / c).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        chosen = files[cls_offset:cls_offset + per_class]
        paths += [str(f) for f in chosen]
        y += [k] * len(chosen)
    return paths, np.array(y)


def test_calibrate_refuses_a_tiny_val_and_leaves_the_run_as_it_was(run_copy, capsys):
    before = _files(run_copy)
    run = load_run(run_copy)
    n_val = sum(r["subset"] == "val" for r in run.split)
    assert n_val < cal.MIN_VAL  # the shared run: 6 + 6 val images
    with pytest.raises(CalibrationRefused) as exc:
        run.calibrate()
    assert f"val has {n_val} images" in str(exc.value) and f"at least {cal.MIN_VAL}" in str(exc.value)
    assert exc.value.record["status"] == "refused" and exc.value.record["n_val"] == n_val
    assert run.temperature == 1.0 and run.threshold is None
    # the CLI: one line naming the run and the minimum, exit 2, every file unchanged
    assert main(["calibrate", "--run", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"ct-transfer: error: {run_copy}: calibration refused")
    assert f"at least {cal.MIN_VAL_PER_CLASS} per class" in err and "--force" in err and "Traceback" not in err
    assert _files(run_copy) == before
    # --force fits it anyway and says so in predictor.json and metrics.json
    assert main(["calibrate", "--run", str(run_copy), "--force"]) == 0
    assert "fitted (forced)" in capsys.readouterr().out
    c = json.loads((run_copy / "predictor.json").read_text())["calibration"]
    m = json.loads((run_copy / "metrics.json").read_text())["calibration"]
    assert c["status"] == m["status"] == "fitted" and c["forced"] and m["forced"]
    assert any(f"val has {n_val} images" in r for r in c["reasons"])
    assert c["temperature"] == m["temperature"] == c["fitted_temperature"] != 1.0
    assert load_run(run_copy).temperature == c["temperature"]


def test_fit_records_a_refused_calibration_and_stays_uncalibrated(trained_run, tmp_path, data_dir):
    """`train --calibrate` on a val too small: the trained run is kept, uncalibrated, with the reason."""
    from ct_transfer import TrainConfig, fit

    out = tmp_path / "tiny"
    run = fit(TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", out=str(out),
                          epochs=1, limit=12, seed=0, strategy="linear", calibrate=True), progress=False)
    assert run.temperature == 1.0 and run.threshold is None
    for doc in ("predictor.json", "metrics.json"):
        rec = json.loads((out / doc).read_text())["calibration"]
        assert rec["status"] == "refused" and rec["temperature"] == 1.0 and rec["threshold"] is None
        assert rec["n_val"] == 2 and any("at least 30" in r for r in rec["reasons"])
    assert "operating_point" not in json.loads((out / "metrics.json").read_text())["test"]


def test_temperature_kept_at_1_when_it_makes_val_ece_worse_or_hits_its_bound(trained_run):
    """Windows of 15 + 15 real UCSD slices as val: wherever the fitted temperature makes val ECE worse
    (or stops at its bound) the run keeps T = 1 and picks the threshold on the unscaled probabilities;
    elsewhere the fitted temperature is used. Both kinds occur on this run's slices."""
    run = load_run(trained_run[0])
    seen = set()
    for offset in range(0, 120, 15):
        paths, y = _ucsd(run, offset, 15)
        x = run.load_images(paths)
        logits = run.predictor.forward(x)[0].numpy().astype(np.float64)
        t = cal.fit_temperature(logits, y)
        ece_1 = cal.expected_calibration_error(y, softmax(logits))
        ece_t = cal.expected_calibration_error(y, softmax(logits, t))
        rec = run.calibrate(_Val(x, y), save=False)
        worse, bound = ece_t > ece_1, cal.at_bound(t)
        assert rec["fitted_temperature"] == pytest.approx(t) and rec["val_ece_fitted"] == pytest.approx(ece_t)
        if worse or bound:
            seen.add("worse" if worse else "bound")
            assert rec["status"] == "kept-uncalibrated" and rec["temperature"] == 1.0 == run.temperature
            assert rec["val_ece_after"] == pytest.approx(ece_1)
            assert any(("got worse" if worse else "bound") in r for r in rec["reasons"])
            unscaled = softmax(logits)[:, 1]
            assert rec["threshold"] == pytest.approx(cal.choose_threshold(y, unscaled))
            forced = run.calibrate(_Val(x, y), save=False, force=True)
            assert forced["status"] == "fitted" and forced["temperature"] == pytest.approx(t) and forced["reasons"]
        else:
            seen.add("fitted")
            assert rec["status"] == "fitted" and rec["temperature"] == pytest.approx(t) and rec["reasons"] == []
            assert rec["val_ece_after"] == pytest.approx(ece_t) and ece_t <= ece_1
    assert "worse" in seen and "fitted" in seen, seen


def test_external_results_are_refreshed_or_marked_stale_after_calibrate(run_copy, tmp_path):
    ext = tmp_path / "ext"  # 6 real UCSD slices per class; a second copy that will be gone
    gone = tmp_path / "gone"
    for root in (ext, gone):
        for c in ("COVID", "non-COVID"):
            (root / c).mkdir(parents=True)
            for f in sorted((UCSD / c).iterdir())[:6]:
                shutil.copy(f, root / c / f.name)
    run = load_run(run_copy)
    first = run.evaluate_external(ext, name="ext")
    run.evaluate_external(gone, name="gone")
    assert first["calibration"] == {"temperature": 1.0, "threshold": None, "status": "uncalibrated",
                                    "fingerprint": cal.fingerprint(1.0, None)}
    shutil.rmtree(gone)
    val = run._load(run.split, "val", run.config["data"], "split")
    rec = run.calibrate(val, force=True)  # the shared run's val is small: forced
    assert {e["name"]: e["status"] for e in rec["external"]} == {"ext": "refreshed", "gone": "stale"}
    fresh = json.loads((run_copy / "external" / "ext" / "metrics.json").read_text())
    assert fresh["calibration"]["fingerprint"] == rec["fingerprint"] == cal.fingerprint(run.temperature, run.threshold)
    assert fresh["calibration"]["threshold"] == rec["threshold"] and "stale" not in fresh
    assert "operating_point" in fresh["metrics"]
    paths, _, proba, _ = read_predictions(run_copy / "external" / "ext" / "predictions.csv")
    np.testing.assert_allclose(load_run(run_copy).predict_proba([str(ext / p) for p in paths]), proba, atol=1e-5)
    stale = json.loads((run_copy / "external" / "gone" / "metrics.json").read_text())
    assert stale["calibration"]["fingerprint"] == cal.fingerprint(1.0, None)  # what it was computed with
    assert "another calibration" in stale["stale"]["reason"] and "not here" in stale["stale"]["reason"]
    assert stale["stale"]["calibration_now"]["fingerprint"] == rec["fingerprint"]
    again = load_run(run_copy).calibrate(val, force=True)  # same calibration: nothing to redo
    assert {e["name"]: e["status"] for e in again["external"]} == {"ext": "current", "gone": "stale"}


def test_too_small_val_reasons_name_the_classes():
    y = np.array([0] * 25 + [1] * 8)
    problems = cal.val_size_problems(y, ["non-COVID", "COVID"])
    assert len(problems) == 1 and "8 COVID" in problems[0] and "non-COVID" not in problems[0]
    assert cal.val_size_problems(np.array([0] * 15 + [1] * 15), ["a", "b"]) == []
