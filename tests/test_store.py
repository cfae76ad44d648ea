"""The disk store of decoded images (data/store.py): same bytes and same training as the in-memory
path on real slices, indexing like a tensor, rebuilt (never half-read) after an interrupted write,
and the memory estimate as the switch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ct_transfer import TrainConfig, fit
from ct_transfer import data as D
from ct_transfer.data.store import build_store, open_store, store_name
from ct_transfer.engine.data import use_store
from ct_transfer.errors import ConfigError, CTTransferError


def _paper_rows(data_dir, per_class=15):
    rows = D.split_folder(data_dir, "paper", 0)
    return D.limit_rows(rows, per_class, 0)


def test_store_bytes_and_indexing_equal_memory(tmp_path, data_dir):
    rows = _paper_rows(data_dir)
    classes = D.resolve_classes(rows, None)
    pre = D.Preprocess(64)
    x_mem, y_mem, kept_mem, _ = D.load_subset(rows, "train", classes, data_dir, pre)
    paths = [D.row_path(r, data_dir) for r in rows if r["subset"] == "train"]
    x, kept, bad = build_store(paths, pre, tmp_path)
    assert kept == list(range(len(paths))) and bad == [] and len(x) == len(x_mem) == len(paths)
    assert x.shape == x_mem.shape
    assert torch.equal(x[:], x_mem)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:7]
    assert torch.equal(x[idx], x_mem[idx])  # a shuffled batch, gathered per image
    assert torch.equal(x[3:9], x_mem[3:9]) and torch.equal(x[-1], x_mem[-1]) and torch.equal(x[::3], x_mem[::3])
    assert np.array_equal(x.memmap(), x_mem.numpy())
    with pytest.raises(IndexError):
        x[len(x)]
    # a second build finds the committed store and decodes nothing
    meta = tmp_path / f"{store_name(paths, pre)}.json"
    stamp = meta.stat().st_mtime_ns
    again, kept2, _ = build_store(paths, pre, tmp_path)
    assert meta.stat().st_mtime_ns == stamp and kept2 == kept and torch.equal(again[:], x_mem)


def test_training_from_store_equals_memory_bit_for_bit(tmp_path, data_dir):
    """The paper split (15 images per class): the same weights, losses and test predictions."""
    out = {}
    for mode in ("memory", "disk"):
        cfg = TrainConfig(data=str(data_dir), model="EfficientNetLite0", epochs=1, limit=15, split_preset="paper",
                          image_size=64, store=mode, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / mode))
        run = fit(cfg, progress=False)
        out[mode] = run
    mem, disk = out["memory"], out["disk"]
    assert list((tmp_path / "cache" / "store").glob("*.u8")), "the disk run used no store"
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[h[k] for k in keys] for h in mem.history] == [[h[k] for k in keys] for h in disk.history]
    sd_m, sd_d = mem.model.state_dict(), disk.model.state_dict()
    assert all(torch.equal(sd_m[k], sd_d[k]) for k in sd_m)
    for name in ("predictions_val.csv", "predictions_test.csv"):
        assert (tmp_path / "memory" / name).read_text() == (tmp_path / "disk" / name).read_text()


def test_interrupted_store_is_rebuilt_never_read(tmp_path, data_dir):
    pre = D.Preprocess(64)
    paths = sorted(str(p) for p in (data_dir / "COVID").iterdir())
    name = store_name(paths, pre)
    # A writer killed mid-way: only its temporary file is there, nothing that commits it.
    code = ("import sys; from ct_transfer import data as D; from ct_transfer.data.store import build_store; "
            "build_store(sys.argv[2:], D.Preprocess(64), sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), *paths])
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(f".{name}*.tmp")):
        assert proc.poll() is None, "the writer finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / f"{name}.u8").exists() and not (tmp_path / f"{name}.json").exists()
    assert open_store(tmp_path, name, 64) is None

    sub = paths[:12]
    expect = D.ImageCache(pre).load_many(sub)[0]
    sub_name = store_name(sub, pre)
    x, _, _ = build_store(sub, pre, tmp_path)
    assert np.array_equal(x[:].numpy(), expect)
    # A committed store whose data file was cut short (disk full, a partial copy): rebuilt, not read.
    data = tmp_path / f"{sub_name}.u8"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    assert open_store(tmp_path, sub_name, 64) is None
    x, _, _ = build_store(sub, pre, tmp_path)
    assert np.array_equal(x[:].numpy(), expect)
    # A JSON that lies about the count is refused the same way.
    meta_path = tmp_path / f"{sub_name}.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n": meta["n"] + 1}))
    assert open_store(tmp_path, sub_name, 64) is None


def test_bad_files_and_changed_files(tmp_path, data_dir):
    import shutil

    pre = D.Preprocess(64)
    good = tmp_path / "good.png"
    shutil.copy(sorted((data_dir / "COVID").iterdir())[0], good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = [str(good), str(bad)]
    with pytest.raises(CTTransferError, match="broken.png"):
        build_store(paths, pre, tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.json"))
    x, kept, msgs = build_store(paths, pre, tmp_path / "s", on_bad="skip")
    assert len(x) == 1 and kept == [0] and len(msgs) == 1 and "broken.png" in msgs[0]
    with pytest.raises(CTTransferError, match="broken.png"):  # a reused store still reports its bad files
        build_store(paths, pre, tmp_path / "s")
    before = store_name(paths, pre)
    os.utime(good, ns=(0, 0))  # a changed file is a new store, never the old one's pixels
    assert store_name(paths, pre) != before


def test_memory_estimate_is_the_switch(data_dir):
    base = dict(data=str(data_dir), model="EfficientNetLite0")
    huge = 10**7  # 10 million slices at 224 px: ~7 TB decoded, more than any machine here has
    assert use_store(TrainConfig(**base), huge, 224) is True
    assert use_store(TrainConfig(**base), 100, 64) is False
    assert use_store(TrainConfig(**base, store="disk"), 100, 64) is True
    with pytest.raises(ConfigError, match="store=disk"):
        use_store(TrainConfig(**base, store="memory"), huge, 224)
    with pytest.raises(ConfigError):
        TrainConfig(**base, store="ram")
