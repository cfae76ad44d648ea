"""A model card per run (``RUN/model_card.md``), generated only from what the run recorded.

Sections follow the reporting items of TRIPOD+AI and CLAIM that apply to a slice classifier
trained here (model and intended use; data sources and provenance; partitions and leakage audit;
training; internal, grouped-split and external performance with 95% intervals; calibration; the
shift guard; failure modes; limitations), in the spirit of Hugging Face model cards. Whatever the
run did not measure is said to be **not measured**, never left out. ``card_facts`` gives the same
content as data (for the report and the web page); ``model_card`` renders it; ``write_model_card``
writes it atomically.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from . import _io
from .errors import CTTransferError

log = logging.getLogger(__name__)

CARD = "model_card.md"
NOT_MEASURED = "not measured"
METRICS = (("accuracy", "accuracy"), ("recall", "sensitivity"), ("specificity", "specificity"),
           ("f1", "F1"), ("roc_auc", "ROC AUC"), ("ece", "ECE"))
# Facts about the datasets this project ships, recognised by folder name (see ../shared/datasets/README.md).
KNOWN_DATASETS = {
    "sarscov2-ct": ("SARS-CoV-2 CT-scan dataset (Soares et al., medRxiv 2020, doi:10.1101/2020.04.24.20078584); "
                    "CC BY-NC-SA 4.0; about 120 patients from hospitals in São Paulo, Brazil; no patient ids in "
                    "the files, so a slice-level split puts slices of one patient on both sides; 2 exact and "
                    "several near-duplicate pairs; in the original download the PNG encoding differs by class "
                    "(a shortcut a loader that keeps alpha or mode can learn)."),
    "ucsd-covid-ct-dev": ("COVID-CT-Dataset, UCSD-AI4H (Zhao et al., arXiv:2003.13865), the official train and "
                          "val patients: slices from medRxiv/bioRxiv preprint figures (varied framing, text, "
                          "arrows, windows); patient ids in SPLIT.csv; research use only."),
}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v, ci=None) -> str:
    if not _num(v):
        return "—"
    text = f"{v:.3f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(c) for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _read(path: Path, what: str):
    if not path.is_file():
        return None
    try:
        return _io.read_json(path, what=what)
    except CTTransferError as exc:
        log.warning("%s: left out of the model card (%s)", path, exc)
        return None


def _split_facts(run_dir: Path, cfg: dict) -> dict:
    counts: dict = {}
    patients: dict = {}
    path = run_dir / "split.csv"
    rows = _io.read_csv(path, what="split file") if path.is_file() else []
    for r in rows:
        c = counts.setdefault(r.get("subset", "?"), {})
        c[r.get("class", "?")] = c.get(r.get("class", "?"), 0) + 1
        if r.get("patient"):
            patients.setdefault(r.get("subset", "?"), set()).add(r["patient"])
    preset = cfg.get("split_preset")
    by_file = cfg.get("split_file")
    grouped = preset == "grouped" and not by_file or bool(patients) or bool(cfg.get("split_groups"))
    return {"counts": counts, "patients": {k: len(v) for k, v in patients.items()},
            "preset": None if by_file else preset, "split_file": by_file, "seed": cfg.get("split_seed"),
            "grouped": grouped, "limit": cfg.get("limit")}


def _audit(run_dir: Path) -> dict | None:
    for p in (run_dir / "audit.json", run_dir / "audit" / "audit.json"):
        doc = _read(p, "audit file")
        if doc is not None:
            return {"path": str(p.relative_to(run_dir)), **{k: doc.get(k) for k in (
                "n_exact_pairs", "n_pairs_across_subsets", "n_pairs_train_test", "n_groups_across_subsets")}}
    return None


def _external(run_dir: Path, now_fingerprint: str) -> list[dict]:
    from .calibration import record_fingerprint

    out = []
    root = run_dir / "external"
    for path in sorted(root.glob("*/metrics.json")) if root.is_dir() else []:
        doc = _read(path, "external metrics")
        if doc is None or not isinstance(doc.get("metrics"), dict):
            continue
        stale = doc.get("stale") or (None if record_fingerprint(doc) == now_fingerprint else
                                     {"reason": "computed with another calibration than the run's"})
        out.append({"name": doc.get("name") or path.parent.name, "data": doc.get("data"),
                    "subset": doc.get("subset"), "metrics": doc["metrics"], "stale": stale})
    return out


def card_facts(run_dir) -> dict:
    """Everything the model card says, as data: ``model``, ``data``, ``split``, ``audit``, ``training``,
    ``internal``, ``grouped``, ``external``, ``calibration``, ``guard``, ``failure_modes``,
    ``not_measured``, ``limitations``."""
    from .calibration import fingerprint

    run_dir = Path(run_dir)
    cfg = _read(run_dir / "config.json", "run config")
    if cfg is None:
        raise CTTransferError(f"{run_dir}: not a run directory (no config.json)")
    metrics = _read(run_dir / "metrics.json", "metrics file") or {}
    predictor = _read(run_dir / "predictor.json", "predictor file") or {}
    cal = predictor.get("calibration") or metrics.get("calibration") or cfg.get("calibration")
    temperature = float((cal or {}).get("temperature", 1.0) or 1.0)
    threshold = (cal or {}).get("threshold")
    classes = cfg.get("classes") or metrics.get("classes") or []
    datasets = cfg.get("data") if isinstance(cfg.get("data"), list) else [cfg.get("data")]
    split = _split_facts(run_dir, cfg)
    internal = {s: metrics[s] for s in ("val", "test") if isinstance(metrics.get(s), dict)}
    external = _external(run_dir, fingerprint(temperature, threshold))
    guard = predictor.get("guard") or cfg.get("guard")
    provenance = cfg.get("provenance") or predictor.get("provenance") or metrics.get("provenance")

    not_measured = []
    if "test" not in internal:
        not_measured.append("internal test performance (no test metrics recorded)")
    if not split["grouped"]:
        not_measured.append("grouped-split performance: the split is not grouped by patient or near-duplicate "
                            "group, so slices of one patient may sit in train and test")
    if not external:
        not_measured.append("external validation (no other hospital's or dataset's images evaluated)")
    if not cal:
        not_measured.append("calibration (no temperature or threshold fitted on val)")
    if not guard:
        not_measured.append("a distribution-shift guard (none fitted: out-of-distribution inputs are not flagged)")
    if not split["patients"]:
        not_measured.append("patient-level performance (metrics are per slice; no patient ids recorded)")
    not_measured += ["performance by subgroup (sex, age, scanner, site, disease stage): no such metadata",
                     "prospective or clinical-workflow evaluation, and comparison with radiologists"]
    if not provenance:
        not_measured.append("software versions of the training run (not recorded by this run)")

    failures = []
    if any(ds and Path(str(ds)).name == "sarscov2-ct" for ds in datasets):
        failures.append("Known shortcut in the training data: in the original download the PNG encoding differs "
                        "by class; ct-transfer decodes every file to one mode, so this run cannot use it, but a "
                        "model trained elsewhere on the raw files may have.")
    for where, m in [("the internal test set", internal.get("test"))] + [(e["name"], e["metrics"]) for e in external]:
        ci = ((m or {}).get("ci95") or {}).get("accuracy")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and _num(ci[0]) and ci[0] <= 0.5:
            failures.append(f"On {where} the accuracy interval reaches chance ({_fmt(m.get('accuracy'), ci)}): "
                            "do not rely on this model for images like these.")
    test = internal.get("test")
    if test and external and _num(test.get("accuracy")):
        worst = min((e for e in external if _num(e["metrics"].get("accuracy"))),
                    key=lambda e: e["metrics"]["accuracy"], default=None)
        if worst and test["accuracy"] - worst["metrics"]["accuracy"] > 0.05:
            failures.append(f"Accuracy drops from {test['accuracy']:.3f} (internal test) to "
                            f"{worst['metrics']['accuracy']:.3f} on {worst['name']}: the internal figure overstates "
                            "performance at another site.")
    if test and _num(test.get("n")) and test["n"] < 100:
        failures.append(f"The internal test set has {test['n']} images: its intervals are wide.")
    for reason in (cal or {}).get("reasons") or []:
        failures.append(f"Calibration ({(cal or {}).get('status')}): {reason}.")
    for e in external:
        if e["stale"]:
            failures.append(f"External result {e['name']} is stale: {e['stale']['reason']}.")

    limitations = [
        "Research use only; not a medical device and not validated for diagnosis or triage.",
        "Classifies single 2-D slices into the run's classes; it has never seen other findings (tumours, other "
        "pneumonias not in the classes) and will still answer one of its classes for them.",
        "Trained on 8-bit slices from public collections; a hospital's DICOM series differ (windowing, "
        "resolution, scanners, annotations), so expect lower performance there until measured.",
    ]
    return {
        "model": {"name": cfg.get("model"), "timm_name": cfg.get("timm_name"), "weights": cfg.get("weights"),
                  "strategy": cfg.get("strategy"), "recipe": cfg.get("recipe"), "classes": classes,
                  "positive_class": cfg.get("positive"), "image_size": (cfg.get("preprocess") or {}).get("image_size"),
                  "preprocess": cfg.get("preprocess"), "tta": cfg.get("tta", "none"), "provenance": provenance},
        "data": [{"folder": str(ds), "about": KNOWN_DATASETS.get(Path(str(ds)).name)} for ds in datasets if ds],
        "split": split, "audit": _audit(run_dir),
        "training": {k: cfg.get(k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule", "augment",
                                             "augmentation", "dropout", "seed", "ema", "head_init", "crop", "intensity")}
        | {"epochs_run": metrics.get("epochs"), "best_epoch": metrics.get("best_epoch"),
           "train_seconds": metrics.get("train_seconds")},
        "internal": internal, "grouped": internal.get("test") if split["grouped"] else None, "external": external,
        "calibration": cal, "guard": guard, "failure_modes": failures, "not_measured": not_measured,
        "limitations": limitations,
    }


def _metric_table(rows: list[tuple[str, dict | None]]) -> list[str]:
    out = ["| set | n | " + " | ".join(label for _, label in METRICS) + " |",
           "|---|---|" + "---|" * len(METRICS)]
    for name, m in rows:
        if m is None:
            out.append(f"| {name} | — | " + " | ".join(NOT_MEASURED for _ in METRICS) + " |")
            continue
        ci = m.get("ci95") or {}
        out.append(f"| {name} | {m.get('n', '—')} | " + " | ".join(_fmt(m.get(k), ci.get(k)) for k, _ in METRICS) + " |")
    return out


def model_card(run_dir) -> str:
    """The model card of a run, as Markdown."""
    f = card_facts(run_dir)
    m, split, cal = f["model"], f["split"], f["calibration"]
    name = Path(run_dir).resolve().name
    lines = [f"# Model card: {name}", "",
             "Generated by `ct-transfer card` from the run's own files (config.json, metrics.json, split.csv, "
             "external/, predictor.json). Items follow TRIPOD+AI and CLAIM where they apply; anything the run did "
             f"not measure says **{NOT_MEASURED}**.", "",
             "## Model", "",
             f"- Architecture: {m['name']} (timm `{m['timm_name']}`), initial weights: {m['weights']}, "
             f"fine-tuning: {m['strategy']}" + (f", recipe {m['recipe']}" if m["recipe"] else ""),
             f"- Output: one of {', '.join(m['classes'] or ['?'])}" +
             (f"; positive class {m['positive_class']}" if m["positive_class"] else ""),
             f"- Input: one CT slice, resized to {m['image_size']} px; preprocessing {m['preprocess']}; "
             f"test-time augmentation: {m['tta']}",
             "- Software: " + (", ".join(f"{k} {v}" for k, v in m["provenance"].items())
                               if isinstance(m["provenance"], dict) else NOT_MEASURED + " (versions not recorded)"),
             "", "## Intended use", "",
             "Research on transfer learning for CT-slice classification. Not for clinical decisions.", "",
             "## Data and provenance", ""]
    for d in f["data"]:
        lines.append(f"- `{d['folder']}`: {d['about'] or 'no provenance recorded by this project'}")
    lines.append("- Reference standard: the datasets' class folders as published (not re-read by this project)")
    lines += ["", "## Split and leakage audit", ""]
    how = f"split file {split['split_file']}" if split["split_file"] else f"preset {split['preset']} (seed {split['seed']})"
    lines.append(f"- Partition: {how}" + (f", at most {split['limit']} images per class" if split["limit"] else "")
                 + ("; grouped (no patient / near-duplicate group on two sides)" if split["grouped"]
                    else "; **not grouped**: slices of one patient can be in train and test"))
    for subset, c in split["counts"].items():
        pts = split["patients"].get(subset)
        lines.append(f"- {subset}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                     + (f" ({pts} patients)" if pts else ""))
    a = f["audit"]
    lines.append(f"- Leakage audit: {a['n_pairs_across_subsets']} near-duplicate pairs across subsets, "
                 f"{a['n_exact_pairs']} exact duplicate pairs ({a['path']})" if a else
                 f"- Leakage audit: {NOT_MEASURED} for this run (`ct-transfer audit --split-file RUN/split.csv`)")
    t = f["training"]
    lines += ["", "## Training", "",
              "- " + ", ".join(f"{k} {v}" for k, v in t.items() if v is not None), "",
              "## Performance (95% intervals: Wilson; bootstrap for F1 and AUC)", ""]
    rows = [("internal val", f["internal"].get("val")), ("internal test", f["internal"].get("test")),
            ("grouped-split test", f["grouped"])]
    rows += [(f"external {e['name']}" + (" (stale)" if e["stale"] else ""), e["metrics"]) for e in f["external"]]
    if not f["external"]:
        rows.append(("external", None))
    lines += _metric_table(rows)
    lines += ["", "## Calibration", ""]
    if cal:
        thr = cal.get("threshold")
        lines.append(f"- Status: **{cal.get('status', 'fitted')}**" + (" (forced)" if cal.get("forced") else "")
                     + f"; temperature {cal.get('temperature', 1.0):.4g}"
                     + (f" (fitted {cal['fitted_temperature']:.4g})" if _num(cal.get("fitted_temperature")) else "")
                     + f"; threshold {'argmax' if thr is None else f'{thr:.4f}'} ({cal.get('criterion', '—')}); "
                       f"on {cal.get('n_val', '—')} val images")
        if _num(cal.get("val_ece_before")):
            lines.append(f"- Val ECE {cal['val_ece_before']:.4f} -> {cal.get('val_ece_after', float('nan')):.4f}")
        lines += [f"- {r}" for r in cal.get("reasons") or []]
    else:
        lines.append(f"- {NOT_MEASURED}: probabilities are the network's softmax; the decision is the argmax")
    lines += ["", "## Distribution-shift guard", ""]
    g = f["guard"]
    lines.append("- " + (", ".join(f"{k} {v}" for k, v in g.items() if not isinstance(v, (dict, list)))
                         if isinstance(g, dict) else NOT_MEASURED + ": none fitted; inputs unlike the training "
                                                                   "data are not flagged"))
    lines += ["", "## Known failure modes", ""] + [f"- {x}" for x in f["failure_modes"] or ["none recorded"]]
    lines += ["", "## Not measured", ""] + [f"- {x}" for x in f["not_measured"]]
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in f["limitations"]]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir, out=None) -> Path:
    """Write ``RUN/model_card.md`` (or ``out``) atomically; returns its path."""
    target = Path(out) if out else Path(run_dir) / CARD
    text = model_card(run_dir)
    _io.write_text(target, text)
    return target
