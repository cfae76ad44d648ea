"""``fit``: train one model on one split and return a ``Run``.

The engine keeps every decoded image in one uint8 tensor on the device, augments whole batches
with tensor ops (independent random parameters per image) and runs without DataLoader workers.
Every epoch's random state derives from (seed, epoch), so a resumed run continues exactly as an
unbroken one. Everything besides the step (checkpoints, history, progress, stopping) is a callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data as D
from .. import models as M
from .. import _io
from .._io import ensure_writable_dir
from ..config import TrainConfig
from ..errors import CTTransferError, first_line, show
from ..inference import autocast, predict_proba
from ..progress import track
from ..rundir import RunDir
from ..run import Run
from . import callbacks as C
from . import probe as P
from .data import load_subsets, split_rows
from .strategies import apply_strategy, set_train_mode

log = logging.getLogger("ct_transfer.engine")


@dataclass
class TrainState:
    """What callbacks see: the model, optimizer and progress of one fit."""

    config: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    classes: list[str]
    device: str
    n_train: int
    epoch: int = 0  # epochs completed
    history: list = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    train_seconds: float = 0.0
    improved: bool = False
    stop: bool = False
    scheduler: object = None  # stepped once per optimizer step
    end_epoch: int | None = None  # None: config.epochs
    extra: dict = field(default_factory=dict)  # strategy facts for metrics.json (the linear probe's C, ...)
    subsets: dict | None = None  # the decoded train/val/test tensors (callbacks may evaluate on them)
    ema: object = None  # timm ModelEmaV3 of the model (--ema), or None
    train_pool: object = None  # --balance sources: the train images' source ids (each epoch draws evenly)
    val_sources: tuple = ((), None)  # (names, per-image source id) of the val images; names empty: one source
    progress: bool = False  # fit(progress=True): long steps (feature extraction) report their progress
    dist: object = None  # workers > 1: this process's place in the group (engine/workers.py Dist); None alone
    batch_index: object = None  # the train indices of the batch just stepped (on_batch_end; full/partial)

    @property
    def rank(self) -> int:
        """This worker's rank (0 when training alone): rank 0 writes the run."""
        return 0 if self.dist is None else self.dist.rank

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, best.safetensors and the final model use: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _epoch_generator(seed: int, epoch: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 100_003 + epoch)
    return g


def balanced_pool(sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's image indices with every source equally represented: as many images of each
    source as the smallest has, the larger sources subsampled afresh every epoch (all their images
    are seen over the epochs). ``sources``: per-image source id, on the generator's device."""
    m = pool_size(sources, len(sources)) // len(torch.unique(sources))
    parts = [idx[torch.randperm(len(idx), generator=generator, device=generator.device)[:m]]
             for s in torch.unique(sources) for idx in [torch.nonzero(sources == s).flatten()]]
    return torch.cat(parts)


def pool_size(sources: torch.Tensor | None, n: int) -> int:
    """Images per epoch: ``n``, or with a balanced pool (number of sources x the smallest source)."""
    if sources is None:
        return n
    _, counts = torch.unique(sources, return_counts=True)
    return int(len(counts) * counts.min())


def _batches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = False, sources=None,
             single: bool = False, rank: int = 0, world: int = 1):
    """Shuffled index batches. ``drop_last``: only full batches (static shapes for compiled/graphed
    steps; the dropped images change every epoch with the shuffle). ``sources``: draw the epoch from
    ``balanced_pool`` instead of every image once. ``single``: one-image batches are kept
    (batch size 1, allowed only where no BatchNorm layer learns batch statistics). ``world`` > 1:
    this ``rank``'s share of each step (``_shard``)."""
    pool = None if sources is None else balanced_pool(sources, generator)
    if pool is not None:
        n = len(pool)
    perm = torch.randperm(n, generator=generator, device=generator.device)
    if pool is not None:
        perm = pool[perm]
    if world > 1:
        yield from _shard(perm, batch_size, rank, world, drop_last=drop_last)
        return
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if drop_last and len(idx) < batch_size and n >= batch_size:
            return
        if len(idx) > 1 or n == 1 or single:  # a lone last image would break BatchNorm
            yield idx


