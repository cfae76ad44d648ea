"""Shared bits of the benchmark scripts: paths, the paper split, machine info."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "sarscov2-ct"
RESULTS = ROOT / "bench" / "results"


def paper_split(folder: Path) -> Path:
    """Write the paper's Table 1 split (seed 0) into ``folder`` and return its path."""
    from ct_transfer import data as D

    folder.mkdir(parents=True, exist_ok=True)
    split = folder / "paper_split.csv"
    items, _ = D.scan_folder(DATA)
    D.write_split(D.make_split(items, "paper", 0), split)
    return split


def machine_info() -> dict:
    import torch

    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "command": " ".join(sys.argv)}
