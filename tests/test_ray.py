"""The grid on a real Ray cluster (a head and a worker node on 127.0.0.1, one CPU each): killed
driver, killed worker, restart, and the same metrics as the local executor for the same seeds."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ct_transfer.cli import main
from ct_transfer.experiment import run_grid

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ct-transfer[ray]')")

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = dict(epochs=3, limit=8, threads=1)  # threads=1: the same float sums in both executors
FLAGS = ["--models", "EfficientNetLite0", "--weights", "none", "--epochs", "3", "--limit", "8", "--threads", "1",
         "--quiet"]
TIMING = {"seconds", "train_ips"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    """Processes whose environment holds this cluster's own token (Ray renames its workers' command
    lines, but every process of the cluster inherits the env): only this test's processes."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


class _Cluster:
    def __init__(self, address, env):
        self.address, self.env = address, env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` and a second `ray start --address` node on 127.0.0.1, one CPU each, token auth.

    Everything Ray runs in subprocesses with this env (the test process never joins the cluster);
    teardown ends only the processes under this cluster's own temp dir."""
    port = _free_port()
    temp = f"/tmp/ray-t{secrets.token_hex(3)}"  # short: Ray's unix socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={temp}", *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        yield _Cluster(f"127.0.0.1:{port}", env)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_with(env["RAY_AUTH_TOKEN"]):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(2)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("local-grid")
    results = run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none"], [0, 1], base=BASE, progress=False)
    assert [r["status"] for r in results] == ["done", "done"]
    return out


def _cli(cluster, *args, **kw):
    return subprocess.run([sys.executable, "-m", "ct_transfer.cli", *args], capture_output=True, text=True,
                          env=cluster.env, timeout=300, **kw)


def _driver(data_dir, out, cluster, seeds="0,1"):
    cmd = [sys.executable, "-m", "ct_transfer.cli", "experiment", "--data", str(data_dir), "--out", str(out),
           *FLAGS, "--seeds", seeds, "--executor", "ray", "--address", cluster.address]
    env = cluster.env
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def _wait_for(predicate, proc, lines, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail("driver ended before the condition:\n" + "".join(lines)[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out:\n" + "".join(lines)[-3000:])
        time.sleep(0.05)


def _partial(run_dir: Path) -> bool:
    return (run_dir / "last.pt").exists() and not (run_dir / "metrics.json").exists()


def _numbers(obj) -> list:
    """Every number in a nested JSON value, in order."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj) for x in _numbers(obj[k])]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def _same_as_local(grid: Path, local: Path, names):
    for name in names:
        got = json.loads((grid / "runs" / name / "metrics.json").read_text())
        want = json.loads((local / "runs" / name / "metrics.json").read_text())
        for key in ("val", "test", "epochs", "best_epoch"):
            if isinstance(got[key], dict):  # the guard's scores are sums of squares of ~1e4: float noise
                assert _numbers(got[key].pop("selective", {})) == pytest.approx(
                    _numbers(want[key].pop("selective", {})), rel=1e-4), (name, key)
            assert got[key] == want[key], (name, key)
        strip = lambda p: [{k: v for k, v in zip(p[0].split(","), row.split(",")) if k not in TIMING}  # noqa: E731
                           for row in p[1:]]
        hist = (grid / "runs" / name / "history.csv").read_text().splitlines()
        ref = (local / "runs" / name / "history.csv").read_text().splitlines()
        assert len(hist) == 1 + BASE["epochs"] and strip(hist) == strip(ref), name


def test_driver_killed_then_rerun_matches_local(cluster, local_grid, data_dir, tmp_path):
    grid = tmp_path / "g"
    runs = [grid / "runs" / f"EfficientNetLite0__none__seed{s}" for s in (0, 1)]
    proc, lines, _ = _driver(data_dir, grid, cluster)
    _wait_for(lambda: any((r / "last.pt").exists() for r in runs), proc, lines)
    proc.send_signal(signal.SIGKILL)  # the driver dies mid-grid, its tasks with it
    proc.wait(timeout=30)
    assert any(_partial(r) for r in runs), "the kill came after the runs finished"
    assert not all((r / "metrics.json").exists() for r in runs)

    rerun = _cli(cluster, "experiment", "--data", str(data_dir), "--out", str(grid), *FLAGS, "--seeds", "0,1",
                 "--executor", "ray", "--address", cluster.address)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # a log line (Ray forwards its workers' lines to the driver): the interrupted run went on from its checkpoint
    assert "resuming" in rerun.stdout + rerun.stderr
    _same_as_local(grid, local_grid, [r.name for r in runs])

    # a third start finds everything done and trains nothing
    assert main(["experiment", "--data", str(data_dir), "--out", str(grid), *FLAGS, "--seeds", "0,1"]) == 0


def test_worker_killed_task_is_retried_and_resumes(cluster, local_grid, data_dir, tmp_path):
    grid = tmp_path / "g"
    run = grid / "runs" / "EfficientNetLite0__none__seed0"
    proc, lines, reader = _driver(data_dir, grid, cluster, seeds="0")
    pid = re.compile(r"pid=(\d+)(?:, ip=[^)]*)?\)\S*\s+\[1/1\] EfficientNetLite0 weights=none seed=0: starting")
    _wait_for(lambda: any(pid.search(line) for line in lines), proc, lines)
    worker = int(next(pid.search(line) for line in lines if pid.search(line)).group(1))
    _wait_for(lambda: _partial(run), proc, lines)
    os.kill(worker, signal.SIGKILL)  # the Ray worker process running the cell (started by this test's cluster)
    assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    reader.join(timeout=10)
    out = "".join(lines)
    assert "resuming" in out and (run / "metrics.json").exists()  # retried on a new worker, from last.pt
    _same_as_local(grid, local_grid, [run.name])


def test_failing_run_is_recorded_and_the_grid_goes_on(cluster, data_dir, tmp_path):
    grid = tmp_path / "g"
    # a weights file that exists but is not weights: the CLI refuses a missing file before starting,
    # a damaged one fails inside its own run, which the grid records while the other run finishes
    missing = str(tmp_path / "missing-weights.pth")
    Path(missing).write_bytes(b"not a state dict")
    r = _cli(cluster, "experiment", "--data", str(data_dir), "--out", str(grid), "--models", "EfficientNetLite0",
             "--weights", f"none,{missing}", "--seeds", "0", "--epochs", "1", "--limit", "8", "--quiet",
             "--executor", "ray", "--address", cluster.address)
    assert r.returncode == 2 and "1 of 2 runs failed" in r.stderr, r.stderr[-2000:]
    assert (grid / "runs" / "EfficientNetLite0__none__seed0" / "metrics.json").exists()
    assert "missing-weights.pth" in (grid / "runs" / "EfficientNetLite0__file-missing-weights__seed0" / "error.txt").read_text()


def test_unreachable_address_is_one_line(cluster, data_dir, tmp_path):
    r = _cli(cluster, "experiment", "--data", str(data_dir), "--out", str(tmp_path / "g"), "--models",
             "EfficientNetLite0", "--weights", "none", "--epochs", "1", "--limit", "8", "--executor", "ray",
             "--address", f"127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and r.stderr.startswith("ct-transfer: error: --address 127.0.0.1:"), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_one_run_across_two_ray_workers_matches_the_local_workers(cluster, data_dir, tmp_path):
    """train --workers 2 --executor ray: a Ray Train TorchTrainer with one worker on each node of the
    cluster; the same seeded run as two local worker processes, epoch for epoch."""
    args = ["train", "--data", str(data_dir), "--model", "EfficientNetLite0", "--weights", "none", "--image-size",
            "32", "--limit", "16", "--batch-size", "4", "--threads", "2", "--epochs", "2", "--shift-guard", "none",
            "--workers", "2", "--quiet"]
    res = _cli(cluster, *args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--address", cluster.address)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli(cluster, *args, "--out", str(tmp_path / "local"))
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ray", "local"))
    assert (got["executor"], want["executor"], got["workers"], got["effective_batch_size"]) == ("ray", "local", 2, 8)
    for key in ("val", "test", "epochs", "best_epoch"):
        assert got[key] == want[key], key
    strip = lambda p: [{k: v for k, v in zip(p[0].split(","), row.split(",")) if k not in TIMING}  # noqa: E731
                       for row in p[1:]]
    hist, ref = ((tmp_path / d / "history.csv").read_text().splitlines() for d in ("ray", "local"))
    assert len(hist) == 3 and strip(hist) == strip(ref)
