"""One run across worker processes: 2 CPU processes over loopback (torch.distributed gloo + DDP).

The callbacks below run inside the spawned workers (they are pickled there), so what they write is
what each worker really did: which train images it stepped on, its weights at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ct_transfer.engine import Callback
from ct_transfer.errors import ConfigError, CTTransferError

from .conftest import ROOT, error_line

BASE = dict(model="EfficientNetLite0", weights="none", image_size=32, limit=16, batch_size=4, threads=2,
            shift_guard="none")


class RecordSeen(Callback):
    """Each worker appends the train indices of every step to ``rank{r}-epoch{e}.txt`` and writes a
    digest of its learned parameters at the end."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_batch_end(self, state, n, loss_sum, correct):
        with open(os.path.join(self.folder, f"rank{state.rank}-epoch{state.epoch}.txt"), "a") as fh:
            fh.write(" ".join(str(int(i)) for i in state.batch_index) + "\n")

    def on_fit_end(self, state):
        h = hashlib.sha256()
        for k, v in sorted(state.model.named_parameters()):  # BatchNorm statistics: each worker's own batches
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        Path(self.folder, f"rank{state.rank}-weights.txt").write_text(h.hexdigest())


class SlowEpochs(Callback):
    """Rank 0 waits after each epoch: time for a test to kill the run between checkpoints."""

    order = 90

    def __init__(self, seconds):
        self.seconds = seconds

    def on_epoch_end(self, state, row):
        if state.rank == 0:
            time.sleep(self.seconds)


def _steps(folder: Path, rank: int, epoch: int) -> list[list[int]]:
    f = folder / f"rank{rank}-epoch{epoch}.txt"
    return [[int(i) for i in line.split()] for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, data_dir):
    """A real 2-worker run: 2 epochs, per-worker batch 4, 32 px, 16 images per class."""
    from ct_transfer import TrainConfig, fit

    root = tmp_path_factory.mktemp("workers")
    seen = root / "seen"
    seen.mkdir()
    cfg = TrainConfig(data=str(data_dir), out=str(root / "run"), epochs=2, workers=2, **BASE)
    run = fit(cfg, progress=False, callbacks=[RecordSeen(seen)])
    return root / "run", seen, run


def test_two_workers_write_one_normal_run_that_loads_and_predicts(two_workers, data_dir):
    from ct_transfer import load_run

    out, _, run = two_workers
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "split.csv", "history.csv", "metrics.json", "last.pt", "best.safetensors"} <= names
    config, metrics = json.loads((out / "config.json").read_text()), json.loads((out / "metrics.json").read_text())
    for rec in (config, metrics):
        assert (rec["workers"], rec["effective_batch_size"], rec["lr"], rec["threads_per_worker"]) == (2, 8, 1e-4, 1)
    assert [r["epoch"] for r in run.history] == [1, 2]
    assert metrics["test"]["n"] == len([r for r in run.split if r["subset"] == "test"])
    loaded = load_run(out)
    image = next((data_dir / "COVID").iterdir())
    [pred] = loaded.predict([str(image)])
    assert pred.label in ("COVID", "non-COVID") and abs(sum(pred.probabilities.values()) - 1) < 1e-5


def test_each_train_image_is_seen_once_per_epoch_across_workers(two_workers):
    _, seen, run = two_workers
    n = sum(r["subset"] == "train" for r in run.split)
    for epoch in (0, 1):
        a, b = _steps(seen, 0, epoch), _steps(seen, 1, epoch)
        assert len(a) == len(b) > 0  # DDP: the same number of steps on every worker
        assert all(len(s) == 4 for s in a[:-1] + b[:-1])  # batch_size images per worker per step
        together = [i for s in a + b for i in s]
        tail = n % 8  # a last step too small to give each worker 2 images is dropped (as a lone image alone)
        expected = n - (tail if tail < 4 else 0)
        # no image twice in an epoch, none padded in, every image once but a dropped tail
        assert len(together) == len(set(together)) == expected and set(together) <= set(range(n))
    assert _steps(seen, 0, 0) != _steps(seen, 0, 1)  # a new shuffle each epoch
    # gradients were averaged: both workers end with the same parameters
    assert (seen / "rank0-weights.txt").read_text() == (seen / "rank1-weights.txt").read_text()


