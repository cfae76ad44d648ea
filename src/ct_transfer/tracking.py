"""Experiment tracking as engine callbacks (Lightning's and fastai's loggers): TensorBoard and MLflow.

Each logger records the run's options (params), every epoch's ``history.csv`` row, the final
metrics of ``metrics.json`` (val/test with their 95% interval bounds, the calibration's outcome)
and of every external result in ``RUN/external/``, and the run's plots. Both are optional extras
(``pip install ct-transfer[tensorboard]`` / ``[mlflow]``); the choice is a name in ``LOGGERS``.

MLflow is driven through ``MlflowClient`` only (no active-run stack, no environment variables):
the default store is ``sqlite:///RUN/mlruns.db`` with artifacts in ``RUN/mlartifacts``; any
tracking URI MLflow accepts (``http://host:5000``, ``sqlite:///...``, ``databricks``) may be given.
Where each logger wrote is kept in ``RUN/tracking.json`` so later results (an external evaluation)
can be added to the same tracked run (``log_external``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from . import _io
from .errors import ConfigError, CTTransferError, first_line

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
PLOTS = ("curves.png", "confusion_matrix.png", "reliability.png")
MLFLOW_EXPERIMENT = "ct-transfer"


def parse_loggers(text) -> list[str]:
    """``"tensorboard,mlflow"`` (or a list) -> known logger names, in order, without repeats."""
    if text is None or text == "" or text == []:
        return []
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    out = []
    for p in parts:
        if p not in LOGGERS:
            raise ConfigError("log", text, f"unknown logger '{p}' (choose from {', '.join(LOGGERS)})")
        if p not in out:
            out.append(p)
    return out


def default_mlflow_uri(run_dir) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlruns.db'}"


def final_metrics(metrics: dict, external: list[dict] | None = None) -> dict[str, float]:
    """The numbers worth tracking from ``metrics.json`` (and external records), flat:
    ``test/accuracy``, ``test/accuracy_ci95_low``, ``calibration/temperature``, ``external/NAME/f1``..."""
    out: dict[str, float] = {}

    def subset(prefix, m):
        for k, v in m.items():
            if _number(v):
                out[f"{prefix}/{k}"] = float(v)
        for k, ci in (m.get("ci95") or {}).items():
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(v) for v in ci):
                out[f"{prefix}/{k}_ci95_low"], out[f"{prefix}/{k}_ci95_high"] = float(ci[0]), float(ci[1])
        op = m.get("operating_point") or {}
        for k in ("threshold", "sensitivity", "specificity", "accuracy"):
            if _number(op.get(k)):
                out[f"{prefix}/operating_point/{k}"] = float(op[k])

    for name in ("val", "test"):
        if isinstance(metrics.get(name), dict):
            subset(name, metrics[name])
    for k in ("train_seconds", "epochs", "best_epoch"):
        if _number(metrics.get(k)):
            out[k] = float(metrics[k])
    cal = metrics.get("calibration") or {}
    for k in ("temperature", "fitted_temperature", "threshold", "val_ece_before", "val_ece_after"):
        if _number(cal.get(k)):
            out[f"calibration/{k}"] = float(cal[k])
    for rec in external or []:
        if isinstance(rec.get("metrics"), dict):
            subset(f"external/{rec.get('name')}", rec["metrics"])
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _params(config: dict) -> dict[str, str]:
    """The run's options as text (MLflow params are strings; TensorBoard shows them as a table)."""
    return {k: ("" if v is None else str(v))[:500] for k, v in sorted(config.items())
            if k not in ("calibration",)}


def _read_external(run_dir) -> list[dict]:
    root = Path(run_dir) / "external" if run_dir else None
    out = []
    for path in sorted(root.glob("*/metrics.json")) if root and root.is_dir() else []:
        try:
            out.append(_io.read_json(path, what="external metrics"))
        except CTTransferError as exc:
            log.warning("%s: not tracked (%s)", path, exc)
    return out


def _record(run_dir, key: str, value: dict) -> None:
    path = Path(run_dir) / TRACKING_FILE
    doc = _io.read_json(path, what="tracking record") if path.exists() else {}
    _io.write_json(path, {**doc, key: value})


class TrackingLogger:
    """An engine callback (the hooks of ``engine.callbacks.Callback``, written out here so that this
    module stays below the engine): the loop calls ``on_fit_start`` / ``on_epoch_end`` /
    ``on_fit_error``; ``fit`` calls ``on_run_end(state, run)`` once the final metrics and plots are
    written."""

    order = 70  # after the history row is final
    name = ""

    def __init__(self, run_dir):
        if run_dir is None:
            raise ConfigError("log", self.name, "needs a run directory (out) to write to")
        self.run_dir = Path(run_dir)

    def on_fit_start(self, state): ...

    def on_epoch_start(self, state): ...

    def on_batch_end(self, state, n, loss_sum, correct): ...

    def on_epoch_end(self, state, row): ...

    def on_fit_end(self, state): ...

    def on_fit_error(self, state): ...

    def on_run_end(self, state, run): ...


