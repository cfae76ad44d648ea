"""Speed features on the real dataset: the linear probe, the CPU fast recipe, checkpoint cadence
and the background writer, progressive resizing, static-shape batches, and `experiment --jobs`."""

from __future__ import annotations

import csv
import json
import threading

import numpy as np
import pytest
import torch

from ct_transfer import TrainConfig, fit, load_run
from ct_transfer import data as D
from ct_transfer import models as M
from ct_transfer.engine import pooled_features
from ct_transfer.engine import probe as P
from ct_transfer.data import load_subset
from ct_transfer.engine.loop import _batches, epoch_size, steps_per_epoch
from ct_transfer.experiment import run_grid, run_status
from ct_transfer.recipes import RECIPES, config_from_recipe
from ct_transfer.rundir import RunDir


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("probe") / "lin"
    cfg = TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", strategy="linear",
                      image_size=96, limit=50, out=str(out), epochs=7)
    return out, fit(cfg, progress=False)


def test_linear_probe_beats_chance_and_is_one_fit(probe_run):
    out, run = probe_run
    m = run.metrics
    assert m["strategy"] == "linear" and m["epochs"] == 1  # --epochs does not apply
    assert m["val"]["accuracy"] >= 0.75 and m["test"]["accuracy"] >= 0.7  # chance is 0.5
    assert m["probe"]["C"] in P.C_GRID and len(m["probe"]["grid"]) == len(P.C_GRID)
    chosen = max(m["probe"]["grid"], key=lambda g: (g["val_acc"], -g["val_loss"]))
    assert chosen["C"] == m["probe"]["C"]
    assert (out / "best.safetensors").is_file() and (out / "last.pt").is_file()
    assert run_status(out, 100) == "done"  # a grid restart with epochs=100 must not redo it


def test_linear_probe_probabilities_equal_sklearn(probe_run, data_dir):
    """Folding the standardisation into fc gives sklearn's predict_proba through the Run's own path."""
    out, run = probe_run
    rows = D.read_split(out / "split.csv", data_dir)
    classes = run.classes
    model = run.model.eval()
    tf = D.batch_transform(*M.normalization(model), augment=False)
    feats = {}
    for s in ("train", "val", "test"):
        x, y, kept, _ = load_subset(rows, s, classes, data_dir, run.preprocess)
        feats[s] = (pooled_features(model, x, tf).numpy(), y.numpy(), [data_dir / r["path"] for r in kept])
    res = P.fit_probe(feats["train"][0], feats["train"][1], feats["val"][0], feats["val"][1], num_classes=2)
    assert res.C == run.metrics["probe"]["C"]
    want = res.classifier.predict_proba(feats["test"][0])
    got = run.predict_proba(feats["test"][2])  # image files through the Run's predict path
    np.testing.assert_allclose(got, want, atol=2e-4)
    reloaded = load_run(out)
    np.testing.assert_allclose(reloaded.predict_proba(feats["test"][2]), want, atol=2e-4)


def test_fold_matches_a_multiclass_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)) * [1, 10, 0.1, 3, 1, 5] + [0, 5, -2, 1, 0, 9]
    y = (X[:, 0] + X[:, 3] / 3 > 0).astype(int) + (X[:, 1] > 5)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X, y)
    w, b = P.fold(clf, 3)
    logits = X @ w.T + b
    proba = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(proba / proba.sum(1, keepdims=True), clf.predict_proba(X), atol=1e-9)


def test_checkpoint_cadence_and_writer_thread(tmp_path, data_dir, monkeypatch):
    saves = {"last": [], "best": [], "threads": set()}
    orig_last, orig_best = RunDir.save_last, RunDir.save_best

    def spy_last(self, state):
        saves["last"].append(state["epoch"])
        saves["threads"].add(threading.current_thread().name)
        orig_last(self, state)

    def spy_best(self, state):
        saves["best"].append(state["epoch"])
        saves["threads"].add(threading.current_thread().name)
        orig_best(self, state)

    monkeypatch.setattr(RunDir, "save_last", spy_last)
    monkeypatch.setattr(RunDir, "save_best", spy_best)
    out = tmp_path / "c"
    run = fit(TrainConfig(data=str(data_dir), model="EfficientNetLite0", out=str(out), epochs=5, limit=12,
                          image_size=64, checkpoint_every=2, seed=1), progress=False)
    assert saves["last"] == [2, 4, 5]  # every 2 epochs and at the end
    hist = list(csv.DictReader(open(out / "history.csv")))
    improved, best = [], None
    for r in hist:  # TrackBest's rule: higher val acc, ties to lower val loss
        key = (float(r["val_acc"]), -float(r["val_loss"]))
        if best is None or key > best:
            best = key
            improved.append(int(r["epoch"]))
    assert saves["best"] == improved  # best.safetensors only when val improved
    # on the CPU the files are written by the training thread (a writer thread competed with training
    # for the cores: later epochs ~1.5x slower); the writer thread is for CUDA runs
    assert saves["threads"] == {threading.current_thread().name}
    state = RunDir(out).load_resume_state()
    assert state["epoch"] == 5 and len(state["history"]) == 5
    assert RunDir(out).load_best()["epoch"] == run.metrics["best_epoch"]
    assert load_run(out).metrics["test"] == run.metrics["test"]


