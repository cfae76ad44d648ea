"""``RunDir``: the one owner of a run directory's files. Every write is atomic; ``last.pt`` keeps
its predecessor (``last.prev.pt``) so a resume can fall back to the last good checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import _io
from .errors import CTTransferError

log = logging.getLogger(__name__)

CONFIG, SPLIT, HISTORY, METRICS = "config.json", "split.csv", "history.csv", "metrics.json"
# best.safetensors: the best-on-val weights, pickle-free, classes and epoch in its metadata; runs
# written before it have best.pt (still read, with torch.load(weights_only=True)). last.pt keeps the
# optimizer and history for --resume (a nested state that safetensors cannot hold).
BEST, BEST_PT, LAST, LAST_PREV = "best.safetensors", "best.pt", "last.pt", "last.prev.pt"
CHECKPOINTS = (BEST, BEST_PT, LAST)  # what a run is loaded from, in this order
LOCK = ".lock"
PREDICTOR = "predictor.json"  # inference.PREDICTOR_FILE (the fitted calibration and guard)
RUN_FILES = (CONFIG, SPLIT, HISTORY, METRICS, BEST, BEST_PT, LAST, LAST_PREV, PREDICTOR)  # any of them: a run is here


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # -- what is there ---------------------------------------------------------------------
    def is_run(self) -> bool:
        return (self.path / CONFIG).is_file()

    def run_files(self) -> list[str]:
        """The run files present (a finished run whose ``last.pt`` is gone still holds a run)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def clear_run_files(self) -> None:
        """``overwrite``: remove the previous run's files (its checkpoints, metrics, predictions and
        external results) so nothing of it is mistaken for the new run's; other files stay."""
        import shutil

        old = [self.path / n for n in (*RUN_FILES, "skipped.txt", "reliability.png", "confusion_matrix.png",
                                       "model_card.md", "tracking.json")]
        old += sorted(self.path.glob("predictions_*.csv"))
        try:
            for f in old:
                if f.is_file() or f.is_symlink():
                    f.unlink()
            if (self.path / "external").is_dir():
                shutil.rmtree(self.path / "external")
        except OSError as exc:
            raise CTTransferError(f"{self.path}: cannot remove the previous run's files ({_io.why(exc)})") from None

    def remove_temporary(self) -> list[str]:
        """Temporary files a killed writer left (``.NAME.XXXX.tmp`` of ``_io.atomic_open``,
        ``.last.pt.new``); called with the lock held, so no live writer owns them."""
        removed = []
        for f in list(self.path.glob(".*.tmp")) + [self.path / f".{LAST}.new"]:
            try:
                if f.is_file():
                    f.unlink()
                    removed.append(f.name)
            except OSError:
                pass
        if removed:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", self.path, len(removed))
        return removed

    def lock(self) -> "RunLock":
        """One writer per run folder: ``RUN/.lock`` names the writing process (pid and host)."""
        return RunLock(self.path / LOCK)

    def check(self) -> "RunDir":
        if not self.is_run():
            raise CTTransferError(f"{self.path}: not a run directory (no {CONFIG})")
        return self

    def refuse_output(self, target) -> None:
        """One-line error when ``target`` would overwrite (or could be) one of this run's files."""
        if self.owns(target) and Path(target).resolve() == self.path.resolve():
            raise CTTransferError(f"{target}: is the run directory itself; choose another output")
        if self.owns(target):
            raise CTTransferError(f"{target}: is one of the run's own files (its checkpoints, CSV and JSON "
                                  f"files are never outputs of another command); choose another output")

    def owns(self, target) -> bool:
        """Is ``target`` one of this run's own files (never an output of another command)?"""
        try:
            target = Path(target).resolve()
            return target == self.path.resolve() or target.parent == self.path.resolve() and (
                target.name in (CONFIG, SPLIT, HISTORY, METRICS, BEST, BEST_PT, LAST, LAST_PREV)
                or target.suffix in (".pt", ".csv", ".json", ".safetensors"))
        except OSError:
            return False

    # -- json / csv ------------------------------------------------------------------------
    def read_config(self) -> dict:
        return _io.read_json(self.path / CONFIG, what="run config")

    def write_config(self, cfg: dict) -> None:
        _io.write_json(self.path / CONFIG, cfg)

    def read_metrics(self) -> dict | None:
        p = self.path / METRICS
        return _io.read_json(p, what="metrics file") if p.exists() else None

    def write_metrics(self, metrics: dict) -> None:
        _io.write_json(self.path / METRICS, metrics)

    def write_history(self, history: list[dict]) -> None:
        if history:
            _io.write_csv(self.path / HISTORY, history)

    def read_history(self) -> list[dict]:
        p = self.path / HISTORY
        if not p.exists():
            return []
        rows = _io.read_csv(p, what="history file")
        try:
            return [{k: float(v) for k, v in r.items()} for r in rows]
        except (TypeError, ValueError):
            raise CTTransferError(f"{p}: not a readable history file (non-numeric values)") from None

    # -- checkpoints -----------------------------------------------------------------------
    def save_best(self, state: dict) -> None:
        """``{"model": state dict, "classes", "epoch"}`` -> ``best.safetensors``."""
        meta = {k: v for k, v in state.items() if k != "model"}
        _io.save_safetensors(state["model"], self.path / BEST, {"format": _io.CHECKPOINT_FORMAT, **meta})

    def checkpoint(self) -> Path | None:
        """The file a run loads from: best.safetensors, else best.pt (older runs), else last.pt."""
        return next((self.path / n for n in CHECKPOINTS if (self.path / n).is_file()), None)

    def save_last(self, state: dict) -> None:
        """New ``last.pt``; the previous one becomes ``last.prev.pt`` (a fallback for resume). A kill
        between the steps leaves ``.last.pt.new``, removed at the next start (``remove_temporary``)."""
        tmp = self.path / f".{LAST}.new"
        _io.save_checkpoint(state, tmp)
        try:
            if (self.path / LAST).exists():
                os.replace(self.path / LAST, self.path / LAST_PREV)
            os.replace(tmp, self.path / LAST)
        except OSError as exc:
            raise CTTransferError(f"{self.path / LAST}: cannot write ({_io.why(exc)})") from None

    def load_best(self, map_location="cpu") -> dict:
        path = self.checkpoint()
        if path is None:
            raise CTTransferError(f"{self.path}: no checkpoint ({' / '.join(CHECKPOINTS)})")
        return _io.load_checkpoint(path, map_location=map_location, keys=("model", "classes"))

    def load_resume_state(self, map_location="cpu") -> dict | None:
        """The newest loadable resume state: ``last.pt``, else ``last.prev.pt`` (said in the log)."""
        keys = ("model", "optimizer", "epoch", "history", "best", "train_seconds", "classes")
        errors = []
        for name in (LAST, LAST_PREV):
            if not (self.path / name).exists():
                continue
            try:
                state = _io.load_checkpoint(self.path / name, map_location=map_location, keys=keys)
            except CTTransferError as exc:
                errors.append(str(exc))
                continue
            if errors:
                log.warning("%s; resuming from %s (epoch %d) instead", errors[0], name, state["epoch"])
            return state
        if errors:
            raise CTTransferError(errors[0] + " (and no earlier checkpoint to fall back to)")
        return None


