"""``tune``: a real 4-trial search on the dataset, its recipe accepted by ``train``, resume of a
killed search, one-line errors, and proof that the search never looks at the test set."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from ct_transfer import data as D
from ct_transfer.cli import main

SPACE = """\
lr: {type: loguniform, low: 1e-4, high: 3.0e-3}
dropout: {type: uniform, low: 0.0, high: 0.8}
strategy: {type: choice, values: [full, frozen]}
epochs: 2
"""
FLAGS = ["--model", "EfficientNetLite0", "--trials", "4", "--threads", "1", "--quiet"]


def test_ray_executor_without_ray_is_one_line(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = main(["experiment", "--data", str(data_dir), "--out", str(tmp_path / "g"), "--models", "EfficientNetLite0",
                 "--epochs", "1", "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("ct-transfer: error: --executor ray: Ray is not installed; install it with "
                                 "pip install 'ct-transfer[ray]'\n")
    assert not (tmp_path / "g").exists()  # nothing written


optuna = pytest.importorskip("optuna", reason="Optuna is not installed (pip install 'ct-transfer[ray]')")


def _space(tmp_path, text=SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def _tune(data, out, space, *extra):
    return main(["tune", "--data", str(data), "--space", space, "--out", str(out), *FLAGS, *extra])


@pytest.fixture(scope="module")
def search(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "search"
    assert _tune(data_dir, out, _space(tmp), "--limit", "12") == 0
    return out


def _trials(out):
    with open(out / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_search_writes_recipe_table_and_plot(search, data_dir, tmp_path):
    rows = _trials(search)
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert {r["strategy"] for r in rows} <= {"full", "frozen"}
    assert all(1e-4 <= float(r["lr"]) <= 3e-3 and 0 <= float(r["dropout"]) <= 0.8 for r in rows)
    best = search / "best.yaml"
    import yaml

    values = yaml.safe_load(best.read_text())
    # the searched values, and the base options tune was given (best.yaml trains the best trial again)
    assert set(values) == {"lr", "dropout", "strategy", "epochs", "limit", "threads"} and values["epochs"] == 2
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert max(float(r["val_accuracy"]) for r in complete) == float(
        next(r for r in complete if float(r["lr"]) == values["lr"])["val_accuracy"])
    assert (search / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (search / "search.md").read_text()
    assert "| trial | state | val_accuracy |" in md and "test set was not used" in md
    # the search split holds no test rows; train and val only
    assert {r["subset"] for r in D.read_split(search / "split.csv")} == {"train", "val"}

    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--model", "EfficientNetLite0", "--recipe-file", str(best),
                 "--limit", "12", "--out", str(run), "--quiet"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == values["lr"] and cfg["strategy"] == values["strategy"] and cfg["recipe"] == str(best)


def test_search_is_independent_of_the_test_set(search, data_dir, tmp_path):
    """The same search with every test label flipped and every test image unreadable gives the
    identical trials: the test images are neither decoded nor scored."""
    import shutil

    from .conftest import small_dataset

    def run_on(root, flip):
        small_dataset(root, data_dir, per_class=12)
        items, _ = D.scan_folder(root)
        rows = D.make_split(items, "stratified", 0)
        test = [r for r in rows if r["subset"] == "test"]
        assert test
        if flip:
            for r in test:
                (root / r["path"]).write_bytes(b"not an image")
                r["class"] = "COVID" if r["class"] == "non-COVID" else "non-COVID"
        D.write_split(rows, root / "split.csv")
        out = root / "search"
        assert _tune(root, out, _space(root), "--split-file", str(root / "split.csv")) == 0
        return out

    a, b = run_on(tmp_path / "a", False), run_on(tmp_path / "b", True)
    assert _trials(a) == _trials(b)
    import yaml

    best_a, best_b = (yaml.safe_load((x / "best.yaml").read_text()) for x in (a, b))
    # best.yaml names each search's own split file (a base option); everything else is identical
    assert best_a.pop("split_file") == str(tmp_path / "a" / "split.csv")
    assert best_b.pop("split_file") == str(tmp_path / "b" / "split.csv")
    assert best_a == best_b
    shutil.rmtree(tmp_path / "a")


def test_killed_search_resumes_to_the_asked_number(search, data_dir, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(search, out)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    # as if killed during a fifth trial: one RUNNING trial left behind in the study
    study.enqueue_trial({"lr": 1e-3, "dropout": 0.5, "strategy": "full"})
    study.ask()
    assert _tune(data_dir, out, _space(tmp_path), "--limit", "12", "--trials", "6") == 0
    rows = _trials(out)
    assert [r["state"] for r in rows[:4]] == [r["state"] for r in _trials(search)]  # kept, not rerun
    assert rows[4]["state"] == "FAIL" and len(rows) == 7
    assert sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows) == 6


@pytest.mark.parametrize("text, message", [
    ("test_set: {type: uniform, low: 0, high: 1}\n", "test_set: not a searchable option"),
    ("dropout: {type: uniform, low: 0.5, high: 1.0}\n", "dropout: 1.0: choose a number in [0, 1)"),
    ("image_size: {type: uniform, low: 64, high: 128}\n", "image_size: an integer option; use type: int"),
    ("lr: {type: gaussian}\n", "lr: type 'gaussian': choose loguniform, uniform, int, choice"),
    ("- lr\n", "a search space is a mapping"),
])
def test_bad_space_is_one_line(text, message, data_dir, tmp_path, capsys):
    assert _tune(data_dir, tmp_path / "s", _space(tmp_path, text)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_ray_tune_search_writes_the_same_outputs(data_dir, tmp_path):
    """--executor ray: Ray Tune (OptunaSearch + ASHA) on a Ray instance started here for the search."""
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install 'ct-transfer[ray]')")
    out = tmp_path / "s"
    assert _tune(data_dir, out, _space(tmp_path), "--limit", "12", "--trials", "2", "--executor", "ray") == 0
    rows = _trials(out)
    assert len(rows) == 2 and all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    assert (out / "best.yaml").exists() and (out / "search.png").exists()
    assert {r["subset"] for r in D.read_split(out / "split.csv")} == {"train", "val"}


def test_tune_honours_split_options_and_best_yaml_is_the_best_trials_config(tmp_path, data_dir):
    """``--split-preset grouped`` (near-duplicates and groups kept in one subset) and a patient-level
    split file both work; ``best.yaml`` carries every base option, so ``train --recipe-file`` gets
    the best trial's configuration (here: ImageNet weights, the grouped split, the probe)."""
    from ct_transfer.recipes import config_from_recipe

    from .conftest import small_dataset

    small = small_dataset(tmp_path / "small", data_dir, per_class=30)
    space = _space(tmp_path, "lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\nepochs: 1\n")
    out = tmp_path / "grouped"
    assert main(["tune", "--data", str(small), "--space", space, "--out", str(out), "--model", "EfficientNetLite0",
                 "--trials", "1", "--threads", "1", "--quiet", "--split-preset", "grouped", "--weights", "imagenet",
                 "--strategy", "linear", "--image-size", "32"]) == 0
    rows = D.read_split(out / "split.csv")
    assert {r["subset"] for r in rows} == {"train", "val"} and all(r.get("group") for r in rows)
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["subset"])
    assert all(len(s) == 1 for s in by_group.values())  # no group crosses subsets
    best = json.loads(json.dumps(__import__("yaml").safe_load((out / "best.yaml").read_text())))
    trial = next(r for r in _trials(out) if r["state"] == "COMPLETE")
    cfg = config_from_recipe(str(out / "best.yaml"), data=str(small), model="EfficientNetLite0")
    assert (cfg.weights, cfg.split_preset, cfg.strategy, cfg.image_size, cfg.threads, cfg.epochs) == \
        ("imagenet", "grouped", "linear", 32, 1, 1)
    assert cfg.lr == pytest.approx(float(trial["lr"])) and best["lr"] == cfg.lr

    ucsd = data_dir.parent / "ucsd-covid-ct-dev"
    out = tmp_path / "ucsd"
    assert main(["tune", "--data", str(ucsd), "--split-file", str(ucsd / "SPLIT.csv"), "--space", space,
                 "--out", str(out), "--model", "EfficientNetLite0", "--trials", "1", "--threads", "1", "--quiet",
                 "--strategy", "linear", "--weights", "imagenet", "--image-size", "32", "--limit", "40"]) == 0
    official = {r["path"]: r for r in D.read_split(ucsd / "SPLIT.csv")}
    rows = D.read_split(out / "split.csv")
    # UCSD's official val patients are the held-out test: the search never sees them; its val is
    # carved from the train patients, whole patients, and the patient ids survive
    assert rows and all(official[r["path"]]["subset"] == "train" for r in rows)
    assert all(r["patient"] == official[r["path"]]["patient"] for r in rows)
    val_patients = {r["patient"] for r in rows if r["subset"] == "val"}
    assert val_patients and not val_patients & {r["patient"] for r in rows if r["subset"] == "train"}
