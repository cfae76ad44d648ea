"""Collect: the runs of a grid directory (or one run directory), their metrics, history, external
results and shift checks, the split, and a leakage audit when one is found."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from .. import _io
from ..errors import CTTransferError, first_line, show

log = logging.getLogger(__name__)

CONDITIONS = ("none", "imagenet")  # "without" and "with" transfer learning
PAPER_PER_CLASS = {"train": 976, "val": 122, "test": 122}  # the paper's Table 1
EXTERNAL_KEYS = ("accuracy", "recall", "specificity", "f1", "roc_auc")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a one-line CTTransferError naming the file."""
    return _io.read_json(path)


def _require(data: dict, keys, path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise CTTransferError(f"{path}: missing key(s) {', '.join(missing)}")


METRIC_NUMBERS = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "ece", "n")
RUN_NUMBERS = ("train_seconds", "epochs", "best_epoch", "image_size")


def _check_numbers(metrics: dict, path: Path, subsets=("val", "test")) -> None:
    """Every value the report computes with is a number (or null): a string there is a one-line
    error naming the file and key, not a TypeError deep in the statistics."""
    def bad(where, v):
        return v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))

    for key in RUN_NUMBERS:
        if bad(key, metrics.get(key)):
            raise CTTransferError(f"{path}: {key} is {show(metrics[key])}, not a number")
    if bad("seed", metrics.get("seed")) or isinstance(metrics.get("seed"), float):
        raise CTTransferError(f"{path}: seed is {show(metrics.get('seed'))}, not an integer")
    for subset in subsets:
        m = metrics.get(subset) if subset else metrics
        if subset and not isinstance(m, dict):
            raise CTTransferError(f"{path}: '{subset}' must be an object of metrics")
        for key in METRIC_NUMBERS:
            if bad(key, m.get(key)):
                raise CTTransferError(f"{path}: {subset + '.' if subset else ''}{key} is {show(m[key])}, not a number")


def read_history(path: Path) -> list[dict]:
    """history.csv as a list of {column: float}; [] when the run has none."""
    if not path.exists():
        return []
    rows = _io.read_csv(path, what="history file")
    try:
        return [{k: float(v) for k, v in row.items()} for row in rows]
    except (ValueError, TypeError) as exc:
        raise CTTransferError(f"{path}: unreadable history ({first_line(exc, 80)})") from None


def read_external(run_dir: Path) -> list[dict]:
    """External test sets of a run: ``RUN/external/<name>/metrics.json`` -> {name, data, metrics}."""
    root = run_dir / "external"
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "metrics.json"
        if not path.exists():
            log.info("%s: no metrics.json, skipped", folder)
            continue
        data = read_json(path)
        _require(data, ("metrics",), path)
        metrics = data["metrics"]
        if not isinstance(metrics, dict):
            raise CTTransferError(f"{path}: 'metrics' must be an object")
        _require(metrics, ("accuracy",), path)
        _check_numbers(metrics, path, subsets=(None,))
        out.append({"name": str(data.get("name") or folder.name), "data": str(data.get("data", "")),
                    "metrics": metrics, "path": path})
    return out


def read_shift_checks(run_dir: Path) -> list[dict]:
    """The shift guard's set-level checks, ``RUN/external/<name>/shift*.json`` (labelled or not)."""
    root = run_dir / "external"
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("shift*.json"))[:1]:
            data = read_json(path)
            if "verdict" not in data:
                log.info("%s: no verdict, skipped", path)
                continue
            out.append({"name": folder.name, "path": str(path), "verdict": str(data["verdict"]),
                        "shifted": data.get("shifted"), "n": data.get("n"), "flagged": data.get("flagged"),
                        "val_flagged": data.get("val_flagged"), "p_value": data.get("p_value"),
                        "detector": data.get("detector"), "data": data.get("data")})
    return out


def is_run_dir(path) -> bool:
    """A single run's folder (what `train` writes), not a grid of runs."""
    path = Path(path)
    return (path / "metrics.json").is_file() and (path / "config.json").is_file()


def condition(weights: str) -> str:
    """none | imagenet | file (a weights file: neither of the paper's two conditions)."""
    return weights if weights in CONDITIONS else "file"


def read_run(run_dir: Path) -> dict:
    """One finished run: metrics.json, config.json, history.csv and external results."""
    metrics = read_json(run_dir / "metrics.json")
    config = read_json(run_dir / "config.json")
    _require(metrics, ("model", "seed", "val", "test"), run_dir / "metrics.json")
    _require(config, ("weights",), run_dir / "config.json")
    _check_numbers(metrics, run_dir / "metrics.json")
    return {"dir": run_dir, "name": run_dir.name, "model": metrics["model"],
            "weights": condition(config["weights"]), "seed": metrics["seed"],
            "strategy": metrics.get("strategy", "full"), "metrics": metrics,
            "history": read_history(run_dir / "history.csv"), "config": config,
            "external": read_external(run_dir), "shift": read_shift_checks(run_dir)}


def collect_runs(grid_dir) -> tuple[list[dict], list[dict]]:
    """(finished runs, failed or unfinished runs) of a grid directory, or of one run directory."""
    grid_dir = Path(grid_dir)
    if is_run_dir(grid_dir):
        return [read_run(grid_dir)], []
    runs_dir = grid_dir / "runs"
    if not runs_dir.is_dir():
        raise CTTransferError(f"{grid_dir}: not a grid directory (no runs/ folder) nor a finished run "
                              "(no metrics.json)")
    done, other = [], []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if (run_dir / "metrics.json").exists():
            done.append(read_run(run_dir))
            continue
        error = run_dir / "error.txt"
        other.append({"name": run_dir.name,
                      "error": _io.read_text(error, what="error file").strip() if error.exists() else "unfinished"})
    return done, other


