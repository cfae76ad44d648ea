"""Grid cells as Ray tasks: the study on many machines, on an existing engine (Ray), not our own.

Each cell is one ``@ray.remote`` task calling the same ``run_cell`` the local executor calls, so
skipping, resuming and failure records are identical. The tasks write into the grid directory
themselves: on several machines that directory must be shared storage (NFS, a cluster file
system) mounted at the same path everywhere — see docs/distributed.md.

Why tasks and not Ray Tune trials: a grid has no search, no scheduler decisions and no trial
state of its own; the grid directory already is the state (``run_status``), so a task per cell
keeps one source of truth and the restart logic of the local executor.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .errors import ConfigError, CTTransferError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ct-transfer[ray]'"
MAX_RETRIES = 3  # a task whose worker process or node died is rerun (and resumes from last.pt)


def import_ray():
    try:
        import ray
    except ImportError:
        raise CTTransferError(f"executor=ray: Ray is not installed; install it with {INSTALL_HINT}") from None
    return ray


def check_ray(*, cpus_per_run: float, gpus_per_run: float) -> None:
    """Ray importable and sane resource requests, before the grid writes anything."""
    import_ray()
    if not isinstance(cpus_per_run, (int, float)) or not 0 < cpus_per_run <= 1024:
        raise ConfigError("cpus_per_run", cpus_per_run, "choose a number of CPUs > 0")
    if not isinstance(gpus_per_run, (int, float)) or not 0 <= gpus_per_run <= 64:
        raise ConfigError("gpus_per_run", gpus_per_run, "choose 0, a fraction such as 0.25, or a whole number")


def init_ray(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (``auto`` or HOST:PORT) or start Ray on this machine.
    Returns True when this call started (and so must stop) Ray."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # Worker stdout (our log lines) is forwarded to the driver; the dashboard is not needed.
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address and address != "auto":
        _check_reachable(address)  # ray.init retries a dead address for minutes
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    except ConnectionError as exc:
        raise ConfigError("address", address, f"cannot reach a Ray cluster ({' '.join(str(exc).split())[:160]})") \
            from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("address", address, "give auto or HOST:PORT of the Ray head node")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError("address", address, f"cannot reach a Ray cluster "
                              f"({(exc.strerror or str(exc)).lower()})") from None


def _worker_logging() -> None:
    """Our INFO lines on the worker's stdout (Ray forwards them to the driver, prefixed by the task)."""
    logger = logging.getLogger("ct_transfer")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _ray_cell(fn, spec: dict) -> dict:
    """What a Ray worker runs: the executor-independent cell function."""
    _worker_logging()
    return fn(spec)


def run_cells_on_ray(fn, specs: list[dict], *, address: str | None = None, cpus_per_run: float = 1,
                     gpus_per_run: float = 0, max_retries: int = MAX_RETRIES):
    """Run ``fn(spec)`` for every spec as a Ray task; yields ``(spec, result)`` as tasks finish.

    A task that Ray itself gives up on (its worker or node died ``max_retries`` + 1 times) is
    reported as a failed cell with ``error.txt`` written, like any other failure.
    """
    if not specs:
        return
    ray = import_ray()
    from .rundir import record_failure  # the grid's failure record, written by the driver here

    started = init_ray(address, num_cpus=None)
    try:
        total = ray.cluster_resources()
        log.info("ray: %d run(s) on a cluster with %s CPU(s), %s GPU(s); %s CPU(s) and %s GPU(s) per run",
                 len(specs), total.get("CPU", 0), total.get("GPU", 0), cpus_per_run, gpus_per_run)
        if total.get("CPU", 0) < cpus_per_run or total.get("GPU", 0) < gpus_per_run:
            raise CTTransferError(f"cpus_per_run={cpus_per_run} gpus_per_run={gpus_per_run}: more than the "
                                  f"whole cluster has ({total.get('CPU', 0)} CPUs, {total.get('GPU', 0)} GPUs)")
        # Ray sets OMP_NUM_THREADS to the task's num_cpus, so torch in a task uses the CPUs it reserved.
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                          retry_exceptions=False)(_ray_cell)
        pending = {task.remote(fn, spec): spec for spec in specs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the task could not finish on any worker
                msg = f"ray: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                record_failure(Path(spec["config"]["out"]), msg)
                result = {"run": Path(spec["config"]["out"]).name, "status": "failed", "error": msg}
            log.info("%s: %s", spec["head"], result["status"])
            yield spec, result
    finally:
        if started:
            ray.shutdown()