class TensorBoardLogger(TrackingLogger):
    """Event files in ``RUN/tensorboard``: each history column a scalar per epoch, the final metrics
    at the last epoch, the options as text, the plots as images."""

    name = "tensorboard"

    def __init__(self, run_dir, *, log_dir=None):
        super().__init__(run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise ConfigError("log", "tensorboard", "needs the tensorboard package "
                              "(pip install 'ct-transfer[tensorboard]')") from None
        self.log_dir = Path(log_dir) if log_dir else self.run_dir / "tensorboard"
        self.writer = None

    def on_fit_start(self, state):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        cfg = state.config.to_dict()
        table = "| option | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in _params(cfg).items())
        self.writer.add_text("params", table, 0)
        _record(self.run_dir, self.name, {"log_dir": str(self.log_dir)})

    def on_epoch_end(self, state, row):
        for k, v in row.items():
            if k != "epoch" and _number(v):
                self.writer.add_scalar(k, float(v), int(row["epoch"]))
        self.writer.flush()

    def on_run_end(self, state, run):
        step = int(state.history[-1]["epoch"]) if state.history else 0
        for k, v in final_metrics(run.metrics, _read_external(self.run_dir)).items():
            self.writer.add_scalar(f"final/{k}", v, step)
        for name in PLOTS:
            if (self.run_dir / name).is_file():
                import numpy as np
                from PIL import Image

                with Image.open(self.run_dir / name) as im:
                    self.writer.add_image(f"plots/{Path(name).stem}", np.asarray(im.convert("RGB")), step,
                                          dataformats="HWC")
        self.close()

    def on_fit_error(self, state):
        self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowLogger(TrackingLogger):
    """One MLflow run per fit: params, per-epoch metrics (step = epoch), final metrics, plots and
    the run's JSON files as artifacts; its id goes to ``RUN/tracking.json``."""

    name = "mlflow"

    def __init__(self, run_dir, *, tracking_uri: str | None = None, experiment: str = MLFLOW_EXPERIMENT,
                 run_name: str | None = None):
        super().__init__(run_dir)
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("log", "mlflow", "needs the mlflow package (pip install 'ct-transfer[mlflow]')") from None
        self.tracking_uri = tracking_uri or default_mlflow_uri(self.run_dir)
        self.experiment, self.run_name = experiment, run_name or self.run_dir.name
        self.client, self.run_id = None, None

    def on_fit_start(self, state):
        from mlflow.entities import Param

        self.client, experiment_id = _mlflow_client(self.tracking_uri, self.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, v) for k, v in _params(state.config.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        _record(self.run_dir, self.name, {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                          "experiment_id": experiment_id, "run_id": self.run_id})

    def on_epoch_end(self, state, row):
        self._log(row, step=int(row["epoch"]))

    def _log(self, values: dict, step: int):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()
                   if k != "epoch" and _number(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def on_run_end(self, state, run):
        step = int(state.history[-1]["epoch"]) if state.history else 0
        self._log(final_metrics(run.metrics, _read_external(self.run_dir)), step=step)
        for name in (*PLOTS, "metrics.json", "config.json", "model_card.md"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED")

    def on_fit_error(self, state):
        if self.client is not None and self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception as exc:  # the training error matters more than the tracker's
                log.warning("mlflow: could not mark run %s failed (%s)", self.run_id, first_line(exc))


def _mlflow_key(key: str) -> str:
    """MLflow metric names: letters, digits, _ - . / and spaces (a source name may hold others)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


def _mlflow_client(tracking_uri: str, experiment: str):
    """A client on ``tracking_uri`` and the experiment's id (created when missing; on a local SQLite
    store its artifacts go beside the database, not into the current folder)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return client, client.create_experiment(experiment, artifact_location=location)
    except Exception as exc:  # an unreachable server or a bad URI: MLflow raises many types
        raise ConfigError("mlflow_uri", tracking_uri, f"cannot use this tracking store ({first_line(exc, 200)})") from None


def make_loggers(names, run_dir, *, mlflow_uri: str | None = None) -> list[TrackingLogger]:
    """The callbacks for ``TrainConfig.log``."""
    out = []
    for name in parse_loggers(names):
        out.append(LOGGERS[name](run_dir, **({"tracking_uri": mlflow_uri} if name == "mlflow" else {})))
    return out


def log_external(run_dir, record: dict) -> None:
    """Add one external result to the run's tracked runs (those in ``RUN/tracking.json``), as
    ``external/NAME/...`` metrics; nothing when the run was not tracked."""
    path = Path(run_dir) / TRACKING_FILE
    if not path.is_file():
        return
    try:
        _log_external(_io.read_json(path, what="tracking record"), record)
    except Exception as exc:  # the result is written already; a tracker that is away must not undo it
        log.warning("%s: external result %s not tracked (%s)", path, record.get("name"), first_line(exc))


def _log_external(doc: dict, record: dict) -> None:
    values = final_metrics({}, [record])
    if "mlflow" in doc:
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=doc["mlflow"]["tracking_uri"])
        now = int(time.time() * 1000)
        client.log_batch(doc["mlflow"]["run_id"], metrics=[Metric(_mlflow_key(k), v, now, 0) for k, v in values.items()])
    if "tensorboard" in doc:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=doc["tensorboard"]["log_dir"]) as writer:
            for k, v in values.items():
                writer.add_scalar(f"final/{k}", v, 0)


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}
