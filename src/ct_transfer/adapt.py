"""Few-label site adaptation: from a trained run and N labelled slices of a new site to a run that
works there (issue #21, second half).

``draw_labels`` picks the N slices: stratified by class (proportional, at least one per class) and,
inside a class, spread over as many patients as possible (round robin over the patients in a
seeded order), so the same seed always gives the same files. ``adapt`` then starts from the run
and applies one of ``METHODS``:

- ``head``: the backbone stays as it is; a new linear head is fitted on the N slices' pooled
  features (the linear probe of ``engine/probe.py``, its ``C`` chosen by cross-validation *inside*
  the N slices, by patient where possible: nothing else is there to choose on).
- ``finetune``: the head refit above, then the network fine-tuned on the N slices (LP-FT: a fitted
  head keeps the first steps from wrecking the features), the ``cpu-fast`` way: the later half of
  the backbone and the head learn, BatchNorm statistics stay fixed, a fixed number of ``steps``.
- ``both``: the same, on the start run's own training images together with the N slices, every
  source counting equally (``balance="sources"``), so the first site is not forgotten.

Nothing of the new site's held-out patients (``held_out``, UCSD's official ``val``) is used for
training or for choosing anything: they are the adapted run's ``test`` subset. With N labels there
is nothing left to hold out, so the adapted run's ``val`` subset is the N labelled slices
themselves (un-augmented); the fine-tuning keeps the epoch that fits them best (in practice the
last). The drawn slices are written to ``RUN/labels.csv``; ``config.json`` gets an ``adaptation``
record (start run, method, N, seed, the head's C).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .errors import ConfigError, CTTransferError
from .registry import ADAPT_METHODS

log = logging.getLogger(__name__)

METHODS = ADAPT_METHODS  # registry.py: name -> what it does (the CLI's --method choices and help)
from .config import FINETUNE_DEFAULTS  # noqa: E402  (config.py: the CLI reads it without torch)


# -- drawing the labelled slices -----------------------------------------------------------------
def draw_labels(rows: list[dict], n: int, *, seed: int = 0, subset: str = "train") -> list[dict]:
    """``n`` rows of ``subset``, stratified by class and spread over patients (``group``); the
    same ``seed`` gives the same rows. Each class gets its share of ``n`` (largest remainder, at
    least one); inside a class the patients are visited in a seeded order, one slice each per round,
    so N slices cover min(N, patients) patients."""
    pool = [r for r in rows if r["subset"] == subset]
    classes = sorted({r["class"] for r in pool})
    if not pool:
        raise ConfigError("labels", n, f"the split has no '{subset}' rows to draw labelled slices from")
    if isinstance(n, bool) or not isinstance(n, int) or n < max(2, len(classes)):
        raise ConfigError("labels", n, f"choose at least {max(2, len(classes))} (one slice per class)")
    if n > len(pool):
        raise ConfigError("labels", n, f"the labelled set ('{subset}' rows) holds only {len(pool)} slices")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "choose an integer >= 0")
    by_class = {c: sorted((r for r in pool if r["class"] == c), key=lambda r: r["path"]) for c in classes}
    quota = _allocate(n, {c: len(v) for c, v in by_class.items()})
    rng = np.random.default_rng(seed)
    drawn = []
    for c in classes:  # sorted: the generator's draws happen in a fixed order
        patients: dict[str, list[dict]] = {}
        for r in by_class[c]:
            patients.setdefault(r.get("group") or r["path"], []).append(r)
        order = [sorted(patients)[i] for i in rng.permutation(len(patients))]
        queues = [[patients[p][i] for i in rng.permutation(len(patients[p]))] for p in order]
        picked, depth = [], 0
        while len(picked) < quota[c]:
            for q in queues:  # one slice of every patient per round
                if depth < len(q) and len(picked) < quota[c]:
                    picked.append(q[depth])
            depth += 1
        drawn += picked
    return sorted(({**r, "subset": "train"} for r in drawn), key=lambda r: (r["class"], r["path"]))


def _allocate(n: int, counts: dict[str, int]) -> dict[str, int]:
    """``n`` split over classes in proportion to ``counts`` (largest remainder), each >= 1 and <= its count."""
    total = sum(counts.values())
    exact = {c: n * k / total for c, k in counts.items()}
    quota = {c: max(1, min(counts[c], math.floor(v))) for c, v in exact.items()}
    while sum(quota.values()) < n:  # the largest remainders (then the largest class) get the rest
        c = max((c for c in counts if quota[c] < counts[c]), key=lambda c: (exact[c] - quota[c], counts[c], c))
        quota[c] += 1
    while sum(quota.values()) > n:  # the at-least-one rule overshot: take from the largest quota
        c = max((c for c in counts if quota[c] > 1), key=lambda c: (quota[c] - exact[c], quota[c], c))
        quota[c] -= 1
    return quota


# -- the head refit -----------------------------------------------------------------------------
def refit_head(features: np.ndarray, y: np.ndarray, groups, *, num_classes: int, seed: int = 0):
    """Linear probe on ``features`` with ``C`` chosen by cross-validation inside these slices
    (``StratifiedGroupKFold`` by patient when there are enough patients, else ``StratifiedKFold``;
    up to 5 folds, at least 2 slices per class and fold needed, else the probe's strongest
    regularisation). Returns ``engine.probe.ProbeResult`` fitted on all of them."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from .engine import probe as P

    y = np.asarray(y)
    groups = np.asarray(groups)
    min_class = int(np.bincount(y, minlength=num_classes)[np.unique(y)].min())
    k = min(5, min_class)
    scores = np.zeros(len(P.C_GRID))
    if k >= 2:
        n_groups = min(len(set(groups[y == c])) for c in np.unique(y))
        splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if n_groups >= k
                    else StratifiedKFold(k, shuffle=True, random_state=seed))
        for tr, va in splitter.split(features, y, groups):
            if len(np.unique(y[tr])) < 2 or len(va) == 0:
                continue
            res = P.fit_probe(features[tr], y[tr], features[va], y[va], num_classes=num_classes, seed=seed)
            # accuracy first, then log-loss (as the probe's own rule), summed over folds
            scores += np.array([g["val_acc"] * len(va) - 1e-3 * g["val_loss"] * len(va) for g in res.grid])
        best = int(np.argmax(scores))  # argmax: ties keep the first, the stronger regularisation
    else:
        best = 0
    C = P.C_GRID[best]
    res = P.fit_probe(features, y, features, y, num_classes=num_classes, c_grid=(C,), seed=seed)
    res.grid = [{"C": c, "cv_score": round(float(s), 6)} for c, s in zip(P.C_GRID, scores)] if k >= 2 else []
    return res


