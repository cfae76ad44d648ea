"""Generalisation benchmark: how a model trained on SARS-CoV-2 CT holds up on another hospital's
scans (UCSD COVID-CT dev), for the paper recipe, the transfer recipe, the transfer recipe with each
of its robustness steps switched off, and multi-source training (SARS-CoV-2 + UCSD train patients).

Columns: internal test accuracy on the paper split and on the grouped split (near-duplicate slices
kept on one side; SARS-CoV-2), external accuracy, sensitivity
and specificity with 95% Wilson intervals on UCSD-dev: all 541 images when UCSD was not trained on,
its official val patients (118 images, never used to pick an epoch) when its train patients were.

Budget knobs (this machine: 2 CPU cores): ``--image-size``, ``--epochs``, ``--strategy`` (linear =
the convex linear probe on fixed ImageNet features, no augmentation, so the augmentation setting is
skipped; frozen = only the head trains, on cached features of augmented views; partial/full
fine-tune, optionally ``--head-init probe``, ``--schedule``, ``--lr``). They replace the recipes' own
values for every setting alike; the JSON records each setting's full resolved config.

    PYTHONPATH=src python bench/generalization.py --strategy linear --image-size 224
    PYTHONPATH=src python bench/generalization.py --strategy partial --head-init probe --image-size 224 \
        --epochs 12 --schedule onecycle --lr 5e-4 --settings "transfer;transfer + UCSD train patients"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, parse_sets  # noqa: E402

from ct_transfer import data as D  # noqa: E402
from ct_transfer.engine import fit  # noqa: E402
from ct_transfer.evaluate import compute_metrics  # noqa: E402
from ct_transfer.recipes import config_from_recipe  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
SARS, UCSD = SHARED / "sarscov2-ct", SHARED / "ucsd-covid-ct-dev"
UCSD_SPLIT = UCSD / "SPLIT.csv"

SETTINGS = {
    "paper": ("paper", {"weights": "imagenet"}),  # the paper's transfer-learning arm
    "transfer": ("transfer", {}),
    "transfer, crop none": ("transfer", {"crop": "none"}),
    "transfer, intensity none": ("transfer", {"intensity": "none"}),
    "transfer, paper augmentation": ("transfer", {"augmentation": "paper"}),
    "transfer + UCSD train patients": ("transfer", {"data": [str(SARS), str(UCSD)],
                                                     "split_file": ["-", str(UCSD_SPLIT)]}),
}


def with_intervals(m: dict) -> dict:
    """The table's columns; the 95% Wilson intervals are the ones compute_metrics wrote."""
    ci = m.get("ci95") or {}
    nan = (float("nan"), float("nan"))
    return {"n": m["n"], "accuracy": m["accuracy"], "accuracy_ci": tuple(ci.get("accuracy") or nan),
            "sensitivity": m["recall"], "sensitivity_ci": tuple(ci.get("recall") or nan),
            "specificity": m["specificity"], "specificity_ci": tuple(ci.get("specificity") or nan),
            "roc_auc": m["roc_auc"], "confusion_matrix": m["confusion_matrix"]}


def external_rows(trained_on_ucsd: bool) -> list[dict]:
    rows = D.read_split(UCSD_SPLIT, UCSD)
    return [r for r in rows if r["subset"] == "val"] if trained_on_ucsd else rows


def failure_gallery(run, rows, proba, out: Path, k: int = 4) -> list[dict]:
    """Grad-CAM overlays of the most confident external mistakes (k per class)."""
    from ct_transfer.evaluate import save_figure
    from ct_transfer.explain import overlay_figure

    y = np.array([run.classes.index(r["class"]) for r in rows])
    pred = proba.argmax(1)
    picked = []
    for cls in (0, 1):
        wrong = np.flatnonzero((y == cls) & (pred != cls))
        picked += list(wrong[np.argsort(-proba[wrong, 1 - cls])][:k])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in picked:
        path = UCSD / rows[i]["path"]
        ex = run.explain(str(path))
        image = D.read_input(path, run.preprocess.window)
        target = out / f"{rows[i]['class']}_{Path(rows[i]['path']).stem}.png"
        save_figure(overlay_figure(image, ex.heatmap, f"true {rows[i]['class']} · {ex.label} p={ex.probability:.2f}"),
                    target, dpi=70)
        written.append({"path": rows[i]["path"], "true": rows[i]["class"], "pred": ex.label,
                        "prob": round(ex.probability, 4), "overlay": str(target.relative_to(ROOT))})
    return written


def setting_config(recipe: str, changes: dict, args, *, split_preset: str):
    options = dict(data=str(SARS), model=args.model, split_preset=split_preset, split_seed=0, seed=args.seed,
                   epochs=args.epochs, image_size=args.image_size, strategy=args.strategy,
                   cache_dir=args.cache_dir, threads=args.threads, limit=args.limit)
    if args.strategy == "partial":
        options["freeze_until"] = args.freeze_until
    if args.strategy == "frozen":
        options["frozen_views"] = args.frozen_views
    if args.strategy in ("partial", "full"):
        options.update({k: v for k in ("head_init", "schedule", "lr") if (v := getattr(args, k)) is not None})
    options.update(args.overrides)
    options.update(changes)
    return config_from_recipe(recipe, **options)


