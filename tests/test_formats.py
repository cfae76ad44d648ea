"""Weight formats (#23): the fine-tuned network as a plain timm checkpoint, loaded back by
``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` with the same logits on real slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors import safe_open

from ct_transfer.cli import main
from ct_transfer.run import load_run

UCSD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


def _slices(data_dir, n=4):
    return ([str(p) for p in sorted((data_dir / "COVID").iterdir())[300:300 + n]]
            + [str(p) for p in sorted((UCSD / "non-COVID").iterdir())[:n]])


def test_timm_round_trip_gives_the_run_logits_on_real_slices(trained_run, tmp_path, data_dir, capsys):
    out = tmp_path / "lite0.safetensors"
    assert main(["export", "--run", str(trained_run[0]), "--out", str(out)]) == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out
    info = json.loads((tmp_path / "lite0.safetensors.json").read_text())
    run = load_run(trained_run[0])
    assert info["classes"] == run.classes and info["timm_name"] == "tf_efficientnet_lite0"
    assert info["parity"]["on"] == "test images" and info["parity"]["max_abs_diff_logits"] < 1e-4
    with safe_open(str(out), "pt") as fh:  # plain timm names, no pickle
        assert "classifier.weight" in fh.keys() and not any(k.startswith(("backbone.", "fc.")) for k in fh.keys())
        assert json.loads(fh.metadata()["classes"]) == run.classes
    k = len(run.classes)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=k,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=k)).eval()
    x = run.transform(run.load_images(_slices(data_dir)), None)  # the run's preprocessing and mean/std
    with torch.inference_mode():
        ours, theirs = run.model.eval()(x), model(x)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    p = torch.softmax(theirs / run.temperature, 1).numpy()
    torch.testing.assert_close(torch.from_numpy(p).float(), torch.from_numpy(run.predict_proba(_slices(data_dir))).float(),
                               atol=1e-5, rtol=0)
    # without num_classes in the overlay timm keeps the fine-tuned backbone and starts a new head
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=k,
                                 pretrained_cfg_overlay=dict(file=str(out))).eval()
    with torch.inference_mode():
        torch.testing.assert_close(backbone.forward_features(x), run.model.backbone.forward_features(x),
                                   atol=1e-4, rtol=1e-4)


def test_timm_export_refuses_a_wrong_name_and_writes_nothing(trained_run, tmp_path, capsys):
    assert main(["export", "--run", str(trained_run[0]), "--out", str(tmp_path / "m.pt"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".safetensors" in err
    assert list(tmp_path.iterdir()) == []


def test_runs_save_safetensors_and_older_pt_runs_still_load(trained_run, tmp_path, data_dir):
    src = trained_run[0]
    assert (src / "best.safetensors").is_file() and not (src / "best.pt").exists()
    with safe_open(str(src / "best.safetensors"), "pt") as fh:  # no pickle; classes and epoch as metadata
        meta = fh.metadata()
        assert json.loads(meta["format"]) == "ct-transfer"
        assert json.loads(meta["classes"]) == load_run(src).classes
        assert json.loads(meta["epoch"]) == json.loads((src / "metrics.json").read_text())["best_epoch"]
        assert "fc.weight" in fh.keys()
    # a run written before safetensors: best.pt (a tensor dict, loaded with weights_only=True)
    old = tmp_path / "old"
    shutil.copytree(src, old)
    with safe_open(str(old / "best.safetensors"), "pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    torch.save({"model": state, "classes": json.loads(meta["classes"]), "epoch": 1}, old / "best.pt")
    (old / "best.safetensors").unlink()
    files = _slices(data_dir, 2)
    again = load_run(old)
    assert Path(again.checkpoint).name == "best.pt"
    np.testing.assert_array_equal(again.predict_proba(files), load_run(src).predict_proba(files))
    # and a run folder given as weights: the new file first
    from ct_transfer import create_model

    model = create_model("EfficientNetLite0", str(src), classes=again.classes)
    torch.testing.assert_close(model.fc.weight, again.model.fc.weight, rtol=0, atol=0)
