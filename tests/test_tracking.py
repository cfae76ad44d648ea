"""Experiment tracking (#23): a tiny real run logged to TensorBoard and to a real MLflow store
(SQLite), read back with TensorBoard's event reader and ``MlflowClient`` and compared with
``history.csv`` and ``metrics.json``."""

from __future__ import annotations

import json

import pytest

from ct_transfer import TrainConfig, fit
from ct_transfer.errors import ConfigError
from ct_transfer.rundir import RunDir
from ct_transfer.tracking import final_metrics, parse_loggers

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("tracked") / "lite0"
    cfg = TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", out=str(out), epochs=2,
                      limit=10, seed=0, log="tensorboard,mlflow")
    fit(cfg, progress=False)
    return out


def test_tensorboard_scalars_equal_history_and_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    history = RunDir(tracked_run).read_history()
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    tags = set(acc.Tags()["scalars"])
    for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
        events = acc.Scalars(column)
        assert [e.step for e in events] == [int(r["epoch"]) for r in history]
        assert [e.value for e in events] == pytest.approx([r[column] for r in history], rel=1e-6)
    for key in ("test/accuracy", "test/roc_auc", "val/f1", "test/accuracy_ci95_low"):
        assert f"final/{key}" in tags
    assert acc.Scalars("final/test/accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"], rel=1e-6)
    assert acc.Scalars("final/test/accuracy_ci95_low")[-1].value == pytest.approx(metrics["test"]["ci95"]["accuracy"][0])
    assert {"plots/curves", "plots/confusion_matrix", "plots/reliability"} <= set(acc.Tags()["images"])


def test_mlflow_run_equals_history_metrics_and_config(tracked_run):
    from mlflow.tracking import MlflowClient

    doc = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    assert doc["tracking_uri"] == f"sqlite:///{tracked_run.resolve() / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=doc["tracking_uri"])  # a real store, read back by MLflow itself
    run = client.get_run(doc["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    history = RunDir(tracked_run).read_history()
    for column in ("train_loss", "val_acc", "val_loss"):
        logged = sorted(client.get_metric_history(doc["run_id"], column), key=lambda m: m.step)
        assert [m.step for m in logged] == [int(r["epoch"]) for r in history]
        assert [m.value for m in logged] == pytest.approx([r[column] for r in history], rel=1e-9)
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    expected = final_metrics(metrics)
    assert expected["test/accuracy"] == metrics["test"]["accuracy"]
    assert {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    config = json.loads((tracked_run / "config.json").read_text())
    for key in ("model", "lr", "epochs", "seed", "weights"):
        assert run.data.params[key] == str(config[key])
    artifacts = {a.path for a in client.list_artifacts(doc["run_id"])}
    assert {"curves.png", "confusion_matrix.png", "reliability.png", "metrics.json"} <= artifacts
    local = client.download_artifacts(doc["run_id"], "metrics.json", str(tracked_run.parent))
    assert json.loads(open(local).read()) == metrics


def test_logger_options_are_checked_before_any_work(tmp_path, data_dir):
    assert parse_loggers("mlflow, tensorboard,mlflow") == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        TrainConfig(data=str(data_dir), model="EfficientNetLite0", out=str(tmp_path / "x"), log="tensorboard,wandb")
    with pytest.raises(ConfigError, match="needs out"):
        TrainConfig(data=str(data_dir), model="EfficientNetLite0", log="mlflow")
    assert not (tmp_path / "x").exists()


def test_external_results_join_the_tracked_run(tracked_run, tmp_path):
    import shutil
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ct_transfer.run import load_run

    ucsd = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
    ext = tmp_path / "ext"  # 5 real UCSD slices per class
    for c in ("COVID", "non-COVID"):
        (ext / c).mkdir(parents=True)
        for f in sorted((ucsd / c).iterdir())[:5]:
            shutil.copy(f, ext / c / f.name)
    rec = load_run(tracked_run).evaluate_external(ext, name="ucsd5")
    doc = json.loads((tracked_run / "tracking.json").read_text())
    logged = MlflowClient(tracking_uri=doc["mlflow"]["tracking_uri"]).get_run(doc["mlflow"]["run_id"]).data.metrics
    assert logged["external/ucsd5/accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
    assert logged["external/ucsd5/n"] == 10
    acc = EventAccumulator(doc["tensorboard"]["log_dir"])
    acc.Reload()
    assert acc.Scalars("final/external/ucsd5/accuracy")[-1].value == pytest.approx(rec["metrics"]["accuracy"])