def _shard(perm: torch.Tensor, batch_size: int, rank: int, world: int, *, drop_last: bool = False):
    """Data-parallel batches: every worker draws the same epoch permutation (same seeded generator),
    cuts it into steps of ``batch_size x world`` images and takes every ``world``-th image of each
    step from its ``rank`` on. No image is padded in or repeated (unlike DistributedSampler's
    padding): each image is seen at most once per epoch across workers, and exactly once except a
    last step too small to give every worker 2 images (BatchNorm), dropped as the one-process loop
    drops a lone last image; every worker takes the same number of steps (DDP needs that)."""
    step = batch_size * world
    for start in range(0, len(perm), step):
        chunk = perm[start:start + step]
        if len(chunk) < step and (drop_last or len(chunk) < 2 * world):
            return
        yield chunk[rank::world]


def make_optimizer(cfg: TrainConfig, params):
    """The optimizer with multi-tensor kernels: PyTorch picks foreach only on CUDA by default; on the
    CPU the per-parameter Adam loop (hundreds of small tensors) cost ~10 % of a step. The update is
    the same math either way (fused Adam on the CPU rounds slightly differently, so foreach is used)."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                               foreach=True)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False, world: int = 1) -> int:
    """Optimizer steps per epoch, as ``_batches`` yields them (a lone last image is skipped)."""
    if world > 1:  # as ``_shard`` cuts the epoch
        full, tail = divmod(n, batch_size * world)
        return full + (1 if tail and not drop_last and tail >= 2 * world else 0)
    if drop_last and n >= batch_size:
        return n // batch_size
    return n // batch_size + (1 if n % batch_size > 1 or n == 1 else 0)


def epoch_size(cfg: TrainConfig, epoch: int) -> int:
    """Progressive resizing: the training size of ``epoch`` (0-based). From ``resize_from`` up to
    ``image_size`` in steps of 32 px over the first half of training; the second half at full size,
    so BatchNorm statistics and the head end at the size evaluation uses."""
    if not cfg.resize_from or cfg.resize_from >= cfg.image_size:
        return cfg.image_size
    ramp = cfg.epochs // 2
    if epoch >= ramp:
        return cfg.image_size
    size = cfg.resize_from + (cfg.image_size - cfg.resize_from) * epoch / max(ramp, 1)
    return int(min(cfg.image_size, max(cfg.resize_from, round(size / 32) * 32)))


def make_scheduler(cfg: TrainConfig, opt, steps: int):
    total = max(1, cfg.epochs * steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total + 1)
    return None


def _check_out(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> RunDir | None:
    """Fail before any work: an occupied run directory, or one that cannot be written."""
    if cfg.out is None:
        return None
    rundir = RunDir(cfg.out)
    present = rundir.run_files()
    if present and not resume and not overwrite:  # also a finished run whose last.pt is gone
        raise CTTransferError(f"{cfg.out}: already holds a run ({', '.join(present)}); give resume=True to continue "
                              "it, overwrite=True to replace it, or choose another out=")
    _io.check_writable(cfg.out)  # a real probe file: os.access says yes to root on a read-only mount
    return rundir


# Options a resumed run may change: how and where it runs, not what it learns. Epochs may grow.
RESUMABLE = {"out", "epochs", "threads", "device", "cache_dir", "checkpoint_every", "on_bad", "recipe",
             "split_file", "limit", "calibrate", "sensitivity"}


def _resumed_config(cfg: TrainConfig, rundir: RunDir) -> TrainConfig:
    """A resumed run uses its own saved config and split (already limited), with the new epochs.
    An option given with another value than the run's is refused, naming it (an option left at its
    default takes the run's value: the command line cannot tell it from one not given)."""
    from dataclasses import fields

    saved = rundir.read_config()
    defaults = TrainConfig.__dataclass_fields__
    differ = []
    for f in fields(TrainConfig):
        if f.name in RESUMABLE or f.name not in saved:
            continue
        given, old = getattr(cfg, f.name), saved[f.name]
        if f.name == "data":
            same = [os.path.realpath(d) for d in cfg.datasets] == \
                [os.path.realpath(str(d)) for d in ([old] if isinstance(old, str) else list(old or []))]
        elif f.name == "model":
            same = _same_model(given, old)
        else:
            default = f.default if f.default is not MISSING else None
            same = given == old or given == default
        if not same:
            differ.append(f"{f.name} {show(given)} (the run has {show(old)})")
    given_files = [f for f in cfg.split_files if f]
    saved_files = saved.get("split_file") or []
    saved_files = [saved_files] if isinstance(saved_files, str) else list(saved_files)
    allowed = {os.path.realpath(str(f)) for f in saved_files if f not in ("", "-")} | {
        os.path.realpath(rundir / "split.csv")}
    if any(os.path.realpath(str(f)) not in allowed for f in given_files):  # the run's own split.csv is fine
        differ.append(f"split_file {show(cfg.split_file)} (the run has {show(saved.get('split_file'))})")
    if differ:
        raise CTTransferError(f"{rundir.path}: resume=True continues the run with its own options; these differ: "
                              + "; ".join(differ) + ". Leave them out, or train a new run into another out=")
    try:
        return TrainConfig.from_dict({**saved, "out": cfg.out, "epochs": cfg.epochs,
                                      "split_file": str(rundir / "split.csv"), "limit": None,
                                      **{k: getattr(cfg, k) for k in ("threads", "device", "cache_dir", "on_bad",
                                                                      "checkpoint_every", "calibrate", "sensitivity")
                                         if getattr(cfg, k) != defaults[k].default}})
    except (TypeError, ValueError) as exc:
        raise CTTransferError(f"{rundir / 'config.json'}: not a valid run config ({exc})") from None