def labelled_features(run, x_u8: torch.Tensor) -> np.ndarray:
    """Pooled backbone features of the run (un-augmented, its normalisation, eval mode)."""
    from .engine.loop import pooled_features

    return pooled_features(run.model, x_u8.to(run.device), run.transform, device=run.device,
                           channels_last=run.config.get("channels_last", True), batch_size=64).cpu().numpy()


# -- adapt ---------------------------------------------------------------------------------------
def adapt(*, run, data, split_file, labels: int, method: str = "head", out=None, seed: int = 0,
          labelled_subset: str = "train", held_out: str = "val", source_data=None,
          steps: int = FINETUNE_DEFAULTS["steps"], batch_size: int = FINETUNE_DEFAULTS["batch_size"],
          lr: float = FINETUNE_DEFAULTS["lr"], threads: int | None = None, cache_dir=None,
          progress: bool = False):
    """Adapt the trained ``run`` (a run folder) to the site of ``data`` with ``labels`` of its
    labelled slices (the ``labelled_subset`` rows of ``split_file``); metrics on its ``held_out``
    rows. Returns the adapted ``Run`` (written to ``out`` when given; ``out=None`` writes nothing).

    ``steps``: optimizer steps of the fine-tuning (``finetune``, ``both``), whatever N is, so the
    cost does not grow with N; ``batch_size`` at most N.
    """
    from .run import load_run

    # every check before any work or write: bad input leaves every file as it was
    METHODS.check(method)
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(name, v, f"choose an integer >= {lo}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 10:
        raise ConfigError("lr", lr, "choose a finite number in (0, 10]")
    if not isinstance(data, (str, os.PathLike)) or not Path(data).is_dir():
        raise CTTransferError(f"{data}: dataset folder not found")
    if split_file is None or not Path(split_file).is_file():
        raise CTTransferError(f"{split_file}: split file not found (the new site's labelled and held-out slices)")
    if out is not None:
        _check_out(out)
    start = load_run(run)
    rows = D.read_split(split_file, data)
    drawn = draw_labels(rows, labels, seed=seed, subset=labelled_subset)
    test_rows = [{**r, "subset": "test"} for r in rows if r["subset"] == held_out]
    if not test_rows:
        raise ConfigError("held_out", held_out, f"{split_file} has no '{held_out}' rows to evaluate on")
    unknown = sorted({r["class"] for r in drawn + test_rows} - set(start.classes))
    if unknown:
        raise CTTransferError(f"{split_file}: class(es) {', '.join(unknown)} are not the run's ({', '.join(start.classes)})")
    held_paths = {r["path"] for r in test_rows}
    if any(r["path"] in held_paths for r in drawn):  # a split file listing one slice twice
        raise CTTransferError(f"{split_file}: a labelled slice is also in the held-out '{held_out}' rows")
    source_rows, source_dir = [], None
    if method == "both":
        source_dir = source_data or start.config.get("data")
        if not isinstance(source_dir, (str, os.PathLike)) or not Path(source_dir).is_dir():
            raise ConfigError("source_data", source_dir, "the start run's dataset folder is not here; give it")
        source_rows = [r for r in start.split if r["subset"] in ("train", "test")]
        if not any(r["subset"] == "train" for r in source_rows):
            raise CTTransferError(f"{start.directory}: the start run has no split.csv with train rows ('both' needs them)")

    # 1. the head refit on the drawn slices (every method starts with it)
    x, y, kept, bad = D.load_subset(drawn, "train", start.classes, data, start.preprocess,
                                    cache_dir=cache_dir, on_bad="error")
    t = _threads(threads)
    try:
        feats = labelled_features(start, x)
        res = refit_head(feats, y.numpy(), [r.get("group") or r["path"] for r in kept],
                         num_classes=len(start.classes), seed=seed)
        from .engine import probe as P

        P.load_into_fc(start.model.fc, res.weight, res.bias)
        record = {"start_run": str(start.directory), "method": method, "labels": int(labels), "seed": int(seed),
                  "data": str(data), "split_file": str(split_file), "labelled_subset": labelled_subset,
                  "held_out": held_out, "head_C": res.C, "head_cv": res.grid,
                  "patients": len({r.get("group") or r["path"] for r in kept})}
        if method == "head":
            adapted = _head_run(start, drawn, test_rows, x, y, data, record, cache_dir)
        else:
            record.update(steps=steps, batch_size=min(batch_size, labels), lr=lr)
            adapted = _finetune_run(start, drawn, test_rows, data, record, source_rows=source_rows,
                                    source_dir=source_dir, out=out, threads=threads, cache_dir=cache_dir,
                                    progress=progress)
    finally:
        torch.set_num_threads(t)
    if out is not None:
        adapted.save(out)
        D.write_split(drawn, Path(out) / "labels.csv")
    return adapted


def refit_guard(run, train, val):
    """The shift guard follows the adapted run's split: refitted on its train images (the N slices,
    plus the start run's training images for ``both``), its threshold on its val (the N slices),
    so the new site's slices are accepted. Returns the guard's facts (what predictor.json records)."""
    from .shift import fit_guard

    return fit_guard(run, train=train, val=val, save=False).facts()


def _threads(threads):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    return before


def _check_out(out) -> None:
    from . import _io
    from .rundir import RunDir

    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("out", out, "exists and is not a folder")
    if RunDir(out).is_run():
        raise CTTransferError(f"{out}: already holds a run; choose another folder")
    _io.check_writable(out)


def _adapted_config(start, record: dict, split_rows: list[dict]) -> dict:
    return {**start.config, "adaptation": record, "weights": str(start.directory),
            "split_file": None, "data": record["data"]}


def _head_run(start, drawn, test_rows, x, y, data, record, cache_dir):
    from .run import Run, _Loaded

    xt, yt, kept_t, _ = D.load_subset(test_rows, "test", start.classes, data, start.preprocess,
                                      cache_dir=cache_dir, on_bad="skip")
    rows = drawn + kept_t  # each file in one subset (read_split's rule); the val is labels.csv's slices
    cfg = {**_adapted_config(start, record, rows), "strategy": "linear"}
    run = Run(model=start.model.eval(), config=cfg, classes=start.classes, preprocess=start.preprocess,
              split=rows, device=start.device)  # a new predictor: no calibration, no guard of the start run
    labelled = _Loaded(x, y, drawn)
    record["guard"] = refit_guard(run, labelled, labelled)
    run.metrics = run.evaluate_subsets({"val": labelled, "test": _Loaded(xt, yt, kept_t)})
    run.metrics.update(adaptation=record, model=start.config.get("model"), classes=start.classes)
    return run


_VAL = "labelled-val"  # the temporary folder of the val rows' second names


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        import shutil

        shutil.copyfile(src, dst)


def _finetune_run(start, drawn, test_rows, data, record, *, source_rows, source_dir, out, threads,
                  cache_dir, progress):
    """Fine-tuning through ``fit``: the start is the head-refitted model, saved as a checkpoint in a
    temporary folder (``weights`` takes a run's checkpoint); the split lists the drawn slices as
    train, the held-out rows as test (and, for ``both``, the start run's rows), and the drawn slices
    again as val. A split file lists each file once (``read_split`` refuses a file in two subsets,
    against leaks), so the val rows name hard links (copies where links fail) of the drawn slices
    in a temporary copy of the new site's folder; the saved run's split.csv names the real files,
    without the val rows (``labels.csv`` lists them)."""
    from .config import TrainConfig
    from .engine import fit

    n = len(drawn)
    val = [{**r, "subset": "val"} for r in drawn]
    with tempfile.TemporaryDirectory(prefix="ct-adapt-") as tmp:
        ckpt = Path(tmp) / "best.pt"
        torch.save({"model": {k: v.detach().cpu() for k, v in start.model.state_dict().items()},
                    "classes": start.classes, "epoch": 0}, ckpt)
        site = Path(tmp) / Path(data).resolve().name  # same folder name: same source name
        for r in drawn + test_rows:
            _link(Path(data) / r["path"], site / r["path"])
        for r in val:
            _link(Path(data) / r["path"], site / _VAL / r["path"])
        val_fit = [{**r, "path": f"{_VAL}/{r['path']}"} for r in val]
        if source_rows:
            datasets = [str(source_dir), str(site)]
            names = list(D.source_names(datasets))
            fit_rows = [{**r, "source": names[0]} for r in source_rows] + \
                       [{**r, "source": names[1]} for r in drawn + val_fit + test_rows]
            rows = [{**r, "source": names[0]} for r in source_rows] + \
                   [{**r, "source": names[1]} for r in drawn + test_rows]
        else:
            datasets, fit_rows, rows = str(site), drawn + val_fit + test_rows, drawn + test_rows
        split = Path(tmp) / "split.csv"
        D.write_split(fit_rows, split)
        bs = min(record["batch_size"], n)
        per_epoch = max(1, (2 * n if source_rows else n) // bs)
        pre = start.preprocess
        cfg = TrainConfig(
            data=datasets, split_file=str(split), model=start.config["model"], weights=str(ckpt), out=None,
            image_size=pre.image_size, crop=pre.crop, intensity=pre.intensity,
            # the cpu-fast recipe's way from a probe head: the first half of the backbone frozen
            # (cheaper steps) and every BatchNorm keeping its statistics; in train mode, batches of
            # 8 augmented slices moved them so far that the fitted head's loss jumped to 3.3
            strategy="partial", bn_stats="frozen",
            epochs=max(1, math.ceil(record["steps"] / per_epoch)), batch_size=bs, lr=float(record["lr"]),
            optimizer="adamw", weight_decay=0.01, schedule="cosine", label_smoothing=0.1,
            dropout=0.2, seed=int(record["seed"]),  # light: the head is fitted already (cpu-fast)
            balance="sources" if source_rows else "none", tta=start.config.get("tta", "none"),
            threads=threads, cache_dir=None if cache_dir is None else str(cache_dir),
            channels_last=bool(start.config.get("channels_last", True)))
        run = fit(cfg, progress=progress)
    datasets = [str(source_dir), str(data)] if source_rows else str(data)
    record.update(epochs=cfg.epochs, best_epoch=run.metrics.get("best_epoch"),
                  guard="fitted by fit on the adapted split" if run.predictor.guard is not None
                  else "not refitted (this version has no shift guard)")
    run.config = {**_adapted_config(start, record, rows), **{k: run.config[k] for k in (
        "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing", "strategy",
        "balance", "seed")}, "data": datasets}
    run.split = rows
    run.metrics["adaptation"] = record
    return run
