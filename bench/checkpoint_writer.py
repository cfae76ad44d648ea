"""What writing checkpoints costs the training loop on the CPU: no run folder (nothing written)
against checkpoints written in the foreground (the engine's CPU default) and by a background
writer thread (the engine's CUDA default, forced here), same model, split and seed, each arm in
its own process. EfficientNetV2B0 from scratch, 64 px, the paper split, 3 epochs, 2 threads.

    PYTHONPATH=src python bench/checkpoint_writer.py      # prints a table, writes JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split, write_json  # noqa: E402

ARMS = ("none", "foreground", "background")


def worker(arm: str, split: str, epochs: int) -> dict:
    from ct_transfer import TrainConfig, fit
    from ct_transfer.engine import callbacks as C

    if arm == "background":  # the CUDA path's writer thread, on the CPU (bench-only switch)
        init = C.Checkpoint.__init__
        C.Checkpoint.__init__ = lambda self, rundir, every=1, background=False: init(self, rundir, every, True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(DATA), model="EfficientNetV2B0", weights="none", image_size=64, epochs=epochs,
                          split_file=split, out=None if arm == "none" else tmp + "/run", seed=0, threads=2,
                          shift_guard="none", cache_dir=tmp)
        t0 = time.perf_counter()
        run = fit(cfg, progress=False)
        wall = time.perf_counter() - t0
    secs = [h["seconds"] for h in run.history]
    return {"arm": arm, "epoch_seconds": [round(b - a, 2) for a, b in zip([0.0] + secs, secs)],
            "fit_seconds": round(wall, 1), "test_acc": run.metrics["test"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "checkpoint_writer.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--split", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.split, args.epochs)))
        return
    split = str(paper_split(Path(args.out).parent))
    rows = []
    for arm in ARMS:
        res = subprocess.run([sys.executable, __file__, "--worker", arm, "--split", split, "--epochs", str(args.epochs)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("| checkpoints | s per epoch | fit s | test acc |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {', '.join(map(str, r['epoch_seconds']))} | {r['fit_seconds']} | {r['test_acc']:.4f} |")
    write_json(Path(args.out), {"machine": machine_info(), "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