def _same_model(a, b) -> bool:
    if a == b:
        return True
    try:
        return M.resolve(a).timm_name == M.resolve(b).timm_name
    except Exception:  # an unknown name: only the same text is the same model
        return False


def fit(config: TrainConfig, *, callbacks=(), progress: bool = True, resume: bool = False,
        test: bool = True, overwrite: bool = False) -> Run:
    """Train ``config.model`` on ``config.data``; returns the trained ``Run`` (see ``_fit``).
    ``config.threads`` applies to this fit only: the process's torch thread count and random
    state are put back. ``overwrite``: replace a run already in ``config.out`` (refused otherwise,
    unless ``resume``). One writer per run folder: ``RUN/.lock`` is held while the run is written.
    This is the one-process fit; ``ct_transfer.fit`` (``engine/workers.py``) also starts workers."""
    if config.workers > 1:
        raise CTTransferError(f"workers={config.workers}: engine.loop.fit trains in this process; call "
                              "ct_transfer.fit, which starts the workers")
    threads = torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        # the fit seeds torch's global generator (head init, dropout per epoch, exact on resume);
        # forking it gives the caller's random state back unchanged afterwards
        with torch.random.fork_rng(devices=devices):
            return _fit(config, callbacks=callbacks, progress=progress, resume=resume, test=test,
                        overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)


def _fit(config: TrainConfig, *, callbacks=(), progress: bool = True, resume: bool = False,
         test: bool = True, overwrite: bool = False) -> Run:
    """Train ``config.model`` on ``config.data``; returns the trained ``Run`` (best-on-val weights).

    With ``config.out`` the run directory gets config, split, history, checkpoints, metrics,
    predictions and plots; with ``out=None`` nothing is written. ``test=False`` (hyper-parameter
    search) neither decodes nor evaluates the test images: only train and val are touched.
    """
    with contextlib.ExitStack() as stack:  # holds the run folder's lock from the first check to the last write
        parts = assemble(config, callbacks=callbacks, progress=progress, resume=resume, test=test,
                         overwrite=overwrite, stack=stack)
        train(parts)
        return finish(parts)


@dataclass
class Parts:
    """What ``fit`` builds before any epoch runs (as MONAI's trainer receives its network, optimizer,
    data and handlers built): the loop only runs them."""

    cfg: TrainConfig
    rundir: RunDir | None
    device: str
    bf16: bool
    preprocess: D.Preprocess
    classes: list[str]
    subsets: dict
    used_rows: list[dict]
    saved_cfg: dict
    frozen_info: dict
    state: TrainState
    callbacks: list
    epoch_fn: object = None
    probe_info: dict = field(default_factory=dict)

    @property
    def model(self):
        return self.state.model


