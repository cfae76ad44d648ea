"""``fit``: train one model on one split and return a ``Run``.

The engine keeps every decoded image in one uint8 tensor on the device, augments whole batches
with tensor ops (independent random parameters per image) and runs without DataLoader workers.
Every epoch's random state derives from (seed, epoch), so a resumed run continues exactly as an
unbroken one. Everything besides the step (checkpoints, history, progress, stopping) is a callback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import data as D
from .. import models as M
from .. import _io
from .._io import ensure_writable_dir
from ..config import TrainConfig
from ..errors import CTTransferError, first_line
from ..evaluate import autocast, predict_proba
from ..rundir import RunDir
from ..run import Run
from . import callbacks as C
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


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _epoch_generator(seed: int, epoch: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 100_003 + epoch)
    return g


def _batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator, device=generator.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1 or n == 1:  # a lone last image would break BatchNorm
            yield idx


def _check_out(cfg: TrainConfig, resume: bool) -> RunDir | None:
    """Fail before any work: an occupied run directory, or one that cannot be written."""
    if cfg.out is None:
        return None
    rundir = RunDir(cfg.out)
    if (rundir / "last.pt").exists() and not resume:
        raise CTTransferError(f"{cfg.out}: already holds a run; add --resume to continue it or choose another --out")
    _io.check_writable(cfg.out)  # a real probe file: os.access says yes to root on a read-only mount
    return rundir


def _resumed_config(cfg: TrainConfig, rundir: RunDir) -> TrainConfig:
    """A resumed run uses its own saved config and split (already limited), with the new epochs."""
    saved = rundir.read_config()
    try:
        return TrainConfig.from_dict({**saved, "out": cfg.out, "epochs": cfg.epochs,
                                      "split_file": str(rundir / "split.csv"), "limit": None})
    except (TypeError, ValueError) as exc:
        raise CTTransferError(f"{rundir / 'config.json'}: not a valid run config ({exc})") from None


def fit(config: TrainConfig, *, callbacks=(), progress: bool = True, resume: bool = False) -> Run:
    """Train ``config.model`` on ``config.data``; returns the trained ``Run`` (best-on-val weights).

    With ``config.out`` the run directory gets config, split, history, checkpoints, metrics,
    predictions and plots; with ``out=None`` nothing is written.
    """
    rundir = _check_out(config, resume)
    if config.cache_dir is not None:
        _io.check_writable(config.cache_dir)
    if resume and rundir is not None and rundir.is_run():
        config = _resumed_config(config, rundir)
    cfg = config.resolved()
    device = pick_device(cfg.device)
    bf16 = cfg.bf16 or device.startswith("cuda")  # on a GPU mixed precision is the default
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    preprocess = D.Preprocess(cfg.image_size)

    # Data and model first: bad input fails before anything is written.
    rows = split_rows(cfg)
    classes = D.resolve_classes(rows, cfg.positive)
    subsets, skipped = load_subsets(cfg, rows, classes, preprocess, device, progress)
    torch.manual_seed(cfg.seed)  # the head's init depends on the seed alone, not on what ran before
    model = M.create_model(cfg.model, weights=cfg.weights, num_classes=len(classes), dropout=cfg.dropout)
    frozen_info = apply_strategy(model, cfg.strategy, cfg.freeze_until)
    used_rows = [r for s in D.SUBSETS for r in subsets[s].rows]
    saved_cfg = {**cfg.to_dict(), "timm_name": M.resolve(cfg.model).timm_name, "classes": classes,
                 "positive": classes[1] if len(classes) == 2 else None, "bf16": bf16,
                 "preprocess": preprocess.to_dict()}
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    state = TrainState(cfg, model, opt, classes, device, len(subsets["train"].x))
    if resume and rundir is not None:
        _restore(state, rundir, device)  # before any write: a bad checkpoint leaves the run as it was
    if rundir is not None:
        ensure_writable_dir(rundir.path)
        D.write_split(used_rows, rundir / "split.csv")
        if skipped:
            _io.write_text(rundir / "skipped.txt", "\n".join(skipped) + "\n")
        rundir.write_config(saved_cfg)

    cbs = [C.TrackBest()] + ([C.Checkpoint(rundir), C.HistoryCSV(rundir)] if rundir else [])
    cbs += ([C.ProgressLog()] if progress else []) + list(callbacks)
    mean, std = M.normalization(model)
    epoch_fn = (_frozen_epochs if cfg.strategy == "frozen" else _full_epochs)(state, subsets, mean, std, bf16)
    _run_epochs(state, epoch_fn, C.ordered(cbs))

    model.load_state_dict(state.best_state)  # final evaluation with the best-on-val weights
    run = Run(model=model.eval(), config=saved_cfg, classes=classes, preprocess=preprocess, history=state.history,
              split=used_rows, directory=rundir.path if rundir else None, device=device)
    metrics = run.evaluate_subsets({s: subsets[s] for s in ("val", "test")}, write=rundir is not None)
    metrics.update({
        "train_seconds": round(state.train_seconds, 3), "epochs": state.history[-1]["epoch"],
        "best_epoch": state.best["epoch"], "model": M.resolve(cfg.model).name, "timm_name": saved_cfg["timm_name"],
        "weights": cfg.weights, "image_size": cfg.image_size, "seed": cfg.seed, "strategy": cfg.strategy,
        "classes": classes, **frozen_info,
    })
    run.metrics = metrics
    if rundir is not None:
        run.write_outputs()
    return run


def _restore(state: TrainState, rundir: RunDir, device: str) -> None:
    saved = rundir.load_resume_state(map_location=device)
    if saved is None:
        return
    try:
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.history, state.epoch = list(saved["history"])[:int(saved["epoch"])], int(saved["epoch"])
        state.best, state.train_seconds = saved["best"], float(saved["train_seconds"])
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
            raise CTTransferError(f"{rundir / 'best.pt'}: does not fit this run's model ({first_line(exc, 100)})") from None


def _run_epochs(state: TrainState, epoch_fn, callbacks) -> None:
    cfg = state.config
    for cb in callbacks:
        cb.on_fit_start(state)
    for epoch in range(state.epoch, cfg.epochs):
        for cb in callbacks:
            cb.on_epoch_start(state)
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout; exact on resume
        g = _epoch_generator(cfg.seed, epoch, state.device)
        train_loss, train_acc, loop_seconds, val_loss, val_acc = epoch_fn(epoch, g, callbacks)
        state.train_seconds += time.perf_counter() - t0
        state.epoch = epoch + 1
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "seconds": round(state.train_seconds, 3),
               "train_ips": round(state.n_train / max(loop_seconds, 1e-9), 2)}
        state.history.append(row)
        for cb in callbacks:
            cb.on_epoch_end(state, row)
        if state.stop:
            break
    for cb in callbacks:
        cb.on_fit_end(state)


def _val_loss_acc(proba, y):
    p = torch.from_numpy(proba).clamp_min(1e-7)
    yy = y.cpu()
    return float(F.nll_loss(p.log(), yy)), float((p.argmax(1) == yy).float().mean())


def _full_epochs(state: TrainState, subsets, mean, std, bf16):
    """Every trainable parameter learns; batches are augmented on the device."""
    cfg, model, opt, device = state.config, state.model, state.optimizer, state.device
    train_tf = D.batch_transform(mean, std, augment=cfg.augment)
    eval_tf = D.batch_transform(mean, std, augment=False)
    x_tr, y_tr = subsets["train"].x, subsets["train"].y
    fwd = torch.compile(model) if cfg.compile else model

    def step(xb, yb):
        with autocast(bf16, device):
            logits = fwd(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach()

    def epoch_fn(epoch, g, callbacks):
        t0 = time.perf_counter()
        set_train_mode(model)
        # Sums stay on the device: no host sync per step (matters on CUDA).
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for idx in _batches(len(x_tr), cfg.batch_size, g):
            xb = train_tf(x_tr[idx], g)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss, logits = step(xb, y_tr[idx])
            total_loss += loss * len(idx)
            correct += (logits.argmax(1) == y_tr[idx]).sum()
            seen += len(idx)
            for cb in callbacks:
                cb.on_batch_end(state, len(idx), total_loss, correct)
        loop_seconds = time.perf_counter() - t0
        proba = predict_proba(model, subsets["val"].x, eval_tf, bf16=bf16, device=device,
                              channels_last=cfg.channels_last)
        val_loss, val_acc = _val_loss_acc(proba, subsets["val"].y)
        return float(total_loss) / max(seen, 1), int(correct) / max(seen, 1), loop_seconds, val_loss, val_acc

    return epoch_fn


@torch.inference_mode()
def pooled_features(model, x_u8, transform, *, channels_last=True, bf16=False, device="cpu", generator=None,
                    batch_size=256):
    """Backbone features after global average pooling."""
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch_size):
        xb = transform(x_u8[start:start + batch_size], generator)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(bf16, device):
            out.append(model.pooled(xb).float())
    return torch.cat(out)


def _frozen_epochs(state: TrainState, subsets, mean, std, bf16):
    """Only the head trains, on pooled features cached once (``frozen_views`` augmented views)."""
    cfg, model, opt, device = state.config, state.model, state.optimizer, state.device
    train_tf = D.batch_transform(mean, std, augment=cfg.augment)
    eval_tf = D.batch_transform(mean, std, augment=False)
    x_tr, y_tr, y_va = subsets["train"].x, subsets["train"].y, subsets["val"].y
    feats, val_feats = None, None
    kw = dict(channels_last=cfg.channels_last, bf16=bf16, device=device)

    def epoch_fn(epoch, g, callbacks):
        nonlocal feats, val_feats
        if feats is None:  # counted in train_seconds: part of what this strategy costs
            views = max(1, cfg.frozen_views) if cfg.augment else 1
            feats = [pooled_features(model, x_tr, train_tf, generator=_epoch_generator(cfg.seed, -1 - v, device), **kw)
                     for v in range(views)]
            val_feats = pooled_features(model, subsets["val"].x, eval_tf, **kw)
        t0 = time.perf_counter()
        f = feats[epoch % len(feats)]
        model.train()
        tl, tc, seen = 0.0, 0, 0
        for idx in _batches(len(f), cfg.batch_size, g):
            logits = model.head(f[idx])
            loss = F.cross_entropy(logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tl += float(loss.detach()) * len(idx)
            tc += int((logits.argmax(1) == y_tr[idx]).sum())
            seen += len(idx)
        for cb in callbacks:
            cb.on_batch_end(state, len(x_tr), torch.tensor(tl), torch.tensor(tc))
        loop_seconds = time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            vp = torch.softmax(model.head(val_feats), 1).cpu().numpy()
        val_loss, val_acc = _val_loss_acc(vp, y_va)
        return tl / seen, tc / seen, loop_seconds, val_loss, val_acc

    return epoch_fn
