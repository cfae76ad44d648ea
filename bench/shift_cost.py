"""What a guard's score costs on top of the forward pass, measured where the shared machine's load
cannot hide it: the detector's scoring of already pooled features (the cached ones of bench/shift.py),
and the pooling hooks on the forward, each the minimum of many repeats.

    PYTHONPATH=src python bench/shift_cost.py [--run bench/results/shift-lite0-probe] [--images 32]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, write_json  # noqa: E402

from ct_transfer import load_run, shift  # noqa: E402


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=RESULTS / "shift-lite0-probe")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    run = load_run(args.run)
    feats = torch.load(args.run / "shift-features.pt")  # written by bench/shift.py
    files = [str(DATA / r["path"]) for r in run.split if r["subset"] == "test"][:args.images]
    x = run.transform(run.load_images(files)).contiguous(memory_format=torch.channels_last)
    rows = {}
    with torch.inference_mode():
        run.model.eval()
        fwd = best(lambda: run.model(x), 5)
        for name in ("mahalanobis-multi", "mahalanobis-blocks", "knn", "knn-blocks"):
            cls = shift.DETECTORS.get(name)
            taps = cls.taps(run.model)
            det = cls.fit([feats["train"][t] for t in taps], feats["y_train"], len(run.classes)).eval()
            test = [feats["test"][t][:args.images] for t in taps]
            score = best(lambda: det(test), args.repeats)

            def tapped():
                with shift.FeatureTap(run.model, taps) as tap:
                    run.model(x)
                    return tap.taken()

            hooked = best(tapped, 5)
            rows[name] = {"score_seconds": score, "forward_with_hooks_seconds": hooked,
                          "score_share_of_forward": score / fwd}
            print(f"{name:<20} score {1000 * score:8.2f} ms ({100 * score / fwd:.2f}% of the forward); "
                  f"forward with its hooks {hooked:.3f} s", flush=True)
    print(f"forward of {args.images} images without hooks: {fwd:.3f} s (minimum of 5)")
    write_json(RESULTS / "shift_cost.json", {"images": args.images, "forward_seconds": fwd, "rows": rows,
                                             "machine": machine_info()})


if __name__ == "__main__":
    main()