def assemble(config: TrainConfig, *, callbacks=(), progress: bool = True, resume: bool = False,
             test: bool = True, overwrite: bool = False, stack: contextlib.ExitStack | None = None,
             dist=None) -> Parts:
    """Build every part of a fit (data, model, strategy, optimizer, schedule, EMA, callbacks) and
    write the run's config and split; bad input fails here, before anything is written. With
    ``stack``, the run folder's lock is entered on it (held until the caller's stack closes).
    ``dist``: a worker of a data-parallel run; only rank 0 locks, writes and holds val and test,
    the other ranks load the train images alone and only read the run (its config and last.pt)."""
    stack = stack if stack is not None else contextlib.ExitStack()
    writer = dist is None or dist.rank == 0
    locked = writer and config.out is not None and Path(config.out).is_dir()
    if locked:  # first: a second writer is told who holds the run (a new folder is locked once made)
        stack.enter_context(RunDir(config.out).lock())
    rundir = _check_out(config, resume, overwrite) if writer else None
    reader = rundir if writer else RunDir(config.out)
    if locked:
        rundir.remove_temporary()
    if config.cache_dir is not None:
        _io.check_writable(config.cache_dir)
    if resume and reader is not None and reader.is_run():
        config = _resumed_config(config, reader)
    cfg = config.resolved()
    device = pick_device(cfg.device) if dist is None else dist.device
    bf16 = device.startswith("cuda") if cfg.bf16 is None else cfg.bf16  # None: on a GPU mixed precision
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if dist is not None:  # threads= is the run's total: each worker gets its share
        torch.set_num_threads(dist.threads)
    preprocess = D.Preprocess(cfg.image_size, crop=cfg.crop, intensity=cfg.intensity)

    # Data and model first: bad input fails before anything is written.
    rows = split_rows(cfg)
    classes = D.resolve_classes(rows, cfg.positive)
    names = D.SUBSETS if test else ("train", "val")
    if not writer:  # val and test are evaluated on rank 0 alone
        names = ("train",)
    serial = dist is not None and cfg.store != "memory"  # a disk store is built once, by rank 0, then read
    if serial and not writer:
        dist.barrier()
    subsets, skipped = load_subsets(cfg, rows, classes, preprocess, device, progress and writer, names=names)
    if serial and writer:
        dist.barrier()
    torch.manual_seed(cfg.seed)  # the head's init depends on the seed alone, not on what ran before
    spec = M.resolve(cfg.model)
    model = M.create_model(cfg.model, weights=cfg.weights, num_classes=len(classes), dropout=cfg.dropout,
                           classes=classes)
    frozen_info = apply_strategy(model, cfg.strategy, cfg.freeze_until)
    used_rows = [r for s in names for r in subsets[s].rows]
    saved_cfg = {**cfg.to_dict(), "timm_name": spec.timm_name, "classes": classes,
                 "positive": classes[1] if len(classes) == 2 else None, "bf16": bf16,
                 "preprocess": preprocess.to_dict()}
    if dist is not None:  # what a data-parallel step is: recorded in config.json and metrics.json
        saved_cfg.update(dist.facts(cfg))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    val_names, val_ids = D.source_ids(subsets["val"].rows if "val" in subsets else [])
    train_names, train_ids = D.source_ids(subsets["train"].rows)
    pool = torch.as_tensor(train_ids, device=device) if cfg.balance == "sources" and len(train_names) > 1 else None
    n_epoch = pool_size(pool, len(subsets["train"].x))
    state = TrainState(cfg, model, opt, classes, device, n_epoch, subsets=subsets, train_pool=pool,
                       val_sources=(val_names if len(val_names) > 1 else (), torch.as_tensor(val_ids)),
                       progress=progress, dist=dist)
    state.scheduler = make_scheduler(cfg, opt, steps_per_epoch(n_epoch, cfg.batch_size, drop_last=cfg.compile,
                                                               world=1 if dist is None else dist.world))
    if cfg.strategy == "linear":
        state.end_epoch = 1  # one convex fit; the epochs option does not apply
    if cfg.ema:
        from timm.utils import ModelEmaV3

        state.ema = ModelEmaV3(model, decay=cfg.ema)  # a copy; its BatchNorm layers stay in eval mode
    if resume and reader is not None:
        _restore(state, reader, device)  # before any write: a bad checkpoint leaves the run as it was
    if rundir is not None:
        if not locked:
            ensure_writable_dir(rundir.path)
            stack.enter_context(rundir.lock())
        if overwrite and not resume:
            rundir.clear_run_files()
        D.write_split(used_rows, rundir / "split.csv")
        if skipped:
            _io.write_text(rundir / "skipped.txt", "\n".join(skipped) + "\n")
        rundir.write_config(saved_cfg)
    # The writer thread overlaps a GPU's training; on the CPU it competes with the training for the
    # same cores and made later epochs 1.7x slower (bench/checkpoint_writer.py), so there the files
    # are written in the foreground.
    ckpt = C.Checkpoint(rundir, every=cfg.checkpoint_every, background=device.startswith("cuda")) if rundir else None
    cbs = [C.TrackBest()] + ([ckpt, C.HistoryCSV(rundir)]
                             if rundir else [])
    cbs += ([C.ProgressLog()] if progress and writer else []) + list(callbacks)
    if not writer:  # the other ranks train; rank 0 alone tracks the best epoch, writes and logs
        cbs = list(callbacks)
    if cfg.log and writer:  # experiment trackers: checked (package installed, out given) before any training
        from ..tracking import make_loggers

        cbs += make_loggers(cfg.log, rundir.path if rundir else None, mlflow_uri=cfg.mlflow_uri)
    return Parts(cfg, rundir, device, bf16, preprocess, classes, subsets, used_rows, saved_cfg, frozen_info,
                 state, C.ordered(cbs))