def record_failure(run_dir, msg: str, details: str = "") -> None:
    """A failed run's ``error.txt`` (one line) and ``error.log`` (the trace); never raises."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _io.write_text(run_dir / "error.txt", msg + "\n")
        if details:
            _io.write_text(run_dir / "error.log", details)
    except (OSError, CTTransferError):
        pass


class RunLock:
    """``RUN/.lock`` created exclusively (``O_EXCL``) with ``pid host`` inside; a second writer is
    refused with the holder's name. A lock whose process is gone (same host, pid not running) is
    stale: it is replaced, with a log line. Released (removed) on exit, also after an error."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False

    @staticmethod
    def _me() -> str:
        import socket

        return f"{os.getpid()} {socket.gethostname()}"

    def _holder(self) -> tuple[int | None, str]:
        try:
            pid, _, host = self.path.read_text(encoding="utf-8", errors="replace").strip().partition(" ")
            return int(pid), host.strip()
        except (OSError, ValueError):
            return None, ""

    def acquire(self) -> "RunLock":
        import socket

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, host = self._holder()
                if pid is not None and host == socket.gethostname() and not _alive(pid):
                    log.warning("%s: stale lock of process %d (no longer running) replaced", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                if pid is None:  # being written this instant, or damaged: say so rather than guess
                    raise CTTransferError(f"{self.path.parent}: locked by another process ({self.path} unreadable); "
                                          f"if no ct-transfer process uses this run, remove {self.path}")
                raise CTTransferError(f"{self.path.parent}: another process (pid {pid} on {host or 'an unknown host'}) "
                                      f"is writing this run; wait for it to finish (or remove {self.path} if that "
                                      "process is gone)")
            except OSError as exc:
                raise CTTransferError(f"{self.path.parent}: cannot write here ({_io.why(exc)})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self._me() + "\n")
            self.held = True
            return self
        raise CTTransferError(f"{self.path}: cannot take the lock (another process keeps replacing it)")

    def release(self) -> None:
        if self.held:
            try:
                if self.path.read_text(encoding="utf-8").strip() == self._me():
                    self.path.unlink()
            except OSError:
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True
