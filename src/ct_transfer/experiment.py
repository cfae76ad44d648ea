"""Experiment: the paper's grid (model x weights x seed), one run directory per cell, via ``train``.

Restarting the same command skips finished runs, resumes the interrupted one from its last epoch
and retries failed ones; a failing run is recorded (``error.txt``) and the grid goes on.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from . import data as D
from . import models as M
from .errors import CTTransferError
from .train import TrainConfig, train

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
        finished = json.loads((run_dir / "metrics.json").read_text()).get("epochs", 0)
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


def run_grid(data: str, out: str, models: list[str], weights: list[str], seeds: list[int],
             base: dict | None = None, split_file: str | None = None, split_preset: str = "paper",
             split_seed: int = 0, progress: bool = True) -> list[dict]:
    """Train every (model, weights, seed); returns one status dict per cell."""
    base = dict(base or {})
    grid_dir = Path(out)
    if not Path(data).is_dir():
        raise CTTransferError(f"{data}: dataset folder not found")
    for m in models:
        M.resolve(m)  # unknown names fail before any training
    grid_dir.mkdir(parents=True, exist_ok=True)
    split = ensure_split(grid_dir, data, split_file, split_preset, split_seed)
    strategy = base.get("strategy", "full")
    cells = grid_cells(models, weights, seeds)
    (grid_dir / "grid.json").write_text(json.dumps({
        "data": str(data), "models": models, "weights": weights, "seeds": seeds, "split": str(split),
        "settings": {k: v for k, v in base.items()},
    }, indent=2) + "\n")
    results, t_start = [], time.perf_counter()
    for k, (model, w, seed) in enumerate(cells, 1):
        run_dir = grid_dir / "runs" / run_name(model, w, seed, strategy)
        status = run_status(run_dir, base.get("epochs"))
        done_before = sum(r["status"] == "done" for r in results)
        elapsed = time.perf_counter() - t_start
        head = f"[{k}/{len(cells)}] {model} weights={w} seed={seed}"
        if status == "done":
            print(f"{head}: done already, skipped", flush=True)
            results.append({"run": run_dir.name, "status": "done"})
            continue
        print(f"{head}: {'resuming' if status == 'partial' else 'starting'} "
              f"({done_before} done, {len(cells) - k + 1} left, {elapsed / 60:.1f} min so far)", flush=True)
        (run_dir / "error.txt").unlink(missing_ok=True)
        cfg = TrainConfig(**{**base, "data": str(data), "model": model, "weights": w, "seed": seed,
                             "out": str(run_dir), "split_file": str(split)})
        try:
            metrics = train(cfg, progress=progress, resume=status == "partial")
            results.append({"run": run_dir.name, "status": "done", "test_accuracy": metrics["test"]["accuracy"]})
            print(f"{head}: test accuracy {metrics['test']['accuracy']:.4f}, "
                  f"{metrics['train_seconds']:.0f} s training", flush=True)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # record and go on: one bad cell must not stop the grid
            run_dir.mkdir(parents=True, exist_ok=True)
            msg = str(exc) if isinstance(exc, CTTransferError) else f"{type(exc).__name__}: {exc}"
            (run_dir / "error.txt").write_text(msg + "\n")
            (run_dir / "error.log").write_text(traceback.format_exc())
            results.append({"run": run_dir.name, "status": "failed", "error": msg})
            print(f"{head}: FAILED: {msg}", flush=True)
    n_done = sum(r["status"] == "done" for r in results)
    n_failed = sum(r["status"] == "failed" for r in results)
    print(f"grid: {n_done} done, {n_failed} failed, {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    return results


def _csv_list(text: str, kind=str):
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def cmd_experiment(args):
    from .cli import _train_config

    preset = PRESETS[args.preset]
    models = _csv_list(args.models) if args.models else list(preset["models"])
    weights = _csv_list(args.weights) if args.weights else list(preset["weights"])
    try:
        seeds = _csv_list(args.seeds, int)
    except ValueError:
        raise CTTransferError(f"--seeds {args.seeds}: give integers, e.g. 0,1,2") from None
    base = asdict(_train_config(args, model="-", out="-", strategy=args.strategy))
    for k in ("data", "model", "out", "weights", "seed", "split_file"):
        base.pop(k, None)
    results = run_grid(args.data, args.out, models, weights, seeds, base, args.split_file,
                       args.split_preset or "paper", args.split_seed, progress=not args.quiet)
    if any(r["status"] == "failed" for r in results) and args.strict:
        raise CTTransferError(f"{args.out}: some runs failed (see their error.txt)")


def add_cli(sub) -> None:
    from .cli import _add_train_args

    p = sub.add_parser("experiment", help="run the paper's grid of models x weights x seeds")
    _add_train_args(p, grid=True)
    p.set_defaults(split_preset=None)
    p.add_argument("--out", required=True, help="grid directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: the 12 archs; offline: EfficientNetLite0/1/2 (weights install here)")
    p.add_argument("--models", help="comma-separated model names (default: the preset's)")
    p.add_argument("--weights", help="comma-separated: none,imagenet or paths (default: none,imagenet)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--strategy", choices=["full", "partial", "frozen"], default="full")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any run failed")
    p.set_defaults(func=cmd_experiment)