def train(parts: Parts) -> None:
    """The training itself: the probe head init (if asked), then the strategy's epochs."""
    from ..registry import STRATEGIES

    cfg, state, subsets = parts.cfg, parts.state, parts.subsets
    mean, std = M.normalization(state.model)
    # a resumed run has its head already; with workers, rank 0 fits it (on its val) and DDP's start
    # gives every worker rank 0's weights
    if cfg.head_init == "probe" and state.epoch == 0 and state.rank == 0:
        t0, first_size = time.perf_counter(), epoch_size(cfg, 0)
        res, feat_s = _probe(state, subsets, mean, std, parts.bf16, size=first_size)
        P.load_into_fc(state.model.fc, res.weight, res.bias)
        if state.ema is not None:
            state.ema.set(state.model)  # the average starts from the probe head, not the random one
        state.train_seconds += time.perf_counter() - t0  # part of what this run costs
        parts.probe_info = {"probe": _probe_summary(res, feat_s, first_size)}
    parts.epoch_fn = STRATEGIES.get(cfg.strategy)(state, subsets, mean, std, parts.bf16)
    _run_epochs(state, parts.epoch_fn, parts.callbacks)


def finish(parts: Parts) -> Run:
    """The best-on-val weights as a ``Run``: calibrated on val if asked, evaluated, written."""
    cfg, state, rundir, subsets, classes = parts.cfg, parts.state, parts.rundir, parts.subsets, parts.classes
    model = state.model
    model.load_state_dict(state.best_state)  # final evaluation with the best-on-val weights
    run = Run(model=model.eval(), config=parts.saved_cfg, classes=classes, preprocess=parts.preprocess,
              history=state.history, split=parts.used_rows, directory=rundir.path if rundir else None,
              device=parts.device)
    if cfg.calibrate:  # on val only; test sees the fitted temperature and threshold unchanged
        _calibrate(run, subsets["val"], cfg)
    if cfg.shift_guard != "none":  # train images fit it, val sets its threshold; never an external set
        from ..shift import fit_guard

        fit_guard(run, detector=cfg.shift_guard, train=subsets["train"], val=subsets["val"], save=rundir is not None)
    metrics = run.evaluate_subsets({s: subsets[s] for s in ("val", "test") if s in subsets}, write=rundir is not None)
    if cfg.calibrate:
        metrics["calibration"] = run.predictor.calibration.to_dict()
    metrics.update({
        "train_seconds": round(state.train_seconds, 3), "epochs": state.history[-1]["epoch"],
        "best_epoch": state.best["epoch"], "model": M.resolve(cfg.model).name, "timm_name": parts.saved_cfg["timm_name"],
        "weights": cfg.weights, "image_size": cfg.image_size, "seed": cfg.seed, "strategy": cfg.strategy,
        "classes": classes, **parts.frozen_info, **(parts.probe_info or state.extra),
    })
    if cfg.workers > 1 or "executor" in parts.saved_cfg:  # a data-parallel run says what a step was
        metrics.update({k: parts.saved_cfg[k] for k in ("workers", "executor", "effective_batch_size", "lr",
                                                        "threads_per_worker", "shard")})
    run.metrics = metrics
    if rundir is not None:
        run.save_predictor()  # first: the model card (written with the outputs) reads it
        run.write_outputs()
    for cb in parts.callbacks:  # trackers log the final metrics and plots
        getattr(cb, "on_run_end", lambda *_: None)(state, run)
    return run


