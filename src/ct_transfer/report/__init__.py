"""Report of a grid: the paper's Tables 6-8 per architecture beside ours, headline ratios, paired
tests, internal vs external results, plots and an explanation gallery (report.md/.html/.json).

Modules: ``collect`` (runs, grid.json, split, external results), ``stats`` (intervals, tests,
tables), ``paper`` (the paper's numbers), ``plots`` (figures), ``render`` (Jinja2 + Markdown),
``gallery`` (heat-map overlays), ``write`` (all of it into one folder).
"""

from __future__ import annotations

from pathlib import Path

from .collect import collect_runs, describe_split, group_runs, read_grid_info
from .gallery import gallery_section
from .paper import abstract_ratios, paper_results, paper_rows, paper_table_means, table_ratios
from .stats import build_tables, headline_ratios, mcnemar_exact, mean_std_ci, paired_comparison
from .write import build_summary, write_report

__all__ = [
    "write_report", "build_summary", "collect_runs", "group_runs", "read_grid_info", "describe_split",
    "mean_std_ci", "mcnemar_exact", "paired_comparison", "build_tables", "headline_ratios",
    "paper_results", "paper_rows", "paper_table_means", "abstract_ratios", "table_ratios",
    "gallery_section", "add_cli", "cmd_report",
]


def cmd_report(args) -> None:
    out = args.out or args.grid_dir
    extra = []
    if not args.no_gallery:
        section = gallery_section(args.grid_dir, out, args.method)
        if section:
            extra.append(section)
    summary = write_report(args.grid_dir, args.out, extra_sections=extra)
    ratio = summary["ratios"]["ours"]["test"]["accuracy_ratio"]
    ratio_text = "n/a" if ratio is None else f"{ratio:.3f}"
    print(f"{len(summary['runs'])} runs reported (split: {summary['split']['name']}); "
          f"test accuracy ratio (with/without TL) {ratio_text}")
    print(f"wrote {Path(out) / 'report.md'} and {Path(out) / 'report.html'}")


def add_cli(sub) -> None:
    p = sub.add_parser("report", help="tables, statistics and plots of a grid (report.md + report.html)")
    p.add_argument("grid_dir")
    p.add_argument("--out", help="output folder (default: the grid directory)")
    p.add_argument("--method", default="gradcam", help="explanation method of the gallery")
    p.add_argument("--no-gallery", action="store_true", help="leave out the explanation gallery")
    p.set_defaults(func=cmd_report)
