"""Statistics: means with t intervals over seeds, the paired ImageNet-vs-scratch test, Tables 6-8."""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..evaluate import read_predictions
from .collect import EXTERNAL_KEYS

TABLE_METRICS = ("accuracy", "f1", "train_seconds")  # Tables 6, 7, 8
BOUNDS = {"accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "train_seconds": (0.0, None)}


def mean_std_ci(values, *, bounds: tuple[float | None, float | None] = (None, None)) -> dict:
    """Mean, sample std and a 95% t confidence interval of the mean (std and CI None below 2 values).

    ``bounds``: the metric's range; the interval is clipped to it (with 2-3 seeds a t interval
    of an accuracy easily reaches past 1, which no accuracy can).
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(v.mean())
    if len(v) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(v.std(ddof=1))
    if std == 0:  # identical seeds: scipy's interval would be nan, the honest interval is the point
        return {"n": int(len(v)), "mean": mean, "std": 0.0, "ci95": [mean, mean]}
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=mean, scale=stats.sem(v))
    lo, hi = (float(np.clip(x, *bounds)) if bounds != (None, None) else float(x) for x in (lo, hi))
    return {"n": int(len(v)), "mean": mean, "std": std, "ci95": [lo, hi]}


def correctness(run: dict, subset: str = "test") -> dict[str, bool]:
    """{image path: predicted right?} from a run's predictions_<subset>.csv."""
    paths, true, proba, classes = read_predictions(run["dir"] / f"predictions_{subset}.csv")
    pred = [classes[i] for i in proba.argmax(1)]
    return {p: t == q for p, t, q in zip(paths, true, pred)}


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value from the discordant counts (b: only A right, c: only B right)."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "ImageNet better"
    if hi < 0:
        return "scratch better"
    return "no significant difference"


def paired_comparison(with_runs: list[dict], without_runs: list[dict], *, n_boot: int = 10_000,
                      seed: int = 0, subset: str = "test") -> dict:
    """ImageNet vs scratch on the same test images.

    McNemar (exact) on discordant pairs pooled over seed pairs, and a paired bootstrap over test
    images of the accuracy difference (each image's correctness averaged over seeds).
    """
    a = [correctness(r, subset) for r in with_runs]
    b = [correctness(r, subset) for r in without_runs]
    images = sorted(set.intersection(*(set(x) for x in a + b))) if a and b else []
    if not images:
        return {}
    ca = np.array([[x[p] for p in images] for x in a], dtype=float)
    cb = np.array([[x[p] for p in images] for x in b], dtype=float)
    k = min(len(a), len(b))
    only_a = int(sum(((ca[i] == 1) & (cb[i] == 0)).sum() for i in range(k)))
    only_b = int(sum(((ca[i] == 0) & (cb[i] == 1)).sum() for i in range(k)))
    # Pairing is by image: resampling images and averaging their per-image difference is the
    # paired bootstrap, a one-sample bootstrap of the differences. Percentile, not BCa: the
    # interval then excludes 0 exactly when the two-sided bootstrap p below is under 0.05, so
    # verdict and p agree, and it stays defined when every difference is 0 (BCa gives nan).
    diff_per_image = ca.mean(0) - cb.mean(0)
    res = stats.bootstrap((diff_per_image,), np.mean, n_resamples=n_boot, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    boot = res.bootstrap_distribution
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    p_boot = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    return {"n_images": len(images), "seed_pairs": k, "n_boot": n_boot, "only_imagenet_right": only_a,
            "only_scratch_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b),
            "acc_diff": float(diff_per_image.mean()), "bootstrap_ci95": [lo, hi], "bootstrap_p": p_boot,
            "verdict": _verdict(lo, hi)}


def metric_values(runs: list[dict], key: str, subset: str) -> list[float]:
    if key == "train_seconds":
        return [r["metrics"]["train_seconds"] for r in runs]
    return [r["metrics"][subset][key] for r in runs]


def build_tables(groups: dict, subset: str) -> dict:
    """Per metric (accuracy, f1, train_seconds): rows per model with without/with/difference,
    and the mean over the models run in both conditions."""
    tables = {}
    for key in TABLE_METRICS:
        rows = []
        for model, conds in groups.items():
            bounds = BOUNDS[key]
            wo = mean_std_ci(metric_values(conds.get("none", []), key, subset), bounds=bounds)
            wi = mean_std_ci(metric_values(conds.get("imagenet", []), key, subset), bounds=bounds)
            diff = wi["mean"] - wo["mean"] if wi["mean"] is not None and wo["mean"] is not None else None
            rows.append({"model": model, "without": wo, "with": wi, "difference": diff})
        both = [r for r in rows if r["difference"] is not None]
        mean_row = None
        if both:
            mean_row = {"without": float(np.mean([r["without"]["mean"] for r in both])),
                        "with": float(np.mean([r["with"]["mean"] for r in both])),
                        "difference": float(np.mean([r["difference"] for r in both])), "n_models": len(both)}
        tables[key] = {"rows": rows, "mean": mean_row}
    return tables


def headline_ratios(tables: dict) -> dict:
    """The paper's two ratios: mean accuracy with/without TL; mean time without/with TL."""
    acc, t = tables["accuracy"]["mean"], tables["train_seconds"]["mean"]
    return {
        "accuracy_ratio": acc["with"] / acc["without"] if acc and acc["without"] else None,
        "time_ratio": t["without"] / t["with"] if t and t["with"] else None,
        "n_models": acc["n_models"] if acc else 0,
    }


def summarise_metrics(metric_dicts: list[dict]) -> dict:
    """Per key of EXTERNAL_KEYS over seeds: mean, std and an interval.

    One seed: the interval its evaluation wrote (``ci95``, over images) when present. Several
    seeds: the t interval over seeds (seed-to-seed spread, not image sampling).
    """
    out = {}
    for key in EXTERNAL_KEYS:
        s = mean_std_ci([m.get(key) for m in metric_dicts], bounds=(0.0, 1.0))
        if s["n"] == 1:
            ci = next((m.get("ci95", {}).get(key) for m in metric_dicts if m.get(key) is not None), None)
            s["ci95"] = [float(ci[0]), float(ci[1])] if ci else None
            s["ci_kind"] = "images" if ci else None
        else:
            s["ci_kind"] = "seeds" if s["ci95"] else None
        out[key] = s
    return out


def external_comparison(groups: dict) -> list[dict]:
    """Per run group (model x condition) with external results: internal test beside each external set."""
    out = []
    for model, conds in groups.items():
        for cond, runs in conds.items():
            # internal over the same runs as external, so both columns describe the same models
            runs = [r for r in runs if r["external"]]
            if not runs:
                continue
            names = sorted({e["name"] for r in runs for e in r["external"]})
            sets = [{"name": "internal test", "data": None, "seeds": len(runs),
                     "n": runs[0]["metrics"]["test"].get("n"),
                     "metrics": summarise_metrics([r["metrics"]["test"] for r in runs])}]
            for name in names:
                found = [e for r in runs for e in r["external"] if e["name"] == name]
                sets.append({"name": name, "data": found[0]["data"], "seeds": len(found),
                             "n": found[0]["metrics"].get("n"),
                             "metrics": summarise_metrics([e["metrics"] for e in found])})
            out.append({"model": model, "weights": cond, "sets": sets})
    return out


def _chance(metric_dicts: list[dict]) -> float:
    """Accuracy of a coin: 1/k for k classes (k from the confusion matrix; 2 when unknown)."""
    for m in metric_dicts:
        cm = m.get("confusion_matrix")
        if cm:
            return 1.0 / len(cm)
    return 0.5


def _decision_notes(internal: dict, externals: list[dict], split_name: str, grouped: dict | None) -> list[str]:
    """What the numbers say, in the reader's words: at chance, a drop, or holding up."""
    acc = internal["accuracy"]
    notes = []
    if not externals:
        notes.append("no external validation: nothing here says how it does on another site's scans")
    for e in externals:
        ext = e["metrics"]["accuracy"]
        if ext["mean"] is None:
            continue
        ci = ext.get("ci95")
        if ci and ci[0] <= e["chance"] <= ci[1]:
            notes.append(f"at chance on {e['name']}: accuracy {ext['mean']:.3f}, its 95% interval includes "
                         f"{e['chance']:.2g}")
        elif acc["mean"] is None:
            notes.append(f"{ext['mean']:.3f} on {e['name']} (no internal test accuracy to compare)")
        elif ext["mean"] < acc["mean"] - 0.05:
            notes.append(f"drops on {e['name']}: {ext['mean']:.3f} vs {acc['mean']:.3f} internal")
        else:
            notes.append(f"holds on {e['name']}: {ext['mean']:.3f} vs {acc['mean']:.3f} internal")
    if split_name not in ("grouped",) and grouped is None:
        notes.append("internal figure from a split that may put near-duplicate slices in train and test "
                     "(no grouped-split result given)")
    return notes


def decision_rows(groups: dict, *, split_name: str, grouped_groups: dict | None = None) -> list[dict]:
    """The report's answer: per model x weights, internal test, grouped-split test and every external set
    side by side (intervals as in ``summarise_metrics``), the shift checks, and a verdict.

    ``grouped_groups``: runs of the same models on a grouped split (another grid), matched by model and
    weights; a grid whose own split is grouped is its own grouped figure."""
    rows = []
    for model, conds in groups.items():
        for cond, runs in conds.items():
            internal = summarise_metrics([r["metrics"]["test"] for r in runs])
            grouped, grouped_from = None, None
            if split_name == "grouped":
                grouped, grouped_from = internal, "this split"
            elif grouped_groups and grouped_groups.get(model, {}).get(cond):
                other = grouped_groups[model][cond]
                grouped = summarise_metrics([r["metrics"]["test"] for r in other])
                grouped_from = f"{len(other)} run(s) on the grouped split"
            externals = []
            for name in sorted({e["name"] for r in runs for e in r["external"]}):
                found = [e["metrics"] for r in runs for e in r["external"] if e["name"] == name]
                externals.append({"name": name, "seeds": len(found), "n": found[0].get("n"),
                                  "metrics": summarise_metrics(found), "chance": _chance(found)})
            shift = [{**s, "seed": r["seed"]} for r in runs for s in r.get("shift", [])]
            rows.append({"model": model, "weights": cond, "strategy": runs[0]["strategy"], "seeds": len(runs),
                         "n_test": runs[0]["metrics"]["test"].get("n"), "internal": internal, "grouped": grouped,
                         "grouped_from": grouped_from, "external": externals, "shift": shift,
                         "verdict": _decision_notes(internal, externals, split_name, grouped)})
    return rows
