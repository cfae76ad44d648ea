"""Time to accuracy on the paper split: wall seconds until TEST accuracy first reaches 0.95 / 0.98.

Each cell is a named recipe (recipes.py) on EfficientNetLite0 with ImageNet weights, run in its own
fresh process. "cold": an empty disk cache, so decoding the 2481 PNGs is included, as is importing
torch, building the model and loading the weights; "warm": the same cell again with the disk cache
the cold run filled (decoding skipped). The clock starts when the worker process starts; test
accuracy is measured after every epoch (the time that takes is subtracted), and a cell stops once
the highest target is reached or the recipe's epochs end.

    python bench/time_to_accuracy.py                               # linear-probe and cpu-fast, cold + warm
    python bench/time_to_accuracy.py --cells linear-probe --modes cold
    python bench/time_to_accuracy.py --cells paper --set epochs=10 --set image_size=64   # a baseline
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the worker's clock starts before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split, parse_sets, write_json  # noqa: E402

TARGETS = (0.95, 0.98)


def worker(recipe: str, model: str, split: str, cache_dir: str, overrides: dict, run_all: bool = False,
           keep: str | None = None) -> dict:
    from ct_transfer import data as D
    from ct_transfer import fit
    from ct_transfer import models as M
    from ct_transfer.engine import Callback
    from ct_transfer.inference import predict_proba
    from ct_transfer.recipes import config_from_recipe

    curve, reached, eval_s = [], {}, [0.0]

    class TestAccuracy(Callback):
        order = 55

        def on_epoch_end(self, state, row):
            t0 = time.perf_counter()
            test = state.subsets["test"]
            model = state.eval_model  # the weight average with --ema
            tf = D.batch_transform(*M.normalization(model), augment=False)
            kw = dict(device=state.device, channels_last=state.config.channels_last)
            y = test.y.cpu().numpy()
            acc = float((predict_proba(model, test.x, tf, tta=state.config.tta, **kw).argmax(1) == y).mean())
            # Would test-time flips pay (or, with them on, what do they add)? Both columns, every epoch.
            other = "none" if state.config.tta == "flips" else "flips"
            acc_other = float((predict_proba(model, test.x, tf, tta=other, **kw).argmax(1) == y).mean())
            eval_s[0] += time.perf_counter() - t0
            wall = time.perf_counter() - T_START - eval_s[0]
            curve.append({"epoch": row["epoch"], "train_seconds": row["seconds"], "wall": round(wall, 1),
                          "val_acc": row["val_acc"], "test_acc": acc, f"test_acc_tta_{other}": acc_other})
            for t in TARGETS:
                if t not in reached and acc >= t:
                    reached[t] = {"wall": round(wall, 1), "epoch": row["epoch"]}
            if len(reached) == len(TARGETS) and not run_all:
                state.stop = True

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_recipe(recipe, data=str(DATA), model=model, split_file=split, cache_dir=cache_dir,
                                 out=keep or tmp + "/run", **overrides)
        run = fit(cfg, callbacks=[TestAccuracy()], progress=False)
    m = run.metrics
    return {"recipe": recipe, "overrides": overrides, "reached": {str(k): reached.get(k) for k in TARGETS},
            "final_test_acc": m["test"]["accuracy"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs"],
            "train_seconds": m["train_seconds"], "wall_seconds": round(time.perf_counter() - T_START - eval_s[0], 1),
            "probe": m.get("probe"), "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="linear-probe,cpu-fast", help="comma-separated recipe names")
    p.add_argument("--model", default="EfficientNetLite0")
    p.add_argument("--modes", default="cold,warm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--out", default=str(RESULTS / "time_to_accuracy.json"))
    p.add_argument("--run-all", action="store_true",
                   help="train every epoch of the recipe (its final model is what a user gets), not only until "
                        "the targets are reached")
    p.add_argument("--keep", metavar="DIR", help="keep the (single) run's directory here, e.g. to evaluate it "
                                                 "on external data afterwards")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = parse_sets(args.set)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.split, args.cache_dir, overrides, args.run_all, args.keep)))
        return
    out = Path(args.out)
    split = paper_split(out.parent)
    results = []
    for recipe in args.cells.split(","):
        with tempfile.TemporaryDirectory(prefix="ct-tta-cache-") as cache:  # empty: the cold run decodes
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--worker", recipe, "--model", args.model, "--split", str(split),
                       "--cache-dir", cache, *sum((["--set", s] for s in args.set), []),
                       *(["--run-all"] if args.run_all else []), *(["--keep", args.keep] if args.keep else [])]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"{recipe} ({mode}) failed:\n{res.stderr[-3000:]}")
                r = {"mode": mode, **json.loads(res.stdout.strip().splitlines()[-1])}
                results.append(r)
                f = lambda v: "—" if v is None else f"{v['wall']:.0f} s (ep {v['epoch']})"
                print(f"{recipe:<14}{mode:<5} 0.95: {f(r['reached']['0.95'])}  0.98: {f(r['reached']['0.98'])}  "
                      f"final test {r['final_test_acc']:.4f}  wall {r['wall_seconds']:.0f} s", flush=True)
    print()
    print(f"| recipe ({args.model}) | start | s to 0.95 test acc (epoch) | s to 0.98 (epoch) | final test acc | "
          "epochs | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f = lambda v: "not reached" if v is None else f"{v['wall']:.0f} ({v['epoch']})"
        print(f"| {r['recipe']} | {r['mode']} | {f(r['reached']['0.95'])} | {f(r['reached']['0.98'])} | "
              f"{r['final_test_acc']:.4f} | {r['epochs_run']} | {r['wall_seconds']:.0f} |")
    write_json(out, {**machine_info(), "targets": TARGETS, "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
