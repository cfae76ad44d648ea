"""The picture in docs/generalization.md: the same 8 slices of each dataset before and after the
robust preprocessing (``--crop`` and ``--intensity``). Usage:

    PYTHONPATH=src python bench/preprocess_figure.py [--out docs/preprocessing.png] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ct_transfer.data import Preprocess, as_rgb_array

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DATASETS = {"UCSD-dev": ROOT / "ucsd-covid-ct-dev", "SARS-CoV-2": ROOT / "sarscov2-ct"}
SETTINGS = [("raw (paper: squash only)", Preprocess(128)),
            ("crop body + percentile", Preprocess(128, crop="body", intensity="percentile")),
            ("crop lung + percentile", Preprocess(128, crop="lung", intensity="percentile")),
            ("crop lung + CLAHE", Preprocess(128, crop="lung", intensity="clahe"))]


def pick(root: Path, n: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    files = []
    for cls in ("COVID", "non-COVID"):
        files += rng.sample(sorted((root / cls).iterdir()), n // 2)
    return files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "preprocessing.png"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    label_w, tile = 170, 128
    rows = []
    for name, root in DATASETS.items():
        files = pick(root, 8, args.seed)
        arrays = [as_rgb_array(f) for f in files]
        for title, pre in SETTINGS:
            strip = np.concatenate([pre(a) for a in arrays], axis=1)
            label = Image.new("RGB", (label_w, tile), "white")
            ImageDraw.Draw(label).text((4, tile // 2 - 12), f"{name}\n{title}", fill="black")
            rows.append(np.concatenate([np.asarray(label), strip], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
