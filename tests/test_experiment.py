"""The grid runner (skip, resume, failures) and the report's statistics on small real grids."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from scipy import stats

from ct_transfer import report as R
from ct_transfer.cli import main
from ct_transfer.experiment import run_grid, run_status

BASE = dict(epochs=1, limit=16)


@pytest.fixture(scope="module")
def small_grid(tmp_path_factory, data_dir):
    """EfficientNetLite0 x {none, imagenet} x seeds {0, 1}, 1 epoch, plus one run that fails."""
    out = tmp_path_factory.mktemp("grid")
    missing = str(out / "missing-weights.pth")
    results = run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none", "imagenet", missing], [0, 1],
                       base=BASE, progress=False)
    return out, results


def test_grid_runs_every_cell_and_records_failures(small_grid):
    out, results = small_grid
    assert len(results) == 6
    assert sum(r["status"] == "done" for r in results) == 4
    failed = [r for r in results if r["status"] == "failed"]
    assert len(failed) == 2 and all("missing-weights.pth" in r["error"] for r in failed)
    for r in failed:
        assert "missing-weights.pth" in (out / "runs" / r["run"] / "error.txt").read_text()
    # every run used the grid's one split
    splits = {(out / "runs" / r["run"] / "split.csv").read_text() for r in results if r["status"] == "done"}
    assert len(splits) == 1


def test_grid_restart_skips_finished_runs(small_grid, data_dir, caplog):
    caplog.set_level(logging.INFO, logger="ct_transfer")
    out, _ = small_grid
    done = out / "runs" / "EfficientNetLite0__none__seed0" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    results = run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none"], [0], base=BASE, progress=False)
    assert results == [{"run": "EfficientNetLite0__none__seed0", "status": "done"}]
    assert done.stat().st_mtime_ns == stamp
    assert "done already, skipped" in caplog.text


def test_grid_resumes_an_interrupted_run(tmp_path, data_dir):
    out = tmp_path / "g"
    run_dir = out / "runs" / "EfficientNetLite0__none__seed0"
    run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none"], [0], base=dict(epochs=1, limit=16), progress=False)
    first = (run_dir / "history.csv").read_text().splitlines()
    (run_dir / "metrics.json").unlink()  # as if killed after epoch 1 of 2
    assert run_status(run_dir, 2) == "partial"
    run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none"], [0], base=dict(epochs=2, limit=16), progress=False)
    hist = (run_dir / "history.csv").read_text().splitlines()
    assert len(hist) == 3 and hist[:2] == first  # epoch 1 kept, epoch 2 added
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


def test_experiment_cli_bad_model_fails_before_training(tmp_path, data_dir, capsys):
    code = main(["experiment", "--data", str(data_dir), "--out", str(tmp_path / "g"), "--models", "NoSuchNet",
                 "--seeds", "0", "--epochs", "1"])
    assert code == 2 and "--models NoSuchNet" in capsys.readouterr().err
    assert not (tmp_path / "g" / "runs").exists()


def test_statistics_helpers():
    s = R.mean_std_ci([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    assert s["ci95"] == pytest.approx([0.9 - half, 0.9 + half])
    assert R.mean_std_ci([0.5])["ci95"] is None
    assert R.mcnemar_exact(0, 0) == 1.0
    assert R.mcnemar_exact(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert R.mcnemar_exact(5, 5) == pytest.approx(1.0)


def _fake_run(tmp_path, name, correct_mask):
    """A run directory whose test predictions are right exactly where ``correct_mask`` is True."""
    d = tmp_path / name
    d.mkdir()
    lines = ["path,true,pred,prob_non-COVID,prob_COVID"]
    for i, ok in enumerate(correct_mask):
        true = "COVID" if i % 2 else "non-COVID"
        pred = true if ok else ("non-COVID" if true == "COVID" else "COVID")
        p = 0.9 if pred == "COVID" else 0.1
        lines.append(f"img{i}.png,{true},{pred},{1 - p:.6f},{p:.6f}")
    (d / "predictions_test.csv").write_text("\n".join(lines) + "\n")
    return {"dir": d}


def test_paired_comparison_detects_a_real_difference(tmp_path):
    n = 200
    good = [_fake_run(tmp_path, f"g{s}", [i % 10 != 0 for i in range(n)]) for s in range(3)]  # 90 %
    bad = [_fake_run(tmp_path, f"b{s}", [i % 10 < 6 for i in range(n)]) for s in range(3)]  # 60 %
    c = R.paired_comparison(good, bad, n_boot=2000)
    assert c["acc_diff"] == pytest.approx(0.3)
    assert c["verdict"] == "ImageNet better" and c["mcnemar_p"] < 1e-6 and c["bootstrap_ci95"][0] > 0
    same = R.paired_comparison(good, good, n_boot=2000)
    assert same["verdict"] == "no significant difference" and same["mcnemar_p"] == 1.0


def test_report_from_a_real_grid(small_grid, tmp_path, capsys):
    out, _ = small_grid
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for needle in ("Table 6 — accuracy (test)", "Table 7 — F1 score (test)", "Table 8 — training time",
                   "Table 6 — accuracy (val)", "Headline ratios", "1.13×", "McNemar", "Explanation gallery",
                   "Reduced protocol", "missing-weights.pth", "| EfficientNetLite0 |"):
        assert needle in md, needle
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 + 1  # plots + at least one gallery overlay
    assert "src=\"gallery/" not in html and "<table>" in html
    for png in ("accuracy.png", "f1.png", "train_time.png", "val_curves.png", "confusion_matrices.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    row = summary["tables"]["test"]["accuracy"]["rows"][0]
    runs, _ = R.collect_runs(out)
    accs = [r["metrics"]["test"]["accuracy"] for r in runs if r["weights"] == "imagenet"]
    assert row["with"]["mean"] == pytest.approx(np.mean(accs)) and row["with"]["n"] == 2
    assert "runs reported" in capsys.readouterr().out
