"""One training run data-parallel over N worker processes (``TrainConfig.workers``), on existing engines.

``executor="local"``: ``torch.multiprocessing`` spawns N processes on this machine; they meet over
loopback (``init_process_group("gloo", init_method="tcp://127.0.0.1:PORT")``, nothing written to
``os.environ``). ``executor="ray"``: a Ray Train ``TorchTrainer`` runs the same per-worker function
on N Ray workers (Ray sets up the process group), here or on a cluster (``address``).

Every worker runs the engine's own ``assemble`` -> ``train`` with a ``Dist`` (its rank): the same
seeded epoch permutation everywhere, each worker training on its shard of every step
(``loop._shard``), gradients averaged by ``DistributedDataParallel``. Per-worker batch =
``batch_size``, so the effective batch is ``batch_size x workers``; ``lr`` is used as given (no
linear scaling: state it, change it yourself). Rank 0 alone decodes val and test, evaluates val
each epoch and shares the figures (the best epoch and early stop are the same on every rank), and
alone writes the run (config, split, history, checkpoints, outputs, guard, calibration). The
other ranks hold only the train images (with ``store="disk"`` they read only their shard's
images per batch from rank 0's store; in memory each holds the whole train subset).
``threads`` is the run's total, split evenly between the workers.

Resume: every worker restarts from rank 0's ``last.pt``. A failed worker ends the run: the parent
sees it within a second (``ProcessContext.join``), stops the others and raises one line; workers
whose parent dies (killed) exit on their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import ConfigError, CTTransferError, first_line

log = logging.getLogger("ct_transfer.engine")

EXECUTORS = ("local", "ray")
GROUP_TIMEOUT_S = 1800  # a collective waiting this long fails (rank 0 may decode a large store alone first)


@dataclass
class Dist:
    """A worker's place in the group, and the few collectives the loop needs."""

    rank: int
    world: int
    threads: int
    device: str = "cpu"
    executor: str = "local"

    def barrier(self) -> None:
        torch.distributed.barrier()

    def share(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, loss, correct, seen: int):
        """The epoch's loss sum, correct count and images over all ranks."""
        t = torch.stack([loss.detach().double().reshape(()), correct.detach().double().reshape(()),
                         torch.tensor(float(seen), dtype=torch.float64, device=loss.device)])
        torch.distributed.all_reduce(t)
        return t[0], int(t[1]), int(t[2])

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    def facts(self, cfg: TrainConfig) -> dict:
        return {"workers": self.world, "executor": self.executor, "effective_batch_size": cfg.batch_size * self.world,
                "threads_per_worker": self.threads,
                "shard": "one permutation per epoch; step k: images [k*B*W, (k+1)*B*W) of it, worker r takes "
                         "every W-th from r (B = batch_size, W = workers); no padding"}