def _calibrate(run: Run, val, cfg: TrainConfig) -> None:
    """``--calibrate`` after training: a val too small for it is recorded (status ``refused``, the
    model left uncalibrated) rather than raised, so the trained run is kept."""
    from ..calibration import CalibrationRefused
    from ..inference import Calibration

    try:
        run.calibrate(val, sensitivity=cfg.sensitivity, force=cfg.force_calibration)
    except CalibrationRefused as exc:
        log.warning("%s; the run stays uncalibrated", exc.describe("force_calibration=True"))
        run.predictor.calibration = Calibration.from_dict(exc.record)  # T = 1, argmax, and why


def _restore(state: TrainState, rundir: RunDir, device: str) -> None:
    saved = rundir.load_resume_state(map_location=device)
    if saved is None:
        return
    try:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.scheduler is not None and saved.get("scheduler"):
            state.scheduler.load_state_dict(saved["scheduler"])
        state.history, state.epoch = list(saved["history"])[:int(saved["epoch"])], int(saved["epoch"])
        state.best, state.train_seconds = saved["best"], float(saved["train_seconds"])
        if state.ema is not None:
            if saved.get("ema") is None:
                raise KeyError("no weight average (ema) saved: resume with the options the run began with")
            state.ema.module.load_state_dict(saved["ema"])
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise CTTransferError(f"{rundir / 'last.pt'}: does not fit this run's model and options "
                              f"({first_line(exc, 100)})") from None
    if state.best is not None:
        best = rundir.load_best(map_location=device)
        try:
            if set(best["model"]) != set(state.model.state_dict()):
                raise ValueError("tensor names differ")
            state.best_state = best["model"]
            state.best = {**state.best, "epoch": best.get("epoch", state.best["epoch"])}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CTTransferError(f"{rundir.checkpoint()}: does not fit this run's model ({first_line(exc, 100)})") from None


def _run_epochs(state: TrainState, epoch_fn, callbacks) -> None:
    cfg = state.config
    for cb in callbacks:
        cb.on_fit_start(state)
    try:
        for epoch in range(state.epoch, state.end_epoch or cfg.epochs):
            for cb in callbacks:
                cb.on_epoch_start(state)
            t0 = time.perf_counter()
            # dropout; exact on resume (each worker its own masks)
            torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * state.rank)
            g = _epoch_generator(cfg.seed, epoch, state.device)
            train_loss, train_acc, loop_seconds, val = epoch_fn(epoch, g, callbacks)
            state.train_seconds += time.perf_counter() - t0
            state.epoch = epoch + 1
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, **val,
                   "seconds": round(state.train_seconds, 3),
                   "train_ips": round(state.n_train / max(loop_seconds, 1e-9), 2)}
            state.history.append(row)
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            if state.dist is not None:  # rank 0's callbacks decide for all (best epoch, early stop)
                state.stop = state.dist.share(state.stop)
            if state.stop:
                break
    except BaseException:
        for cb in callbacks:
            cb.on_fit_error(state)
        raise
    for cb in callbacks:
        cb.on_fit_end(state)


def _val_stats(state: TrainState, proba, y) -> dict:
    """Validation loss and accuracy (what the epoch is chosen on) and, with several sources, each
    source's accuracy (``val_acc_<source>``). With ``--balance sources`` the loss and accuracy are
    the means over sources, so the largest source does not choose the epoch alone."""
    p = torch.from_numpy(proba).clamp_min(1e-7)
    yy = y.cpu()
    nll = F.nll_loss(p.log(), yy, reduction="none")
    hit = (p.argmax(1) == yy).double()
    names, ids = state.val_sources
    if not names:
        return {"val_loss": float(nll.mean()), "val_acc": float(hit.mean())}
    per = {n: (float(nll[ids == i].mean()), float(hit[ids == i].mean())) for i, n in enumerate(names)}
    if state.config.balance == "sources":
        loss, acc = (sum(v[k] for v in per.values()) / len(per) for k in (0, 1))
    else:
        loss, acc = float(nll.mean()), float(hit.mean())
    return {"val_loss": loss, "val_acc": acc, **{f"val_acc_{n}": a for n, (_, a) in per.items()}}


