"""External validation: a trained run on another folder-per-class dataset (another hospital).

Writes ``RUN/external/NAME/metrics.json`` (``{"name", "data", "metrics", ...}``, the metrics of
``compute_metrics`` with 95% intervals and, for a calibrated run, the val-chosen operating point)
and ``RUN/external/NAME/predictions.csv`` (one row per image). Nothing is tuned on the external set.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from . import _io
from . import data as D
from .errors import ConfigError, CTTransferError
from .evaluate import write_predictions

log = logging.getLogger(__name__)


def parse_class_map(text: str | dict | None) -> dict[str, str]:
    """``"CT_COVID=COVID,CT_NonCOVID=non-COVID"`` -> {external folder: run class} (the training
    option's parser: one check for both)."""
    from .config import parse_class_map as parse

    return {} if text is None else parse(text)


def external_rows(run_classes: list[str], data, *, class_map=None, split_file=None, subset=None) -> list[dict]:
    """The external images as split rows (subset ``external``) labelled with the run's classes."""
    data = Path(data)
    if not data.is_dir():
        raise CTTransferError(f"{data}: external dataset folder not found")
    if split_file:
        rows = D.read_split(split_file, data)
        if subset:
            rows = [r for r in rows if r["subset"] == subset]
            if not rows:
                raise CTTransferError(f"{split_file}: no images in subset '{subset}'")
    else:
        if subset:
            raise ConfigError("subset", subset, "only with a split file")
        items, _ = D.scan_folder(data)
        rows = [{"path": it.path, "class": it.label, **({"slice": it.slice} if it.slice is not None else {}),
                 **({"patient": it.patient} if it.patient else {})} for it in items]
    mapping = parse_class_map(class_map)
    found = sorted({r["class"] for r in rows})
    unknown = [dst for dst in mapping.values() if dst not in run_classes]
    if unknown:
        raise ConfigError("class_map", _map_text(mapping), f"unknown class '{unknown[0]}' "
                          f"(the run's classes: {', '.join(run_classes)})")
    absent = [src for src in mapping if src not in found]
    if absent:
        raise ConfigError("class_map", _map_text(mapping), f"{data} has no class folder '{absent[0]}' "
                          f"(found: {', '.join(found)})")
    labelled = [{**r, "class": mapping.get(r["class"], r["class"]), "subset": "external"} for r in rows]
    extra = sorted({r["class"] for r in labelled} - set(run_classes))
    if extra:
        raise CTTransferError(f"{data}: class '{extra[0]}' is not one of the run's classes "
                              f"({', '.join(run_classes)}); map it with class_map={extra[0]}=CLASS")
    missing = [c for c in run_classes if c not in {r["class"] for r in labelled}]
    if missing:
        raise CTTransferError(f"{data}: no images of the run's class '{missing[0]}' (found: {', '.join(found)}); "
                              "give class_map=FOLDER=CLASS")
    return labelled


def _map_text(mapping: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def default_name(data, subset: str | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).resolve().name).strip("-") or "external"
    return f"{name}-{subset}" if subset else name


def evaluate_external(run, data, *, name: str | None = None, class_map=None, split_file=None,
                      subset: str | None = None, write: bool = True, near_duplicates: bool = True,
                      allow_shared: bool = False) -> dict:
    """Evaluate ``run`` on ``data``; returns (and writes) ``{"name", "data", "metrics", ...}``.

    A set that shares files with the run's own data (same resolved path or same bytes) is refused
    (``allow_shared=True``: evaluated and labelled instead, e.g. to compare prediction paths on known
    images); one with near-duplicates of them (the audit's pHash) is evaluated but labelled not
    independent (``"independent": false`` in metrics.json, a warning on the serve card)."""
    name = name or default_name(data, subset)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ConfigError("name", name, "use letters, digits, '.', '_' or '-' (it names a folder)")
    rows = external_rows(run.classes, data, class_map=class_map, split_file=split_file, subset=subset)
    independence = check_independent(run, data, rows, near=near_duplicates, allow_shared=allow_shared)
    x, y, kept, bad = D.load_subset(rows, "external", run.classes, data, run.preprocess, on_bad="skip")
    if len(kept) == 0:
        raise CTTransferError(f"{data}: no readable images")
    paths, labels, outputs, rows = run.predict_subsets({"external": _Subset(x, y, kept)})["external"]
    result = run.score(labels, outputs, rows)
    record = {"name": name, "data": str(data), "split_file": str(split_file) if split_file else None,
              "subset": subset, "class_map": parse_class_map(class_map) or None, "skipped": bad,
              "temperature": run.temperature, "threshold": run.threshold,
              "calibration": calibration_used(run), "metrics": result,
              "independent": independence["independent"], "independence": independence}
    scores = outputs.shift_score
    if scores is not None:  # set level: is this set like the run's training images? (selective: in metrics)
        from .shift import set_test

        record["shift"] = {"detector": run.guard.name,
                           **set_test(scores, run.guard.val_scores.numpy(), float(run.guard.threshold))}
    if write:
        if run.directory is None:
            raise CTTransferError("this run has no directory; save it first (Run.save) or pass write=False")
        folder = _io.ensure_writable_dir(Path(run.directory) / "external" / name)
        write_predictions(folder / "predictions.csv", paths, labels, outputs, run.classes, rows=rows)
        if scores is not None:
            from .evaluate import save_figure
            from .shift import histogram_figure

            save_figure(histogram_figure(scores, run.guard.val_scores.numpy(), float(run.guard.threshold),
                                         f"{name} vs val · {run.guard.name}"), folder / "shift_hist.png")
        _io.write_json(folder / "metrics.json", record)
        record["path"] = str(folder / "metrics.json")
        if (Path(run.directory) / "tracking.json").is_file():  # a tracked run: the trackers get it too
            from .tracking import log_external

            log_external(run.directory, record)
        if (Path(run.directory) / "config.json").is_file():  # the model card lists every external result
            from .modelcard import write_model_card

            write_model_card(run.directory)
    log.info("external %s: %d images, accuracy %.4f", name, result["n"], result["accuracy"])
    if not independence["independent"]:
        log.warning("external %s is NOT independent of the run's data: %s", name, independence["why"])
    return record


def calibration_used(run) -> dict:
    """What an external result was computed with: temperature, threshold, their fingerprint and status."""
    from .calibration import fingerprint

    cal = run.predictor.calibration
    return {"temperature": run.temperature, "threshold": run.threshold,
            "fingerprint": fingerprint(run.temperature, run.threshold),
            "status": (cal.facts or {}).get("status") or ("fitted" if cal.fitted else "uncalibrated")}


def is_current(run_dir, path) -> bool:
    """Is the external result at ``path`` there, readable and computed with the run's calibration now?"""
    from .calibration import fingerprint, record_fingerprint
    from .inference import read_calibration

    try:
        record = _io.read_json(path, what="external metrics")
        cal = read_calibration(run_dir, _io.read_json(Path(run_dir) / "config.json", what="run config"))
    except CTTransferError:
        return False
    return "stale" not in record and record_fingerprint(record) == fingerprint(cal.temperature, cal.threshold)


def refresh_external(run) -> list[dict]:
    """After a new calibration: every ``RUN/external/NAME/metrics.json`` computed with another one is
    evaluated again when its data is still there, else marked ``stale`` (kept, with the reason and
    the calibration now in force). Returns ``[{name, status: current|refreshed|stale}]``."""
    from .calibration import fingerprint, record_fingerprint

    out = []
    root = Path(run.directory) / "external" if run.directory else None
    if root is None or not root.is_dir():
        return out
    now = fingerprint(run.temperature, run.threshold)
    for path in sorted(root.glob("*/metrics.json")):
        try:
            record = _io.read_json(path, what="external metrics")
        except CTTransferError as exc:
            log.warning("%s: left as it is (%s)", path, exc)
            continue
        name = record.get("name") or path.parent.name
        if record_fingerprint(record) == now:
            out.append({"name": name, "status": "current"})
            continue
        data, split_file = record.get("data"), record.get("split_file")
        if data and Path(data).is_dir() and (not split_file or Path(split_file).is_file()):
            try:
                independence = record.get("independence") or {}
                evaluate_external(run, data, name=path.parent.name, class_map=record.get("class_map"),
                                  split_file=split_file, subset=record.get("subset"),
                                  near_duplicates=not independence or independence.get("near_duplicates") is not None,
                                  allow_shared=bool(independence.get("same_files")))  # as it was made
                out.append({"name": name, "status": "refreshed"})
                continue
            except CTTransferError as exc:  # the data changed since: stale, with the reason
                why = f"re-evaluation failed ({exc})"
        else:
            why = f"its data ({data}) is not here to re-evaluate"
        record["stale"] = {"reason": f"computed with another calibration (fingerprint {record_fingerprint(record)}, "
                                     f"now {now}); {why}",
                           "calibration_now": calibration_used(run)}
        _io.write_json(path, record)
        log.warning("external %s: stale (%s)", name, record["stale"]["reason"])
        out.append({"name": name, "status": "stale"})
    return out


class _Subset:
    def __init__(self, x, y, rows):
        self.x, self.y, self.rows = x, y, rows


def run_files(run) -> tuple[list[Path], list[dict]] | None:
    """The run's own images (every subset of its split) as files, or None when its data folder is gone."""
    data = run.config.get("data")
    if not data or not run.split:
        return None
    root = D.data_root(data)
    roots = list(root.values()) if isinstance(root, dict) else [root]
    if any(not Path(r).is_dir() for r in roots):
        return None
    rows = [r for r in run.split if D.row_path(r, root).is_file()]
    return [D.row_path(r, root) for r in rows], rows


def check_independent(run, data, rows: list[dict], *, near: bool = True, allow_shared: bool = False) -> dict:
    """Is the external set apart from the run's data? Shared files (resolved path or sha256 of the
    bytes) are refused; near-duplicates (pHash distance <= the audit's threshold) are counted."""
    from .data import groups as G

    ext_files = [Path(data) / r["path"] for r in rows]
    mine = run_files(run)
    if mine is None:
        return {"checked": False, "independent": True, "why": "the run's data folder is not here: not checked"}
    run_paths, run_rows = mine
    real = {str(Path(f).resolve()): r for f, r in zip(run_paths, run_rows)}
    same = [(f, real[str(f.resolve())]) for f in ext_files if str(f.resolve()) in real]
    if not same:
        digests = D.content_digests([*map(str, run_paths), *map(str, ext_files)])
        by_digest = {digests[str(f)]: r for f, r in zip(run_paths, run_rows) if str(f) in digests}
        same = [(f, by_digest[digests[str(f)]]) for f in ext_files if digests.get(str(f)) in by_digest]
    if same and allow_shared:
        f, r = same[0]
        return {"checked": True, "same_files": len(same), "independent": False, "near_duplicates": None,
                "why": f"{len(same)} of its {len(ext_files)} images are the run's own data (e.g. {D.shown(f)} = "
                       f"{r['path']} in the run's {r['subset']} subset); not an external validation"}
    if same:
        f, r = same[0]
        raise CTTransferError(f"{data}: {len(same)} of its {len(ext_files)} images are the run's own data "
                              f"(e.g. {D.shown(f)} = {r['path']} in the run's {r['subset']} subset); an external "
                              "set must not share files with the training data")
    record = {"checked": True, "same_files": 0, "independent": True, "why": "no shared or near-duplicate images",
              "near_duplicates": None, "threshold": G.DEFAULT_THRESHOLD}
    if near:
        # pHash compares images: volume slices (rows with a slice) are left out on both sides
        flat = [(f, r) for f, r in zip(run_paths, run_rows) if r.get("slice") in (None, "")]
        run_rows = [r for _, r in flat]
        rows = [r for r in rows if r.get("slice") in (None, "")]
        fa = [G.fingerprint(f, r["path"]) for f, r in flat]
        fb = G.fingerprints(data, [r["path"] for r in rows])
        pairs = G.close_pairs(fa, fb, threshold=G.DEFAULT_THRESHOLD)
        record["near_duplicates"] = len(pairs)
        record["pairs"] = [{"run": fa[i].path, "subset": run_rows[i]["subset"], "external": fb[j].path,
                            "distance": d} for i, j, d, _ in pairs[:20]]
        if pairs:
            images = len({j for _, j, _, _ in pairs})
            record.update(independent=False, why=f"{images} of its {len(rows)} images are near-duplicates of the "
                          f"run's images (pHash distance <= {G.DEFAULT_THRESHOLD}); not an external validation")
    return record
