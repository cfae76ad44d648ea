"""Shared bits of the benchmark scripts: paths, the paper split, machine info."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "sarscov2-ct"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))  # the checkout's package, not an installed one


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
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(), "command": " ".join(sys.argv)}


def write_json(path: Path, obj) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def parse_sets(items) -> dict:
    """``--set KEY=VALUE`` flags -> {key: value}; values read as JSON (numbers, null, true) or kept as text."""
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out
