"""Few-label site adaptation (issue #21): the draw of N labelled slices and `adapt` on real UCSD slices."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ct_transfer import ConfigError, CTTransferError, load_run
from ct_transfer import data as D
from ct_transfer.adapt import adapt, draw_labels

UCSD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
SPLIT = UCSD / "SPLIT.csv"


@pytest.fixture(scope="module")
def ucsd_rows():
    if not SPLIT.is_file():
        pytest.fail(f"dataset missing: {SPLIT}")
    return D.read_split(SPLIT, UCSD)


def test_draw_is_stratified_spread_over_patients_and_reproducible(ucsd_rows):
    train = [r for r in ucsd_rows if r["subset"] == "train"]
    share = sum(r["class"] == "COVID" for r in train) / len(train)
    for n in (8, 16, 64, 128):
        drawn = draw_labels(ucsd_rows, n, seed=3)
        assert len(drawn) == n and all(r["subset"] == "train" for r in drawn)
        assert {r["path"] for r in drawn} <= {r["path"] for r in train}  # never a held-out patient's slice
        counts = collections.Counter(r["class"] for r in drawn)
        assert abs(counts["COVID"] - n * share) <= 1  # the labelled set's class shares, to one slice
        for cls in counts:  # as many patients as the class has slices, up to its patient count
            patients = {r["group"] for r in train if r["class"] == cls}
            assert len({r["group"] for r in drawn if r["class"] == cls}) == min(counts[cls], len(patients))
        assert drawn == draw_labels(ucsd_rows, n, seed=3)  # same seed, same files
        assert drawn != draw_labels(ucsd_rows, n, seed=4)
    everything = draw_labels(ucsd_rows, len(train), seed=0)
    assert sorted(r["path"] for r in everything) == sorted(r["path"] for r in train)


@pytest.mark.parametrize("n, why", [(424, "holds only 423 slices"), (1, "at least 2"), (0, "at least 2")])
def test_draw_bad_n(ucsd_rows, n, why):
    with pytest.raises(ConfigError, match=why) as exc:
        draw_labels(ucsd_rows, n)
    assert exc.value.param == "labels"


@pytest.fixture(scope="module")
def adapted_head(trained_run, tmp_path_factory):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("adapt") / "ucsd-head"
    run = adapt(run=run_dir, data=UCSD, split_file=SPLIT, labels=16, method="head", out=out, seed=1)
    return out, run


def test_adapt_head_end_to_end(adapted_head, ucsd_rows, trained_run):
    out, run = adapted_head
    held_out = [r for r in ucsd_rows if r["subset"] == "val"]
    assert run.metrics["test"]["n"] == len(held_out) == 118  # UCSD's official val patients, all of them
    drawn = D.read_split(out / "labels.csv")
    assert [r["path"] for r in drawn] == [r["path"] for r in draw_labels(ucsd_rows, 16, seed=1)]
    assert not {r["path"] for r in drawn} & {r["path"] for r in held_out}
    rec = load_run(out).config["adaptation"]
    assert rec["method"] == "head" and rec["labels"] == 16 and rec["start_run"] == str(trained_run[0])
    # the new run loads and predicts; its backbone is the start run's, its head is new
    new, start = load_run(out), load_run(trained_run[0])
    files = [str(UCSD / r["path"]) for r in held_out[:6]]
    proba = new.predict_proba(files)
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.allclose(proba, run.predict_proba(files), atol=1e-5)
    sd_new, sd_start = new.model.state_dict(), start.model.state_dict()
    assert all(np.array_equal(sd_new[k], sd_start[k]) for k in sd_new if not k.startswith("fc."))
    assert not np.allclose(sd_new["fc.weight"], sd_start["fc.weight"])
    # the refitted head fits its 16 labelled slices better than the start run's head does
    xs = new.load_images([str(UCSD / r["path"]) for r in drawn])
    y = np.array([new.classes.index(r["class"]) for r in drawn])
    acc_new = (new.predictor.outputs(xs).proba.argmax(1) == y).mean()
    acc_start = (start.predictor.outputs(xs).proba.argmax(1) == y).mean()
    assert acc_new > acc_start and acc_new >= 0.75


def test_adapt_finetune_both_sites(trained_run, data_dir, tmp_path):
    run = adapt(run=trained_run[0], data=UCSD, split_file=SPLIT, labels=8, method="both", out=None,
                seed=0, steps=2, batch_size=8)
    test = run.metrics["test"]
    assert set(test["per_source"]) == {"sarscov2-ct", "ucsd-covid-ct-dev"}
    assert test["per_source"]["ucsd-covid-ct-dev"]["n"] == 118
    assert run.metrics["adaptation"]["epochs"] >= 1 and run.config["balance"] == "sources"


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ct_transfer.cli", "adapt", *args], capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("extra, why", [
    (["--labels", "500"], "--labels 500: the labelled set ('train' rows) holds only 423 slices"),
    (["--labels", "1"], "--labels 1: choose at least 2"),
    (["--labels", "8", "--method", "magic"], "invalid choice"),
    (["--labels", "8", "--held-out", "test"], "--held-out test:"),
])
def test_adapt_cli_bad_input_one_line_writes_nothing(trained_run, tmp_path, extra, why):
    out = tmp_path / "new"
    before = sorted(p.name for p in Path(trained_run[0]).iterdir())
    r = _cli("--run", str(trained_run[0]), "--data", str(UCSD), "--split-file", str(SPLIT), "--out", str(out), *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert why in lines[-1] and "Traceback" not in r.stderr
    if "invalid choice" not in why:
        assert len(lines) == 1 and lines[0].startswith("ct-transfer: error: ")
    assert not out.exists() and sorted(p.name for p in Path(trained_run[0]).iterdir()) == before


def test_adapt_refuses_existing_run(adapted_head, trained_run):
    out, _ = adapted_head
    before = (out / "config.json").read_bytes()
    with pytest.raises(CTTransferError, match="already holds a run"):
        adapt(run=trained_run[0], data=UCSD, split_file=SPLIT, labels=8, out=out)
    assert (out / "config.json").read_bytes() == before
