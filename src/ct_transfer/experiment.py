"""Experiment: the paper's grid (model x weights x seed), one run directory per cell, via ``fit``.

Restarting the same command skips finished runs, resumes the interrupted one from its last epoch
and retries failed ones; a failing run is recorded (``error.txt``) and the grid goes on. Each cell
is one call of ``run_cell``: in this process, in a pool of ``jobs`` processes, or as a Ray task.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import traceback
from pathlib import Path

from . import _io
from . import data as D
from . import models as M
from .config import TrainConfig
from .engine import fit
from .errors import ConfigError, CTTransferError
from .external import default_name, external_rows
from .rundir import record_failure
from .run import load_run

log = logging.getLogger(__name__)

PRESETS = {  # names in config.GRID_PRESETS (listed by the CLI)
    "paper": {"models": M.PAPER_MODELS, "weights": ["none", "imagenet"]},
    "offline": {"models": M.OFFLINE_MODELS, "weights": ["none", "imagenet"]},
}


def run_name(model: str, weights: str, seed: int, strategy: str = "full", *, others=()) -> str:
    """The cell's folder name. A weights file is named by its stem; when another weights file of the
    grid (``others``) has the same stem, a short hash of its resolved path tells them apart."""
    w = weights if weights in ("none", "imagenet") else "file-" + Path(weights).stem
    if w.startswith("file-") and any(o != weights and Path(o).stem == Path(weights).stem for o in others):
        w += "-" + hashlib.sha1(os.path.realpath(weights).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    suffix = "" if strategy == "full" else f"__{strategy}"
    return f"{model}__{w}__seed{seed}{suffix}"


def run_status(run_dir: Path, epochs: int | None = None) -> str:
    """done | failed | partial (resumable) | todo. A done run asked for more epochs is partial."""
    if (run_dir / "metrics.json").exists():
        try:
            metrics = _io.read_json(run_dir / "metrics.json", what="metrics file")
            finished = metrics.get("epochs", 0)
        except CTTransferError:
            return "partial" if (run_dir / "last.pt").exists() else "todo"  # damaged: redo the evaluation
        linear = metrics.get("strategy") == "linear"  # one convex fit: epochs do not apply
        if epochs is None or finished >= epochs or linear or not (run_dir / "last.pt").exists():
            return "done"
        return "partial"
    if (run_dir / "error.txt").exists():
        return "failed"
    if (run_dir / "last.pt").exists():
        return "partial"
    return "todo"


def grid_cells(models, weights, seeds):
    return [(m, w, s) for s in seeds for m in models for w in weights]


def ensure_split(grid_dir: Path, data: str, split_file: str | None, split_preset: str, split_seed: int,
                 split_groups: str | None = None) -> Path:
    """One split for every run of the grid (kept in GRID_DIR/split.csv)."""
    target = grid_dir / "split.csv"
    if split_file:
        if not target.exists() or Path(split_file).resolve() != target.resolve():
            D.write_split(D.build_split(data, split_files=[split_file], seed=split_seed), target)
    elif not target.exists():
        D.write_split(D.build_split(data, preset=split_preset, seed=split_seed, groups_file=split_groups), target)
    return target


def _external(run_dir: Path, external: str, run=None) -> None:
    """Evaluate a finished run on the external folder once (kept in RUN/external/<folder name>/);
    again when that result was computed with another calibration than the run's now."""
    from .external import is_current

    name = default_name(external)
    if is_current(run_dir, run_dir / "external" / name / "metrics.json"):
        return
    (run or load_run(run_dir)).evaluate_external(external, name=name)


EXECUTORS = ("local", "ray")