def _full_epochs(state: TrainState, subsets, mean, std, bf16):
    """Every trainable parameter learns; batches are augmented on the device."""
    cfg, model, opt, device = state.config, state.model, state.optimizer, state.device
    train_tf = D.batch_transform(mean, std, augment=cfg.augment, preset=cfg.augmentation)
    eval_tf = D.batch_transform(mean, std, augment=False)
    x_tr, y_tr = subsets["train"].x, subsets["train"].y
    dist = state.dist
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world)
    base = model if dist is None else dist.wrap(model)  # DDP: gradients averaged over the workers in backward
    fwd = torch.compile(base, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) if cfg.compile \
        else base
    graphs = cfg.compile and cfg.compile_mode != "default" and device.startswith("cuda")

    step = make_step(fwd, opt, label_smoothing=cfg.label_smoothing, bf16=bf16, device=device, graphs=graphs,
                     scheduler=state.scheduler, ema=state.ema, ema_source=model)

    def epoch_fn(epoch, g, callbacks):
        t0 = time.perf_counter()
        set_train_mode(model, bn_stats=cfg.bn_stats)
        # Sums stay on the device: no host sync per step (matters on CUDA).
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        size = epoch_size(cfg, epoch)
        # every rank shuffles with ``g`` alike; the other ranks augment from their own stream
        aug = g if rank == 0 else _epoch_generator(cfg.seed + 1_000_003 * rank, epoch, device)
        for idx in _batches(len(x_tr), cfg.batch_size, g, drop_last=cfg.compile, sources=state.train_pool,
                            single=cfg.batch_size == 1, rank=rank, world=world):
            xb = train_tf(x_tr[idx], aug)
            if size != xb.shape[-1]:  # progressive resizing: augment at full size, then shrink
                xb = _shrink(xb, size)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss, logits = step(xb, y_tr[idx])
            total_loss += loss * len(idx)
            correct += (logits.argmax(1) == y_tr[idx]).sum()
            seen += len(idx)
            state.batch_index = idx
            for cb in callbacks:
                cb.on_batch_end(state, len(idx), total_loss, correct)
        if dist is not None:  # the epoch's loss and accuracy over every worker's images
            total_loss, correct, seen = dist.sum(total_loss, correct, seen)
        loop_seconds = time.perf_counter() - t0
        val = None
        if rank == 0:
            proba = predict_proba(state.eval_model, subsets["val"].x, eval_tf, bf16=bf16, device=device,
                                  channels_last=cfg.channels_last, tta=cfg.tta)
            val = _val_stats(state, proba, subsets["val"].y)
        if dist is not None:  # every rank records rank 0's val figures: the same best epoch everywhere
            val = dist.share(val)
        return float(total_loss) / max(seen, 1), int(correct) / max(seen, 1), loop_seconds, val

    return epoch_fn


def make_step(model, optimizer, *, label_smoothing: float = 0.0, bf16: bool = False, device: str = "cpu",
              graphs: bool = False, scheduler=None, ema=None, ema_source=None):
    """The engine's training step on an augmented, normalised batch: forward (bf16 autocast if
    asked), cross-entropy, backward, optimizer, schedule and EMA; returns (loss, logits), detached.
    ``model`` may be the compiled module; ``ema_source`` is the module the average follows. The
    benchmarks time this very function."""
    ema_source = model if ema_source is None else ema_source

    def step(xb, yb):
        if graphs:  # CUDA graphs: tell the compiled step a new iteration starts (outputs are reused)
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(bf16, device):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(ema_source)
        return loss.detach(), logits.detach()

    return step


def _shrink(xb, size: int):
    """Progressive resizing: augment (or normalise) at full size, then shrink the batch."""
    return F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.inference_mode()
def pooled_features(model, x_u8, transform, *, channels_last=True, bf16=False, device="cpu", generator=None,
                    batch_size=256, size: int | None = None, desc: str | None = None):
    """Backbone features after global average pooling (at ``size`` px: shrunk as training shrinks);
    ``desc``: progress under that name (the probe's minutes of extraction on a CPU)."""
    model.eval()
    out = []
    starts = range(0, len(x_u8), batch_size)
    for start in track(starts, desc=desc or "", total=len(x_u8), enabled=desc is not None,
                       size=lambda s: min(batch_size, len(x_u8) - s)):
        xb = transform(x_u8[start:start + batch_size], generator)
        if size and size != xb.shape[-1]:
            xb = _shrink(xb, size)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(bf16, device):
            out.append(model.pooled(xb).float())
    return torch.cat(out)


