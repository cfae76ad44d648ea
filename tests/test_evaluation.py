"""Evaluation users can trust (#10): leakage audit, grouped split, external validation, intervals,
calibration and the val-chosen operating point, on the real datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from ct_transfer import _io
from ct_transfer import calibration as cal
from ct_transfer import data as D
from ct_transfer.audit import audit
from ct_transfer.cli import main
from ct_transfer.evaluate import compute_metrics, read_predictions
from ct_transfer.run import load_run

from .conftest import error_line, small_dataset

UCSD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


def _one_line_error(capsys, needle: str) -> str:
    err = error_line(capsys.readouterr().err)
    assert needle in err, err
    return err


# -- leakage audit -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_audit(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("audit")
    split = out / "paper.csv"
    D.write_split(D.split_folder(data_dir, "paper", 0), split)
    return audit(data_dir, out / "report", split_file=split), out


def test_audit_finds_the_known_pairs_and_the_paper_split_leak(paper_audit):
    summary, out = paper_audit
    assert ["COVID/Covid (128).png", "COVID/Covid (129).png"] in summary["exact_duplicate_sets"]
    assert ["COVID/Covid (134).png", "COVID/Covid (135).png"] in summary["exact_duplicate_sets"]
    assert summary["n_exact_pairs"] == 2
    # the paper split (seed 0) puts 128 in train and 129 in test, and more near-duplicates across
    pair = next(p for p in summary["pairs"] if {p["a"], p["b"]} == {"COVID/Covid (128).png", "COVID/Covid (129).png"})
    assert {pair["subset_a"], pair["subset_b"]} == {"train", "test"} and pair["exact"]
    assert summary["n_pairs_train_test"] > 1
    assert summary["n_pairs_across_subsets"] == sum(n for k, n in summary["pairs_by_subsets"].items()
                                                    if len(set(k.split("-"))) == 2 and "unused" not in k)
    # the default threshold pairs no COVID slice with a non-COVID one (those are necessarily two patients)
    assert summary["n_cross_class_pairs"] == 0
    on_disk = json.loads((out / "report" / "audit.json").read_text())
    assert on_disk["n_pairs_train_test"] == summary["n_pairs_train_test"]
    md = (out / "report" / "audit.md").read_text()
    assert "Covid (128).png" in md and "train-test" in md
    with Image.open(out / "report" / "contact_sheet.png") as im:
        assert im.width > 300 and im.height > 300


def test_audit_against_a_second_dataset_finds_shared_images(tmp_path, data_dir, capsys):
    a = small_dataset(tmp_path / "a", data_dir, per_class=6)
    b = tmp_path / "b"
    for cls in ("COVID", "non-COVID"):  # b shares a's last 3 images per class, plus 3 others
        (b / cls).mkdir(parents=True)
        for f in sorted((a / cls).iterdir())[3:]:
            shutil.copy(f, b / cls / ("copy-" + f.name))
        for f in sorted((data_dir / cls).iterdir())[100:103]:
            shutil.copy(f, b / cls / f.name)
    assert main(["audit", "--data", str(a), "--against", str(b), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "audit.json").read_text())
    exact = {(p["a"], p["b"]) for p in s["against"]["pairs"] if p["exact"]}
    assert exact == {(f"{c}/{f.name}", f"{c}/copy-{f.name}") for c in ("COVID", "non-COVID")
                     for f in sorted((a / c).iterdir())[3:]}
    assert (tmp_path / "out" / "contact_sheet_against.png").is_file()
    assert "against" in capsys.readouterr().out


def test_audit_bad_threshold_is_one_line(tmp_path, data_dir, capsys):
    assert main(["audit", "--data", str(data_dir), "--out", str(tmp_path), "--threshold", "-3"]) == 2
    _one_line_error(capsys, "--threshold -3")


# -- grouped split -------------------------------------------------------------------------------
def test_grouped_split_keeps_groups_together_and_is_byte_stable(tmp_path, data_dir, capsys):
    args = ["split", "--data", str(data_dir), "--preset", "grouped", "--seed", "3", "--no-duplicates"]
    assert main(args + ["--out", str(tmp_path / "a.csv")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    rows = D.read_split(tmp_path / "a.csv", data_dir)
    assert len(rows) == 2481
    subsets_of: dict = {}
    for r in rows:
        subsets_of.setdefault(r["group"], set()).add(r["subset"])
    assert all(len(s) == 1 for s in subsets_of.values())
    where = {r["path"]: r["subset"] for r in rows}
    assert where["COVID/Covid (128).png"] == where["COVID/Covid (129).png"]
    assert where["COVID/Covid (134).png"] == where["COVID/Covid (135).png"]
    for cls, n in (("COVID", 1252), ("non-COVID", 1229)):  # stratified 80:10:10 (within a few images)
        for subset, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            k = sum(r["class"] == cls and r["subset"] == subset for r in rows)
            assert abs(k - share * n) <= 0.02 * n, (cls, subset, k)
    # the audit of this split: no near-duplicate pair across subsets
    s = audit(data_dir, tmp_path / "audit", split_file=tmp_path / "a.csv")
    assert s["n_pairs_across_subsets"] == 0 and s["n_groups_across_subsets"] == 0
    assert s["contact_sheet"] is None


def test_grouped_split_with_patients_keeps_every_patient_in_one_subset(tmp_path):
    rows = D.split_folder(UCSD, "grouped", 0, groups_file=UCSD / "SPLIT.csv")
    patient = {r["path"]: r["patient"] for r in _io.read_csv(UCSD / "SPLIT.csv")}
    subsets_of: dict = {}
    for r in rows:
        subsets_of.setdefault(patient[r["path"]], set()).add(r["subset"])
    assert len(subsets_of) > 20 and all(len(s) == 1 for s in subsets_of.values())
    assert {r["subset"] for r in rows} == {"train", "val", "test"}


def test_grouped_split_bad_groups_file(tmp_path, data_dir, capsys):
    bad = tmp_path / "groups.csv"
    bad.write_text("path,group\nCOVID/Covid (1).png,p1\n")
    assert main(["split", "--data", str(data_dir), "--split-preset", "grouped", "--split-groups", str(bad),
                 "--out", str(tmp_path / "s.csv"), "--no-duplicates"]) == 2
    _one_line_error(capsys, "have no group")
    assert main(["split", "--data", str(data_dir), "--groups", str(bad), "--out", str(tmp_path / "s.csv")]) == 2
    _one_line_error(capsys, "only with --split-preset grouped")


# -- external validation -------------------------------------------------------------------------
@pytest.fixture()
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run[0], dst)
    return dst


def test_external_metrics_equal_a_computation_from_the_predictions(run_copy, capsys):
    assert main(["evaluate", "--run", str(run_copy), "--data", str(UCSD), "--split-file", str(UCSD / "SPLIT.csv"),
                 "--subset", "val", "--name", "ucsd"]) == 0
    assert "ext" in capsys.readouterr().out
    rec = json.loads((run_copy / "external" / "ucsd" / "metrics.json").read_text())
    assert rec["name"] == "ucsd" and rec["data"] == str(UCSD)
    m = rec["metrics"]
    paths, true, proba, classes = read_predictions(run_copy / "external" / "ucsd" / "predictions.csv")
    assert len(paths) == m["n"] == 118  # UCSD dev's val patients
    y = np.array([classes.index(t) for t in true])
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, pos_label=1))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]), abs=2e-3)  # CSV keeps 6 decimals
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for key in ("accuracy", "recall", "specificity", "f1", "roc_auc"):
        lo, hi = m["ci95"][key]
        assert lo <= m[key] <= hi and hi - lo > 0
    # the report reads it
    from ct_transfer.report.collect import read_external

    assert read_external(run_copy)[0]["metrics"]["accuracy"] == m["accuracy"]


def test_external_one_line_errors(run_copy, tmp_path, data_dir, capsys):
    base = ["evaluate", "--run", str(run_copy), "--data"]
    assert main(base + [str(UCSD), "--class-map", "COVID=Pneumonia"]) == 2
    _one_line_error(capsys, "unknown class 'Pneumonia'")
    assert main(base + [str(UCSD), "--class-map", "CT_COVID=COVID"]) == 2
    _one_line_error(capsys, "no class folder 'CT_COVID'")
    other = tmp_path / "other"
    used = {r["path"] for r in D.read_split(run_copy / "split.csv")}  # the run's own images are never external
    fresh = [f for f in sorted((data_dir / "COVID").iterdir()) if f"COVID/{f.name}" not in used]
    for cls, f in zip(("CT_COVID", "CT_NonCOVID"), fresh):
        (other / cls).mkdir(parents=True)
        shutil.copy(f, other / cls / "x.png")
    assert main(base + [str(other)]) == 2
    _one_line_error(capsys, "not one of the run's classes")
    assert main(base + [str(other), "--class-map", "CT_COVID=COVID,CT_NonCOVID=non-COVID", "--name", "m"]) == 0
    assert (run_copy / "external" / "m" / "metrics.json").is_file()
    capsys.readouterr()
    bad_split = tmp_path / "split.csv"
    bad_split.write_text("path,class,subset\nCOVID/nope.png,COVID,test\n")
    assert main(base + [str(UCSD), "--split-file", str(bad_split), "--subset", "test"]) == 2
    _one_line_error(capsys, "missing under")


# -- intervals, calibration, operating point -----------------------------------------------------
def test_ece_of_a_perfectly_calibrated_toy_is_about_zero():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(len(p)) < p).astype(int)
    proba = np.stack([1 - p, p], 1)
    assert cal.expected_calibration_error(y, proba) < 0.005
    sharp = np.stack([1 - (p > 0.5), (p > 0.5)], 1).astype(float) * 0.98 + 0.01  # overconfident
    assert cal.expected_calibration_error(y, sharp) > 0.15


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, size=(20_000, 2))
    true_p = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)
    y = (rng.random(len(logits)) < true_p[:, 1]).astype(int)
    assert cal.fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)


def test_intervals_are_wilson_and_existing_keys_unchanged():
    y = np.array([0] * 50 + [1] * 50)
    p = np.linspace(0.01, 0.99, 100)
    m = compute_metrics(y, np.stack([1 - p, p], 1), ["non-COVID", "COVID"])
    assert {"n", "accuracy", "precision", "recall", "f1", "specificity", "roc_auc", "confusion_matrix",
            "positive_class"} <= set(m)
    assert m["accuracy"] == 1.0 and m["ci95"]["accuracy"][1] == pytest.approx(1.0)
    assert m["ci95"]["accuracy"][0] == pytest.approx(0.963, abs=1e-3)  # Wilson, 100/100
    again = compute_metrics(y, np.stack([1 - p, p], 1), ["non-COVID", "COVID"])
    assert again["ci95"] == m["ci95"]  # seeded bootstrap


def test_threshold_chosen_on_val_is_applied_unchanged_to_test(run_copy, capsys):
    # the shared run's val (6 + 6) is below calibration's minimum: forced (test_calibration checks the refusal)
    assert main(["calibrate", "--run", str(run_copy), "--sensitivity", "0.95", "--force"]) == 0
    out = capsys.readouterr().out
    assert "at threshold" in out
    c = json.loads((run_copy / "predictor.json").read_text())["calibration"]  # fitted state, apart from options
    metrics = json.loads((run_copy / "metrics.json").read_text())
    # val: the threshold reaches the target sensitivity; test: the same threshold, not refitted
    assert metrics["val"]["operating_point"]["sensitivity"] >= 0.95
    assert metrics["test"]["operating_point"]["threshold"] == c["threshold"]
    _, true, proba, classes = read_predictions(run_copy / "predictions_test.csv")
    y = np.array([classes.index(t) for t in true])
    pos = proba[:, 1] >= c["threshold"]
    op = metrics["test"]["operating_point"]
    # predictions keep 6 decimals: compare counts allowing an image exactly at the threshold
    assert abs(pos[y == 1].mean() - op["sensitivity"]) <= 1 / (y == 1).sum() + 1e-9
    assert abs((~pos[y == 0]).mean() - op["specificity"]) <= 1 / (y == 0).sum() + 1e-9
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)  # probabilities stay probabilities
    run = load_run(run_copy)  # predict picks the calibration up
    assert run.temperature == c["temperature"] and run.threshold == c["threshold"]
    labels = [p.label for p in run.predict(proba_paths(run_copy)[:8])]
    got = run.predict_proba(proba_paths(run_copy)[:8])
    assert labels == [classes[1] if q[1] >= c["threshold"] else classes[0] for q in got]
    assert (run_copy / "reliability.png").is_file()


def proba_paths(run_dir):
    paths, _, _, _ = read_predictions(run_dir / "predictions_test.csv")
    data = json.loads((run_dir / "config.json").read_text())["data"]
    return [str(Path(data) / p) for p in paths]


def test_grid_with_calibration_and_external_set_through_the_cli(tmp_path, data_dir, capsys):
    """`experiment --calibrate --external`: every run calibrated on val, evaluated on the external
    folder, and the report puts internal and external side by side."""
    ext = tmp_path / "ext"  # a small real external set: 6 UCSD slices per class
    for cls in ("COVID", "non-COVID"):
        (ext / cls).mkdir(parents=True)
        for f in sorted((UCSD / cls).iterdir())[:6]:
            (ext / cls / f.name).write_bytes(f.read_bytes())
    grid = tmp_path / "grid"
    args = ["experiment", "--data", str(data_dir), "--out", str(grid), "--models", "EfficientNetLite0",
            "--weights", "imagenet", "--seeds", "0", "--epochs", "1", "--limit", "12", "--calibrate", "--force-calibration",
            "--external", str(ext), "--quiet"]
    assert main(args) == 0
    run_dir = grid / "runs" / "EfficientNetLite0__imagenet__seed0"
    cal = json.loads((run_dir / "predictor.json").read_text())["calibration"]
    assert cal["temperature"] > 0 and 0 < cal["threshold"] < 1
    ext_metrics = json.loads((run_dir / "external" / "ext" / "metrics.json").read_text())
    assert ext_metrics["metrics"]["n"] == 12 and set(ext_metrics["metrics"]["ci95"]) >= {"accuracy", "roc_auc"}
    # the external probabilities are the calibrated model's: equal to Run.predict_proba on the files
    paths, _, proba, _ = read_predictions(run_dir / "external" / "ext" / "predictions.csv")
    files = [p if Path(p).is_absolute() else str(ext / p) for p in paths]
    np.testing.assert_allclose(load_run(run_dir).predict_proba(files), proba, atol=1e-5)
    stamp = (run_dir / "external" / "ext" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # a restart skips the run and does not evaluate it again
    assert (run_dir / "external" / "ext" / "metrics.json").stat().st_mtime_ns == stamp
    # a finished run without the external result (--external added later) is evaluated on restart
    shutil.rmtree(run_dir / "external")
    assert main(args) == 0
    again = json.loads((run_dir / "external" / "ext" / "metrics.json").read_text())
    assert again["metrics"]["accuracy"] == ext_metrics["metrics"]["accuracy"]
    capsys.readouterr()
    assert main(["report", str(grid), "--out", str(tmp_path / "report"), "--no-gallery"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Internal vs external" in md and "ext" in md
