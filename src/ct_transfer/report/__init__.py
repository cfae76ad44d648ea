"""Report of a grid: the paper's Tables 6-8 per architecture beside ours, headline ratios, paired
tests, internal vs external results, plots and an explanation gallery (report.md/.html/.json).

Modules: ``collect`` (runs, grid.json, split, external results), ``stats`` (intervals, tests,
tables), ``paper`` (the paper's numbers), ``plots`` (figures), ``render`` (Jinja2 + Markdown),
``gallery`` (heat-map overlays), ``write`` (all of it into one folder).
"""

from __future__ import annotations

from .collect import collect_runs, describe_split, group_runs, read_grid_info
from .gallery import gallery_section
from .paper import abstract_ratios, paper_results, paper_rows, paper_table_means, table_ratios
from .stats import build_tables, headline_ratios, mcnemar_exact, mean_std_ci, paired_comparison
from .write import build_summary, write_report

__all__ = [
    "write_report", "build_summary", "collect_runs", "group_runs", "read_grid_info", "describe_split",
    "mean_std_ci", "mcnemar_exact", "paired_comparison", "build_tables", "headline_ratios",
    "paper_results", "paper_rows", "paper_table_means", "abstract_ratios", "table_ratios",
    "gallery_section",
]

