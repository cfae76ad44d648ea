"""write_report: collect a grid (or one run), compute its statistics, draw its plots, render md/HTML/JSON.

The report opens with the answer (internal, grouped-split and external results side by side, the
leakage audit, the shift checks), then the paper's tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import _io
from ..errors import CTTransferError
from . import paper as P
from .collect import CONDITIONS, collect_runs, describe_split, find_audit, group_runs, is_run_dir, read_grid_info
from .plots import write_plots
from .render import render_html, render_markdown
from .stats import build_tables, decision_rows, external_comparison, headline_ratios, paired_comparison

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


def _grouped_groups(grouped) -> dict | None:
    """Runs on a grouped split to set beside the grid's (another grid, or one run)."""
    if grouped is None:
        return None
    runs, _ = collect_runs(grouped)
    split = describe_split(grouped, read_grid_info(grouped))
    if split["name"] != "grouped":
        raise CTTransferError(f"{grouped}: its split is {split['name']}, not grouped")
    return group_runs(runs)


def build_summary(grid_dir, *, audit=None, grouped=None) -> tuple[dict, list[dict], dict]:
    """(report.json's content, the runs of the paper's two conditions, those runs grouped by model and
    condition). ``grid_dir`` may be one run's folder; ``audit``: an audit folder (default: found beside);
    ``grouped``: a grid or run on the grouped split, set beside this one's figures."""
    grid_dir = Path(grid_dir)
    all_runs, failed = collect_runs(grid_dir)
    grid_info = read_grid_info(grid_dir)
    if not all_runs:
        raise CTTransferError(f"{grid_dir}: no finished runs to report")
    split = describe_split(grid_dir, grid_info)
    answer = decision_rows(group_runs(all_runs), split_name=split["name"], grouped_groups=_grouped_groups(grouped))
    other = [r["name"] for r in all_runs if r["weights"] not in CONDITIONS]
    if other:  # runs from a weights file are neither of the paper's two conditions
        log.info("%d run(s) with a weights file left out of the paper's tables: %s", len(other), ", ".join(other))
    runs = [r for r in all_runs if r["weights"] in CONDITIONS]
    groups = group_runs(runs)
    paper = P.paper_results()
    tables = {s: build_tables(groups, s) for s in SUBSETS} if runs else None
    summary = {
        "grid": str(grid_dir), "single_run": is_run_dir(grid_dir), "split": split, "answer": answer,
        "audit": find_audit(grid_dir, audit), "settings": _settings(all_runs, grid_info),
        "protocol": _protocol(all_runs), "models": list(groups), "tables": tables,
        "paper": _paper_section(tables, paper) if tables else None,
        "ratios": _ratios(tables, paper) if tables else None, "comparisons": _paired(groups),
        "external": external_comparison(groups), "runs": [r["name"] for r in all_runs], "failed": failed,
    }
    return summary, all_runs, groups


def default_out(grid_dir) -> Path:
    """Where a report goes by default: the grid directory; for one run, RUN/report (a run's own
    folder holds only what training wrote)."""
    grid_dir = Path(grid_dir)
    return grid_dir / "report" if is_run_dir(grid_dir) else grid_dir


def write_report(grid_dir, out_dir=None, *, extra_sections: list[str] | None = None, audit=None,
                 grouped=None) -> dict:
    """Write report.md, report.html (images embedded), report.json and the PNG plots into
    ``out_dir`` (default: ``default_out``); returns report.json's content. ``grid_dir``: a grid or
    one run; ``audit``/``grouped``: see ``build_summary``."""
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir else default_out(grid_dir)
    summary, runs, groups = build_summary(grid_dir, audit=audit, grouped=grouped)
    _io.ensure_writable_dir(out_dir)
    paper_val = {k: {r["model"]: r for r in P.paper_rows(k)} for k in ("accuracy", "f1")}
    plots = write_plots(out_dir, tables=summary["tables"], groups=groups, runs=runs, paper_val=paper_val)
    md = render_markdown(summary, runs=runs, plots=plots, extra_sections=extra_sections or [])
    _io.write_text(out_dir / "report.md", md)
    _io.write_text(out_dir / "report.html", render_html(md, image_dir=out_dir))
    _io.write_text(out_dir / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("wrote %s, report.html and report.json (%d runs)", out_dir / "report.md", len(runs))
    return summary