def test_progressive_sizes_and_static_batches():
    cfg = TrainConfig(data="d", model="EfficientNetLite0", image_size=224, resize_from=128, epochs=16).resolved()
    sizes = [epoch_size(cfg, e) for e in range(16)]
    assert sizes[0] == 128 and sizes[8:] == [224] * 8 and sizes == sorted(sizes)
    assert all(s % 32 == 0 for s in sizes)
    g = torch.Generator().manual_seed(0)
    full = [len(i) for i in _batches(70, 32, g, drop_last=True)]
    assert full == [32, 32] and steps_per_epoch(70, 32, drop_last=True) == 2
    assert [len(i) for i in _batches(70, 32, g)] == [32, 32, 6] and steps_per_epoch(70, 32) == 3
    with pytest.raises(Exception, match="resize_from=300"):
        TrainConfig(data="d", model="EfficientNetLite0", image_size=224, resize_from=300).resolved()


def test_cpu_fast_recipe_resolves_and_trains(tmp_path, data_dir):
    assert RECIPES["cpu-fast"]["head_init"] == "probe"
    cfg = config_from_recipe("cpu-fast", data=str(data_dir), model="EfficientNetLite0", out=str(tmp_path / "f"),
                             epochs=2, image_size=96, resize_from=64, limit=16)
    assert cfg.strategy == "partial" and cfg.schedule == "onecycle" and cfg.recipe == "cpu-fast"
    run = fit(cfg, progress=False)
    m = run.metrics
    assert m["epochs"] == 2 and m["probe"]["C"] in P.C_GRID and 0 <= m["test"]["accuracy"] <= 1
    assert m["probe"]["size"] == 64  # fitted at the first epoch's size, not the final 96
    saved = json.loads((tmp_path / "f" / "config.json").read_text())
    assert saved["recipe"] == "cpu-fast" and saved["head_init"] == "probe" and saved["resize_from"] == 64
    assert saved["ema"] == 0.995 and saved["tta"] == "flips" and load_run(tmp_path / "f").tta == "flips"


def test_bn_stats_frozen_keeps_imagenet_statistics(tmp_path, data_dir):
    """--bn-stats frozen: after fine-tuning every BN layer still has the ImageNet running statistics
    (its affine weights did learn); the default updates them from the augmented batches."""
    base = M.create_model("EfficientNetLite0", weights="imagenet", num_classes=2)
    ref = {k: v.clone() for k, v in base.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    def bn_state(bn_stats):
        run = fit(TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", epochs=1, limit=16,
                              image_size=64, strategy="full", bn_stats=bn_stats), progress=False)
        return run.model.state_dict()

    frozen, moved = bn_state("frozen"), bn_state("train")
    assert all(torch.equal(frozen[k], v) for k, v in ref.items())
    assert not all(torch.equal(moved[k], v) for k, v in ref.items())
    weights = [k.replace("running_mean", "weight") for k in ref if k.endswith("running_mean")]
    assert not all(torch.equal(frozen[k], base.state_dict()[k]) for k in weights)


def _learning(run_dir):
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_ips")} for r in rows]


def test_jobs_2_gives_the_sequential_results(tmp_path, data_dir):
    base = dict(epochs=2, limit=16, threads=1)  # the same thread count both ways: same float sums
    seq = run_grid(str(data_dir), str(tmp_path / "seq"), ["EfficientNetLite0"], ["none", "imagenet"], [0],
                   base=base, progress=False)
    par = run_grid(str(data_dir), str(tmp_path / "par"), ["EfficientNetLite0"], ["none", "imagenet"], [0],
                   base=base, progress=False, jobs=2)
    assert [r["run"] for r in par] == [r["run"] for r in seq] and all(r["status"] == "done" for r in par)
    for r in seq:
        a, b = tmp_path / "seq" / "runs" / r["run"], tmp_path / "par" / "runs" / r["run"]
        ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
        assert ma["val"] == mb["val"] and ma["test"] == mb["test"]
        assert _learning(a) == _learning(b)
    # restart in parallel: everything is done, nothing reruns
    again = run_grid(str(data_dir), str(tmp_path / "par"), ["EfficientNetLite0"], ["none", "imagenet"], [0],
                     base=base, progress=False, jobs=2)
    assert [r["status"] for r in again] == ["done", "done"] and all("test_accuracy" not in r for r in again)


def test_ema_weights_are_validated_kept_and_resumed_exactly(tmp_path, data_dir):
    """--ema: validation and the final model use the weight average (not the raw weights), and a run
    resumed after its first epoch ends with the same average as an unbroken one."""
    from ct_transfer.engine import Callback

    seen = []

    class Snap(Callback):
        def on_epoch_end(self, state, row):
            seen.append({k: v.clone() for k, v in state.eval_model.state_dict().items()})
            assert state.eval_model is state.ema.module
            assert not torch.equal(state.ema.module.fc.weight, state.model.fc.weight)

    kw = dict(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", limit=16, image_size=64,
              strategy="partial", ema=0.9, seed=2, threads=1)
    whole = fit(TrainConfig(**kw, epochs=2, out=str(tmp_path / "whole")), callbacks=[Snap()], progress=False)
    best = whole.metrics["best_epoch"]
    final = whole.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in seen[best - 1].items())  # best epoch's average, not raw
    assert RunDir(tmp_path / "whole").load_resume_state()["ema"] is not None

    fit(TrainConfig(**kw, epochs=1, out=str(tmp_path / "split")), progress=False)
    resumed = fit(TrainConfig(**kw, epochs=2, out=str(tmp_path / "split")), progress=False, resume=True)
    assert _learning(tmp_path / "split") == _learning(tmp_path / "whole")
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in final.items())
    with pytest.raises(Exception, match="ema"):
        TrainConfig(**{**kw, "strategy": "linear"})
