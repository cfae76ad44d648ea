"""Callbacks keep the epoch loop short (fastai's idea): best-model tracking, checkpoints, history,
progress, early stopping and custom stop rules are objects the loop calls at fixed points.

Hooks: ``on_fit_start(state)``, ``on_epoch_start(state)``, ``on_batch_end(state, n, loss_sum,
correct)``, ``on_epoch_end(state, row)``, ``on_fit_end(state)``, ``on_fit_error(state)``, and ``on_run_end(state, run)``
after the final evaluation (``fit`` calls it; experiment trackers log the final metrics there). Setting ``state.stop = True``
ends training after the current epoch. Callback time is not counted in ``train_seconds``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

log = logging.getLogger("ct_transfer.engine")


class Callback:
    order = 50  # lower runs first

    def on_fit_start(self, state): ...

    def on_epoch_start(self, state): ...

    def on_batch_end(self, state, n, loss_sum, correct): ...

    def on_epoch_end(self, state, row): ...

    def on_fit_end(self, state): ...

    def on_fit_error(self, state):
        """Training stopped on an exception (which still propagates): release what you hold."""

    def on_run_end(self, state, run):
        """``fit`` is done: ``run`` has its final metrics, and its files are written (trackers log them)."""


class TrackBest(Callback):
    """Best epoch on val accuracy, ties to the lower val loss; keeps a copy of its weights."""

    order = 0

    def on_epoch_end(self, state, row):
        best = state.best
        if best is None or (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"]):
            state.best = {"epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
            state.best_state = {k: v.detach().clone() for k, v in state.eval_model.state_dict().items()}
            state.improved = True
        else:
            state.improved = False


class Checkpoint(Callback):
    """``best.safetensors`` when val improves; ``last.pt`` (full resume state) every ``every`` epochs and at
    the end. The loop only snapshots the tensors to the CPU (a copy, so training may go on changing
    them); with ``background`` (the engine's choice on CUDA) one thread serialises and writes the
    files, in order, off the hot path; on the CPU that thread slowed training (bench/checkpoint_writer.py).
    ``on_fit_end`` waits for the writes, so a finished ``fit`` has its files on disk."""

    order = 10

    def __init__(self, rundir, every: int = 1, background: bool = True):
        self.rundir, self.every, self.background = rundir, max(1, int(every)), background
        self._pool, self._pending = None, []

    def _submit(self, fn, obj):
        if not self.background:
            return fn(obj)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct-checkpoint")
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._raise_failed()
        self._pending.append(self._pool.submit(fn, obj))

    def _raise_failed(self):
        for f in self._pending:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def on_epoch_end(self, state, row):
        if state.improved:
            self._submit(self.rundir.save_best, {"model": _cpu(state.best_state), "classes": state.classes,
                                                 "epoch": state.best["epoch"]})
        end = state.end_epoch or state.config.epochs
        if state.epoch % self.every == 0 or state.epoch >= end or state.stop:
            self._submit(self.rundir.save_last, resume_state(state))

    def on_fit_end(self, state):
        self.flush()

    def on_fit_error(self, state):
        # The error being raised matters more than a write that also failed; but no write may still be
        # running (its temporary file would outlive the failed run).
        with contextlib.suppress(Exception):
            self.flush()

    def flush(self):
        """Wait for every queued write, then raise the first that failed."""
        pending, self._pending = self._pending, []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for f in pending:
            if f.exception() is not None:
                raise f.exception()


def resume_state(state) -> dict:
    """A snapshot on the CPU that later training steps cannot change (the writer thread reads it)."""
    return {"model": _cpu(state.model.state_dict()), "optimizer": _cpu_tree(state.optimizer.state_dict()),
            "scheduler": copy.deepcopy(state.scheduler.state_dict()) if state.scheduler is not None else None,
            "epoch": state.epoch, "history": copy.deepcopy(state.history), "best": copy.deepcopy(state.best),
            "train_seconds": state.train_seconds, "classes": list(state.classes),
            "ema": _cpu(state.ema.module.state_dict()) if state.ema is not None else None}


def _cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _cpu_tree(obj):
    """Deep copy with every tensor copied to the CPU (optimizer state may live on a GPU)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_tree(v) for v in obj)
    return copy.deepcopy(obj)


class HistoryCSV(Callback):
    order = 20

    def __init__(self, rundir):
        self.rundir = rundir

    def on_epoch_end(self, state, row):
        self.rundir.write_history(state.history)


class ProgressLog(Callback):
    """One log line per epoch; within an epoch a bar on a terminal or in a notebook, else a log line
    now and then (``ct_transfer.progress``). The linear probe's single fit is called what it is."""

    order = 30

    def __init__(self, bar: bool = True):
        self.bar_enabled, self.progress = bar, None

    def on_epoch_start(self, state):
        from ..progress import Progress

        if self.bar_enabled and state.config.strategy != "linear":  # the probe reports its feature extraction
            epochs = state.end_epoch or state.config.epochs
            self.progress = Progress(state.n_train, f"epoch {state.epoch + 1}/{epochs}", unit="img")

    def on_batch_end(self, state, n, loss_sum, correct):
        if self.progress is not None:
            seen = self.progress.n + n
            # the running loss syncs a GPU: only computed when a line or the bar's postfix is due
            self.progress.update(n, note=lambda: f"loss {float(loss_sum) / seen:.4f} acc {int(correct) / seen:.3f}")

    def on_epoch_end(self, state, row):
        if self.progress is not None:
            self.progress.enabled = self.progress.bar is not None  # the epoch line below says it all
            self.progress.close()
            self.progress = None
        if state.config.strategy == "linear":
            probe = state.extra.get("probe", {})
            log.info("linear probe: train loss %.4f acc %.4f  val_loss %.4f val_acc %.4f  (C=%s; features %.0fs, "
                     "fit %.0fs)", row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                     probe.get("C"), probe.get("feature_seconds", float("nan")),
                     probe.get("solver_seconds", float("nan")))
            return
        log.info("epoch %d/%d  loss %.4f acc %.4f  val_loss %.4f val_acc %.4f  [%.0fs]", row["epoch"],
                 state.end_epoch or state.config.epochs, row["train_loss"], row["train_acc"], row["val_loss"],
                 row["val_acc"], state.train_seconds)


class EarlyStopping(Callback):
    """Stop when val accuracy has not improved for ``patience`` epochs."""

    order = 40

    def __init__(self, patience: int = 10):
        self.patience = int(patience)

    def on_epoch_end(self, state, row):
        if state.best and state.epoch - state.best["epoch"] >= self.patience:
            log.info("early stop: no val improvement for %d epochs", self.patience)
            state.stop = True


class StopWhen(Callback):
    """Stop when ``predicate(row, model)`` is true (time-to-accuracy benchmarks use it)."""

    order = 60

    def __init__(self, predicate):
        self.predicate = predicate

    def on_epoch_end(self, state, row):
        if self.predicate(row, state.eval_model):
            state.stop = True


class TimeToAccuracy(Callback):
    """Records the training seconds at which val accuracy first reached each target."""

    order = 45

    def __init__(self, targets=(0.95, 0.98)):
        self.targets = sorted(targets)
        self.reached: dict[float, float] = {}

    def on_epoch_end(self, state, row):
        for t in self.targets:
            if t not in self.reached and not math.isnan(row["val_acc"]) and row["val_acc"] >= t:
                self.reached[t] = row["seconds"]


def ordered(callbacks) -> list[Callback]:
    return sorted(callbacks, key=lambda cb: cb.order)
