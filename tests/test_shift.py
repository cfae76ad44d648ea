"""The shift guard (issue #21) on the session's real trained run: it flags another hospital's
slices (UCSD-dev) and accepts unseen SARS-CoV-2 slices; the same score and flag through predict, the
Python API and the ONNX export; old runs without a guard; the set-level check; one-line errors."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_transfer import shift
from ct_transfer.cli import main
from ct_transfer.errors import ConfigError, CTTransferError
from ct_transfer.run import load_run

from .conftest import error_line

ROOT = Path(__file__).resolve().parents[1]
UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run[0])


@pytest.fixture(scope="module")
def ucsd_files():
    files = sorted(p for c in ("COVID", "non-COVID") for p in (UCSD / c).iterdir())
    return files[::18]  # 31 slices spread over both classes and many patients


@pytest.fixture(scope="module")
def sars_unseen(run, data_dir):
    """SARS-CoV-2 slices the run never saw (outside its split: not trained on, not the threshold's val)."""
    used = {r["path"] for r in run.split}
    files = sorted(p for c in ("COVID", "non-COVID") for p in (data_dir / c).iterdir()
                   if f"{c}/{p.name}" not in used)
    return files[::80]  # 30 slices


def _copy(files, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f"{f.parent.name}-{f.name}")
    return folder


def test_fit_saves_a_guard_that_flags_ucsd_and_accepts_sars(trained_run, run, ucsd_files, sars_unseen):
    from sklearn.metrics import roc_auc_score

    facts = json.loads((trained_run[0] / shift.GUARD_FACTS).read_text())
    assert facts["detector"] == shift.DEFAULT_DETECTOR and facts["fitted_on"] == "train"
    assert facts["n_train"] == sum(r["subset"] == "train" for r in run.split)
    assert run.guard is not None and run.guard.val_scores.shape == (facts["n_val"],)
    u, s = run.predict(ucsd_files), run.predict(sars_unseen)
    flag_u = np.mean([not p.in_distribution for p in u])
    flag_s = np.mean([not p.in_distribution for p in s])
    auroc = roc_auc_score([1] * len(u) + [0] * len(s), [p.shift_score for p in u + s])
    # a small run (96 train images, 12 val: the threshold is about the largest val score) still
    # flags far more of the other hospital's slices than of its own unseen ones
    assert flag_u >= flag_s + 0.3 and flag_s <= 0.2 and auroc > 0.85, (flag_u, flag_s, auroc)
    # the flag is the threshold rule on the score, and the probabilities are those without a guard
    assert all(p.in_distribution == (p.shift_score <= float(run.guard.threshold)) for p in u + s)
    guard = run.guard
    try:
        run.guard = None
        plain = run.predict(ucsd_files[:4])
    finally:
        run.guard = guard
    assert all(p.shift_score is None and p.in_distribution is None for p in plain)
    for a, b in zip(plain, u[:4]):  # batches of 4 and of 31 images: float32 sums in another order
        assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_every_detector_fits_and_scores_in_one_pass(run, ucsd_files, sars_unseen):
    x_u = run.load_images(ucsd_files[:8])
    x_s = run.load_images(sars_unseen[:8])
    for name in shift.list_detectors():
        guard = shift.fit_guard(run, detector=name, save=False)
        assert guard.name == name and guard.describe()["val_accepted"] >= 0.95
        proba, scores = shift.image_scores(run, torch.cat([x_u, x_s]))
        assert scores.shape == (16,) and np.isfinite(scores).all() and proba.shape == (16, 2)
    run.guard = shift.load_guard(run.directory)  # back to the run's saved guard


def test_scores_agree_with_pytorch_ood_and_sklearn(run, sars_unseen):
    """Our torch detectors against maintained implementations, on real features of real slices."""
    from pytorch_ood.detector import KNN as OodKNN
    from pytorch_ood.detector import EnergyBased, MaxSoftmax
    from sklearn.covariance import LedoitWolf

    x = run.load_images(sars_unseen[:24])
    f, logits = shift._tapped_features(run.model, x, run.transform, [shift.HEAD_INPUT, shift.LOGITS],
                                       device="cpu", channels_last=True, bf16=False)
    np.testing.assert_allclose(shift.Energy()([logits]), EnergyBased.score(logits), rtol=1e-5)
    np.testing.assert_allclose(shift.MaxSoftmax()([logits]), MaxSoftmax.score(logits), rtol=1e-5)
    train, test = f[:16], f[16:]
    ours = shift.KNN.fit([train], torch.zeros(16, dtype=torch.long), 2)([test])
    ref = OodKNN(None, k=10).fit_features(train, torch.zeros(16, dtype=torch.long)).predict_features(test)
    np.testing.assert_allclose(ours, ref.numpy() ** 2 / 2, rtol=1e-4, atol=1e-6)  # 1 - cos = |a - b|^2 / 2
    maha = shift.Mahalanobis.fit([train], torch.zeros(16, dtype=torch.long), 1)([test])
    lw = LedoitWolf(assume_centered=True).fit(train.double().numpy() - train.double().numpy().mean(0))
    np.testing.assert_allclose(maha, lw.mahalanobis(test.double().numpy() - train.double().numpy().mean(0)),
                               rtol=1e-3)


def test_predict_csv_and_onnx_export_carry_the_same_score(trained_run, run, ucsd_files, sars_unseen, tmp_path):
    files = [*ucsd_files[:3], *sars_unseen[:3]]
    api = run.predict(files)
    assert main(["predict", "--run", str(trained_run[0]), *map(str, files), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    for r, p in zip(rows, api):
        assert float(r["shift_score"]) == pytest.approx(p.shift_score, rel=1e-6)
        assert r["in_distribution"] == str(p.in_distribution)

    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    info = run.export(out, n_check=8)
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["outputs"] == ["probabilities", "shift_score"]
    assert side["shift_guard"]["threshold"] == pytest.approx(float(run.guard.threshold))
    assert info["parity"]["max_rel_diff_shift_score"] < 1e-4 and info["parity"]["same_in_distribution"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = run.load_images(files).float().numpy() / 255.0
    proba, score = session.run(["probabilities", "shift_score"], {"image": x})
    np.testing.assert_allclose(score, [p.shift_score for p in api], rtol=1e-4)
    assert [bool(s <= side["shift_guard"]["threshold"]) for s in score] == [p.in_distribution for p in api]
    np.testing.assert_allclose(proba[:, 1], [p.probabilities["COVID"] for p in api], atol=1e-5)
    assert not any(m._forward_hooks for m in run.model.modules())  # the export left no hooks behind


def test_old_run_without_guard_loads_and_the_guard_command_fits_one(trained_run, tmp_path, caplog, capsys):
    old = tmp_path / "old"
    shutil.copytree(trained_run[0], old)
    (old / shift.GUARD_FILE).unlink()
    (old / shift.GUARD_FACTS).unlink()
    with caplog.at_level(logging.INFO, logger="ct_transfer"):
        run = load_run(old)
    said = [r.getMessage() for r in caplog.records if "no shift guard" in r.getMessage()]
    assert run.guard is None and len(said) == 1
    pred = run.predict([str(p) for p in sorted((Path(run.config["data"]) / "COVID").iterdir())[:2]])
    assert pred[0].shift_score is None
    # a command that needs a guard: one line naming the run
    assert main(["shift", "--run", str(old), "--data", str(UCSD / "COVID")]) == 2
    err = error_line(capsys.readouterr().err)  # after the load's own log line, one error line
    assert "no shift guard" in err and "ct-transfer guard" in err
    assert main(["guard", "--run", str(old), "--detector", "knn"]) == 0
    assert "accepts" in capsys.readouterr().out
    assert load_run(old).guard.name == "knn"
    assert main(["guard", "--run", str(old), "--detector", "nope"]) == 2
    assert main(["guard", "--run", str(old), "--accept", "1.5"]) == 2
    assert "--accept 1.5: choose a share" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="detector=nope"):
        shift.fit_guard(run, detector="nope")
    # a damaged guard file: one line naming it, the run's files as they were
    (old / shift.GUARD_FILE).write_bytes(b"not safetensors")
    assert main(["predict", "--run", str(old), str(sorted((Path(run.config["data"]) / "COVID").iterdir())[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "guard.safetensors: not a valid shift guard" in err
    assert (old / shift.GUARD_FILE).read_bytes() == b"not safetensors"


def test_set_level_check(trained_run, run, ucsd_files, sars_unseen, tmp_path, capsys):
    ucsd = _copy(ucsd_files[:20], tmp_path / "ucsd")
    sars = _copy(sars_unseen[:20], tmp_path / "sars")
    res_u = shift.check_shift(run, ucsd, out=tmp_path / "out-u")
    res_s = shift.check_shift(run, sars)
    assert res_u["p_value"] < 0.01 and res_u["shifted"] and res_u["verdict"].startswith("Unlike")
    assert res_s["p_value"] > 0.01 and not res_s["shifted"] and res_s["verdict"].startswith("Consistent")
    assert res_u["n"] == 20 and res_u["flagged"] > res_s["flagged"]
    saved = json.loads((tmp_path / "out-u" / "shift.json").read_text())
    assert saved["p_value"] == pytest.approx(res_u["p_value"])
    assert len(list(csv.DictReader(open(tmp_path / "out-u" / "shift_scores.csv")))) == 20
    assert (tmp_path / "out-u" / "shift_hist.png").read_bytes()[:4] == b"\x89PNG"
    # the CLI: JSON out, the same numbers
    assert main(["shift", "--run", str(trained_run[0]), "--data", str(sars), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["p_value"] == pytest.approx(res_s["p_value"]) and out["flagged"] == res_s["flagged"]


def test_set_level_bad_input_one_line(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    assert main(["shift", "--run", str(trained_run[0]), "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no images" in err
    assert main(["shift", "--run", str(trained_run[0]), "--data", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(CTTransferError, match="holds no images"):
        shift.check_shift(load_run(trained_run[0]), empty)


def test_external_evaluation_has_set_level_and_risk_coverage(trained_run, tmp_path):
    folder = tmp_path / "ucsd-small"
    for c in ("COVID", "non-COVID"):
        _copy(sorted((UCSD / c).iterdir())[::25], folder / c)
    copy = tmp_path / "run"
    shutil.copytree(trained_run[0], copy)
    run = load_run(copy)
    rec = run.evaluate_external(folder, name="ucsd-small")
    assert rec["shift"]["p_value"] < 0.01 and rec["shift"]["n"] == rec["metrics"]["n"]
    sel = rec["metrics"]["selective"]
    assert sel["curve"][-1]["coverage"] == 1.0 and sel["curve"][-1]["accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
    assert sel["at_threshold"]["accepted"] == pytest.approx(1 - rec["shift"]["flagged"])  # one threshold, both views
    assert rec["shift"]["flagged"] > rec["shift"]["val_flagged"]
    rows = list(csv.DictReader(open(copy / "external" / "ucsd-small" / "predictions.csv")))
    assert {"shift_score", "in_distribution"} <= set(rows[0])
    assert (copy / "external" / "ucsd-small" / "shift_hist.png").is_file()
    internal = json.loads((trained_run[0] / "metrics.json").read_text())
    assert "selective" in internal["test"] and internal["test"]["selective"]["n"] == internal["test"]["n"]


def test_block_mahalanobis_equals_sklearn_on_every_block(run, sars_unseen):
    """mahalanobis-blocks = per layer (stem, every block, head input) the Ledoit-Wolf Mahalanobis
    distance to the nearest class mean (scikit-learn), standardised by the training distances, summed."""
    from sklearn.covariance import LedoitWolf

    taps = shift.BlockMahalanobis.taps(run.model)
    blocks = run.model.get_submodule("backbone.blocks")
    assert taps[0] == "backbone.bn1" and taps[-1] == shift.HEAD_INPUT
    assert len(taps) == 2 + sum(len(stage) for stage in blocks) > len(shift.MultiMahalanobis.taps(run.model))
    x = run.load_images(sars_unseen[:30])
    feats = shift._tapped_features(run.model, x, run.transform, taps, device="cpu", channels_last=True, bf16=False)
    y = torch.tensor([0] * 12 + [1] * 12)  # 24 to fit on (the class is a label here; only the geometry matters)
    det = shift.BlockMahalanobis.fit([f[:24] for f in feats], y, 2)
    ours = det([f[24:] for f in feats]).numpy()
    cols_fit, cols_new = [], []
    for f in feats:
        f = f.double().numpy()
        tr, yy = f[:24], y.numpy()
        means = [tr[yy == c].mean(0) for c in (0, 1)]
        lw = LedoitWolf(assume_centered=True).fit(tr - np.stack(means)[yy])
        for z, cols in ((tr, cols_fit), (f[24:], cols_new)):
            cols.append(np.min([lw.mahalanobis(z - m) for m in means], 0))
    fit_d, new_d = np.stack(cols_fit, 1), np.stack(cols_new, 1)
    manual = ((new_d - fit_d.mean(0)) / fit_d.std(0, ddof=1)).sum(1)
    np.testing.assert_allclose(ours, manual, rtol=2e-3, atol=2e-2)


def test_block_mahalanobis_guard_flags_ucsd_above_sars(trained_run, run, ucsd_files, sars_unseen, tmp_path):
    from sklearn.metrics import roc_auc_score

    copy = tmp_path / "run"
    shutil.copytree(trained_run[0], copy)
    other = load_run(copy)
    shift.fit_guard(other, detector="mahalanobis-blocks")
    other = load_run(copy)  # saved and loaded back
    assert other.guard.name == "mahalanobis-blocks" and len(other.guard.taps) > 6
    u, s = other.predict(ucsd_files), other.predict(sars_unseen)
    flag_u = np.mean([not p.in_distribution for p in u])
    flag_s = np.mean([not p.in_distribution for p in s])
    auroc = roc_auc_score([1] * len(u) + [0] * len(s), [p.shift_score for p in u + s])
    assert flag_u >= flag_s + 0.3 and auroc > 0.85, (flag_u, flag_s, auroc)
    # the export carries it: the same score inside the ONNX graph
    info = other.export(tmp_path / "m.onnx", n_check=4)
    assert info["parity"]["max_rel_diff_shift_score"] < 1e-4 and info["parity"]["same_in_distribution"]


def test_block_knn_equals_numpy_nearest_neighbour(run, sars_unseen, ucsd_files):
    """knn-blocks = 1 - the largest mean over layers (stem, every block, head input) of the cosine
    to a training image: computed here in numpy on real features of real slices."""
    taps = shift.BlockKNN.taps(run.model)
    assert taps == shift.BlockMahalanobis.taps(run.model)
    x = torch.cat([run.load_images(sars_unseen[:20]), run.load_images(ucsd_files[:6])])
    feats = shift._tapped_features(run.model, x, run.transform, taps, device="cpu", channels_last=True, bf16=False)
    det = shift.BlockKNN.fit([f[:16] for f in feats], torch.zeros(16, dtype=torch.long), 2)
    assert det.k == 1 and det.bank.shape == (16, sum(f.shape[1] for f in feats))
    ours = det([f[16:] for f in feats]).numpy()
    cos = np.zeros((len(x) - 16, 16))
    for f in feats:
        f = f.double().numpy()
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        cos += f[16:] @ f[:16].T / len(feats)
    np.testing.assert_allclose(ours, 1 - cos.max(1), rtol=1e-4, atol=1e-5)
    # a training image is its own nearest neighbour
    np.testing.assert_allclose(det([f[:16] for f in feats]).numpy(), 0, atol=1e-5)


def test_knn_bank_is_capped_to_a_seeded_subset(run, sars_unseen, monkeypatch):
    """A large training set keeps at most ``max_bank`` images' features (a 40k-slice run would
    otherwise carry hundreds of MB): a seeded subset of the real rows, the same on every fit, and the
    score is the nearest neighbour among the kept rows."""
    taps = shift.BlockKNN.taps(run.model)
    x = run.load_images(sars_unseen[:20])
    feats = shift._tapped_features(run.model, x, run.transform, taps, device="cpu", channels_last=True, bf16=False)
    monkeypatch.setattr(shift.BlockKNN, "max_bank", 6)
    train = [f[:16] for f in feats]
    det, again = (shift.BlockKNN.fit(train, torch.zeros(16, dtype=torch.long), 2) for _ in range(2))
    joined = shift.BlockKNN.join(train)
    assert det.bank.shape == (6, joined.shape[1]) and torch.equal(det.bank, again.bank)
    kept = [i for i in range(16) if any(torch.equal(joined[i], b) for b in det.bank)]
    assert len(kept) == 6 and det.params() == {"k": 1, "bank": 6}
    queries = [f[16:] for f in feats]
    expect = 1 - (shift.BlockKNN.join(queries) @ joined[kept].T).max(1).values
    torch.testing.assert_close(det(queries), expect)
    # a kept training image still scores 0; one left out scores above 0
    scores = det(train)
    assert scores[kept].abs().max() < 1e-5 and scores[[i for i in range(16) if i not in kept]].min() > 0


def test_guard_without_separate_val_sets_its_threshold_out_of_fold(run, ucsd_files):
    """An adapted run's N labelled slices are its train and its val: in-sample scores would put the
    nearest-neighbour threshold at 0 and flag every new slice of that site; the threshold comes from
    cross-fitted scores instead, and the site's other slices are accepted."""
    from types import SimpleNamespace

    x = run.load_images(ucsd_files[:24])
    labelled = SimpleNamespace(x=x, y=torch.tensor([0, 1] * 12))
    guard = shift.fit_guard(run, detector="knn-blocks", train=labelled, val=labelled, save=False)
    try:
        assert guard.info["threshold_on"] == "train, cross-fitted" and guard.val_scores.shape == (24,)
        in_sample = guard(shift._tapped_features(run.model, x, run.transform, guard.taps, device="cpu",
                                                 channels_last=True, bf16=False))
        assert float(in_sample.max()) < 1e-4 < float(guard.threshold)  # itself: distance 0
        others = run.predict(ucsd_files[24:])  # the same site's slices, not among the 24
        assert np.mean([p.in_distribution for p in others]) >= 0.5
    finally:
        run.guard = shift.load_guard(run.directory)
