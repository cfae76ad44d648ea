"""write_report: collect a grid, compute its statistics, draw its plots, render md/HTML/JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import _io
from ..errors import CTTransferError
from . import paper as P
from .collect import CONDITIONS, collect_runs, describe_split, group_runs, read_grid_info
from .plots import write_plots
from .render import render_html, render_markdown
from .stats import build_tables, external_comparison, headline_ratios, paired_comparison

log = logging.getLogger(__name__)

SETTING_KEYS = ("batch_size", "lr", "dropout", "augment", "limit", "split_seed", "device")
SUBSETS = ("val", "test")  # val first: the paper's Tables 6-8 are on its validation set


def _protocol(runs: list[dict]) -> dict:
    """What the runs share or vary in: epochs, seeds, image sizes, strategies."""
    return {"epochs": sorted({r["metrics"]["epochs"] for r in runs if "epochs" in r["metrics"]}),
            "seeds": sorted({r["seed"] for r in runs}),
            "image_sizes": sorted({r["metrics"]["image_size"] for r in runs if "image_size" in r["metrics"]}),
            "strategies": sorted({r["strategy"] for r in runs})}


def _settings(runs: list[dict], grid_info: dict) -> dict:
    """Training settings: grid.json's, completed from the first run's config.json (grid.json
    records only what the grid was given; the run's config has every value it used)."""
    config = runs[0]["config"]
    return {**{k: config[k] for k in SETTING_KEYS if k in config}, **(grid_info.get("settings") or {})}


def _paper_section(tables: dict, paper: dict) -> dict:
    """Our tables beside the paper's, per subset and metric, plus the paper's table means."""
    beside = {s: {k: P.beside_paper(tables[s][k]["rows"], k, paper=paper) for k in P.TABLE_KEYS}
              for s in SUBSETS}
    return {"citation": paper["citation"], "beside": beside, "means": P.paper_table_means(paper=paper)}


def _ratios(tables: dict, paper: dict) -> dict:
    return {"paper_abstract": P.abstract_ratios(paper=paper), "paper_tables": P.table_ratios(paper=paper),
            "paper_text": P.text_claims(paper=paper),
            "ours": {s: headline_ratios(tables[s]) for s in SUBSETS}}


def _paired(groups: dict) -> dict:
    return {model: paired_comparison(conds["imagenet"], conds["none"])
            for model, conds in groups.items() if conds.get("none") and conds.get("imagenet")}


def build_summary(grid_dir) -> tuple[dict, list[dict], dict]:
    """(report.json's content, the runs, the runs grouped by model and condition)."""
    grid_dir = Path(grid_dir)
    runs, failed = collect_runs(grid_dir)
    grid_info = read_grid_info(grid_dir)
    other = [r["name"] for r in runs if r["weights"] not in CONDITIONS]
    if other:  # runs from a weights file are neither of the paper's two conditions
        log.info("%d run(s) with a weights file left out of the comparison: %s", len(other), ", ".join(other))
    runs = [r for r in runs if r["weights"] in CONDITIONS]
    if not runs:
        raise CTTransferError(f"{grid_dir}: no finished runs to report")
    groups = group_runs(runs)
    paper = P.paper_results()
    tables = {s: build_tables(groups, s) for s in SUBSETS}
    summary = {
        "grid": str(grid_dir), "split": describe_split(grid_dir, grid_info),
        "settings": _settings(runs, grid_info), "protocol": _protocol(runs),
        "models": list(groups), "tables": tables, "paper": _paper_section(tables, paper),
        "ratios": _ratios(tables, paper), "comparisons": _paired(groups),
        "external": external_comparison(groups), "runs": [r["name"] for r in runs], "failed": failed,
    }
    return summary, runs, groups


def write_report(grid_dir, out_dir=None, *, extra_sections: list[str] | None = None) -> dict:
    """Write report.md, report.html (images embedded), report.json and the PNG plots into
    ``out_dir`` (default: the grid directory); returns report.json's content."""
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir else grid_dir
    summary, runs, groups = build_summary(grid_dir)
    _io.ensure_writable_dir(out_dir)
    paper_val = {k: {r["model"]: r for r in P.paper_rows(k)} for k in ("accuracy", "f1")}
    plots = write_plots(out_dir, tables=summary["tables"], groups=groups, runs=runs, paper_val=paper_val)
    md = render_markdown(summary, runs=runs, plots=plots, extra_sections=extra_sections or [])
    _io.write_text(out_dir / "report.md", md)
    _io.write_text(out_dir / "report.html", render_html(md, image_dir=out_dir))
    _io.write_text(out_dir / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("wrote %s, report.html and report.json (%d runs)", out_dir / "report.md", len(runs))
    return summary
