"""Explanation gallery: heat-map overlays of a few test images per confusion cell of the best run."""

from __future__ import annotations

from pathlib import Path

from ..evaluate import read_predictions
from .collect import collect_runs

CELLS = ("TP", "TN", "FP", "FN")


def _pick_cells(paths, true, proba, classes, per_cell: int) -> dict[str, list[str]]:
    """Up to ``per_cell`` image paths per confusion cell, positive class ``classes[1]``."""
    pos = classes[1]
    cells = {k: [] for k in CELLS}
    for p, t, pr in zip(paths, true, proba):
        pred = classes[int(pr.argmax())]
        key = ("T" if pred == t else "F") + ("P" if pred == pos else "N")
        if len(cells[key]) < per_cell:
            cells[key].append(p)
    return cells


def gallery_section(grid_dir, out_dir, method: str = "gradcam", *, per_cell: int = 2) -> str | None:
    """Markdown: overlays of a few test images per confusion cell (TP, TN, FP, FN) of the best run.

    Overlays go to OUT_DIR/gallery/; None when the grid has no finished binary run.
    """
    # imported here: they load torch models and the explanation libraries, which the rest of
    # the report does not need
    from ..explain import METHODS, explain_files
    from ..run import load_run

    runs, _ = collect_runs(grid_dir)
    if not runs:
        return None
    best = max(runs, key=lambda r: (r["metrics"]["val"]["accuracy"], r["metrics"]["test"]["accuracy"]))
    paths, true, proba, classes = read_predictions(best["dir"] / "predictions_test.csv")
    if len(classes) != 2:
        return None
    run = load_run(best["dir"])
    cells = _pick_cells(paths, true, proba, classes, per_cell)
    data_dir = Path(run.config["data"])
    gallery = Path(out_dir) / "gallery"
    lines = [f"## Explanation gallery ({METHODS.get(method, method)})", "",
             f"Best run by validation accuracy: `{best['name']}` (test accuracy "
             f"{best['metrics']['test']['accuracy']:.4f}). Up to {per_cell} test images per confusion-matrix cell; "
             f"positive class {classes[1]}.", ""]
    for key, files in cells.items():
        lines += [f"### {key} ({len(files)} shown)", ""]
        if not files:
            lines += ["none in this cell", ""]
            continue
        names = [f"{key}_{i}" for i in range(len(files))]
        res = explain_files(run, [data_dir / f for f in files], method=method, out_dir=gallery, names=names)
        for f, r in zip(files, res):
            lines += [f"`{f}`", "", f"![{key}](gallery/{Path(r['overlay']).name})", ""]
    return "\n".join(lines)