def check_executor(executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise ConfigError("executor", executor, f"choose {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ConfigError("address", address, "only with executor=ray (local workers meet on this machine)")
    if executor == "ray":
        try:
            import ray.train.torch  # noqa: F401
        except ImportError:
            from ..distributed import INSTALL_HINT

            raise ConfigError("executor", executor, f"Ray Train is not installed; install it with {INSTALL_HINT}") \
                from None


def fit(config: TrainConfig, *, callbacks=(), progress: bool = True, resume: bool = False,
        test: bool = True, overwrite: bool = False, executor: str = "local", address: str | None = None):
    """Train ``config.model`` on ``config.data`` and return the trained ``Run``: in this process
    (``config.workers == 1`` and ``executor="local"``: ``engine.loop.fit``, every option there), or
    as one run data-parallel over ``config.workers`` processes: ``local`` spawns them on this machine,
    ``ray`` runs them as a Ray Train ``TorchTrainer`` (``address``: the cluster to join).

    With workers, ``callbacks`` run in every worker (they must pickle; ``state.rank`` says which;
    rank 0's ``state.stop`` counts), a script calling ``fit`` needs the usual
    ``if __name__ == "__main__":`` guard of spawned processes, and the returned run is read back
    from ``config.out``, which rank 0 wrote."""
    from .loop import fit as fit_here

    check_executor(executor, address)
    config = _resumed_workers(config, resume)
    if config.workers == 1 and executor == "local":
        return fit_here(config, callbacks=callbacks, progress=progress, resume=resume, test=test, overwrite=overwrite)
    return _fit_workers(config, callbacks=callbacks, progress=progress, resume=resume, test=test,
                        overwrite=overwrite, executor=executor, address=address)


def _resumed_workers(config: TrainConfig, resume: bool) -> TrainConfig:
    """``resume=True`` with workers left at 1 continues a data-parallel run on as many workers as it
    had (like every option left at its default); another count is refused by ``_resumed_config``."""
    from ..rundir import RunDir

    if not resume or config.workers != 1 or config.out is None or not RunDir(config.out).is_run():
        return config
    try:
        saved = int(RunDir(config.out).read_config().get("workers", 1))
    except (CTTransferError, TypeError, ValueError):
        return config  # the one-process resume says what is wrong with the run's config
    return config.replace(workers=saved) if saved > 1 else config


def _fit_workers(config: TrainConfig, *, callbacks, progress, resume, test, overwrite, executor, address):
    from ..rundir import RunDir
    from .loop import _check_out, _resumed_config

    if config.out is None:
        raise ConfigError("out", None, f"executor={executor} needs a run directory (worker 0 writes the run there)")
    # Everything the parent can check, before any worker starts or any file changes.
    folder = Path(config.out)
    with RunDir(folder).lock() if folder.is_dir() else contextlib.nullcontext():  # is another process writing it?
        rundir = _check_out(config, resume, overwrite)
        if resume and rundir.is_run():
            config = _resumed_config(config, rundir)
    config.resolved()
    world = config.workers
    threads = max(1, (config.threads or os.cpu_count() or 1) // world)
    payload = {"config": config, "callbacks": list(callbacks), "progress": progress, "resume": resume, "test": test,
               "overwrite": overwrite, "threads": threads, "executor": executor, "parent": os.getpid(),
               "log_level": logging.getLogger("ct_transfer").getEffectiveLevel() if progress else logging.WARNING}
    log.info("%d workers (%s), %d thread(s) each; effective batch %d x %d = %d, lr %g", world, executor, threads,
             config.batch_size, world, config.batch_size * world, config.lr)
    if executor == "ray":
        _run_ray(payload, world, address)
    else:
        _run_local(payload, world)
    from ..run import load_run

    return load_run(config.out)


# -- local: torch.multiprocessing ----------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_local(payload: dict, world: int) -> None:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    errors = mp.get_context("spawn").SimpleQueue()
    port = _free_port()
    ctx = mp.start_processes(_local_worker, args=(world, port, payload, errors), nprocs=world, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=1.0):
            pass
    except ProcessException as exc:  # join stopped the other workers already
        raise _worker_error(errors, exc) from None
    finally:
        for p in ctx.processes:  # an interrupt (Ctrl-C) in the parent: no worker outlives it
            if p.is_alive():
                p.terminate()
                p.join(5)


def _worker_error(errors, exc) -> CTTransferError:
    """One error for the parent: a worker's own error (a ConfigError keeps its parameter), the
    first one reported, else what the process exit says."""
    found = []
    while not errors.empty():
        found.append(errors.get())
    found.sort(key=lambda e: (e[1] != "config", e[1] != "ct", e[0]))  # our errors before collective fallout
    if not found:
        return CTTransferError(f"worker {getattr(exc, 'error_index', '?')}: {first_line(exc)}")
    rank, kind, info = found[0]
    if kind == "config":
        return ConfigError(*info)
    return CTTransferError(info if kind == "ct" else f"worker {rank}: {info}")


def _local_worker(rank: int, world: int, port: int, payload: dict, errors) -> None:
    """One spawned worker: join the group over loopback, train, report an error as one line."""
    _exit_with_parent(payload["parent"])
    try:
        cfg = payload["config"]
        device, backend = _device(cfg.device, rank, world)
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            train_rank(Dist(rank, world, payload["threads"], device, "local"), payload)
        finally:
            torch.distributed.destroy_process_group()
    except BaseException as exc:
        errors.put(_describe(rank, exc))
        raise SystemExit(1) from None


def _device(name: str, rank: int, world: int) -> tuple[str, str]:
    """Each worker's device and the group's backend: one GPU per worker when there are enough, else the CPU."""
    from .loop import pick_device

    device = pick_device(name)
    if device.startswith("cuda") and torch.cuda.device_count() >= world:
        return f"cuda:{rank}", "nccl"
    if device.startswith("cuda"):
        raise ConfigError("workers", world, f"{world} workers need {world} GPUs, this machine has "
                          f"{torch.cuda.device_count()}; choose fewer workers or device=cpu")
    return "cpu", "gloo"


def _describe(rank: int, exc: BaseException) -> tuple:
    if isinstance(exc, ConfigError):
        return rank, "config", (exc.param, exc.value, exc.why)
    if isinstance(exc, CTTransferError):
        return rank, "ct", str(exc)
    return rank, "other", f"{type(exc).__name__}: {first_line(exc)}"


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed stops (its run continues with resume=True)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="ct-parent-watch").start()


def _worker_logging(rank: int, level: int) -> None:
    """The worker's log lines on its stderr (a spawned process starts without handlers)."""
    logger = logging.getLogger("ct_transfer")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[worker {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))


def train_rank(dist: Dist, payload: dict) -> None:
    """What each worker runs (either executor): the engine's assemble -> train, rank 0 also finish."""
    from .loop import assemble, finish, train

    _worker_logging(dist.rank, payload["log_level"])
    with contextlib.ExitStack() as stack:
        parts = assemble(payload["config"], callbacks=payload["callbacks"], progress=payload["progress"],
                         resume=payload["resume"], test=payload["test"], overwrite=payload["overwrite"],
                         stack=stack, dist=dist)
        train(parts)
        if dist.rank == 0:
            finish(parts)


# -- ray: Ray Train TorchTrainer ------------------------------------------------------------------------

def _ray_worker(payload: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    cfg = payload["config"]
    # Relative paths (data, out, split files) mean what they meant to the caller; a Ray Train worker
    # is a process of its own for this run, started elsewhere (on a cluster the folder must be shared)
    os.chdir(payload["cwd"])
    device = "cpu" if not cfg.device.startswith("cuda") else f"cuda:{ctx.get_local_rank()}"
    train_rank(Dist(ctx.get_world_rank(), ctx.get_world_size(), payload["threads"], device, "ray"), payload)


def _run_ray(payload: dict, world: int, address: str | None) -> None:
    import shutil
    import tempfile

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..distributed import init_ray

    started = init_ray(address)
    storage = tempfile.mkdtemp(prefix="ct-ray-train-")  # Ray Train's own result files; ours are in out
    try:
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={**payload, "parent": None, "cwd": os.getcwd()},
            scaling_config=ScalingConfig(num_workers=world, use_gpu=payload["config"].device.startswith("cuda"),
                                         resources_per_worker={"CPU": payload["threads"]}),
            torch_config=TorchConfig(backend="gloo", timeout_s=GROUP_TIMEOUT_S),
            run_config=RunConfig(name="ct-transfer", storage_path=storage, failure_config=FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except Exception as exc:  # Ray's TrainingFailedError wraps the worker's traceback
            raise CTTransferError(f"executor=ray: {_ray_reason(exc)}") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started:
            ray.shutdown()


def _ray_reason(exc: BaseException) -> str:
    """The worker's own error line out of Ray's wrapped traceback text."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        for kind in ("ConfigError: ", "CTTransferError: "):
            if kind in ln:
                return ln.split(kind, 1)[1]
    return first_line(exc)
