"""The paper's 12 architectures from scratch, 100 epochs each, on ONE GPU: wall time of the whole set,
per-run training seconds and train images/s per architecture, against the paper's Table 8 T4 times.

Runs go through ``experiment`` (``run_grid``) with ``--jobs`` runs at once sharing the GPU; the GPU
path's switches (bf16 autocast by default on CUDA, ``--compile-mode reduce-overhead`` = CUDA graphs
with static batch shapes, last.pt every ``--checkpoint-every`` epochs, written off the hot path) are
options here so their effect can be measured. Refuses cleanly without CUDA.

    python bench/gpu_grid.py --jobs 4                       # the full set
    python bench/gpu_grid.py --jobs 4 --compile --compile-mode reduce-overhead
    python bench/gpu_grid.py --models EfficientNetV2B0 --epochs 100 --jobs 1   # the 60 s target
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, write_json  # noqa: E402


def paper_seconds() -> dict:
    from importlib.resources import files

    paper = json.loads(files("ct_transfer").joinpath("resources/pardede2023.json").read_text())
    return {t["model"]: t["train_time"]["without_seconds"] for t in paper["tables"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated (default: the paper's 12)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--jobs", type=int, default=4, help="runs at once on the one GPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--grid-dir", help="grid directory (default: a new folder under bench/results)")
    p.add_argument("--out", default=str(RESULTS / "gpu_grid.json"))
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_grid: no CUDA device here; this benchmark measures the GPU path only (nothing was run)")
    from ct_transfer import models as M
    from ct_transfer.experiment import run_grid

    models = args.models.split(",") if args.models else list(M.PAPER_MODELS)
    grid_dir = Path(args.grid_dir or RESULTS / f"gpu_grid_{time.strftime('%Y%m%d-%H%M%S')}")
    base = dict(epochs=args.epochs, device="cuda", checkpoint_every=args.checkpoint_every,
                compile=args.compile, compile_mode=args.compile_mode if args.compile else "default")
    t0 = time.perf_counter()
    results = run_grid(str(DATA), str(grid_dir), models, ["none"], [0], base=base, progress=False, jobs=args.jobs)
    wall = time.perf_counter() - t0
    paper = paper_seconds()
    rows = []
    for model, r in zip(models, results):
        run_dir = grid_dir / "runs" / r["run"]
        m = json.loads((run_dir / "metrics.json").read_text()) if r["status"] == "done" else {}
        hist = [l.split(",") for l in (run_dir / "history.csv").read_text().strip().splitlines()] \
            if (run_dir / "history.csv").exists() else []
        ips = [float(h[hist[0].index("train_ips")]) for h in hist[1:]] if hist else []
        rows.append({"model": model, "status": r["status"], "train_seconds": m.get("train_seconds"),
                     "median_train_ips": statistics.median(ips) if ips else None,
                     "val_acc": m.get("val", {}).get("accuracy"), "paper_t4_seconds": paper.get(model)})
    print(f"| model | train s ({args.epochs} epochs) | train img/s (median epoch) | val acc | paper T4 s | × faster |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speed = (f"{r['paper_t4_seconds'] / r['train_seconds']:.1f}" if r["train_seconds"] and r["paper_t4_seconds"]
                 else "—")
        print(f"| {r['model']} | {r['train_seconds'] or '—'} | {r['median_train_ips'] or '—'} | "
              f"{r['val_acc'] if r['val_acc'] is not None else '—'} | {r['paper_t4_seconds'] or '—'} | {speed} |")
    total_paper = sum(r["paper_t4_seconds"] or 0 for r in rows)
    print(f"\nwall time of the set: {wall:.0f} s with {args.jobs} runs at once (paper, sequential on a T4: "
          f"{total_paper:.0f} s)")
    write_json(Path(args.out), {**machine_info(), "jobs": args.jobs, "base": base, "wall_seconds": wall,
                                "grid_dir": str(grid_dir), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
