"""Few-label site adaptation learning curve on UCSD (issue #21): accuracy, sensitivity, specificity
and AUC on UCSD-dev's official val patients (118 slices, never trained on or chosen on) against N
labelled slices of its train patients, for each method of ``ct_transfer.adapt``, several seeds per N.

The start is a run trained on SARS-CoV-2 alone (``--start``). ``head`` is computed on pooled
features cached once (the same ``draw_labels`` + ``refit_head`` that ``adapt`` runs, so every N and
seed costs milliseconds); ``finetune`` and ``both`` call ``adapt`` itself (out=None), so they cost
real training and run for the N and seeds given by ``--finetune-ns`` / ``--both-ns``. N = 0 is the
start run as it is. Intervals: the mean ± a 95% t-interval over seeds, and per run the Wilson
interval over the 118 images. A script, not a test.

    PYTHONPATH=src python bench/site_adaptation.py --start runs/sars-lp224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json  # noqa: E402

from ct_transfer import data as D  # noqa: E402
from ct_transfer import load_run  # noqa: E402
from ct_transfer.adapt import FINETUNE_DEFAULTS, adapt, draw_labels, labelled_features, refit_head  # noqa: E402
from ct_transfer.evaluate import compute_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
UCSD_SPLIT = UCSD / "SPLIT.csv"
ALL = 423  # UCSD-dev's train-patient slices
KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def row(m: dict) -> dict:
    ci = m.get("ci95") or {}
    return {"n_eval": m["n"], "accuracy": m["accuracy"], "sensitivity": m["recall"], "specificity": m["specificity"],
            "roc_auc": m["roc_auc"], "wilson": {"accuracy": ci.get("accuracy"), "sensitivity": ci.get("recall"),
                                                  "specificity": ci.get("specificity")}}


def summary(runs: list[dict]) -> dict:
    """Mean and 95% t-interval over seeds for each metric (the interval is None with one seed)."""
    from scipy import stats

    out = {"seeds": len(runs)}
    for k in KEYS:
        v = np.array([r[k] for r in runs], dtype=float)
        half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        out[k] = {"mean": float(v.mean()), "t95": half, "min": float(v.min()), "max": float(v.max())}
    return out


def head_curve(start, ns, seeds, rows, cache_dir) -> tuple[dict, dict]:
    """N = 0 (the start run's head) and the head refit for every N and seed, on cached features."""
    t0 = time.perf_counter()
    train = [r for r in rows if r["subset"] == "train"]
    xtr, ytr, kept, _ = D.load_subset(train, "train", start.classes, UCSD, start.preprocess, cache_dir=cache_dir)
    xva, yva, _, _ = D.load_subset(rows, "val", start.classes, UCSD, start.preprocess, cache_dir=cache_dir)
    assert len(kept) == len(train) == ALL
    ftr, fva = labelled_features(start, xtr), labelled_features(start, xva)
    yva = yva.numpy()
    feature_s = time.perf_counter() - t0
    index = {r["path"]: i for i, r in enumerate(kept)}
    fc = start.model.fc
    with torch.no_grad():
        p0 = torch.softmax(fc(torch.from_numpy(fva)), 1).numpy()
    zero = row(compute_metrics(yva, p0, start.classes))
    curve = {}
    for n in ns:
        runs = []
        for seed in (seeds if n < ALL else [0]):  # all slices: every seed draws the same set
            drawn = draw_labels(rows, n, seed=seed)
            idx = np.array([index[r["path"]] for r in drawn])
            res = refit_head(ftr[idx], ytr.numpy()[idx], [r.get("group") or r["path"] for r in drawn],
                             num_classes=len(start.classes), seed=seed)
            logits = fva @ res.weight.T + res.bias
            p = torch.softmax(torch.from_numpy(logits), 1).numpy()
            runs.append({"seed": seed, "C": res.C, **row(compute_metrics(yva, p, start.classes))})
        curve[n] = {"runs": runs, **summary(runs)}
    return {"n0": zero, "feature_seconds": round(feature_s, 1)}, curve


def trained_curve(start_dir, method, ns, seeds, args) -> dict:
    """Seeds in the outer loop: a measurement stopped early still has every N with its first seeds."""
    by_n: dict[int, list] = {n: [] for n in ns}
    for seed in seeds:
        for n in ns:
            if n >= ALL and seed != seeds[0]:  # all slices: every seed draws the same set
                continue
            t0 = time.perf_counter()
            run = adapt(run=start_dir, data=UCSD, split_file=UCSD_SPLIT, labels=n, method=method, out=None, seed=seed,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr, cache_dir=args.cache_dir,
                        threads=args.threads)
            test = run.metrics["test"]
            ucsd = (test.get("per_source") or {}).get(UCSD.name, test)
            r = {"seed": seed, "seconds": round(time.perf_counter() - t0, 1), **row(ucsd),
                 "epochs": run.metrics["adaptation"]["epochs"], "best_epoch": run.metrics["adaptation"]["best_epoch"],
                 "C": run.metrics["adaptation"]["head_C"]}
            other = {k: v for k, v in (test.get("per_source") or {}).items() if k != UCSD.name}
            if other:  # 'both': what the start site keeps
                (name, m), = other.items()
                r["start_site"] = {"name": name, **row(m)}
            by_n[n].append(r)
            print(f"  {method} N={n} seed={seed}: acc {r['accuracy']:.3f} AUC {r['roc_auc']:.3f} ({r['seconds']} s)",
                  flush=True)
            _save_partial(args, method, n, by_n[n])
    return {n: {"runs": runs, **summary(runs)} for n, runs in by_n.items() if runs}


_PARTIAL: dict = {}


def _save_partial(args, method, n, runs):
    """Each finished run is kept on disk at once: a long measurement killed half-way keeps its runs."""
    _PARTIAL.setdefault(method, {})[n] = runs
    write_json(Path(args.out).with_suffix(".partial.json"), _PARTIAL)


def fmt(s: dict, key: str) -> str:
    """Mean ± t-interval from 3 runs on; below that the runs themselves (a 2-run t-interval is huge)."""
    m = s[key]
    if s["seeds"] >= 3:
        return f"{m['mean']:.3f} ± {m['t95']:.3f}"
    return f"{m['mean']:.3f} (1 seed)" if s["seeds"] == 1 else f"{m['min']:.3f}..{m['max']:.3f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script, not library code
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    zero = result["n0"]
    for method, curve in result["methods"].items():
        ns = sorted(int(n) for n in curve)
        for ax, key in zip(axes, ("accuracy", "roc_auc")):  # noqa: B007
            xs = [1] * bool(zero) + ns  # N = 0 drawn at x = 1 on the log axis
            m = [zero[key]] * bool(zero) + [curve[n][key]["mean"] for n in ns]
            # the t-interval from 3 runs on; with 2 runs their range
            lo = [0] * bool(zero) + [(c["t95"] if curve[n]["seeds"] >= 3 else c["mean"] - c["min"])
                                     for n in ns for c in [curve[n][key]]]
            hi = [0] * bool(zero) + [(c["t95"] if curve[n]["seeds"] >= 3 else c["max"] - c["mean"])
                                     for n in ns for c in [curve[n][key]]]
            ax.errorbar(xs, m, yerr=[lo, hi], marker="o", capsize=3, label=method)
    for ax, key, title in zip(axes, ("accuracy", "roc_auc"), ("accuracy", "ROC AUC")):
        ax.set_xscale("log")
        ax.set_xticks([1, 8, 16, 32, 64, 128, ALL], ["0", "8", "16", "32", "64", "128", "423"])
        ax.axhline(0.75 if key == "accuracy" else 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("labelled UCSD slices (N)")
        ax.set_title(f"UCSD val patients (n=118): {title}")
        ax.grid(alpha=0.3)
    # the earlier reference (docs/generalization.md): all 423 slices, `transfer` recipe, 20 epochs from ImageNet
    axes[0].plot([ALL], [0.763], marker="*", ms=12, ls="", color="black",
                 label="423, transfer recipe 20 ep. (generalization.md)")
    axes[1].plot([ALL], [0.812], marker="*", ms=12, ls="", color="black")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"site adaptation from {result['start']} (mean ± 95% t-interval over seeds; "
                 "with 2 seeds their range)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start", required=True, help="run trained on SARS-CoV-2 alone")
    ap.add_argument("--ns", default="8,16,32,64,128,423", help="N for the head refit")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--finetune-ns", default="8,16,32,64", help="N for finetune ('' = none)")
    ap.add_argument("--finetune-seeds", default="0,1,2")
    ap.add_argument("--both-ns", default="16,64", help="N for both ('' = none)")
    ap.add_argument("--both-seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=FINETUNE_DEFAULTS["steps"])
    ap.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "site_adaptation.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "adaptation.png"))
    ap.add_argument("--no-head", dest="head", action="store_false", help="skip the head curve (and N = 0)")
    ap.add_argument("--from-json", nargs="+", help="re-print and re-plot result files (their methods merged; "
                                                   "a .partial.json holds the runs of a stopped measurement)")
    args = ap.parse_args()
    if args.from_json:
        result = {"methods": {}, "n0": None}
        for f in args.from_json:
            part = json.loads(Path(f).read_text())
            if "methods" not in part:  # a .partial.json: {method: {N: [runs]}}
                part = {"methods": {m: {n: {"runs": r, **summary(r)} for n, r in c.items()} for m, c in part.items()}}
            result["n0"] = result["n0"] or part.get("n0")
            result["start"] = result.get("start") or part.get("start")
            for m, c in part["methods"].items():
                result["methods"].setdefault(m, {}).update({int(n): v for n, v in c.items()})
    else:
        start = load_run(args.start)
        rows = D.read_split(UCSD_SPLIT, UCSD)
        seeds = _ints(args.seeds)
        t0 = time.perf_counter()
        head_info, head = head_curve(start, _ints(args.ns), seeds, rows, args.cache_dir) if args.head else \
            ({"n0": None, "feature_seconds": None}, None)
        if head:
            print(f"head: {len(_ints(args.ns))} N x {len(seeds)} seeds in {time.perf_counter() - t0:.0f} s", flush=True)
        result = {"machine": machine_info(), "start": args.start, "start_config": start.config,
                  "start_metrics": {k: start.metrics.get(k) for k in ("val", "test")},
                  "evaluated_on": "UCSD-dev official val patients (SPLIT.csv subset val, 118 slices)",
                  "labelled_from": "UCSD-dev train patients (SPLIT.csv subset train, 423 slices)",
                  "settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr},
                  "n0": head_info["n0"], "feature_seconds": head_info["feature_seconds"],
                  "methods": {"head": head} if head else {}}
        write_json(Path(args.out), result)
        for method, ns, sd in (("finetune", args.finetune_ns, args.finetune_seeds), ("both", args.both_ns, args.both_seeds)):
            if _ints(ns):
                result["methods"][method] = trained_curve(args.start, method, _ints(ns), _ints(sd), args)
                write_json(Path(args.out), result)
    print(f"\nUCSD val patients (n=118), start {result['start']}; mean ± 95% t-interval over seeds")
    print(f"{'method':9s} {'N':>4s} {'seeds':>5s} {'accuracy':>16s} {'sensitivity':>16s} {'specificity':>16s} {'AUC':>16s}")
    z = result["n0"]
    if z:
        print(f"{'(start)':9s} {0:4d} {'-':>5s} {z['accuracy']:16.3f} {z['sensitivity']:16.3f} {z['specificity']:16.3f} "
              f"{z['roc_auc']:16.3f}")
    for method, curve in result["methods"].items():
        for n in sorted(curve, key=int):
            s = curve[n]
            print(f"{method:9s} {int(n):4d} {s['seeds']:5d} {fmt(s, 'accuracy'):>16s} {fmt(s, 'sensitivity'):>16s} "
                  f"{fmt(s, 'specificity'):>16s} {fmt(s, 'roc_auc'):>16s}")
    if not args.from_json:
        print(f"wrote {args.out}")
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
