"""Shift-guard variants on cached features (issue #21, part A of the second guard round).

The features of every image (SARS-CoV-2 paper-split train / val / test, UCSD-dev's 541 slices with
their official subset) are taken ONCE from the run's model -- mean- and std-pooled outputs of the
stem, of every block and of the head's input, plus the logits -- and cached in
``bench/results/shift-variants-features.npz``; each detector variant then costs seconds.

Selection protocol (no choice on the set that is reported): every variant is fitted on the run's
TRAIN images; variants are RANKED by AUROC between SARS-CoV-2 **val** slices and UCSD's **train
patients'** slices (423). The chosen one is then reported on UCSD's **val patients** (118), on all
541 UCSD-dev slices and on the SARS-CoV-2 test slices (flagged share at the threshold accepting
95% of val). UCSD is never used to fit anything.

    PYTHONPATH=src python bench/shift_variants.py [--run bench/results/shift-lite0-probe]
"""

from __future__ import annotations

import argparse
import csv
import math
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
CACHE = RESULTS / "shift-variants-features.npz"
STAGES = [f"backbone.blocks.{i}" for i in range(7)]


def all_taps(model) -> list[str]:
    """The stem, every block (blocks.i.j; the last of a stage is the stage's output), the head's input."""
    blocks = [n for n, _ in model.named_modules() if n.count(".") == 3 and n.startswith("backbone.blocks.")]
    return ["backbone.bn1", *blocks, shift.HEAD_INPUT]


