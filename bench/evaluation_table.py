"""Internal (paper split) | grouped split | external, side by side, from two finished grids.

    python bench/evaluation_table.py --paper runs/paper --grouped runs/grouped --out docs/results/evaluation.json

Prints a Markdown table (one row per weights x seed, then a mean row per weights with a 95% t interval
over seeds) and writes the numbers as JSON. Per-seed brackets are the 95% intervals each evaluation
wrote over its images (Wilson for accuracy/sensitivity/specificity, bootstrap for AUC).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ct_transfer.report.collect import collect_runs
from ct_transfer.report.stats import mean_std_ci

COLUMNS = (("paper", "test", "accuracy"), ("grouped", "test", "accuracy"), ("paper", "ext", "accuracy"),
           ("paper", "ext", "recall"), ("paper", "ext", "specificity"), ("paper", "ext", "roc_auc"),
           ("grouped", "ext", "accuracy"), ("grouped", "ext", "roc_auc"))
LABELS = ("paper split: test acc", "grouped split: test acc", "UCSD (paper-split model): acc", "sens", "spec", "AUC",
          "UCSD (grouped-split model): acc", "AUC")


def _cell(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "—"
    ci = (m.get("ci95") or {}).get(key)
    return f"{m[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _op(m: dict | None) -> str:
    op = (m or {}).get("operating_point")
    if not op:
        return "—"
    return f"{_cell(op, 'sensitivity')} / {_cell(op, 'specificity')}"


def collect(grid: Path) -> dict:
    runs, _ = collect_runs(grid)
    out = {}
    for r in runs:
        ext = r["external"][0]["metrics"] if r["external"] else None
        out[(r["weights"], r["seed"])] = {"test": r["metrics"]["test"], "ext": ext,
                                          "epochs": r["metrics"].get("epochs"),
                                          "train_seconds": r["metrics"].get("train_seconds")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper", required=True)
    ap.add_argument("--grouped", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    grids = {"paper": collect(Path(args.paper)), "grouped": collect(Path(args.grouped))}
    keys = sorted(set(grids["paper"]) | set(grids["grouped"]), key=lambda k: (k[0] != "imagenet", k[1]))
    lines = ["| weights | seed | " + " | ".join(LABELS) + " | UCSD sens / spec at val threshold (paper-split model) |",
             "|---|---|" + "---|" * (len(LABELS) + 1)]
    summary = {}
    for weights in sorted({k[0] for k in keys}, key=lambda w: w != "imagenet"):
        seeds = [k for k in keys if k[0] == weights]
        for k in seeds:
            cells = [_cell(grids[g].get(k, {}).get(where), key) for g, where, key in COLUMNS]
            lines.append(f"| {weights} | {k[1]} | " + " | ".join(cells) + f" | {_op(grids['paper'].get(k, {}).get('ext'))} |")
        means = []
        for g, where, key in COLUMNS:
            vals = [grids[g][k][where][key] for k in seeds if k in grids[g] and grids[g][k][where]]
            s = mean_std_ci(vals, bounds=(0.0, 1.0))
            summary.setdefault(weights, {})[f"{g}/{where}/{key}"] = s
            means.append("—" if s["mean"] is None else f"**{s['mean']:.3f}**" + (
                f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["ci95"] else "") + f" (n={s['n']})")
        lines.append(f"| {weights} | mean | " + " | ".join(means) + " | |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(json.dumps({
        "table_markdown": table, "summary": summary,
        "runs": {g: {f"{w}/seed{s}": v for (w, s), v in runs.items()} for g, runs in grids.items()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
