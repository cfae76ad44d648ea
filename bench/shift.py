"""The shift guard's detectors compared (issue #21): does each tell SARS-CoV-2 test slices from
another hospital's (UCSD-dev, all 541) slices, for a run trained on SARS-CoV-2 alone?

For one run (default: EfficientNetLite0, ImageNet weights, linear probe, 224 px, the paper split;
trained into bench/results/ when missing) every detector is fitted on the run's TRAIN images, its
threshold set to accept 95% of the val images (the conformal rule of ``shift.fit_guard``), then measured on the SARS-CoV-2 test images and on
UCSD-dev: AUROC (UCSD = positive), flagged shares at the threshold, the set-level test (20 slices
drawn at random, one-sided Mann-Whitney against the val scores at p < 0.01, 200 draws) for UCSD and
for SARS-CoV-2 test, and predict's time with and without the guard. Nothing is fitted on UCSD.
The features are computed once per image for all detectors (the same hooks predict uses).

    PYTHONPATH=src python bench/shift.py [--run bench/results/shift-lite0-probe]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, write_json  # noqa: E402

from ct_transfer import data as D  # noqa: E402
from ct_transfer import load_run, shift  # noqa: E402

UCSD = DATA.parent / "ucsd-covid-ct-dev"
DEFAULT_RUN = RESULTS / "shift-lite0-probe"


def train_run(out: Path):
    from ct_transfer import TrainConfig, fit

    # the linear-probe recipe's values (recipes.py), spelled out
    cfg = TrainConfig(data=str(DATA), model="EfficientNetLite0", weights="imagenet", strategy="linear",
                      image_size=224, augment=False, split_preset="paper", out=str(out), recipe="linear-probe",
                      shift_guard="none")
    return fit(cfg, progress=False)


def tapped(run, x, taps, batch_size=64):
    return shift._tapped_features(run.model, x, run.transform, taps, device=run.device,
                                  channels_last=run.config.get("channels_last", True), bf16=False,
                                  batch_size=batch_size)


def set_detection(scores, val_scores, *, n, draws, alpha, rng) -> float:
    from scipy.stats import mannwhitneyu

    hits = 0
    for _ in range(draws):
        pick = rng.choice(len(scores), size=n, replace=False)
        hits += mannwhitneyu(scores[pick], val_scores, alternative="greater").pvalue < alpha
    return hits / draws


def predict_seconds(run, files, repeats: int) -> float:
    run.predict(files[:4])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run.predict(files, batch_size=64)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--n", type=int, default=20, help="slices per set-level draw")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--timing-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-repeats", type=int, default=7, help="alternated repeats of the forward-only timing (minimum)")
    ap.add_argument("--out", type=Path, default=RESULTS / "shift.json")
    ap.add_argument("--reuse-features", action="store_true", help="reuse RUN/shift-features.pt of an earlier run")
    args = ap.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    if not (args.run / "metrics.json").is_file():  # a finished run (its weights: best.safetensors)
        print(f"training {args.run} (linear probe, 224 px, paper split)")
        train_run(args.run)
    run = load_run(args.run)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    all_taps = list(dict.fromkeys(t for n in shift.list_detectors() for t in shift.DETECTORS.get(n).taps(run.model)))
    cache = args.run / "shift-features.pt"  # the pooled features of every tap (a rerun skips decoding and forward passes)
    if cache.is_file() and args.reuse_features:
        feats = torch.load(cache)
        missing = [t for t in all_taps if t not in feats["train"]]
        if missing:
            raise SystemExit(f"{cache}: no features of {missing}; rerun without --reuse-features")
    else:
        subsets = {s: run._load(run.split, s, run.config["data"], "split") for s in ("train", "val", "test")}
        items, _ = D.scan_folder(UCSD)
        ucsd_x = D.stack([run.preprocess.load(UCSD / it.path) for it in items])
        feats = {s: dict(zip(all_taps, tapped(run, sub.x, all_taps))) for s, sub in subsets.items()}
        feats["ucsd"] = dict(zip(all_taps, tapped(run, ucsd_x, all_taps)))
        feats["y_train"] = subsets["train"].y.cpu()
        torch.save(feats, cache)
    n = {s: len(feats[s][shift.HEAD_INPUT]) for s in ("train", "val", "test", "ucsd")}
    print(f"features of {n}: {time.perf_counter() - t0:.0f} s; taps {all_taps}")
    y_train = feats["y_train"]
    rng = np.random.default_rng(0)
    rows, guards = [], {}
    for name in shift.list_detectors():
        cls = shift.DETECTORS.get(name)
        taps = cls.taps(run.model)
        pick = lambda s: [feats[s][t] for t in taps]  # noqa: E731
        t1 = time.perf_counter()
        det = cls.fit(pick("train"), y_train, len(run.classes)).eval()
        fit_s = time.perf_counter() - t1
        with torch.no_grad():
            sc = {s: det(pick(s)).numpy().astype(np.float64) for s in ("val", "test", "ucsd")}
        threshold = shift.conformal_threshold(sc["val"], shift.DEFAULT_ACCEPT)  # the rule fit_guard uses
        guards[name] = shift.ShiftGuard(det, taps=taps, threshold=threshold,
                                        val_scores=torch.from_numpy(sc["val"]).float()).eval()
        auroc = roc_auc_score(np.r_[np.zeros(len(sc["test"])), np.ones(len(sc["ucsd"]))], np.r_[sc["test"], sc["ucsd"]])
        rows.append({
            "detector": name, "taps": len(taps), "auroc_test_vs_ucsd": float(auroc),
            "flagged_val": float((sc["val"] > threshold).mean()), "flagged_test": float((sc["test"] > threshold).mean()),
            "flagged_ucsd": float((sc["ucsd"] > threshold).mean()),
            "set_detect_ucsd": set_detection(sc["ucsd"], sc["val"], n=args.n, draws=args.draws, alpha=args.alpha, rng=rng),
            "set_detect_test": set_detection(sc["test"], sc["val"], n=args.n, draws=args.draws, alpha=args.alpha, rng=rng),
            "fit_seconds": round(fit_s, 2), "threshold": threshold})
        print(f"{name}: AUROC {auroc:.4f}")

    # predict's time, end to end (decode + forward + guard) on the same files, run without a guard
    # and with each detector's fitted guard, alternated so the machine's load hits all alike
    timing_files = [str(DATA / r["path"]) for r in run.split if r["subset"] == "test"][:args.timing_images]
    times = {"none": [], **{n: [] for n in guards}}
    for _ in range(args.repeats):
        for name in times:
            run.guard = None if name == "none" else guards[name]
            times[name].append(predict_seconds(run, timing_files, 1))
    base = statistics.median(times["none"])
    for r in rows:
        t = statistics.median(times[r["detector"]])
        r["predict_seconds"] = round(t, 3)
        r["predict_overhead"] = round(t / base - 1, 4)

    # the guard's own cost without the decode: forward (+ hooks + score) on decoded images, the
    # MINIMUM of alternated repeats (a load spike only ever adds time, so the minimum is the
    # least disturbed measurement on a shared machine)
    x = run.load_images(timing_files)
    fwd = {name: [] for name in times}
    for _ in range(args.min_repeats):
        for name in fwd:
            run.guard = None if name == "none" else guards[name]
            t1 = time.perf_counter()
            run.predictor.outputs(x)
            fwd[name].append(time.perf_counter() - t1)
    run.guard = None
    fbase = min(fwd["none"])
    for r in rows:
        r["forward_seconds_min"] = round(min(fwd[r["detector"]]), 4)
        r["forward_overhead_min"] = round(min(fwd[r["detector"]]) / fbase - 1, 4)

    header = (f"{'detector':<18}{'AUROC':>8}{'flag val':>10}{'flag test':>10}{'flag UCSD':>10}"
              f"{'set UCSD':>10}{'set test':>10}{'predict +':>11}{'forward +':>11}")
    print(f"\n{run.config['model']} · {run.config.get('strategy')} · {run.image_size} px · test {len(sc['test'])} vs "
          f"UCSD {len(sc['ucsd'])} · set level: {args.n} slices, {args.draws} draws, p < {args.alpha}")
    print(header)
    for r in rows:
        print(f"{r['detector']:<18}{r['auroc_test_vs_ucsd']:>8.4f}{r['flagged_val']:>10.3f}{r['flagged_test']:>10.3f}"
              f"{r['flagged_ucsd']:>10.3f}{r['set_detect_ucsd']:>10.3f}{r['set_detect_test']:>10.3f}"
              f"{100 * r['predict_overhead']:>10.1f}%{100 * r['forward_overhead_min']:>10.1f}%")
    print(f"predict without a guard: {base:.3f} s for {len(timing_files)} images (median of {args.repeats}); "
          f"forward without a guard: {fbase:.3f} s (minimum of {args.min_repeats})")
    write_json(args.out, {"run": str(args.run), "model": run.config["model"], "image_size": run.image_size,
                          "strategy": run.config.get("strategy"), "n_train": n["train"],
                          "n_val": n["val"], "n_test": n["test"], "n_ucsd": n["ucsd"],
                          "set_level": {"n": args.n, "draws": args.draws, "alpha": args.alpha},
                          "predict_seconds_no_guard": base, "timing_images": len(timing_files),
                          "times": times, "forward_seconds_no_guard_min": fbase, "forward_times": fwd, "rows": rows, "machine": machine_info()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