def group_runs(runs: list[dict]) -> dict:
    """{model: {condition: [runs sorted by seed]}} in first-seen model order."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["model"], {}).setdefault(r["weights"], []).append(r)
    for conds in out.values():
        for lst in conds.values():
            lst.sort(key=lambda r: r["seed"])
    return out


def read_grid_info(grid_dir) -> dict:
    """GRID/grid.json (data, models, weights, seeds, split, settings); {} for a grid without one.
    For a single run, the same facts from its config.json."""
    grid_dir = Path(grid_dir)
    if is_run_dir(grid_dir):
        config = read_json(grid_dir / "config.json")
        split_file = config.get("split_file")
        if isinstance(split_file, list):
            split_file = ", ".join(str(f) for f in split_file)
        return {"data": config.get("data"), "split": str(grid_dir / "split.csv"), "split_file": split_file,
                "split_preset": None if split_file else config.get("split_preset"),
                "split_groups": config.get("split_groups"), "settings": {}, "source": "config.json"}
    path = grid_dir / "grid.json"
    return read_json(path) if path.exists() else {}


AUDIT_KEYS = ("data", "split_file", "threshold", "n_images", "n_exact_pairs", "n_near_pairs", "n_cross_class_pairs",
              "n_groups", "n_pairs_across_subsets", "n_pairs_train_test", "n_exact_pairs_across_subsets", "text")


def find_audit(grid_dir, audit=None) -> dict | None:
    """The leakage audit to summarise: ``audit`` (a folder from `ct-transfer audit`, or its audit.json),
    else ``audit/`` inside the grid (or run) folder or beside it; None when there is none."""
    grid_dir = Path(grid_dir)
    if audit is not None:
        path = Path(audit)
        path = path / "audit.json" if path.is_dir() or not path.suffix else path
        if not path.is_file():
            raise CTTransferError(f"{audit}: no audit.json (write one with `ct-transfer audit`)")
    else:
        found = [p / "audit.json" for p in (grid_dir / "audit", grid_dir.parent / "audit")
                 if (p / "audit.json").is_file()]
        if not found:
            return None
        path = found[0]
    data = read_json(path)
    _require(data, ("n_images", "n_near_pairs"), path)
    out = {k: data.get(k) for k in AUDIT_KEYS}
    against = data.get("against") or {}
    out["against"] = {k: against.get(k) for k in ("data", "n_images", "n_pairs", "n_exact_pairs", "text")
                      if k in against} or None
    out["path"] = str(path)
    return out


def _split_counts(path: Path) -> dict | None:
    """{subset: {class: n}} and whether a patient/group column keeps every group in one subset."""
    try:
        rows = _io.read_csv(path, what="split file")
    except CTTransferError:
        return None
    columns = set(rows[0]) if rows else set()
    if not {"subset", "class"} <= columns:
        return None
    counts = Counter((r["subset"], r["class"]) for r in rows)
    by_subset: dict = {}
    for (subset, cls), n in sorted(counts.items()):
        by_subset.setdefault(subset, {})[cls] = n
    group_col = next((c for c in ("patient", "group") if c in columns), None)
    subsets_per_group: dict = {}
    for r in rows if group_col else ():
        subsets_per_group.setdefault(r[group_col], set()).add(r["subset"])
    disjoint = bool(subsets_per_group) and all(len(s) == 1 for s in subsets_per_group.values())
    return {"counts": by_subset, "groups_disjoint": disjoint, "group_col": group_col}


def describe_split(grid_dir, grid_info: dict) -> dict:
    """Which split the grid used: {name, how, file, counts, patient_level}.

    grid.json records the split file (always GRID/split.csv, a copy) and, in newer grids, the
    preset or the user's split file; older grids record neither, so a split whose counts are
    the paper's Table 1 is named "paper" (inferred).
    """
    grid_dir = Path(grid_dir)
    settings = grid_info.get("settings") or {}
    source = grid_info.get("source", "grid.json")  # where the facts come from (a single run: its config.json)
    split_path = Path(grid_info.get("split") or grid_dir / "split.csv")
    if not split_path.exists() and (grid_dir / "split.csv").exists():
        split_path = grid_dir / "split.csv"  # grid moved: grid.json holds the old absolute path
    info = _split_counts(split_path) if split_path.exists() else None
    counts = info["counts"] if info else None
    user_file = grid_info.get("split_file") or settings.get("split_file")
    preset = grid_info.get("split_preset") or settings.get("split_preset")
    if user_file:
        name, how = Path(user_file).name, f"split file ({source})"
    elif preset:
        name, how = str(preset), f"preset ({source})"
    elif split_path.name != "split.csv":
        name, how = split_path.name, "split file (grid.json)"
    elif counts and all(counts.get(s, {}) and set(counts[s].values()) == {n} for s, n in PAPER_PER_CLASS.items()):
        name, how = "paper", "inferred: 976/122/122 images per class, the paper's Table 1"
    else:
        name, how = "unknown", "grid.json names no preset or split file"
    # patient-level only when patients were given: a grouped split of near-duplicates alone is not
    patient_level = bool(info and info["groups_disjoint"]) and (
        info["group_col"] == "patient" or name != "grouped" or bool(grid_info.get("split_groups")))
    return {"name": name, "how": how, "file": str(split_path) if split_path.exists() else None,
            "counts": counts, "patient_level": patient_level}
