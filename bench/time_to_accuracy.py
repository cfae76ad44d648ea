"""Time to accuracy: EfficientNetLite0 (ImageNet weights) per strategy and image size.

Wall seconds of training (history ``seconds``: train loop + val check; frozen: + feature
extraction) until test accuracy first reaches each target. Test accuracy is measured after every
epoch outside the timed part. Decoded images are cached before timing starts (warm cache).

    python bench/time_to_accuracy.py --quick        # sizes 64,128; 60 s budget per cell
    python bench/time_to_accuracy.py                # sizes 64,128,224; 150 s budget per cell
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split  # noqa: E402
TARGETS = (0.88, 0.95)


def measure(strategy: str, size: int, budget: float, split: Path, max_epochs: int, lr: float = 1e-4) -> dict:
    from ct_transfer import data as D
    from ct_transfer.evaluate import predict_proba
    from ct_transfer.models import normalization
    from ct_transfer.train import TrainConfig, load_subset, train

    rows = D.read_split(split)
    classes = ["non-COVID", "COVID"]
    x_test, y_test, _, _ = load_subset(rows, "test", classes, DATA, size)  # warms the cache too
    for subset in ("train", "val"):
        load_subset(rows, subset, classes, DATA, size)
    reached = {t: None for t in TARGETS}
    curve = []
    state = {"feats": None, "eval_s": 0.0}
    t_start = time.perf_counter()

    def on_epoch(row, model):
        t0 = time.perf_counter()
        tf = D.batch_transform(*normalization(model), augment=False)
        if strategy == "frozen":  # backbone fixed: test features once, then only the head
            with torch.no_grad():
                model.eval()
                if state["feats"] is None:
                    state["feats"] = torch.cat([model.pooled(tf(x_test[i:i + 128])) for i in range(0, len(x_test), 128)])
                acc = float((model.head(state["feats"]).argmax(1) == y_test).float().mean())
        else:
            proba = predict_proba(model, x_test, tf)
            acc = float((torch.from_numpy(proba).argmax(1) == y_test).float().mean())
        state["eval_s"] += time.perf_counter() - t0
        end_to_end = time.perf_counter() - t_start - state["eval_s"]
        curve.append({"epoch": row["epoch"], "seconds": row["seconds"], "end_to_end": round(end_to_end, 2), "test_acc": acc})
        for t in TARGETS:
            if reached[t] is None and acc >= t:
                reached[t] = {"seconds": row["seconds"], "end_to_end": round(end_to_end, 2), "epoch": row["epoch"]}
        return all(v is not None for v in reached.values()) or row["seconds"] >= budget

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(DATA), model="EfficientNetLite0", weights="imagenet", out=tmp + "/run",
                          epochs=max_epochs, image_size=size, strategy=strategy, split_file=str(split), lr=lr)
        train(cfg, progress=False, callback=on_epoch)
    best = max(c["test_acc"] for c in curve)
    return {"strategy": strategy, "size": size, "reached": {str(k): v for k, v in reached.items()},
            "best_test_acc": best, "epochs_run": len(curve), "seconds_run": curve[-1]["seconds"], "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="64,128,224")
    p.add_argument("--strategies", default="full,partial,frozen")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per cell")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--out", default=str(RESULTS / "time_to_accuracy.json"))
    args = p.parse_args()
    sizes = [64, 128] if args.quick else [int(s) for s in args.sizes.split(",")]
    budget = 60.0 if args.quick else args.budget
    out = Path(args.out)
    split = paper_split(out.parent)
    results = []
    for size in sizes:
        for strategy in args.strategies.split(","):
            r = measure(strategy, size, budget, split, args.max_epochs, args.lr)
            results.append(r)
            fmt = lambda v: "—" if v is None else f"{v['seconds']:.0f} s (ep {v['epoch']}, e2e {v['end_to_end']:.0f} s)"
            print(f"{strategy:<8}{size:>4}px  0.88: {fmt(r['reached']['0.88'])}  0.95: {fmt(r['reached']['0.95'])}  "
                  f"best {r['best_test_acc']:.3f} in {r['seconds_run']:.0f} s", flush=True)
    print()
    print("| strategy | size | s to 0.88 (epoch) | s to 0.95 (epoch) | best test acc | epochs in budget |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f = lambda v: "not reached" if v is None else f"{v['seconds']:.0f} ({v['epoch']})"
        print(f"| {r['strategy']} | {r['size']} | {f(r['reached']['0.88'])} | {f(r['reached']['0.95'])} | "
              f"{r['best_test_acc']:.3f} | {r['epochs_run']} ({r['seconds_run']:.0f} s) |")
    info = {**machine_info(), "budget_seconds": budget, "lr": args.lr, "results": results}
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
