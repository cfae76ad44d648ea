"""Hyper-parameter search over ``TrainConfig`` fields, on the validation metric only.

Local: Optuna (TPE sampler, successive-halving pruner on per-epoch reports, the study in
``OUT/study.db`` so a killed search resumes). Ray: Ray Tune with the same Optuna search space
(``OptunaSearch`` with a define-by-run function) and the ASHA scheduler, one trial per Ray task.

The test set is never looked at: the search's split keeps only the train and val rows (dropped
before ``--limit`` is applied, so not even the test set's size matters), and ``fit(test=False)``
neither decodes nor evaluates test images. A trial's score is read from its val history alone.

Outputs in ``OUT``: ``best.yaml`` (a recipe: ``train --recipe-file best.yaml``), ``trials.csv``,
``search.md`` (table) with ``search.png`` (scores by trial, parameter importance), ``tune.json``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import fields
from pathlib import Path

from . import _io
from . import data as D
from .config import TrainConfig
from .errors import ConfigError, CTTransferError, show

log = logging.getLogger(__name__)

METRICS = {"val_accuracy": ("val_acc", "maximize"), "val_loss": ("val_loss", "minimize")}
KINDS = ("loguniform", "uniform", "int", "choice")
_NOT_SEARCHABLE = {"data", "model", "out", "recipe", "split_file", "split_preset", "split_seed", "limit"}


# ---------------------------------------------------------------------------------------------
# The search space: YAML, one entry per TrainConfig field
# ---------------------------------------------------------------------------------------------


def load_space(path) -> dict:
    """``{field: spec}``; a spec is a fixed value or ``{type: loguniform|uniform|int|choice, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CTTransferError(f"{path}: search space file not found")
    from .recipes import read_yaml

    space = read_yaml(path, what="search space file")
    if not isinstance(space, dict) or not space:
        raise CTTransferError(f"{path}: a search space is a mapping of option: range (see docs/distributed.md)")
    return {name: _check_entry(path, name, spec) for name, spec in space.items()}


def _check_entry(path, name, spec):
    known = {f.name: f for f in fields(TrainConfig)}
    if name not in known or name in _NOT_SEARCHABLE:
        options = sorted(set(known) - _NOT_SEARCHABLE)
        raise CTTransferError(f"{path}: {name}: not a searchable option (choose from {', '.join(options)})")
    is_int = str(known[name].type).startswith("int")
    if not isinstance(spec, dict):
        _check_value(path, name, spec)
        return spec
    kind = spec.get("type")
    if kind not in KINDS:
        raise CTTransferError(f"{path}: {name}: type {kind!r}: choose {', '.join(KINDS)}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise CTTransferError(f"{path}: {name}: choice needs a non-empty list 'values'")
        for v in values:
            _check_value(path, name, v)
        return {"type": kind, "values": values}
    try:
        low, high = float(spec["low"]), float(spec["high"])  # YAML reads 1e-5 (no dot) as a string
    except (KeyError, TypeError, ValueError):
        raise CTTransferError(f"{path}: {name}: {kind} needs numbers 'low' and 'high'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (kind == "loguniform" and low <= 0):
        raise CTTransferError(f"{path}: {name}: need low < high" + (", both > 0" if kind == "loguniform" else ""))
    if is_int and kind != "int":
        raise CTTransferError(f"{path}: {name}: an integer option; use type: int")
    out = {"type": kind, "low": low, "high": high}
    if kind == "int":
        step, use_log = spec.get("step", 1), spec.get("log", False)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise CTTransferError(f"{path}: {name}: step {show(step)}: choose an integer >= 1")
        if not isinstance(use_log, bool):
            raise CTTransferError(f"{path}: {name}: log {show(use_log)}: choose true or false")
        if low != int(low) or high != int(high):
            raise CTTransferError(f"{path}: {name}: int needs whole numbers 'low' and 'high'")
        if use_log and step != 1:
            raise CTTransferError(f"{path}: {name}: log: true needs step 1")
        out.update(low=int(low), high=int(high), step=step, log=use_log)
    for v in (out["low"], out["high"]):
        _check_value(path, name, v)
    return out


def _check_value(path, name, value) -> None:
    try:
        TrainConfig(data="-", model="-", **{name: value})
    except ConfigError as exc:
        raise CTTransferError(f"{path}: {name}: {show(value)}: {exc.why}") from None
    except TypeError as exc:
        raise CTTransferError(f"{path}: {name}: {exc}") from None


def suggest(trial, space: dict) -> dict:
    """Sample one configuration through an Optuna trial (used by both executors)."""
    params = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            params[name] = spec
        elif spec["type"] == "choice":
            params[name] = trial.suggest_categorical(name, spec["values"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["type"] == "loguniform")
    return params


def distributions(space: dict) -> dict:
    import optuna.distributions as od

    out = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            continue
        if spec["type"] == "choice":
            out[name] = od.CategoricalDistribution(spec["values"])
        elif spec["type"] == "int":
            out[name] = od.IntDistribution(spec["low"], spec["high"], step=spec["step"], log=spec["log"])
        else:
            out[name] = od.FloatDistribution(spec["low"], spec["high"], log=spec["type"] == "loguniform")
    return out


# ---------------------------------------------------------------------------------------------
# One trial: fit on train/val, report per epoch, score from the val history
# ---------------------------------------------------------------------------------------------


def search_split(out: Path, data: str, *, split_file=None, split_preset="stratified", split_seed=0,
                 split_groups=None, class_map=None, limit=None) -> Path:
    """``OUT/split.csv``: the train and val rows of ``data.build_split`` (what ``train`` would
    build from the same options; test dropped first, then ``limit``): the search never sees test."""
    if class_map:
        from .config import parse_class_map

        class_map = parse_class_map(class_map)
    rows = D.build_split(data, split_files=[split_file], preset=split_preset, seed=split_seed,
                         groups_file=split_groups, class_map=class_map, limit=limit, subsets=("train", "val"))
    target = out / "split.csv"
    D.write_split(rows, target)
    return target


def trial_score(history: list[dict], metric: str) -> float:
    key, direction = METRICS[metric]
    values = [r[key] for r in history]
    return max(values) if direction == "maximize" else min(values)


def run_trial(params: dict, *, base: dict, metric: str, report=None) -> dict:
    """Train one configuration; ``report(epoch, best_so_far)`` is called after every epoch (it may
    raise to prune). Returns the score and epochs run, read from the val history only."""
    from .engine import fit
    from .engine.callbacks import Callback

    class _Report(Callback):
        order = 70  # after the best-model tracking and history

        def on_epoch_end(self, state, row):
            if report is not None:
                report(row["epoch"], trial_score(state.history, metric))

    cfg = TrainConfig(**{**base, **params})
    run = fit(cfg, callbacks=[_Report()], progress=False, test=False)
    return {"score": trial_score(run.history, metric), "epochs": len(run.history)}


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise CTTransferError("tune: Optuna is not installed; install it with pip install 'ct-transfer[ray]'") from None
    return optuna


def tune(*, data: str, model: str, space_file: str, trials: int, out: str, metric: str = "val_accuracy",
         base: dict | None = None, executor: str = "local", address: str | None = None, cpus_per_trial: float = 1,
         gpus_per_trial: float = 0, search_seed: int = 0) -> dict:
    """Search ``space_file`` for ``model`` on ``data``; writes best.yaml, trials.csv, search.md/png."""
    if metric not in METRICS:
        raise ConfigError("metric", metric, f"choose {', '.join(METRICS)}")
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError("trials", trials, "choose a whole number >= 1")
    if executor not in ("local", "ray"):
        raise ConfigError("executor", executor, "choose local or ray")
    optuna = import_optuna()
    if executor == "ray":
        from .distributed import check_ray

        check_ray(cpus_per_run=cpus_per_trial, gpus_per_run=gpus_per_trial)
    space = load_space(space_file)
    base = {k: v for k, v in (base or {}).items() if k not in ("data", "model", "out", "recipe")}
    TrainConfig(data=data, model=model, **base)  # the fixed options are valid before any trial
    if not Path(data).is_dir():
        raise CTTransferError(f"{data}: dataset folder not found")
    out_dir = Path(out)
    fresh = not (out_dir / "study.db").exists() and not (out_dir / "ray").exists()
    created = _created_paths(out_dir)
    out_dir = _io.ensure_writable_dir(out_dir)
    try:
        return _tune(out_dir, data, model, space, trials, metric, base, executor, address, cpus_per_trial,
                     gpus_per_trial, search_seed, optuna)
    except Exception:  # not KeyboardInterrupt: a killed search resumes from its study
        if fresh:  # a new search that failed leaves nothing behind (a resumed one keeps its study)
            _remove_outputs(out_dir, created)
        raise


def _created_paths(out_dir: Path) -> list[Path]:
    """The folders ``ensure_writable_dir`` is about to make (removed again if the search fails)."""
    made = []
    p = out_dir
    while not p.exists() and p.parent != p:
        made.append(p)
        p = p.parent
    return made


def _remove_outputs(out_dir: Path, created: list[Path]) -> None:
    import shutil

    for name in ("tune.json", "split.csv", "study.db", "best.yaml", "trials.csv", "search.md", "search.png"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "ray", ignore_errors=True)
    for folder in created:  # innermost first; only if still empty
        try:
            folder.rmdir()
        except OSError:
            break


def _tune(out_dir, data, model, space, trials, metric, base, executor, address, cpus_per_trial, gpus_per_trial,
          search_seed, optuna) -> dict:
    given = dict(base)  # the user's fixed options, as given: best.yaml carries them
    split = search_split(out_dir, data, split_file=base.pop("split_file", None),
                         split_preset=base.pop("split_preset", "stratified"), split_seed=base.get("split_seed", 0),
                         split_groups=base.pop("split_groups", None), class_map=base.pop("class_map", None),
                         limit=base.pop("limit", None))
    base = {**base, "data": str(data), "model": model, "split_file": str(split), "out": None}
    settings = {"data": str(data), "model": model, "space": space, "metric": metric, "trials": trials,
                "executor": executor, "search_seed": search_seed, "given": given,
                "fixed": {k: v for k, v in base.items() if k not in ("data", "model", "out")}}
    _io.write_json(out_dir / "tune.json", settings)
    max_epochs = _max_value(space["epochs"]) if "epochs" in space else TrainConfig(**base).epochs
    if executor == "ray":
        records = _tune_ray(space, base, metric, trials, out_dir, address=address, cpus=cpus_per_trial,
                            gpus=gpus_per_trial, seed=search_seed, max_epochs=max_epochs)
    else:
        records = _tune_local(optuna, space, base, metric, trials, out_dir, seed=search_seed, settings=settings)
    return write_outputs(out_dir, records, space, metric, given=given)


def _max_value(spec):
    if not isinstance(spec, dict):
        return spec
    return max(spec["values"]) if spec["type"] == "choice" else spec["high"]


def _tune_local(optuna, space, base, metric, trials, out_dir: Path, *, seed, settings) -> list[dict]:
    _, direction = METRICS[metric]
    # ERROR: a failed trial is said by our own one-line log below, not by Optuna's warning with a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import sqlite3

    db = str(out_dir / "study.db")
    # the file is opened by sqlite3 itself: a folder name with '?' or '#' would be parsed as part of a URL
    storage = optuna.storages.RDBStorage("sqlite://", engine_kwargs={"creator": lambda: sqlite3.connect(db)})
    study = optuna.create_study(
        study_name="tune", storage=storage, load_if_exists=True, direction=direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    key = {k: settings[k] for k in ("data", "model", "space", "metric")}
    key["fixed"] = {k: v for k, v in settings["fixed"].items() if k != "split_file"}  # split_file lies in out
    if study.user_attrs.get("settings") not in (None, _jsonable(key)):
        raise CTTransferError(f"{out_dir}: holds a search with other settings (model, data, space or metric); "
                              "choose another out=")
    study.set_user_attr("settings", _jsonable(key))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # killed with the previous search
        log.info("trial %d: interrupted by a kill, marked failed", t.number)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    left = trials - len(study.get_trials(deepcopy=False, states=finished))

    def objective(trial):
        params = suggest(trial, space)

        def report(epoch, value):
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = run_trial(params, base=base, metric=metric, report=report)
        except CTTransferError as exc:  # recorded: the search's error names it if no trial completes
            trial.set_user_attr("error", str(exc))
            log.warning("trial %d failed: %s", trial.number, exc)
            raise
        trial.set_user_attr("epochs", result["epochs"])
        log.info("trial %d: %s = %.4f  %s", trial.number, metric, result["score"], params)
        return result["score"]

    if left > 0:
        study.optimize(objective, n_trials=left, catch=(Exception,))
    records = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        records.append({"trial": t.number, "state": t.state.name, "score": value, "params": dict(t.params),
                        "epochs": t.user_attrs.get("epochs", max(t.intermediate_values, default=0)),
                        "error": t.user_attrs.get("error")})
    return records


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _ray_trial(config: dict, *, space_items, base, metric):
    """Ray Tune's trainable: one trial in a Ray worker."""
    from ray import tune as rt

    fixed = {k: v for k, v in space_items if not isinstance(v, dict)}
    run_trial({**fixed, **config}, base=base, metric=metric,
              report=lambda epoch, value: rt.report({"score": value, "epoch": epoch}))


def _define_by_run(trial, *, space):
    """OptunaSearch's space: sample through the trial, no constants (picklable for Tune's state)."""
    suggest(trial, space)


def _tune_ray(space, base, metric, trials, out_dir: Path, *, address, cpus, gpus, seed, max_epochs) -> list[dict]:
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .distributed import init_ray

    _, direction = METRICS[metric]
    mode = "max" if direction == "maximize" else "min"
    searchable = {k: v for k, v in space.items() if isinstance(v, dict)}
    started = init_ray(address)
    try:
        trainable = rt.with_resources(
            rt.with_parameters(_ray_trial, space_items=list(space.items()), base=base, metric=metric),
            {"cpu": cpus, "gpu": gpus})
        storage = str((out_dir / "ray").resolve())
        if rt.Tuner.can_restore(str(Path(storage) / "tune")):  # a killed search goes on
            tuner = rt.Tuner.restore(str(Path(storage) / "tune"), trainable=trainable, resume_errored=True)
        else:
            tuner = rt.Tuner(
                trainable,
                tune_config=rt.TuneConfig(
                    metric="score", mode=mode, num_samples=trials,
                    search_alg=OptunaSearch(space=functools.partial(_define_by_run, space=searchable), metric="score",
                                            mode=mode, seed=seed),
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=int(max_epochs), grace_period=1,
                                            reduction_factor=3)),
                run_config=rt.RunConfig(name="tune", storage_path=storage, verbose=0))
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    records = []
    for k, result in enumerate(grid):
        params = {name: result.config[name] for name in searchable if name in result.config}
        epochs_asked = params.get("epochs", space.get("epochs", TrainConfig(**base).epochs))
        done = (result.metrics or {}).get("epoch", 0)
        state = "FAIL" if result.error else ("COMPLETE" if done >= int(epochs_asked) else "PRUNED")
        records.append({"trial": k, "state": state, "score": (result.metrics or {}).get("score"),
                        "params": params, "epochs": done})
    return records


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def write_outputs(out_dir: Path, records: list[dict], space: dict, metric: str, *, given: dict | None = None) -> dict:
    from .recipes import write_recipe

    _, direction = METRICS[metric]
    complete = [r for r in records if r["state"] == "COMPLETE" and r["score"] is not None]
    if not complete:
        errors = [r for r in records if r.get("error")]
        why = f"; trial {errors[0]['trial']} failed: {errors[0]['error']}" if errors else \
            f" ({', '.join(sorted({r['state'].lower() for r in records})) or 'none ran'})"
        raise CTTransferError(f"{out_dir}: no trial completed{why}")
    sign = 1 if direction == "maximize" else -1
    best = max(complete, key=lambda r: (sign * r["score"], -r["trial"]))  # ties: the earlier trial
    fixed = {k: v for k, v in space.items() if not isinstance(v, dict)}
    # the base options given to tune (weights, split options, ...) and the best trial's values: what
    # `train --recipe-file best.yaml` needs to train the best trial's configuration again
    best_values = {**(given or {}), **fixed, **best["params"]}
    write_recipe(out_dir / "best.yaml", best_values)
    names = [k for k in space if isinstance(space[k], dict)]
    rows = [{"trial": r["trial"], "state": r["state"], metric: "" if r["score"] is None else r["score"],
             "epochs": r["epochs"], **{n: r["params"].get(n, "") for n in names}} for r in records]
    _io.write_csv(out_dir / "trials.csv", rows, ["trial", "state", metric, "epochs", *names])
    importance = _importance(records, space, direction)
    _plot(out_dir / "search.png", records, importance, metric)
    _io.write_text(out_dir / "search.md", _markdown(rows, names, metric, best, best_values, importance))
    log.info("best trial %d: %s = %.4f; wrote %s", best["trial"], metric, best["score"], out_dir / "best.yaml")
    return {"best": best, "best_values": best_values, "trials": records, "importance": importance}


def _importance(records, space, direction) -> dict:
    """Optuna's fANOVA importances from the complete trials (empty when there are too few)."""
    import optuna

    dists = distributions(space)
    complete = [r for r in records if r["state"] == "COMPLETE" and r["score"] is not None]
    varied = [n for n in dists if len({repr(r["params"].get(n)) for r in complete}) > 1]
    if len(complete) < 2 or not varied:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction)
    for r in complete:
        study.add_trial(optuna.trial.create_trial(params=r["params"], distributions=dists, value=r["score"]))
    try:
        return dict(optuna.importance.get_param_importances(
            study, params=varied, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
    except (RuntimeError, ValueError) as exc:  # e.g. all scores equal
        log.info("parameter importance not computed: %s", exc)
        return {}


def _plot(path: Path, records, importance, metric) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no global figure state

    from .evaluate import save_figure

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x"), ("FAIL", "s")):
        pts = [(r["trial"], r["score"]) for r in records if r["state"] == state and r["score"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=state.lower())
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.set_title("trial scores (validation)")
    ax = axes[1]
    if importance:
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names])
        ax.set_title("parameter importance (fANOVA)")
    else:
        ax.text(0.5, 0.5, "too few complete trials\nfor importances", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path)


def _markdown(rows, names, metric, best, best_values, importance) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = ["trial", "state", metric, "epochs", *names]
    lines = ["# Hyper-parameter search", "",
             f"Score: {metric} on the validation subset (best epoch); the test set was not used.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r[h]) for h in head) + " |" for r in rows]
    lines += ["", f"Best: trial {best['trial']} ({metric} {best['score']:.4f}), written to `best.yaml`:", "",
              "```yaml", *[f"{k}: {v}" for k, v in sorted(best_values.items())], "```", ""]
    if importance:
        lines += ["Parameter importance (fANOVA over complete trials): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()), ""]
    lines += ["![trial scores and parameter importance](search.png)", ""]
    return "\n".join(lines)