def test_a_killed_two_worker_run_resumes_with_the_same_epochs(tmp_path, data_dir):
    from ct_transfer import TrainConfig, fit

    out, seen = tmp_path / "run", tmp_path / "seen"
    seen.mkdir()
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from tests.test_workers import SlowEpochs, BASE\n"
              "from ct_transfer import TrainConfig, fit\n"
              "if __name__ == '__main__':\n"
              f"    fit(TrainConfig(data={str(data_dir)!r}, out={str(out)!r}, epochs=3, workers=2, **BASE),\n"
              "        progress=False, callbacks=[SlowEpochs(30)])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        history = out / "history.csv"
        while not ((out / "last.pt").exists() and history.exists() and len(history.read_text().splitlines()) > 1):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no first epoch's checkpoint in 4 minutes"
            time.sleep(0.5)
        holder = int((out / ".lock").read_text().split()[0])  # rank 0, a child of the killed parent
        proc.send_signal(signal.SIGKILL)  # the parent: its workers must stop on their own
        proc.wait(30)
        while _alive(holder):
            assert time.time() < deadline + 30, "worker 0 outlived its killed parent"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    history_before = (out / "history.csv").read_text().splitlines()
    assert len(history_before) == 2  # header + epoch 1: killed after the first checkpoint

    cfg = TrainConfig(data=str(data_dir), out=str(out), epochs=3, **BASE)  # workers left out: the run's 2
    run = fit(cfg, progress=False, resume=True, callbacks=[RecordSeen(seen)])
    assert [r["epoch"] for r in run.history] == [1, 2, 3]
    assert (out / "history.csv").read_text().splitlines()[:2] == history_before
    assert not _steps(seen, 0, 0) and _steps(seen, 0, 1) and _steps(seen, 1, 2)  # both restarted at epoch 2
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by init) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_one_worker_is_the_one_process_path(tmp_path, data_dir):
    """workers=1 (the default) never starts torch.distributed; its config has no data-parallel facts."""
    import torch

    from ct_transfer import TrainConfig, fit
    from ct_transfer.engine.loop import _batches, steps_per_epoch

    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "one"), epochs=1, **BASE)
    assert cfg.workers == 1
    fit(cfg, progress=False)
    assert not torch.distributed.is_initialized()
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["workers"] == 1 and "effective_batch_size" not in config and "executor" not in config
    # two workers with batch B split each one-process step of 2B images of the same seeded permutation
    for n, b in ((10, 2), (17, 2), (33, 2), (16, 3)):
        one = [x.tolist() for x in _batches(n, 2 * b, torch.Generator().manual_seed(n))]
        two = [[x.tolist() for x in _batches(n, b, torch.Generator().manual_seed(n), rank=r, world=2)] for r in (0, 1)]
        assert len(two[0]) == len(two[1]) == steps_per_epoch(n, b, world=2) > 0
        for k, (x0, x1) in enumerate(zip(*two)):
            assert sorted(x0 + x1) == sorted(one[k]) and len(x0) >= 2 and len(x1) >= 2


@pytest.mark.parametrize("change, message", [
    (dict(workers=0), "workers=0: choose an integer in 1.."),
    (dict(workers=4 * (os.cpu_count() or 1) + 1), "workers="),
    (dict(workers=2, strategy="frozen"), "workers=2: strategy frozen trains only the head"),
    (dict(workers=2, out=None), "out=None: workers=2 needs a run directory"),
])
def test_bad_worker_options_fail_naming_the_parameter(data_dir, change, message):
    from ct_transfer import TrainConfig

    with pytest.raises(ConfigError) as exc:
        TrainConfig(data=str(data_dir), **{**BASE, "out": "x", **change})
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_bad_executor_and_address_fail_before_any_file(tmp_path, data_dir):
    from ct_transfer import TrainConfig, fit

    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), workers=2, **BASE)
    with pytest.raises(ConfigError, match=r"^executor=dask: choose local, ray$"):
        fit(cfg, executor="dask")
    with pytest.raises(ConfigError, match=r"^address=auto: only with executor=ray"):
        fit(cfg, address="auto")
    assert not (tmp_path / "run").exists()


def test_ray_train_missing_is_one_line_naming_the_executor(tmp_path, data_dir):
    """In a process where Ray cannot be imported (as without the [ray] extra): one CLI line, nothing written."""
    script = ("import sys; sys.modules['ray'] = None\n"  # what a missing package looks like to import
              "from ct_transfer.cli import main\n"
              "sys.exit(main())\n")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", script, "train", "--data", str(data_dir), "--model",
                          "EfficientNetLite0", "--out", str(out), "--workers", "2", "--executor", "ray"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 2
    assert error_line(res.stderr).startswith("ct-transfer: error: --executor ray: Ray Train is not installed")
    assert not out.exists()


def test_cli_workers_zero_is_one_line(tmp_path, data_dir):
    res = subprocess.run([sys.executable, "-m", "ct_transfer.cli", "train", "--data", str(data_dir), "--model",
                          "EfficientNetLite0", "--out", str(tmp_path / "run"), "--workers", "0"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 2
    assert error_line(res.stderr).startswith("ct-transfer: error: --workers 0: choose an integer in 1..")


def test_a_failing_worker_is_one_error_in_the_parent(tmp_path, data_dir):
    """A worker that fails (here: an unreadable image while decoding) ends the run with its own error."""
    from .conftest import small_dataset

    data = small_dataset(tmp_path / "data", data_dir, per_class=10)
    bad = data / "COVID" / "broken.png"
    bad.write_bytes(b"not a png")
    from ct_transfer import TrainConfig, fit

    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, workers=2, **{**BASE, "limit": None})
    t0 = time.time()
    with pytest.raises(CTTransferError) as exc:
        fit(cfg, progress=False)
    assert "broken.png" in str(exc.value) and "\n" not in str(exc.value)
    assert time.time() - t0 < 120