def sars_test(run, trained_on_ucsd: bool) -> dict:
    test = run.metrics["test"]
    return test["per_source"]["sarscov2-ct"] if trained_on_ucsd else test


def run_setting(name: str, recipe: str, changes: dict, args) -> dict:
    cfg = setting_config(recipe, changes, args, split_preset="paper")
    t0 = time.perf_counter()
    run = fit(cfg, progress=args.progress)
    seconds = time.perf_counter() - t0
    trained_on_ucsd = isinstance(cfg.data, list)
    internal = sars_test(run, trained_on_ucsd)
    rows = external_rows(trained_on_ucsd)
    proba = run.predict_proba([str(UCSD / r["path"]) for r in rows])
    y = np.array([run.classes.index(r["class"]) for r in rows])
    external = with_intervals(compute_metrics(y, proba, run.classes))
    result = {"setting": name, "recipe": recipe, "changes": {k: v for k, v in changes.items() if k != "data"},
              "config": {k: v for k, v in run.config.items() if k not in ("classes",)},
              "internal_test": with_intervals(internal), "internal_split": "paper (stratified 976/122/122)",
              "external": external, "external_set": "UCSD-dev val patients" if trained_on_ucsd else "UCSD-dev all",
              "best_epoch": run.metrics["best_epoch"], "seconds": round(seconds, 1)}
    if args.grouped:  # the same setting on the leakage-free split; its external figures are not reused
        t1 = time.perf_counter()
        grouped = fit(setting_config(recipe, changes, args, split_preset="grouped"), progress=args.progress)
        result["internal_grouped_test"] = with_intervals(sars_test(grouped, trained_on_ucsd))
        result["grouped_seconds"] = round(time.perf_counter() - t1, 1)
    if args.gallery and name in args.gallery:
        slug = name.replace(" ", "_").replace(",", "").replace("+", "plus")
        result["failures"] = failure_gallery(run, rows, proba, RESULTS / "generalization_failures" / slug)
    return result


def fmt(m: dict, key: str) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="EfficientNetLite0")
    ap.add_argument("--strategy", default="linear", choices=("linear", "frozen", "partial", "full"))
    ap.add_argument("--head-init", default=None, choices=("random", "probe"))
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other training option for every setting, e.g. --set bn_stats=frozen --set ema=0.995")
    ap.add_argument("--no-grouped", dest="grouped", action="store_false",
                    help="skip the second fit on the grouped split (halves the time)")
    ap.add_argument("--progress", action="store_true", help="log each epoch")
    ap.add_argument("--freeze-until", type=int, default=3)
    ap.add_argument("--frozen-views", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--settings", default=";".join(SETTINGS), help="semicolon-separated setting names "
                                                                  "(names contain commas)")
    ap.add_argument("--gallery", default="transfer", help="semicolon-separated settings whose external failures "
                                                          "get Grad-CAM overlays")
    ap.add_argument("--cache-dir", default=str(Path("/tmp") / "ct-transfer-bench-cache"))
    ap.add_argument("--out", default=str(RESULTS / "generalization.json"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the settings already in --out (same budget) and run only the others")
    args = ap.parse_args()
    args.overrides = parse_sets(args.set)
    args.gallery = [s.strip() for s in args.gallery.split(";") if s.strip()]
    logging.basicConfig(level=logging.INFO if args.progress else logging.WARNING)
    names = [s.strip() for s in args.settings.split(";") if s.strip()]
    if args.strategy == "linear":  # no augmentation in a linear probe: the setting would repeat "transfer"
        names = [n for n in names if "augmentation" not in n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown} (choose from {list(SETTINGS)})")
    out = {"machine": machine_info(), "budget": {k: getattr(args, k) for k in
                                                 ("model", "strategy", "freeze_until", "frozen_views", "image_size",
                                                  "epochs", "seed", "limit", "head_init", "schedule", "lr",
                                                  "grouped", "overrides")},
           "results": []}
    if args.keep and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old["budget"] != out["budget"]:
            raise SystemExit(f"{args.out}: made with another budget {old['budget']}")
        out["results"] = [r for r in old["results"] if r["setting"] in names]
        out["machine"]["earlier_commands"] = old["machine"].get("earlier_commands", []) + [old["machine"]["command"]]
    done = {r["setting"] for r in out["results"]}
    print(f"{'setting':34} {'internal test acc':>24} {'grouped test acc':>24} {'external acc':>22} "
          f"{'sensitivity':>22} {'specificity':>22} {'ext AUC':>7} {'ext set':>14} {'s':>6}")
    for name in names:
        if name in done:
            r = next(x for x in out["results"] if x["setting"] == name)
        else:
            recipe, changes = SETTINGS[name]
            r = run_setting(name, recipe, changes, args)
            out["results"].append(r)
        e = r["external"]
        grouped = fmt(r["internal_grouped_test"], "accuracy") if "internal_grouped_test" in r else "not run"
        print(f"{name:34} {fmt(r['internal_test'], 'accuracy'):>24} {grouped:>24} {fmt(e, 'accuracy'):>22} "
              f"{fmt(e, 'sensitivity'):>22} {fmt(e, 'specificity'):>22} {e['roc_auc']:7.3f} "
              f"{r['external_set'][9:]:>14} {r['seconds'] + r.get('grouped_seconds', 0):6.0f}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