@torch.inference_mode()
def extract(run, x, taps, batch_size=32) -> dict[str, np.ndarray]:
    """Mean- and std-pooled outputs of every tap (float32), and the logits, of decoded images."""
    out: dict[str, list] = {}
    cur: dict[str, torch.Tensor] = {}

    def hook(name):
        def h(module, args, output):
            o = output.float()
            cur[name] = o
        return h

    handles = [run.model.get_submodule(t).register_forward_hook(hook(t)) for t in taps]
    run.model.eval()
    try:
        for s in range(0, len(x), batch_size):
            xb = run.transform(x[s:s + batch_size].to(run.device)).contiguous(memory_format=torch.channels_last)
            cur.clear()
            logits = run.model(xb).float()
            for t in taps:
                o = cur[t]
                out.setdefault(f"{t}|mean", []).append(o.mean((2, 3)).cpu())
                out.setdefault(f"{t}|std", []).append(o.std((2, 3)).cpu())
            out.setdefault("logits", []).append(logits.cpu())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def build_cache(run_dir: Path, cache: Path) -> None:
    if not (run_dir / "metrics.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from shift import train_run

        print(f"training {run_dir}")
        train_run(run_dir)
    run = load_run(run_dir)
    taps = all_taps(run.model)
    arrays = {}
    t0 = time.perf_counter()
    for s in ("train", "val", "test"):
        sub = run._load(run.split, s, run.config["data"], "split")
        for k, v in extract(run, sub.x, taps).items():
            arrays[f"{s}/{k}"] = v
        arrays[f"{s}/y"] = sub.y.numpy()
        print(f"{s}: {len(sub.x)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    rows = list(csv.DictReader(open(UCSD / "SPLIT.csv")))
    x = D.stack([run.preprocess.load(UCSD / r["path"]) for r in rows])
    for k, v in extract(run, x, taps).items():
        arrays[f"ucsd/{k}"] = v
    arrays["ucsd/subset"] = np.array([r["subset"] for r in rows])
    arrays["ucsd/y"] = np.array([run.classes.index(r["class"]) for r in rows])
    arrays["taps"] = np.array(taps)
    print(f"ucsd: {len(rows)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)


def add_stage_aliases(F, taps) -> None:
    """A stage's output (backbone.blocks.i) is its last block's (backbone.blocks.i.j)."""
    for i in range(7):
        last = [t for t in taps if t.startswith(f"backbone.blocks.{i}.")][-1]
        for k in [k for k in F if k.split("/", 1)[-1].startswith(last + "|")]:
            split, rest = k.split("/", 1)
            F[f"{split}/backbone.blocks.{i}|{rest.split('|')[1]}"] = F[k]


# -- variants (numpy / scikit-learn; the winner is then written in torch in shift.py) ----------
def lw_fit(f, y, *, classes=True, standardise=False):
    """Class means (or one mean) and the Ledoit-Wolf precision of the centred features."""
    from sklearn.covariance import LedoitWolf

    f = f.astype(np.float64)
    mu0, sd0 = f.mean(0), f.std(0) + 1e-6
    if standardise:
        f = (f - mu0) / sd0
    groups = sorted(set(y)) if classes else [None]
    means = np.stack([f[y == c].mean(0) if c is not None else f.mean(0) for c in groups])
    idx = np.searchsorted(groups, y) if classes else np.zeros(len(f), int)
    prec = LedoitWolf(assume_centered=True).fit(f - means[idx]).precision_
    return dict(means=means, prec=prec, mu0=mu0, sd0=sd0, standardise=standardise)


def lw_score(m, f):
    f = f.astype(np.float64)
    if m["standardise"]:
        f = (f - m["mu0"]) / m["sd0"]
    d = np.stack([(((f - mu) @ m["prec"]) * (f - mu)).sum(1) for mu in m["means"]], 1)
    return d.min(1)


_FITTED: dict = {}
_SCORES: dict = {}


class Variant:
    def __init__(self, name, *, taps, pool="mean", standardise=False, relative=False, norm="train",
                 combine="sum", knn=None):
        self.name, self.taps, self.pool, self.standardise = name, taps, pool, standardise
        self.relative, self.norm, self.combine, self.knn = relative, norm, combine, knn

    def feats(self, F, split, tap):
        if self.pool == "mean":
            return F[f"{split}/{tap}|mean"]
        if self.pool == "std":
            return F[f"{split}/{tap}|std"]
        return np.concatenate([F[f"{split}/{tap}|mean"], F[f"{split}/{tap}|std"]], 1)

    def fit(self, F):
        if self.knn:
            self.bank = self._knn_feats(F, "train")
            return self
        ref = "train" if self.norm == "train" else "val"
        d = self._layer_scores(F, ref)
        self.loc, self.scale = d.mean(0), d.std(0) + 1e-9
        return self

    def _knn_feats(self, F, split):
        parts = []
        for t in self.taps:
            f = self.feats(F, split, t).astype(np.float64)
            parts.append(f / np.linalg.norm(f, axis=1, keepdims=True))
        f = np.concatenate(parts, 1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def _layer_scores(self, F, split):
        cols = []
        for t in self.taps:
            key = (t, self.pool, self.standardise, self.relative)
            if key not in _FITTED:  # a layer's fit is shared by every variant that uses it
                f = self.feats(F, "train", t)
                m = lw_fit(f, F["train/y"], standardise=self.standardise)
                bg = lw_fit(f, F["train/y"], classes=False, standardise=self.standardise) if self.relative else None
                _FITTED[key] = (m, bg)
            if key + (split,) not in _SCORES:
                m, bg = _FITTED[key]
                f = self.feats(F, split, t)
                s = lw_score(m, f)
                if bg is not None:
                    s = s - lw_score(bg, f)
                _SCORES[key + (split,)] = s
            cols.append(_SCORES[key + (split,)])
        return np.stack(cols, 1)

    def score(self, F, split):
        if self.knn:
            f = self._knn_feats(F, split)
            sim = f @ self.bank.T
            k = self.knn
            if split == "train":
                k += 1  # itself
            return 1 - np.sort(sim, 1)[:, -k]
        z = (self._layer_scores(F, split) - self.loc) / self.scale
        return z.sum(1) if self.combine == "sum" else z.max(1)


def variants(taps) -> list[Variant]:
    blocks = [t for t in taps if t.startswith("backbone.blocks.")]
    stages5 = ["backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2", "backbone.blocks.4",
               "backbone.blocks.6", shift.HEAD_INPUT]  # today's mahalanobis-multi (timm feature_info)
    stages = ["backbone.bn1", *STAGES, shift.HEAD_INPUT]
    every = ["backbone.bn1", *blocks, shift.HEAD_INPUT]
    V = [Variant("mahalanobis (head input)", taps=[shift.HEAD_INPUT]),
         Variant("multi: feature_info stages, train-std, sum [today]", taps=stages5)]
    for label, tl in (("feature_info stages", stages5), ("stem+7 stages+head", stages), ("every block", every)):
        for norm in ("train", "val"):
            for comb in ("sum", "max"):
                for pool in ("mean", "mean+std"):
                    for std in (False, True):
                        V.append(Variant(f"multi: {label}, {norm}-std, {comb}, {pool}{', feat-std' if std else ''}",
                                         taps=tl, pool=pool, standardise=std, norm=norm, combine=comb))
        V.append(Variant(f"relative multi: {label}, val-std, sum", taps=tl, relative=True, norm="val"))
        for k in (1, 10, 50):
            V.append(Variant(f"knn k={k}: {label}", taps=tl, knn=k))
            V.append(Variant(f"knn k={k}: {label}, mean+std", taps=tl, knn=k, pool="mean+std"))
    return V


def conformal_threshold(val, accept):
    """The ceil((n+1)*accept)-th smallest val score: an exchangeable new score exceeds it with
    probability <= 1 - accept (split conformal)."""
    v = np.sort(val)
    k = math.ceil((len(v) + 1) * accept)
    return v[min(k, len(v)) - 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--accept", type=float, default=0.95)
    ap.add_argument("--out", type=Path, default=RESULTS / "shift_variants.json")
    args = ap.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    if not args.cache.is_file():
        build_cache(args.run, args.cache)
    F = dict(np.load(args.cache))
    taps = list(F["taps"])
    add_stage_aliases(F, taps)
    sub = F["ucsd/subset"]
    rows = []
    for v in variants(taps):
        t0 = time.perf_counter()
        v.fit(F)
        sc = {s: v.score(F, s) for s in ("val", "test", "ucsd")}
        u_tr, u_va = sc["ucsd"][sub == "train"], sc["ucsd"][sub == "val"]

        def auroc(neg, pos):
            return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))

        th_q = float(np.quantile(sc["val"], args.accept, method="higher"))
        th_c = float(conformal_threshold(sc["val"], args.accept))
        r = {"variant": v.name, "select_auroc_val_vs_ucsd_train": auroc(sc["val"], u_tr),
             "auroc_test_vs_ucsd_val": auroc(sc["test"], u_va), "auroc_test_vs_ucsd_all": auroc(sc["test"], sc["ucsd"]),
             "seconds": round(time.perf_counter() - t0, 2)}
        for tag, th in (("quantile", th_q), ("conformal", th_c)):
            r[tag] = {"threshold": th, "flag_val": float((sc["val"] > th).mean()),
                      "flag_test": float((sc["test"] > th).mean()),
                      "flag_ucsd_train": float((u_tr > th).mean()), "flag_ucsd_val": float((u_va > th).mean()),
                      "flag_ucsd_all": float((sc["ucsd"] > th).mean())}
        rows.append(r)
        print(f"{r['select_auroc_val_vs_ucsd_train']:.4f}  {v.name}", flush=True)
    rows.sort(key=lambda r: -r["select_auroc_val_vs_ucsd_train"])
    print(f"\n{'select AUROC':>12}{'test/Uval':>10}{'test/Uall':>10}{'flag test':>10}{'flag Uval':>10}{'flag Uall':>10}  variant"
          "  (flags at the conformal threshold)")
    for r in rows:
        c = r["conformal"]
        print(f"{r['select_auroc_val_vs_ucsd_train']:>12.4f}{r['auroc_test_vs_ucsd_val']:>10.4f}"
              f"{r['auroc_test_vs_ucsd_all']:>10.4f}{c['flag_test']:>10.3f}{c['flag_ucsd_val']:>10.3f}"
              f"{c['flag_ucsd_all']:>10.3f}  {r['variant']}")
    write_json(args.out, {"run": str(args.run), "accept": args.accept, "rows": rows,
                          "protocol": "fit on SARS-CoV-2 train; rank by AUROC SARS-CoV-2 val vs UCSD train patients; "
                                      "report UCSD val patients, all UCSD-dev, SARS-CoV-2 test",
                          "machine": machine_info()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
