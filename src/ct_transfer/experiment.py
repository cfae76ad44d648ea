"""Experiment: the paper's grid (model x weights x seed), one run directory per cell, via ``fit``.

Restarting the same command skips finished runs, resumes the interrupted one from its last epoch
and retries failed ones; a failing run is recorded (``error.txt``) and the grid goes on.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from . import _io
from . import data as D
from . import models as M
from .config import TrainConfig
from .engine import fit
from .errors import CTTransferError

log = logging.getLogger(__name__)

PRESETS = {
    "paper": {"models": M.PAPER_MODELS, "weights": ["none", "imagenet"]},
    "offline": {"models": M.OFFLINE_MODELS, "weights": ["none", "imagenet"]},
}


def run_name(model: str, weights: str, seed: int, strategy: str = "full") -> str:
    w = weights if weights in ("none", "imagenet") else "file-" + Path(weights).stem
    suffix = "" if strategy == "full" else f"__{strategy}"
    return f"{model}__{w}__seed{seed}{suffix}"


def run_status(run_dir: Path, epochs: int | None = None) -> str:
    """done | failed | partial (resumable) | todo. A done run asked for more epochs is partial."""
    if (run_dir / "metrics.json").exists():
        try:
            finished = _io.read_json(run_dir / "metrics.json", what="metrics file").get("epochs", 0)
        except CTTransferError:
            return "partial" if (run_dir / "last.pt").exists() else "todo"  # damaged: redo the evaluation
        if epochs is None or finished >= epochs or not (run_dir / "last.pt").exists():
            return "done"
        return "partial"
    if (run_dir / "error.txt").exists():
        return "failed"
    if (run_dir / "last.pt").exists():
        return "partial"
    return "todo"


def grid_cells(models, weights, seeds):
    return [(m, w, s) for s in seeds for m in models for w in weights]


def ensure_split(grid_dir: Path, data: str, split_file: str | None, split_preset: str, split_seed: int) -> Path:
    """One split for every run of the grid (kept in GRID_DIR/split.csv)."""
    target = grid_dir / "split.csv"
    if split_file:
        rows = D.read_split(split_file, data)
        if not target.exists() or Path(split_file).resolve() != target.resolve():
            D.write_split(rows, target)
    elif not target.exists():
        items, _ = D.scan_folder(data)
        D.write_split(D.make_split(items, split_preset, split_seed), target)
    return target


def run_grid(data: str, out: str, models: list[str], weights: list[str], seeds: list[int], *,
             base: dict | None = None, split_file: str | None = None, split_preset: str = "paper",
             split_seed: int = 0, progress: bool = True) -> list[dict]:
    """Train every (model, weights, seed); returns one status dict per cell."""
    base = dict(base or {})
    grid_dir = Path(out)
    if not Path(data).is_dir():
        raise CTTransferError(f"{data}: dataset folder not found")
    # every cell's options (names, sizes per architecture) are checked before the first run; a weights
    # file that is missing or damaged fails its own cells, recorded, while the others run
    for m in models:
        TrainConfig(**{**base, "data": str(data), "model": m, "weights": "none", "out": None}).resolved()
    _io.ensure_writable_dir(grid_dir)
    split = ensure_split(grid_dir, data, split_file, split_preset, split_seed)
    strategy = base.get("strategy", "full")
    cells = grid_cells(models, weights, seeds)
    _io.write_json(grid_dir / "grid.json", {
        "data": str(data), "models": models, "weights": weights, "seeds": seeds, "split": str(split),
        "split_preset": None if split_file else split_preset, "split_file": split_file, "settings": base,
    })
    results, t_start = [], time.perf_counter()
    for k, (model, w, seed) in enumerate(cells, 1):
        run_dir = grid_dir / "runs" / run_name(model, w, seed, strategy)
        status = run_status(run_dir, base.get("epochs"))
        done_before = sum(r["status"] == "done" for r in results)
        elapsed = time.perf_counter() - t_start
        head = f"[{k}/{len(cells)}] {model} weights={w} seed={seed}"
        if status == "done":
            log.info("%s: done already, skipped", head)
            results.append({"run": run_dir.name, "status": "done"})
            continue
        log.info("%s: %s (%d done, %d left, %.1f min so far)", head, "resuming" if status == "partial" else "starting",
                 done_before, len(cells) - k + 1, elapsed / 60)
        (run_dir / "error.txt").unlink(missing_ok=True)
        try:
            cfg = TrainConfig(**{**base, "data": str(data), "model": model, "weights": w, "seed": seed,
                                 "out": str(run_dir), "split_file": str(split)})
            run = fit(cfg, progress=progress, resume=status == "partial")
            acc = run.metrics["test"]["accuracy"]
            results.append({"run": run_dir.name, "status": "done", "test_accuracy": acc})
            log.info("%s: test accuracy %.4f, %.0f s training", head, acc, run.metrics["train_seconds"])
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # record and go on: one bad cell must not stop the grid
            msg = str(exc) if isinstance(exc, CTTransferError) else f"{type(exc).__name__}: {exc}"
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                _io.write_text(run_dir / "error.txt", msg + "\n")
                _io.write_text(run_dir / "error.log", traceback.format_exc())
            except (OSError, CTTransferError):
                pass
            results.append({"run": run_dir.name, "status": "failed", "error": msg})
            log.info("%s: FAILED: %s", head, msg)
    n_done = sum(r["status"] == "done" for r in results)
    n_failed = sum(r["status"] == "failed" for r in results)
    log.info("grid: %d done, %d failed, %.1f min", n_done, n_failed, (time.perf_counter() - t_start) / 60)
    return results