def _probe(state: TrainState, subsets, mean, std, bf16, *, size: int | None = None):
    """Linear probe on pooled features of the un-augmented train and val images. As a head init it is
    fitted at the first epoch's size: a head fitted on 224 px features gives huge logits on 128 px
    ones (measured: train loss 6.65, val 0.93 -> 0.63 in the first progressive-resizing epoch)."""
    cfg, model, device = state.config, state.model, state.device
    eval_tf = D.batch_transform(mean, std, augment=False)
    kw = dict(channels_last=cfg.channels_last, bf16=bf16, device=device, batch_size=64, size=size)
    t0 = time.perf_counter()
    shown = state.progress
    f_tr = pooled_features(model, subsets["train"].x, eval_tf, desc="features train" if shown else None, **kw)
    f_va = pooled_features(model, subsets["val"].x, eval_tf, desc="features val" if shown else None, **kw)
    f_tr, f_va = f_tr.cpu().numpy(), f_va.cpu().numpy()
    feat_s = time.perf_counter() - t0
    weights = {}
    if cfg.balance == "sources":  # every source weighs the same in the fit and in the choice of C
        weights = {"sample_weight": D.source_weights(subsets["train"].rows),
                   "val_weight": D.source_weights(subsets["val"].rows)}
    res = P.fit_probe(f_tr, subsets["train"].y.cpu().numpy(), f_va, subsets["val"].y.cpu().numpy(),
                      num_classes=len(state.classes), seed=cfg.seed, **weights)
    return res, feat_s


def _probe_summary(res, feature_seconds: float, size: int) -> dict:
    return {"size": size, "C": res.C, "val_acc": res.val_acc, "grid": res.grid, "feature_seconds": round(feature_seconds, 3),
            "solver_seconds": round(res.solver_seconds, 3)}


def _linear_epochs(state: TrainState, subsets, mean, std, bf16):
    """One 'epoch': fixed features, convex fit of the head (see ``probe``); the whole fit is timed."""

    def epoch_fn(epoch, g, callbacks):
        t0 = time.perf_counter()
        res, feat_s = _probe(state, subsets, mean, std, bf16)
        P.load_into_fc(state.model.fc, res.weight, res.bias)
        state.extra = {"probe": _probe_summary(res, feat_s, state.config.image_size)}
        state.stop = True
        return res.train_loss, res.train_acc, time.perf_counter() - t0, \
            _val_stats(state, res.val_proba, state.subsets["val"].y)

    return epoch_fn


def _frozen_epochs(state: TrainState, subsets, mean, std, bf16):
    """Only the head trains, on pooled features cached once (``frozen_views`` augmented views)."""
    cfg, model, opt, device = state.config, state.model, state.optimizer, state.device
    train_tf = D.batch_transform(mean, std, augment=cfg.augment, preset=cfg.augmentation)
    eval_tf = D.batch_transform(mean, std, augment=False)
    x_tr, y_tr, y_va = subsets["train"].x, subsets["train"].y, subsets["val"].y
    feats, val_feats = None, None
    kw = dict(channels_last=cfg.channels_last, bf16=bf16, device=device)

    def epoch_fn(epoch, g, callbacks):
        nonlocal feats, val_feats
        if feats is None:  # counted in train_seconds: part of what this strategy costs
            views = max(1, cfg.frozen_views) if cfg.augment else 1
            shown = state.progress
            feats = [pooled_features(model, x_tr, train_tf, generator=_epoch_generator(cfg.seed, -1 - v, device),
                                     desc=f"features train (view {v + 1}/{views})" if shown else None, **kw)
                     for v in range(views)]
            val_feats = pooled_features(model, subsets["val"].x, eval_tf, desc="features val" if shown else None,
                                        **kw)
        t0 = time.perf_counter()
        f = feats[epoch % len(feats)]
        model.train()
        tl, tc, seen = 0.0, 0, 0
        for idx in _batches(len(f), cfg.batch_size, g, sources=state.train_pool, single=cfg.batch_size == 1):
            logits = model.head(f[idx])
            loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if state.scheduler is not None:
                state.scheduler.step()
            tl += float(loss.detach()) * len(idx)
            tc += int((logits.argmax(1) == y_tr[idx]).sum())
            seen += len(idx)
        for cb in callbacks:
            cb.on_batch_end(state, seen, torch.tensor(tl), torch.tensor(tc))
        loop_seconds = time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            vp = torch.softmax(model.head(val_feats), 1).cpu().numpy()
        return tl / seen, tc / seen, loop_seconds, _val_stats(state, vp, y_va)

    return epoch_fn
