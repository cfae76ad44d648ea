"""One run on 1 vs 2 worker processes on this machine, same total threads (issue #25).

Recipe (short, affordable on 2 cores): EfficientNetLite0, ImageNet weights (offline package),
strategy partial (first half of the stages frozen), 64 px, 2 epochs, Adam lr 1e-4, the paper split
(Table 1: 976/122/122 per class), decoded images in memory, ``threads=2`` in total (1 worker: 2
threads; 2 workers: 1 thread each). Same effective batch: 1 worker x 32 images per step, 2 workers x
16 images per step (so the same number of optimizer steps and the same lr). Seeds 0, 1, 2.

Reports, per run: train images/s (the epochs' training loops, all workers together, from
history.csv's ``train_ips``), the wall time of the whole ``fit`` (worker start-up, decoding,
validation, test and writing included) and test accuracy; then the means and the 2-vs-1 ratio.

    python bench/workers.py                        # 3 seeds x {1, 2} workers
    python bench/workers.py --seeds 0 --epochs 1   # quicker
    python bench/workers.py --lr 1e-3 --epochs 3 --out bench/results/workers-lr1e-3.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split, write_json  # noqa: E402


def one(workers: int, seed: int, args, split: Path, cache: Path, out: Path) -> dict:
    from ct_transfer import TrainConfig, fit

    cfg = TrainConfig(data=str(DATA), model="EfficientNetLite0", weights="imagenet", strategy=args.strategy,
                      image_size=args.image_size, epochs=args.epochs, batch_size=args.batch // workers, lr=args.lr,
                      seed=seed, split_file=str(split), threads=args.threads, workers=workers, store="memory",
                      cache_dir=str(cache), out=str(out), shift_guard="none")
    t0 = time.perf_counter()
    run = fit(cfg, progress=False)
    wall = time.perf_counter() - t0
    ips = [float(r["train_ips"]) for r in run.history]
    return {"workers": workers, "seed": seed, "batch_per_worker": args.batch // workers,
            "effective_batch": (args.batch // workers) * workers, "train_ips": round(statistics.mean(ips), 2),
            "train_seconds": run.metrics["train_seconds"], "wall_seconds": round(wall, 1),
            "test_accuracy": run.metrics["test"]["accuracy"], "val_accuracy": run.metrics["val"]["accuracy"],
            "best_epoch": run.metrics["best_epoch"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="effective batch (per worker: batch / workers)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--strategy", default="partial", choices=["full", "partial"])
    ap.add_argument("--threads", type=int, default=2, help="total torch threads, split between the workers")
    ap.add_argument("--out", default=str(RESULTS / "workers.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct-bench-workers-") as tmp:
        tmp = Path(tmp)
        split = paper_split(tmp)
        for seed in seeds:
            for w in counts:  # interleaved: a load change on the shared machine hits both arms alike
                rows.append(one(w, seed, args, split, tmp / "cache", tmp / f"run-w{w}-s{seed}"))
                print(rows[-1], flush=True)
    summary = {}
    for w in counts:
        mine = [r for r in rows if r["workers"] == w]
        acc = [r["test_accuracy"] for r in mine]
        summary[w] = {"train_ips": round(statistics.mean(r["train_ips"] for r in mine), 2),
                      "wall_seconds": round(statistics.mean(r["wall_seconds"] for r in mine), 1),
                      "test_accuracy_mean": round(statistics.mean(acc), 4),
                      "test_accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else None}
    print(f"\n| workers | batch/worker | train img/s | wall s per run | test accuracy (mean ± sd, {len(seeds)} seeds) |")
    print("|---|---|---|---|---|")
    for w in counts:
        s = summary[w]
        sd = f" ± {s['test_accuracy_sd']:.4f}" if s["test_accuracy_sd"] is not None else ""
        print(f"| {w} | {args.batch // w} | {s['train_ips']:.1f} | {s['wall_seconds']:.0f} | "
              f"{s['test_accuracy_mean']:.4f}{sd} |")
    if 1 in summary and 2 in summary:
        print(f"\n2 vs 1 worker: {summary[2]['train_ips'] / summary[1]['train_ips']:.2f}x train img/s, "
              f"{summary[2]['wall_seconds'] / summary[1]['wall_seconds']:.2f}x wall time")
    write_json(Path(args.out), {"machine": machine_info(), "args": vars(args), "runs": rows, "summary": summary})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
