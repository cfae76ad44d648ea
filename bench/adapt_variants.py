"""Cheap few-label adaptation heads on cached features (issue #21, part B of the second guard round).

Reads the features that ``bench/shift_variants.py`` cached (the run's backbone -- for the
linear-probe start run, ImageNet's EfficientNetLite0 -- mean- and std-pooled at the stem, every
block and the head's input, for SARS-CoV-2's paper split and all 541 UCSD-dev slices). For N
labelled slices of UCSD's train patients (``adapt.draw_labels``: stratified by class and patient,
seeds 0..4) each head is fitted on the N slices alone (its C chosen by cross-validation inside them,
grouped by patient where possible, as ``adapt.refit_head``), then scored on UCSD's val patients
(118 slices: never trained on, never used to choose C). A script, not a test.

    PYTHONPATH=src python bench/adapt_variants.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json  # noqa: E402

from ct_transfer import data as D  # noqa: E402
from shift_variants import add_stage_aliases  # noqa: E402
from ct_transfer.adapt import draw_labels, refit_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
CACHE = RESULTS / "shift-variants-features.npz"
HEAD = "feature_map"
STAGES = [f"backbone.blocks.{i}" for i in range(7)]


def feats(F, split, taps, pool="mean", l2=False):
    parts = []
    for t in taps:
        for p in (("mean", "std") if pool == "mean+std" else (pool,)):
            f = F[f"{split}/{t}|{p}"].astype(np.float64)
            if l2:  # every layer counts alike whatever its width
                f = f / np.linalg.norm(f, axis=1, keepdims=True)
            parts.append(f)
    return np.concatenate(parts, 1)


def proba_lr(res, X):
    z = X @ res.weight.T + res.bias
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def prototype(Xl, yl, Xt, *, standardise_on=None):
    """Nearest class mean, cosine on (optionally site-standardised) features; softmax over -distances."""
    mu, sd = (standardise_on.mean(0), standardise_on.std(0) + 1e-6) if standardise_on is not None else (0, 1)
    a, b = (Xl - mu) / sd, (Xt - mu) / sd
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    means = np.stack([a[yl == c].mean(0) for c in (0, 1)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    s = b @ means.T * 10
    s -= s.max(1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(1, keepdims=True)


def metrics(p, y):
    from sklearn.metrics import roc_auc_score

    pred = p.argmax(1)
    pos = 1  # COVID (the run's classes: non-COVID, COVID)
    sens = float((pred[y == pos] == pos).mean())
    spec = float((pred[y != pos] != pos).mean())
    return {"accuracy": float((pred == y).mean()), "sensitivity": sens, "specificity": spec,
            "roc_auc": float(roc_auc_score(y == pos, p[:, pos]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--ns", default="8,16,32,64,128,423")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "adapt_variants.json")
    args = ap.parse_args(argv)
    F = dict(np.load(args.cache))
    add_stage_aliases(F, list(F["taps"]))
    rows = D.read_split(UCSD / "SPLIT.csv", UCSD)
    classes = ["non-COVID", "COVID"]  # the run's classes (config.json), as the cache's y
    y_all = F["ucsd/y"]
    assert [classes.index(r["class"]) for r in rows] == list(y_all)
    index = {r["path"]: i for i, r in enumerate(rows)}
    tr = np.array([r["subset"] == "train" for r in rows])
    va = ~tr
    yv = y_all[va]
    groups = np.array([r["group"] for r in rows])
    blocks = [t for t in F["taps"] if t.startswith("backbone.blocks.")]
    layer_sets = {"head": [HEAD], "stages": ["backbone.bn1", *STAGES, HEAD], "late": STAGES[4:] + [HEAD],
                  "blocks": ["backbone.bn1", *blocks, HEAD]}
    X = {}
    for name, taps in layer_sets.items():
        for pool in ("mean", "mean+std"):
            for l2 in (False, True):
                X[(name, pool, l2)] = feats(F, "ucsd", taps, pool, l2)
    src = {k: feats(F, "train", layer_sets[k[0]], k[1], k[2]) for k in [("head", "mean", False), ("stages", "mean", True)]}
    y_src = F["train/y"]

    methods = {
        "head (today: LR on the head input)": ("lr", ("head", "mean", False)),
        "LR head mean+std": ("lr", ("head", "mean+std", False)),
        "LR late stages (5,6,head) mean, l2/layer": ("lr", ("late", "mean", True)),
        "LR stem+7 stages+head mean, l2/layer": ("lr", ("stages", "mean", True)),
        "LR stem+7 stages+head mean+std, l2/layer": ("lr", ("stages", "mean+std", True)),
        "LR every block mean, l2/layer": ("lr", ("blocks", "mean", True)),
        "LR every block mean+std, l2/layer": ("lr", ("blocks", "mean+std", True)),
        "prototype head": ("proto", ("head", "mean", False)),
        "prototype stages l2/layer": ("proto", ("stages", "mean", True)),
        "prototype stages, site-standardised (unlabelled UCSD train)": ("proto-site", ("stages", "mean", True)),
        "LR stages, site-standardised (unlabelled UCSD train)": ("lr-site", ("stages", "mean", True)),
        "LR head + SARS-CoV-2 train (weighted 1:1)": ("mix", ("head", "mean", False)),
        "LR stages + SARS-CoV-2 train (weighted 1:1)": ("mix", ("stages", "mean", True)),
    }
    ns = [int(v) for v in args.ns.split(",")]
    results = {}
    for mname, (kind, key) in methods.items():
        Xa = X[key]
        t0 = time.perf_counter()
        curve = {}
        for n in ns:
            runs = []
            seeds = range(min(args.seeds, 3) if kind == "mix" else args.seeds)  # mix: ~2000 more slices per fit
            for seed in (seeds if n < tr.sum() else [0]):
                drawn = draw_labels(rows, n, seed=seed)
                idx = np.array([index[r["path"]] for r in drawn])
                yl, gl = y_all[idx], groups[idx]
                if kind in ("lr", "lr-site"):
                    Z = Xa
                    if kind == "lr-site":
                        mu, sd = Xa[tr].mean(0), Xa[tr].std(0) + 1e-6
                        Z = (Xa - mu) / sd
                    res = refit_head(Z[idx], yl, gl, num_classes=2, seed=seed)
                    p = proba_lr(res, Z[va])
                elif kind == "proto":
                    p = prototype(Xa[idx], yl, Xa[va])
                elif kind == "proto-site":
                    p = prototype(Xa[idx], yl, Xa[va], standardise_on=Xa[tr])
                elif kind == "mix":
                    p = mixed(src[key], y_src, Xa[idx], yl, gl, Xa[va], seed)
                runs.append({"seed": seed, **metrics(p, yv)})
            acc = np.array([r["accuracy"] for r in runs])
            curve[n] = {"runs": runs, "accuracy_mean": float(acc.mean()), "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else None,
                        "auc_mean": float(np.mean([r["roc_auc"] for r in runs]))}
        results[mname] = {"curve": curve, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{mname:<62}" + "".join(f"{curve[n]['accuracy_mean']:>7.3f}" for n in ns), flush=True)
    write_json(args.out, {"ns": ns, "seeds": args.seeds, "results": results, "machine": machine_info(),
                          "eval": "UCSD-dev official val patients (118 slices)"})
    print(f"wrote {args.out}")
    return 0


def mixed(Xs, ys, Xl, yl, gl, Xt, seed):
    """Logistic regression on the source's training slices and the N target slices, each site
    weighing the same in total; C by grouped cross-validation over the TARGET slices only (the
    source slices stay in every training fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    grid = (0.003, 0.03, 0.3)  # a coarser grid than the probe's: each fit carries ~2000 source slices
    k = min(3, int(np.bincount(yl).min()))

    def fit(C, Xtr, ytr, w):
        m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        m.fit(Xtr, ytr, logisticregression__sample_weight=w)
        return m

    def weights(nt):
        return np.r_[np.full(len(Xs), 0.5 / len(Xs)), np.full(nt, 0.5 / nt)] * (len(Xs) + nt)

    best = grid[0]
    if k >= 2:
        ng = min(len(set(gl[yl == c])) for c in np.unique(yl))
        sp = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if ng >= k else StratifiedKFold(k, shuffle=True, random_state=seed)
        score = np.zeros(len(grid))
        for a, b in sp.split(Xl, yl, gl):
            for i, C in enumerate(grid):
                m = fit(C, np.r_[Xs, Xl[a]], np.r_[ys, yl[a]], weights(len(a)))
                score[i] += (m.predict(Xl[b]) == yl[b]).sum()
        best = grid[int(np.argmax(score))]
    m = fit(best, np.r_[Xs, Xl], np.r_[ys, yl], weights(len(Xl)))
    return m.predict_proba(Xt)


if __name__ == "__main__":
    sys.exit(main())