def run_grid(data: str, out: str, models: list[str], weights: list[str], seeds: list[int], *,
             base: dict | None = None, split_file: str | None = None, split_preset: str = "paper",
             split_seed: int = 0, split_groups: str | None = None, external: str | None = None,
             progress: bool = True, jobs: int = 1, executor: str = "local", address: str | None = None,
             cpus_per_run: float = 1, gpus_per_run: float = 0) -> list[dict]:
    """Train every (model, weights, seed); returns one status dict per cell, in grid order.

    ``jobs`` > 1 runs that many cells at once in spawned worker processes (each with
    ``threads = cores // jobs`` unless ``base`` sets threads; on CUDA they share the device).
    ``executor="ray"`` runs each cell as a Ray task (``ct_transfer.distributed``) on the cluster at
    ``address`` (or a local one); the cells write into ``out`` directly, so every node must see it.
    The same ``run_cell`` runs either way, so results, files and resume are the same. With
    ``external`` (a folder per class) every finished run is also evaluated there
    (``RUN/external/<folder name>/``).
    """
    base = dict(base or {})
    grid_dir = Path(out)
    if executor not in EXECUTORS:
        raise ConfigError("executor", executor, f"choose {', '.join(EXECUTORS)}")
    if not Path(data).is_dir():
        raise CTTransferError(f"{data}: dataset folder not found")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("jobs", jobs, "choose an integer >= 1")
    if jobs > 1 and executor == "ray":
        raise ConfigError("jobs", jobs, "with executor=ray set cpus_per_run= / gpus_per_run= instead")
    # every cell's options (names, sizes per architecture) are checked before the first run; a weights
    # file that is missing or damaged fails its own cells, recorded, while the others run
    for m in models:
        TrainConfig(**{**base, "data": str(data), "model": m, "weights": "none", "out": None}).resolved()
    if executor == "ray":
        from .distributed import check_ray

        check_ray(cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)  # before anything is written
    _io.ensure_writable_dir(grid_dir)
    if external is not None:  # a wrong external folder fails before any training
        external_rows(D.resolve_classes([{"class": c} for c in D.scan_folder(data)[1]], base.get("positive")),
                      external)
    split = ensure_split(grid_dir, data, split_file, split_preset, split_seed, split_groups)
    cells = grid_cells(models, weights, seeds)
    _io.write_json(grid_dir / "grid.json", {
        "data": str(data), "models": models, "weights": weights, "seeds": seeds, "split": str(split),
        "split_preset": None if split_file else split_preset, "split_file": split_file, "settings": base,
        "split_groups": split_groups, "external": external,
    })
    strategy = base.get("strategy", "full")
    results: dict[int, dict] = {}
    specs: list[dict] = []
    for k, (model, w, seed) in enumerate(cells, 1):
        run_dir = grid_dir / "runs" / run_name(model, w, seed, strategy, others=weights)
        head = f"[{k}/{len(cells)}] {model} weights={w} seed={seed}"
        if run_status(run_dir, base.get("epochs")) == "done":
            log.info("%s: done already, skipped", head)
            results[k] = {"run": run_dir.name, "status": "done"}
            if external is not None:
                _external(run_dir, external)
            continue
        specs.append({"index": k, "head": head, "progress": progress, "external": external,
                      "config": {**base, "data": str(data), "model": model, "weights": w, "seed": seed,
                                 "out": str(run_dir), "split_file": str(split)}})
    t_start = time.perf_counter()
    if executor == "ray":
        from .distributed import run_cells_on_ray

        for spec, result in run_cells_on_ray(run_cell, specs, address=address, cpus_per_run=cpus_per_run,
                                             gpus_per_run=gpus_per_run):
            results[spec["index"]] = result
    elif jobs > 1 and len(specs) > 1:
        for spec, result in zip(specs, _run_parallel(specs, base, jobs)):
            results[spec["index"]] = result
    else:
        for spec in specs:
            done_before = sum(r["status"] == "done" for r in results.values())
            log.info("%s: %d done, %d left, %.1f min so far", spec["head"], done_before, len(cells) - len(results),
                     (time.perf_counter() - t_start) / 60)
            results[spec["index"]] = run_cell(spec)
    ordered = [results[k] for k in sorted(results)]
    n_done = sum(r["status"] == "done" for r in ordered)
    n_failed = sum(r["status"] == "failed" for r in ordered)
    log.info("grid: %d done, %d failed, %.1f min", n_done, n_failed, (time.perf_counter() - t_start) / 60)
    return ordered


def run_cell(spec: dict) -> dict:
    """Train one grid cell (``spec["config"]``: TrainConfig values with ``out`` = its run directory).

    The cell's status is read here, where it runs, so a retried Ray task (after its worker died)
    resumes from the last checkpoint just like a restarted grid. Failures are recorded, not raised.
    """
    cfg_values, head = spec["config"], spec["head"]
    run_dir = Path(cfg_values["out"])
    status = run_status(run_dir, cfg_values.get("epochs"))
    if status == "done":
        return {"run": run_dir.name, "status": "done"}
    log.info("%s: %s", head, "resuming" if status == "partial" else "starting")
    (run_dir / "error.txt").unlink(missing_ok=True)
    try:
        # a failed or never-checkpointed cell starts again over its own leftovers
        run = fit(TrainConfig(**cfg_values), progress=spec.get("progress", True), resume=status == "partial",
                  overwrite=status != "partial")
        acc = run.metrics["test"]["accuracy"]
        log.info("%s: test accuracy %.4f, %.0f s training", head, acc, run.metrics["train_seconds"])
        if spec.get("external") is not None:
            _external(run_dir, spec["external"], run)
        return {"run": run_dir.name, "status": "done", "test_accuracy": acc}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # record and go on: one bad cell must not stop the grid
        msg = str(exc) if isinstance(exc, CTTransferError) else f"{type(exc).__name__}: {exc}"
        record_failure(run_dir, msg, traceback.format_exc())
        log.info("%s: FAILED: %s", head, msg)
        return {"run": run_dir.name, "status": "failed", "error": msg}


def _worker_init(threads: int, jobs: int, level: int) -> None:
    """A spawned worker: its share of the cores (and of the GPU's memory), the parent's log level."""
    import torch

    logging.basicConfig(level=level, format="%(message)s")
    torch.set_num_threads(threads)
    if torch.cuda.is_available():  # one process must not take the memory the others need
        torch.cuda.set_per_process_memory_fraction(0.95 / jobs)


def _run_parallel(specs: list[dict], base: dict, jobs: int) -> list[dict]:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    jobs = min(jobs, len(specs))
    threads = base.get("threads") or max(1, (os.cpu_count() or 1) // jobs)
    log.info("grid: %d runs to do, %d at a time, %d thread(s) each", len(specs), jobs, threads)
    level = logging.getLogger("ct_transfer").getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads, jobs, level)) as pool:
        futures = [pool.submit(run_cell, {**spec, "progress": False}) for spec in specs]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise
