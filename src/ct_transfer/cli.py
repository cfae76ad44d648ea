"""The ``ct-transfer`` command line: the only module that knows argparse; a thin layer over the API.

``train``/``experiment`` flags are generated from ``TrainConfig``'s fields, so every default and
help text lives in one place. Library errors (``CTTransferError``) become one line on stderr and
exit code 2; parameter errors are shown as their flags (``--lr nan: ...``). Results go to stdout,
log and progress lines to stderr. Modules that import torch are imported inside the commands, so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import ConfigError, CTTransferError, clean, first_line

GRID_FIELDS = ("model", "weights", "seed", "out")  # set per cell by `experiment`


class _Console(logging.Handler):
    """Library log lines as plain text on the current stderr (results alone go to stdout, so that
    `ct-transfer predict ... > preds.txt` holds results only; looked up per line: pytest's capture)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr, flush=True)


def _setup_logging(quiet: bool = False):
    """Show the library's log lines for this command; returns a function that puts the logger back
    as it was (the CLI must not leave a level or handler behind for later Python callers)."""
    logger = logging.getLogger("ct_transfer")
    saved = (logger.level, logger.propagate)
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    def restore():
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


# ---------------------------------------------------------------------------------------------
# Flags generated from TrainConfig
# ---------------------------------------------------------------------------------------------


def _base_type(annotation):
    """int | None -> int (annotations are strings under `from __future__ import annotations`)."""
    text = str(annotation)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {clean(text)[:40]!r}") from None
    return value  # NaN/inf reach TrainConfig, whose message gives the allowed range


def _int_in(lo: int, hi: int):
    """argparse type: an integer in lo..hi, the range said in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{clean(text)[:40]}: choose an integer in {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value}: choose an integer in {lo}..{hi}")
        return value
    return parse


def _check_output(out, run=None) -> Path:
    """A file output: not a folder, its folder exists and is writable, and it is not inside a run
    directory (the run being used, or any other): a run's files are never another command's output."""
    from . import _io

    if str(out).endswith(("/", os.sep)):
        raise CTTransferError(f"{out}: names a folder; give a file name")
    out = Path(out)
    _refuse_run_dir(out.parent, out, run)
    if out.is_dir():  # --out RUN itself
        _refuse_run_dir(out, out, run)
    return _io.check_writable(out, folder=False)


def _refuse_run_dir(folder: Path, out: Path, run=None) -> None:
    from .rundir import RunDir

    rd = RunDir(folder)
    same = run is not None and run.directory is not None and _same(folder, run.directory)
    if rd.is_run() or same:
        rd.refuse_output(out)  # the run's own files: the long message
        raise CTTransferError(f"{out}: is inside the run directory {folder}; choose another folder")


def _same(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"choose an integer >= 1, not {text!r}")
    return value


def add_config_flags(p: argparse.ArgumentParser, *, skip=(), required=()) -> None:
    """One flag per ``TrainConfig`` field. Flags not given stay unset (``SUPPRESS``), so a recipe
    fills them and the dataclass holds the only defaults; the help shows those defaults."""
    from .config import TrainConfig
    from .recipes import RECIPES

    for f in fields(TrainConfig):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        meta, kind = f.metadata, _base_type(f.type)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        help_text = meta.get("help", "").replace("%", "%%")  # argparse %-formats help ("95% of val")
        if kind is bool:  # --x / --no-x, so that a recipe's or the default's choice can be undone
            if f.default is not None:
                help_text += f" (default: {'on' if f.default else 'off'})"
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
            continue
        kw = {"dest": f.name, "help": help_text, "type": _finite_float if kind is float else kind,
              "default": argparse.SUPPRESS}
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if meta.get("multiple"):
            kw["action"] = "append"
        if f.default is MISSING or f.name in required:
            kw["required"] = True
        if f.default is not MISSING and f.default is not None and "default" not in help_text:
            kw["help"] += f" (default: {f.default})"
        p.add_argument(flag, **kw)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--recipe", choices=sorted(RECIPES),
                       help="a named recipe; flags override it (default: paper = the paper's protocol, the "
                            "defaults shown here)")
    group.add_argument("--recipe-file", help="a YAML/JSON recipe file (e.g. written by `tune`); flags override it "
                                             "(default: none, the --recipe)")


def config_from_args(args, **overrides):
    """``TrainConfig`` from the recipe (if any), the flags given, then ``overrides``."""
    from .config import TrainConfig
    from .recipes import config_from_recipe

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and k != "recipe"}
    recipe = getattr(args, "recipe_file", None) or getattr(args, "recipe", None)
    return config_from_recipe(recipe, **{**given, **overrides})


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_models(args):
    from .models import model_table_rows

    rows = model_table_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<20}{'timm name':<26}{'size':>5}{'params (M)':>12}  {'ImageNet offline':<17}in paper")
    for r in rows:
        print(f"{r['name']:<20}{r['timm_name']:<26}{r['image_size']:>5}{r['params_m']:>12.2f}  "
              f"{'yes' if r['imagenet_offline'] else 'no':<17}{'yes' if r['in_paper'] else 'no'}")


def cmd_split(args):
    from . import data as D

    _check_output(args.out)
    _, classes = D.scan_folder(args.data, volume_slices=args.volume_slices)
    if args.split_groups and args.split_preset != "grouped":
        raise CTTransferError(f"--split-groups {args.split_groups}: only with --split-preset grouped")
    rows = D.split_folder(args.data, args.split_preset, args.split_seed, groups_file=args.split_groups,
                          threshold=args.threshold, volume_slices=args.volume_slices)
    # the duplicate check decodes every image: an unreadable one fails here, before anything is written
    pairs = None if args.no_duplicates else D.pixel_duplicates_across_subsets(rows, args.data)
    D.write_split(rows, args.out)
    counts = D.split_counts(rows)
    for subset in D.SUBSETS:
        print(f"{subset:<6}" + "  ".join(f"{c}: {counts.get(subset, {}).get(c, 0)}" for c in classes))
    if pairs is not None:
        print(f"exact duplicates (same decoded pixels) across subsets: {len(pairs)}")
        for a, b in pairs:
            print(f"  {a} = {b}")
    print(f"wrote {args.out}")


def _ci(m: dict, key: str) -> str:
    from .evaluate import format_with_ci

    return format_with_ci(m, key)


def _metric_line(name: str, m: dict) -> str:
    line = (f"{name:<5} acc {_ci(m, 'accuracy')}  sens {_ci(m, 'recall')}  spec {_ci(m, 'specificity')}  "
            f"f1 {_ci(m, 'f1')}  auc {_ci(m, 'roc_auc')}  ece {m.get('ece', float('nan')):.3f}  "
            f"cm {m['confusion_matrix']}  (n={m['n']})")
    line += _operating_line("", m.get("operating_point"), "chosen on val")
    pm = m.get("patients")
    if isinstance(pm, dict) and "accuracy" in pm:  # patient ids known: one row per patient
        line += (f"\n{'':<5} patients ({pm['aggregator']}): acc {_ci(pm, 'accuracy')}  sens {_ci(pm, 'recall')}  "
                 f"spec {_ci(pm, 'specificity')}  auc {_ci(pm, 'roc_auc')}  (n={pm['n_patients']} patients, "
                 f"{pm['n_slices']} slices)")
        line += _operating_line("patients ", pm.get("operating_point"), "fitted on val patients")
    return line


def _operating_line(who: str, op: dict | None, fitted: str) -> str:
    """The decision threshold's operating point (sensitivity, specificity, accuracy), or nothing."""
    if not op:
        return ""
    return (f"\n{'':<5} {who}at threshold {op['threshold']:.4f} ({fitted}): sens {_ci(op, 'sensitivity')}  "
            f"spec {_ci(op, 'specificity')}  acc {_ci(op, 'accuracy')}")


def _print_metrics(metrics, where):
    print("95% intervals: Wilson (acc, sens, spec), bootstrap (f1, auc)")
    for subset in ("val", "test"):
        m = metrics.get(subset)
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        print(_metric_line(subset, m))
    if isinstance(metrics.get("train_seconds"), (int, float)):
        print(f"train_seconds {metrics['train_seconds']:.1f}")
    print(f"wrote {Path(where) / 'metrics.json'}")


def cmd_train(args):
    from .engine import fit

    run = fit(config_from_args(args), progress=not args.quiet, resume=args.resume, overwrite=args.overwrite,
              executor=args.executor, address=args.address)
    _print_metrics(run.metrics, args.out)


def cmd_evaluate(args):
    from . import _io
    from .run import load_run

    from .rundir import RunDir

    run = load_run(args.run)
    _io.check_writable(args.run)  # metrics and predictions are rewritten: fail before the work
    with RunDir(args.run).lock():  # one writer per run folder
        if args.data and not args.split_file or args.class_map or args.name or args.subset:
            # another dataset: external validation (the run's own files stay as they are)
            rec = run.evaluate_external(args.data, name=args.name, class_map=args.class_map,
                                        split_file=args.split_file, subset=args.subset)
            print("95% intervals: Wilson (acc, sens, spec), bootstrap (f1, auc)")
            print(_metric_line("ext", rec["metrics"]))
            _print_shift(rec)
            if not rec["independent"]:
                print(f"NOT an external validation: {rec['independence']['why']}")
            print(f"wrote {rec['path']} and predictions.csv")
            return
        run.evaluate(data=args.data, split_file=args.split_file)
        run.write_outputs()
    _print_metrics(run.metrics, args.run)


def _print_shift(rec: dict) -> None:
    """The shift guard's lines of an external evaluation (a run without a guard has none)."""
    if "shift" in rec:
        print(f"shift ({rec['shift']['detector']}): {rec['shift']['verdict']}")
    sel = rec["metrics"].get("selective", {}).get("at_threshold")
    if sel and sel["accuracy_accepted"] is not None:
        print(f"selective: {100 * sel['accepted']:.1f}% accepted, accuracy on them {sel['accuracy_accepted']:.4f} "
              f"(all: {rec['metrics']['accuracy']:.4f})")


def cmd_guard(args):
    from . import _io
    from .run import load_run
    from .shift import fit_guard

    run = load_run(args.run)
    _io.check_writable(args.run)
    guard = fit_guard(run, detector=args.detector, accept=args.accept)
    d = guard.describe()
    print(f"shift guard {d['detector']}: fitted on {d['n_train']} train images; threshold {d['threshold']:.4g} "
          f"accepts {100 * d['val_accepted']:.1f}% of {d['n_val']} val images")
    print(f"wrote {Path(args.run) / 'guard.safetensors'} and guard.json (predict, serve and export use it)")


def cmd_shift(args):
    from .run import load_run
    from .shift import check_shift, require_guard

    run = load_run(args.run)
    require_guard(run)  # before reading the folder: a run without a guard fails at once
    if args.out:
        _refuse_run_dir(Path(args.out), Path(args.out), run)
    res = check_shift(run, args.data, out=args.out, alpha=args.alpha)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['n']} images, {100 * res['flagged']:.1f}% flagged (val {100 * res['val_flagged']:.1f}%), "
          f"Mann-Whitney p = {res['p_value']:.2e}, KS p = {res['ks_p_value']:.2e}")
    print(res["verdict"])
    if args.out:
        print(f"wrote {res['files']['json']}, shift_scores.csv and shift_hist.png")


def cmd_calibrate(args):
    from . import _io
    from .calibration import CalibrationRefused
    from .external import refresh_external
    from .patients import PATIENTS_FILE, has_patients, save_patient_decision
    from .rundir import RunDir
    from .run import load_run

    run = load_run(args.run)
    _io.check_writable(args.run)
    with RunDir(args.run).lock():  # one writer per run folder
        # fitted and evaluated first; predictor.json and the metrics are written only when both worked
        try:
            cal = run.calibrate(sensitivity=args.sensitivity, force=args.force, save=False)
        except CalibrationRefused as exc:
            raise CTTransferError(f"{args.run}: {exc.describe('--force')}") from None
        decision = None
        if len(run.classes) == 2 and has_patients([r for r in run.split if r["subset"] == "val"]):
            decision = run.fit_patients(sensitivity=args.sensitivity, save=False)  # evaluate uses it
        run.evaluate()
        run.save_predictor()
        if decision is not None:
            save_patient_decision(run, decision)
        external = refresh_external(run)  # results computed with the old calibration: redone or stale
        run.write_outputs()
    threshold = "argmax" if cal["threshold"] is None else f"{cal['threshold']:.4f}"
    print(f"{cal['status']}{' (forced)' if cal['forced'] else ''}: temperature {cal['temperature']:.4f} "
          f"(fitted {cal['fitted_temperature']:.4f})  threshold {threshold} ({cal['criterion']})  "
          f"val ECE {cal['val_ece_before']:.4f} -> {cal['val_ece_after']:.4f}")
    for ext in external:
        print(f"external {ext['name']}: {ext['status']}")
    if decision is not None:  # the choice itself is logged by fit_patient_decision
        print(f"patients: {decision.describe()} -> wrote {Path(args.run) / PATIENTS_FILE}")
    _print_metrics(run.metrics, args.run)
    print(f"wrote the calibration into {Path(args.run) / 'predictor.json'} (predict, evaluate, serve and export use it)")


def cmd_card(args):
    from .modelcard import write_model_card
    from .rundir import RunDir

    RunDir(args.run).check()
    if args.out:
        _check_output(args.out, None)
    path = write_model_card(args.run, args.out)
    print(f"wrote {path}")


def cmd_adapt(args):
    from .adapt import adapt

    run = adapt(run=args.run, data=args.data, split_file=args.split_file, labels=args.labels, method=args.method,
                out=args.out, seed=args.seed, labelled_subset=args.labelled_subset, held_out=args.held_out,
                source_data=args.source_data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                threads=args.threads, cache_dir=args.cache_dir, progress=not args.quiet)
    rec = run.metrics["adaptation"]
    print(f"adapted {args.run} with {rec['labels']} labelled slices of {rec['patients']} patients "
          f"(method {rec['method']}, seed {rec['seed']}, head C={rec['head_C']:g}); held-out '{rec['held_out']}' rows:")
    print("95% intervals: Wilson (acc, sens, spec), bootstrap (f1, auc)")
    print(_metric_line("test", run.metrics["test"]))
    for source, m in (run.metrics["test"].get("per_source") or {}).items():
        print(_metric_line(source, m))
    print(f"wrote {args.out} (drawn slices: {Path(args.out) / 'labels.csv'})")


def cmd_audit(args):
    from .audit import audit

    summary = audit(args.data, args.out, split_file=args.split_file, against=args.against, threshold=args.threshold)
    print(summary["text"])
    print(f"wrote {Path(args.out) / 'audit.json'}, audit.md and {summary['contact_sheet'] or 'no contact sheet'}")


def _csv_list(text: str, kind=str, flag=""):
    shown = clean(text)[:80] or "''"
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CTTransferError(f"{flag} {shown}: give a comma-separated list, e.g. 0,1,2") from None
    if not items:
        raise CTTransferError(f"{flag} {shown}: empty list")
    repeated = sorted({str(x) for x in items if items.count(x) > 1})
    if repeated:
        raise CTTransferError(f"{flag} {shown}: {', '.join(repeated)} given more than once")
    return items


def _grid_lists(args, preset):
    """--models, --weights, --seeds checked one by one, the message naming the list flag."""
    from .config import _validate_weights
    from .models import resolve

    # `is not None`: an empty --models '' is an error, not the preset's 12 models
    models = _csv_list(args.models, flag="--models") if args.models is not None else list(preset["models"])
    weights = (_csv_list(args.grid_weights, flag="--weights") if args.grid_weights is not None
               else list(preset["weights"]))
    seeds = _csv_list(args.seeds, int, "--seeds")
    for flag, values, check in (("--models", models, resolve), ("--weights", weights, _validate_weights)):
        for v in values:
            try:
                check(v)
            except ConfigError as exc:
                raise CTTransferError(f"{flag} {show_list(values)}: {v}: {exc.why}") from None
    files = [os.path.realpath(w) for w in weights if w not in ("none", "imagenet")]
    twice = sorted({w for w, r in zip([w for w in weights if w not in ("none", "imagenet")], files)
                    if files.count(r) > 1})
    if twice:  # one file under two spellings would train the same cell twice
        raise CTTransferError(f"--weights {show_list(weights)}: {', '.join(twice)} name the same file")
    bad = [s for s in seeds if not 0 <= s <= 2**31 - 1]
    if bad:
        raise CTTransferError(f"--seeds {show_list(seeds)}: {bad[0]}: choose integers in 0..{2**31 - 1}")
    return models, weights, seeds


def show_list(values) -> str:
    return clean(",".join(str(v) for v in values))[:80]


def cmd_experiment(args):
    from dataclasses import asdict

    from .experiment import PRESETS, run_grid

    from . import _io

    from .rundir import RunDir

    models, weights, seeds = _grid_lists(args, PRESETS[args.model_set])
    if set(RunDir(args.out).run_files()) - {"split.csv"}:  # a grid holds runs/ and its split, no run's files
        raise CTTransferError(f"{args.out}: is a run directory; choose another --out for the grid")
    _io.check_writable(args.out)
    preset_name = args.grid_split_preset or "paper"
    cfg = config_from_args(args, model=models[0], out=None, split_preset=preset_name)
    if len(cfg.datasets) > 1:
        raise CTTransferError("--data: experiment takes one dataset (train accepts several --data)")
    base = asdict(cfg)
    for k in ("data", "model", "out", "weights", "seed", "split_file", "split_preset", "split_seed", "split_groups"):
        base.pop(k, None)
    results = run_grid(cfg.data, args.out, models, weights, seeds, base=base, split_file=cfg.split_file,
                       split_preset=preset_name, split_seed=cfg.split_seed, split_groups=cfg.split_groups,
                       external=args.external, progress=not args.quiet, jobs=args.jobs, executor=args.executor,
                       address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    failed = [r for r in results if r["status"] == "failed"]
    if failed:  # the others finished; the exit code must not say all is well
        raise CTTransferError(f"{args.out}: {len(failed)} of {len(results)} runs failed: "
                              + "; ".join(f"{r['run']}: {r['error']}" for r in failed[:3])
                              + (" …" if len(failed) > 3 else ""))


def cmd_tune(args):
    from .config import TrainConfig
    from .recipes import load_recipe
    from .tune import tune

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and k not in ("data", "model", "out", "recipe")}
    if isinstance(given.get("split_file"), list):  # --split-file is repeatable (one per --data in train)
        if len(given["split_file"]) > 1:
            raise CTTransferError("--split-file: tune takes one split file")
        given["split_file"] = given["split_file"][0]
    recipe = args.recipe_file or args.recipe
    base = {**(load_recipe(recipe) if recipe else {}), **given}  # the search space overrides both
    datasets = args.data if isinstance(args.data, list) else [args.data]
    if len(datasets) > 1:
        raise CTTransferError("--data: tune takes one dataset (train accepts several --data)")
    result = tune(data=datasets[0], model=args.model, space_file=args.space, trials=args.trials, out=args.out,
                  metric=args.metric, base=base, executor=args.executor, address=args.address,
                  cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                  search_seed=args.search_seed)
    best = result["best"]
    states = [r["state"] for r in result["trials"]]
    print(f"{len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed); best trial {best['trial']}: {args.metric} {best['score']:.4f}")
    print(f"wrote {Path(args.out) / 'best.yaml'} (train --recipe-file), trials.csv, search.md, search.png")


def cmd_report(args):
    from . import _io
    from .report import build_summary, gallery_section, write_report
    from .report.write import default_out

    out = Path(args.out) if args.out else default_out(args.grid_dir)
    build_summary(args.grid_dir, audit=args.audit, grouped=args.grouped)  # bad input fails before any write
    _io.check_writable(out)
    extra = []
    if not args.no_gallery:
        section = gallery_section(args.grid_dir, out, args.method)
        if section:
            extra.append(section)
    summary = write_report(args.grid_dir, out, extra_sections=extra, audit=args.audit, grouped=args.grouped)
    for a in summary["answer"]:  # the answer first, as the report opens with it
        acc = a["internal"]["accuracy"]["mean"]
        print(f"{a['model']} ({a['weights']}, {a['seeds']} seed(s)): internal test accuracy "
              f"{'—' if acc is None else f'{acc:.3f}'}; " + "; ".join(a["verdict"]))
    ratios = summary["ratios"]
    if ratios and ratios["ours"]["test"]["accuracy_ratio"] is not None:
        print(f"test accuracy ratio (with/without TL) {ratios['ours']['test']['accuracy_ratio']:.3f}")
    print(f"{len(summary['runs'])} runs reported (split: {summary['split']['name']}); "
          f"wrote {out / 'report.md'} and {out / 'report.html'}")


def _load_run_with_window(args):
    """The run, with ``--window`` (DICOM width/level) replacing its preprocessing's window."""
    from dataclasses import replace

    from .predict import parse_window
    from .run import load_run

    window = parse_window(args.window) if args.window else None  # a bad window fails before loading
    run = load_run(args.run)
    if window:
        run.preprocess = replace(run.preprocess, window=window)
    return run


def cmd_predict(args):
    from .predict import patients_path, predict_scans, write_rows

    run = _load_run_with_window(args)
    if args.out:
        _check_output(args.out, run)
        _check_output(patients_path(args.out), run)
    rows, patients = predict_scans(run, args.inputs, batch_size=args.batch_size, progress=True,
                                   by_patient=args.patient, max_slices=args.max_slices)
    if rows and (not args.out or len(rows) <= 50):
        width = min(70, max(len(r["path"]) for r in rows))
        guard = run.guard is not None
        print(f"{'path':<{width}}  {'pred':<12}" + "".join(f"{'p(' + c + ')':>14}" for c in run.classes)
              + ("  shift score  like training?" if guard else ""))
        for r in rows:
            print(f"{r['path'][-width:]:<{width}}  {r['pred']:<12}" + "".join(f"{r['prob_' + c]:>14.4f}" for c in run.classes)
                  + (f"  {_shift_text(r.get('shift_score'), r.get('in_distribution'))}" if guard else ""))
        if guard and any(r.get("in_distribution") is False for r in rows):
            print("NO: the image is unlike the run's training images (another scanner, site or framing?); its "
                  "prediction may be wrong however confident. `ct-transfer shift` checks a whole folder.")
    if patients:
        pos = run.classes[1]
        print(f"patients ({patients[0].decision}; flagged: share of slices the shift guard flags)")
        for p in patients:
            flagged = "n/a" if p.flagged_share is None else f"{p.flagged_share:.2f}"
            print(f"  {p.patient} ({p.kind}, {p.name}): {p.label}  p({pos}) {p.probability:.4f}  "
                  f"slices used {len(p.used)} of {p.n_slices}  flagged {flagged}")
    if args.out:
        write_rows(rows, args.out)
        print(f"wrote {args.out} ({len(rows)} images)")
        if patients:
            write_rows([p.row() for p in patients], patients_path(args.out))
            print(f"wrote {patients_path(args.out)} ({len(patients)} patients)")


def _shift_text(score, accepted) -> str:
    """predict's two guard columns (a scan's slice rows carry the flag without the score)."""
    score = "—" if score is None else f"{score:.4g}"
    flag = "—" if accepted is None else ("yes" if accepted else "NO: unlike the training images")
    return f"{score:>11}  {flag}"


def cmd_explain(args):
    from . import _io
    from .explain import explain_files
    from .predict import collect_inputs

    run = _load_run_with_window(args)
    out = Path(args.out)
    for folder in (out, *out.absolute().parents):  # the overlays' folder, or a folder inside a run
        _refuse_run_dir(folder, out, run)
    _io.check_writable(args.out)
    try:
        results = explain_files(run, collect_inputs(args.inputs), method=args.method, out_dir=args.out,
                                target_layer=args.target_layer)
    except CTTransferError as exc:
        if str(exc).startswith("target_layer="):
            raise CTTransferError("--target-layer " + str(exc)[len("target_layer="):]) from None
        raise
    for r in results:
        print(f"{r['path']}: {r['pred']} (p={r['prob']:.3f}) -> {r['overlay']}")


def cmd_export(args):
    from .run import load_run

    run = load_run(args.run)
    for target in (args.out, args.out + ".json"):  # the export and its description beside it
        _check_output(target, run)
    if args.format == "timm" or (args.format is None and args.out.lower().endswith(".safetensors")):
        from .formats import export_timm

        info = export_timm(run, args.out)
        print(f"wrote {args.out} (+ {Path(args.out).name}.json); load it with {info['load']}")
        print(f"parity on {info['parity']['images']} {info['parity']['on']}: max |logits_timm - logits_run| = "
              f"{info['parity']['max_abs_diff_logits']:.2e}")
        return
    info = run.export(args.out, format=args.format)
    print(f"wrote {args.out} (+ {Path(args.out).name}.json)")
    print(f"parity on {info['parity']['images']} {info['parity']['on']}: max |p_export - p_torch| = "
          f"{info['parity']['max_abs_diff_probabilities']:.2e}")
    if info.get("shift_guard"):
        print(f"second output shift_score ({info['shift_guard']['detector']}, threshold "
              f"{info['shift_guard']['threshold']:.4g} in the sidecar): max relative difference "
              f"{info['parity']['max_rel_diff_shift_score']:.2e}, same flags: {info['parity']['same_in_distribution']}")


def cmd_serve(args):
    from .serve import Limits, serve

    if not 0 < args.max_upload_mb <= 4096:
        raise CTTransferError(f"--max-upload-mb {args.max_upload_mb}: choose 1..4096")
    serve(args.run, host=args.host, port=args.port, limits=Limits(max_request_bytes=args.max_upload_mb * 2**20),
          allow_hosts=tuple(args.allow_host or ()))


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the text already says it ("(default: ...)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``ct-transfer: error: ...``) and exit 2, like library errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        import re

        # "argument --batch-size: 0: choose ..." -> "--batch-size 0: choose ...", like a ConfigError
        m = re.fullmatch(r"argument (--[\w-]+): (\S+): (.*)", message, flags=re.S)
        if m:
            message = f"{m[1]} {m[2]}: {m[3]}"
        where = self.prog.removeprefix("ct-transfer").strip()  # the subcommand, if any
        self.exit(2, f"ct-transfer: error: {where + ': ' if where else ''}{clean(message)}\n")


def _alias(p, flag: str, dest: str, **kw) -> None:
    """An old spelling that still works, hidden from the help (one name per option in the help)."""
    p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _add_run_flag(p, **kw) -> None:
    p.add_argument("--run", required=True, help="run directory (written by `train` or `experiment`)", **kw)


def _add_window_flag(p) -> None:
    p.add_argument("--window", help="DICOM window WIDTH,LEVEL in HU (default: the run's, 1500,-600 = lung, "
                                    "unless the run was trained with another)")


def _add_executor_flags(p) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another in this process; ray: Ray tasks (pip install 'ct-transfer[ray]')")
    p.add_argument("--address", help="ray: the cluster to join, auto or HOST:PORT (default: start Ray here)")


def _add_quiet_flag(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no log or progress lines on stderr, only results and errors")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .registry import EXPLAINERS

    METHODS = EXPLAINERS.describe()
    from .config import GRID_PRESETS, SPLIT_PRESETS
    from .config import NEAR_DUPLICATE_THRESHOLD as THRESHOLD

    parser = _Parser(prog="ct-transfer", description="CT-scan classification by transfer learning. "
                     "`ct-transfer COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("models", help="the model table")
    p.add_argument("--json", action="store_true", help="the table as JSON on stdout")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("split", help="write a train/val/test split CSV")
    p.add_argument("--data", required=True, help="dataset folder, one sub-folder per class")
    p.add_argument("--out", required=True, help="the split CSV to write (path,class,subset)")
    # the same names and defaults as train's split options
    p.add_argument("--split-preset", choices=list(SPLIT_PRESETS), default="stratified",
                   help="stratified 80:10:10, the paper's Table 1 counts, or grouped (near-duplicates kept together)")
    p.add_argument("--split-seed", type=_int_in(0, 2**31 - 1), default=0, help="seed of the split")
    p.add_argument("--split-groups", help="grouped: CSV path,group (or path,...,patient) keeping each group in one "
                                          "subset, besides near-duplicates (default: near-duplicates only)")
    p.add_argument("--threshold", type=int, help=f"grouped: pHash distance of near-duplicates (default: {THRESHOLD})")
    p.add_argument("--no-duplicates", action="store_true", help="skip the cross-subset duplicate check")
    p.add_argument("--volume-slices", type=_int_in(1, 100_000), default=16,
                   help="at most N lung slices per volume (NIfTI, multi-frame DICOM, series folder) become rows "
                        "(default: 16)")
    _alias(p, "--preset", "split_preset", choices=list(SPLIT_PRESETS))
    _alias(p, "--seed", "split_seed", type=_int_in(0, 2**31 - 1))
    _alias(p, "--groups", "split_groups")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("audit", help="leakage audit: exact and near-duplicate images within and across subsets")
    p.add_argument("--data", required=True, help="dataset folder, one sub-folder per class")
    p.add_argument("--split-file", help="split CSV: count duplicates within and across its subsets "
                                        "(default: the whole folder as one set)")
    p.add_argument("--against", help="a second dataset folder: the same images in both (default: none)")
    p.add_argument("--out", required=True, help="folder for audit.json, audit.md and the contact sheet")
    p.add_argument("--threshold", type=int, default=THRESHOLD,
                   help="near-duplicate: 256-bit pHash Hamming distance <= N")
    p.set_defaults(func=cmd_audit)

    from .patients import AGGREGATORS  # importing it registers the aggregators

    p = sub.add_parser("calibrate", help="fit temperature scaling and a decision threshold on a run's val subset; "
                                         "with patient ids, also the patient aggregator (one of "
                                         f"{', '.join(AGGREGATORS.names())}) and a patient-level threshold")
    _add_run_flag(p)
    p.add_argument("--sensitivity", type=_finite_float, help="threshold reaching this val sensitivity "
                   "(default: Youden's J)")
    p.add_argument("--force", action="store_true", help="fit even on a val subset too small for it and keep the "
                   "fitted temperature even at its bound or with a worse val ECE (default: refuse / keep T=1)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("card", help="write a run's model card (model_card.md) from what the run recorded")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", help="where to write it (default: RUN/model_card.md)")
    p.set_defaults(func=cmd_card)

    from .config import FINETUNE_DEFAULTS
    from .registry import ADAPT_METHODS  # not METHODS: that name is the explainers' here

    p = sub.add_parser("adapt", help="adapt a trained run to a new site with N of its labelled slices",
                       description="Few-label site adaptation (docs/adaptation.md). Methods: " +
                       "; ".join(f"{k} = {v}" for k, v in ADAPT_METHODS.describe().items()))
    p.add_argument("--run", required=True, help="the trained run to start from")
    p.add_argument("--data", required=True, help="the new site's dataset folder (folder per class)")
    p.add_argument("--split-file", required=True, help="the new site's split CSV: labelled rows and held-out rows")
    p.add_argument("--labels", required=True, type=int, help="N: labelled slices to draw (stratified by class, "
                   "spread over patients)")
    p.add_argument("--method", default="head", choices=list(ADAPT_METHODS))
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (and of the fine-tuning)")
    p.add_argument("--labelled-subset", default="train", help="subset of --split-file to draw from")
    p.add_argument("--held-out", default="val", help="subset of --split-file to evaluate on (never trained on)")
    p.add_argument("--source-data", help="both: the start run's dataset folder, if not where its config says "
                                          "(default: the run's)")
    p.add_argument("--steps", type=int, default=FINETUNE_DEFAULTS["steps"], help="fine-tuning optimizer steps")
    p.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=_finite_float, default=FINETUNE_DEFAULTS["lr"])
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores)")
    p.add_argument("--cache-dir", help="on-disk cache of decoded images (default: memory only)")
    _add_quiet_flag(p)
    p.set_defaults(func=cmd_adapt)

    from .config import DEFAULT_GUARD_ACCEPT as DEFAULT_ACCEPT, DEFAULT_SHIFT_GUARD as DEFAULT_DETECTOR
    from .registry import DETECTORS

    p = sub.add_parser("guard", help="fit a run's shift guard (train images; threshold on val), e.g. for a run "
                                     "saved before guards or another detector")
    _add_run_flag(p)
    p.add_argument("--detector", choices=list(DETECTORS), default=DEFAULT_DETECTOR,
                   help=f"shift score (default {DEFAULT_DETECTOR}; docs/shift.md compares them)")
    p.add_argument("--accept", type=_finite_float, default=DEFAULT_ACCEPT,
                   help="share of val images the threshold accepts (default 0.95)")
    p.set_defaults(func=cmd_guard)

    p = sub.add_parser("shift", help="is a folder of slices (another hospital's) like the run's training images?")
    _add_run_flag(p)
    p.add_argument("--data", required=True, help="folder of images or DICOM files (searched recursively; "
                                                 "labels not needed)")
    p.add_argument("--out", help="folder for shift.json, shift_scores.csv and shift_hist.png (default: none, the verdict on stdout)")
    p.add_argument("--alpha", type=_finite_float, default=0.01, help="test level of the verdict (default 0.01)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("train", help="train and evaluate one model")
    add_config_flags(p, required=("out",))
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (its checkpoints, "
                   "metrics and external results are removed once the new run's data has loaded)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="with --workers: local = worker processes on this machine (torch.distributed over "
                        "loopback); ray = a Ray Train TorchTrainer (pip install 'ct-transfer[ray]')")
    p.add_argument("--address", help="--executor ray: the cluster to join, auto or HOST:PORT (default: start Ray here)")
    _add_quiet_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run on its val and test, or on an external dataset")
    _add_run_flag(p)
    p.add_argument("--data", help="another dataset folder (folder per class): external validation, "
                                  "written to RUN/external/NAME/ (default: the run's own data)")
    p.add_argument("--split-file", help="split CSV of --data, with --subset: only that subset "
                                        "(default: the run's split, or all of --data)")
    p.add_argument("--subset", help="external: only this subset of --split-file (default: all of it)")
    p.add_argument("--class-map", help="external folder names to the run's classes, e.g. "
                                       "CT_COVID=COVID,CT_NonCOVID=non-COVID (default: the same names)")
    p.add_argument("--name", help="external: result folder name (default: the data folder's name)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("experiment", help="run the paper's grid of models x weights x seeds")
    add_config_flags(p, skip=GRID_FIELDS + ("split_preset",))
    p.add_argument("--split-preset", dest="grid_split_preset", choices=list(SPLIT_PRESETS),
                   help="split made when no --split-file is given (default: paper, unlike train's stratified: "
                        "the grid reproduces the paper's protocol)")
    p.add_argument("--out", required=True, help="grid directory")
    p.add_argument("--external", help="a second dataset folder: every run is also evaluated there (default: none)")
    p.add_argument("--model-set", choices=list(GRID_PRESETS), default="paper",
                   help="paper: the paper's 12 archs; offline: EfficientNetLite0/1/2 (ImageNet weights install here)")
    _alias(p, "--preset", "model_set", choices=list(GRID_PRESETS))
    p.add_argument("--models", help="comma-separated model names (default: the --model-set's)")
    p.add_argument("--weights", dest="grid_weights",  # a list, not TrainConfig.weights (set per run)
                   help="comma-separated: none,imagenet or paths; a list here, one value in train "
                        "(default: none,imagenet)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs at once on this machine (each with cores/N threads; a GPU is shared)")
    _add_quiet_flag(p)
    _add_executor_flags(p)
    p.add_argument("--cpus-per-run", type=_finite_float, default=1, help="ray: CPUs each run reserves")
    p.add_argument("--gpus-per-run", type=_finite_float, default=0,
                   help="ray: GPUs each run reserves; fractions share one GPU, e.g. 0.25")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("tune", help="hyper-parameter search on the validation set (Optuna; Ray Tune with --executor ray)")
    add_config_flags(p, skip=("out", "recipe", "workers"))  # trials run in one process each
    p.add_argument("--space", required=True, help="search space YAML (see docs/tune-space.yaml)")
    p.add_argument("--trials", type=int, required=True, help="number of trials")
    p.add_argument("--out", required=True, help="folder for best.yaml, trials.csv, search.md/png (and study.db)")
    p.add_argument("--metric", choices=["val_accuracy", "val_loss"], default="val_accuracy",
                   help="what the search optimises, on the validation subset")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler")
    _add_quiet_flag(p)
    _add_executor_flags(p)
    p.add_argument("--cpus-per-trial", type=_finite_float, default=1, help="ray: CPUs each trial reserves")
    p.add_argument("--gpus-per-trial", type=_finite_float, default=0, help="ray: GPUs each trial reserves")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="the decision-first report of a grid or of a single run")
    p.add_argument("grid_dir", metavar="GRID_OR_RUN", help="grid directory (from `experiment`) or one run directory")
    p.add_argument("--out", help="output folder (default: the grid directory; for a run: RUN/report)")
    p.add_argument("--audit", help="an audit folder (from `audit`) to summarise (default: audit/ inside or "
                                   "beside GRID_OR_RUN, if there)")
    p.add_argument("--grouped", help="a grid or run trained on the grouped split, set beside this one's "
                                     "figures (default: none; a grid on the grouped split is its own)")
    p.add_argument("--method", choices=sorted(METHODS), default="gradcam", help="explanation gallery method")
    p.add_argument("--no-gallery", action="store_true", help="leave out the explanation gallery")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="classify new images, folders or DICOM files with a trained run")
    _add_run_flag(p)
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), DICOM files, DICOM series "
                                             "folders, NIfTI (.nii, .nii.gz) or a .zip of a series")
    p.add_argument("--out", help="predictions file (.csv or .json); scans also write OUT.patients.csv/.json "
                                 "(default: a table on stdout)")
    _add_window_flag(p)
    p.add_argument("--batch-size", type=_int_in(1, 4096), default=64, help="images per forward pass (1..4096)")
    p.add_argument("--patient", action="store_true",
                   help="every folder given is one patient's scan (slice images included); DICOM series, "
                        "multi-frame DICOM, NIfTI and zips of a series are scans anyway")
    p.add_argument("--max-slices", type=_int_in(1, 100000),
                   help="scans: at most N lung slices, evenly spaced, per patient (default 64)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="heat-map overlays (Grad-CAM, Grad-CAM++, CAM, LRP) for images")
    _add_run_flag(p)
    p.add_argument("inputs", nargs="+", help="image files, folders or DICOM files")
    p.add_argument("--method", choices=sorted(METHODS), default="gradcam",
                   help="; ".join(f"{k} = {v}" for k, v in METHODS.items()))
    p.add_argument("--out", required=True, help="folder for the overlay PNGs: the input beside its heat map at "
                                                "the image's resolution, with a colour bar")
    p.add_argument("--target-layer", help="module name (default: the feature map the head pools)")
    _add_window_flag(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a run to ONNX or torch.export (.pt2), with a parity check")
    _add_run_flag(p)
    p.add_argument("--format", choices=["onnx", "pt2", "torchscript", "timm"], help="default: from the --out file "
                   "name (timm: a .safetensors file timm.create_model loads, with the classes in a .json beside it)")
    p.add_argument("--out", required=True, help="the exported model file (a .json description is written beside it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a local web page (and JSON API) to classify and explain scans with runs")
    _add_run_flag(p, action="append")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--max-upload-mb", type=int, default=100, help="largest request body in MB")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name browsers may use to reach the server besides localhost and --host "
                        "(repeat; * for any; default: none). Other Host headers are refused (DNS rebinding)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (already printed) and --help: a code, also in-process
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:  # `ct-transfer` alone: the usage once, then one error line
        parser.print_usage(sys.stderr)
        return _fail(f"choose a command: {', '.join(parser._subparsers._group_actions[0].choices)} "
                     "(ct-transfer --help says what each does)")
    # --json: stdout is the JSON document alone (the library's log lines would break it)
    restore_logging = _setup_logging(quiet=getattr(args, "quiet", False) or getattr(args, "json", False))
    try:
        args.func(args)
    except ConfigError as exc:
        return _fail(flagify(exc.as_flag(), parser))
    except CTTransferError as exc:
        return _fail(flagify(str(exc), parser))
    except KeyboardInterrupt:
        print("ct-transfer: interrupted (a run continues with --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ct-transfer ... | head`: the reader left; nothing to say
        sys.stderr.close()
        return 141
    except Exception as exc:
        if os.environ.get("CT_TRANSFER_DEBUG"):
            raise
        return _unexpected(exc)
    finally:
        restore_logging()
    return 0


def _option_names(parser=None) -> set[str]:
    """Every option the parser knows, by its Python name (``batch_size`` for ``--batch-size``)."""
    names = set()
    for sub in (parser or build_parser())._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            names.update(o[2:].replace("-", "_") for o in action.option_strings if o.startswith("--"))
    return names


_PARAM = re.compile(r"(?<![\w./-])([a-z][a-z0-9_]*)=")


def flagify(message: str, parser=None) -> str:
    """The library names parameters (``batch_size=0``); the CLI speaks in flags (``--batch-size 0``).
    Only names that are options of some command (of ``parser``, the one ``main`` built) are rewritten."""
    names = _option_names(parser)
    return _PARAM.sub(lambda m: f"--{m.group(1).replace('_', '-')} " if m.group(1) in names else m.group(0), message)


def _fail(message: str, code: int = 2) -> int:
    print(f"ct-transfer: error: {first_line(message, 600)}", file=sys.stderr)  # huge paths cut at a word
    return code


def _unexpected(exc: Exception) -> int:
    """Safety net (each case a bug to fix where the input enters): still one line, no traceback."""
    import torch

    if isinstance(exc, OSError):  # a file the code did not expect to fail: name it
        where = exc.filename or "a file"
        return _fail(f"{where}: {(exc.strerror or first_line(exc)).lower()}")
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return _fail("out of memory: choose a smaller --image-size, --batch-size or --limit")
    return _fail(f"internal error ({type(exc).__name__}: {first_line(exc, 120)}); please report it with "
                 "the command (CT_TRANSFER_DEBUG=1 shows the traceback)", code=1)


if __name__ == "__main__":
    sys.exit(main())
