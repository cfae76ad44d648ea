"""One test per class of failure (issue #9), on real files: read-only and full output folders, a
corrupt checkpoint on --resume, outputs aimed at a run's own files, a grid whose runs all fail,
empty subsets, a layer without a spatial map, and what messages may contain."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ct_transfer import data as D
from ct_transfer.cli import main
from ct_transfer.engine.data import check_memory
from ct_transfer.errors import ConfigError, CTTransferError, first_line

from .conftest import ROOT, small_dataset


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ct-transfer: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def rel_data(tmp_path_factory, data_dir):
    return small_dataset(tmp_path_factory.mktemp("rel-data"), data_dir, per_class=8)


@pytest.fixture(scope="module")
def rel_run(tmp_path_factory, rel_data):
    """Two epochs (so last.prev.pt exists). Read-only for tests: copy it before changing anything."""
    out = tmp_path_factory.mktemp("rel-run") / "run"
    assert main(["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "2", "--limit", "6",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "last.prev.pt").is_file()
    return out


def _image(data: Path) -> str:
    return str(sorted((data / "COVID").iterdir())[0])


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A real tmpfs at ``path`` (root in a container may mount); skips with the reason if it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- files we write where we cannot ---------------------------------------------------------------------

def test_read_only_output_folder_every_command(tmp_path, rel_data, rel_run, capsys):
    """A read-only mount: blocks root too (chmod does not). Each command fails before work, one line."""
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        image = _image(rel_data)
        commands = {
            "train": ["train", "--data", rel_data, "--model", "EfficientNetLite0", "--epochs", "1", "--limit", "4",
                      "--out", ro / "run", "--quiet"],
            "split": ["split", "--data", rel_data, "--out", ro / "s.csv"],
            "predict": ["predict", "--run", rel_run, image, "--out", ro / "p.csv"],
            "explain": ["explain", "--run", rel_run, image, "--out", ro / "ex"],
            "export": ["export", "--run", rel_run, "--out", ro / "m.onnx"],
            "experiment": ["experiment", "--data", rel_data, "--out", ro / "g", "--models", "EfficientNetLite0",
                           "--epochs", "1", "--limit", "4", "--quiet"],
        }
        before = tree_hash(rel_run)
        for name, argv in commands.items():
            assert main([str(a) for a in argv]) == 2, name
            err = one_line(capsys)
            assert str(ro) in err and "read-only file system" in err, (name, err)
            assert list(ro.iterdir()) == [], name  # nothing created, not even a folder
        assert tree_hash(rel_run) == before


def test_full_disk_leaves_no_half_written_file(tmp_path, rel_data, rel_run, capsys):
    """A 2 MB tmpfs: the checkpoint (~14 MB) cannot be written. One line, no temporary file left,
    every file that is there is complete."""
    with tmpfs(tmp_path / "full", "size=2m") as full:
        assert main(["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "1",
                     "--limit", "4", "--out", str(full / "run"), "--quiet"]) == 2
        err = one_line(capsys)
        assert "no space left on device" in err or "file write failed" in err, err
        left = sorted(p.name for p in (full / "run").iterdir()) if (full / "run").exists() else []
        assert not [n for n in left if n.endswith((".tmp", ".new"))], left
        for name in left:  # what was written before the disk filled up is whole
            if name.endswith(".json"):
                json.loads((full / "run" / name).read_text())
        # predict --out onto the now-full disk: no partial CSV
        with contextlib.suppress(OSError):
            with open(full / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 65536)
        assert main(["predict", "--run", str(rel_run), str(rel_data), "--out", str(full / "p.csv")]) == 2
        err = one_line(capsys)
        assert str(full) in err and "no space left on device" in err, err
        assert not (full / "p.csv").exists() and not list(full.glob(".p.csv*"))



def test_failed_checkpoint_write_waits_for_the_other_writes(tmp_path):
    """The background writer: when best.pt fails, the error is raised only after the queued last.pt
    write has finished (CI once listed the folder while that write's temporary file still existed)."""
    import threading
    import time

    from ct_transfer.engine.callbacks import Checkpoint
    from ct_transfer.rundir import RunDir

    done = threading.Event()

    class SlowDir(RunDir):
        def save_best(self, state):
            time.sleep(0.2)  # still running when last.pt is queued, as in training
            raise CTTransferError("best.pt: cannot write (no space left on device)")

        def save_last(self, state):
            time.sleep(0.5)
            super().save_last(state)
            done.set()

    ck = Checkpoint(SlowDir(tmp_path), background=True)
    ck._submit(ck.rundir.save_best, {})
    ck._submit(ck.rundir.save_last, {"epoch": 1})
    with pytest.raises(CTTransferError, match="no space left"):
        ck.flush()
    assert done.is_set() and (tmp_path / "last.pt").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

def test_file_size_limit_in_a_subprocess(tmp_path, rel_data):
    """RLIMIT_FSIZE (works without mount rights): writes fail with EFBIG; SIGXFSZ ignored."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from ct_transfer.cli import main\n"
        f"sys.exit(main(['train', '--data', {str(rel_data)!r}, '--model', 'EfficientNetLite0', '--epochs', '1',"
        f" '--limit', '4', '--out', {str(tmp_path / 'run')!r}, '--quiet']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=600)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "file too large" in err or "file write failed" in err, err
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith((".tmp", ".new"))]


# -- --resume with a damaged checkpoint ---------------------------------------------------------------

def test_corrupt_last_pt_falls_back_to_previous(tmp_path, rel_data, rel_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])  # a kill mid-write on a non-atomic filesystem
    args = ["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "3", "--limit", "6",
            "--out", str(run), "--resume"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "last.pt: cannot load checkpoint (the file is damaged or truncated)" in out
    assert "resuming from last.prev.pt (epoch 1)" in out
    history = (run / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]


def test_corrupt_last_pt_without_fallback_leaves_run_untouched(tmp_path, rel_data, rel_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    (run / "last.prev.pt").unlink()
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:5000])
    before = tree_hash(run)
    assert main(["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "3", "--limit", "6",
                 "--out", str(run), "--resume", "--quiet"]) == 2
    err = one_line(capsys)
    assert f"{run / 'last.pt'}: cannot load checkpoint" in err and "no earlier checkpoint" in err
    assert tree_hash(run) == before  # config.json, split.csv, history: all as they were


# -- outputs that would destroy inputs ------------------------------------------------------------------

def test_outputs_onto_a_runs_own_files_are_refused(tmp_path, rel_data, rel_run, capsys):
    before = tree_hash(rel_run)
    image = _image(rel_data)
    for argv in (["export", "--run", rel_run, "--out", rel_run / "best.pt", "--format", "pt2"],
                 ["export", "--run", rel_run, "--out", rel_run / "last.pt", "--format", "onnx"],
                 ["export", "--run", rel_run, "--out", rel_run, "--format", "onnx"],
                 ["predict", "--run", rel_run, image, "--out", rel_run / "predictions_test.csv"],
                 ["predict", "--run", rel_run, image, "--out", rel_run / "metrics.json"],
                 ["split", "--data", rel_data, "--out", rel_run / "split.csv"],
                 ["split", "--data", rel_data, "--out", rel_run / "new.txt"],  # not its own, but inside it
                 ["explain", "--run", rel_run, image, "--out", rel_run]):
        assert main([str(a) for a in argv]) == 2, argv
        err = one_line(capsys)
        assert str(rel_run) in err and ("run's own files" in err or "run directory" in err), err
    assert tree_hash(rel_run) == before  # byte-identical checkpoints, config and split


# -- exit codes ------------------------------------------------------------------------------------------

def test_grid_with_every_run_failing_exits_2_naming_them(tmp_path, rel_data, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code = main(["experiment", "--data", str(rel_data), "--out", str(tmp_path / "g"), "--models", "EfficientNetLite0",
                 "--weights", str(junk), "--seeds", "0,1", "--epochs", "1", "--limit", "4",
                 "--split-preset", "stratified", "--quiet"])
    assert code == 2
    err = one_line(capsys)
    assert "2 of 2 runs failed" in err and "seed0" in err and "seed1" in err and "junk.pth" in err
    for seed in (0, 1):
        assert (tmp_path / "g" / "runs" / f"EfficientNetLite0__file-junk__seed{seed}" / "error.txt").is_file()


# -- edge cases inside a command ----------------------------------------------------------------------------

def test_empty_val_or_test_subsets(tmp_path, rel_data, rel_run, capsys):
    rows = D.read_split(rel_run / "split.csv")
    # (a split file without test rows is a train/val split like UCSD's: its val becomes the test;
    # with neither val nor test rows there is nothing to evaluate on)
    no_test = tmp_path / "no_test.csv"
    D.write_split([r for r in rows if r["subset"] == "train"], no_test)
    assert main(["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "1",
                 "--split-file", str(no_test), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "the test subset is empty" in one_line(capsys)
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    before = tree_hash(run)
    no_val = tmp_path / "no_val.csv"
    D.write_split([r for r in rows if r["subset"] != "val"], no_val)
    assert main(["evaluate", "--run", str(run), "--split-file", str(no_val)]) == 2
    err = one_line(capsys)
    assert str(no_val) in err and "the val subset is empty" in err
    assert tree_hash(run) == before


def test_explain_at_a_layer_without_spatial_output(tmp_path, rel_data, rel_run, capsys):
    for layer, shape in (("fc", "1x2"), ("pool", "1x1280x1x1")):
        out = tmp_path / layer
        assert main(["explain", "--run", str(rel_run), _image(rel_data), "--out", str(out),
                     "--target-layer", layer]) == 2
        err = one_line(capsys)
        assert f"--target-layer {layer}: output is {shape}, not a spatial N x C x H x W map" in err
        assert not out.exists()  # checked before the output folder is made


def test_memory_estimate_is_said_with_numbers():
    with pytest.raises(ConfigError) as info:
        check_memory(10**6, 1024)
    assert info.value.param == "image_size" and " GB" in info.value.why and "available" in info.value.why


# -- messages ---------------------------------------------------------------------------------------------------

def test_messages_are_never_cut_mid_word_and_show_no_reprs(tmp_path, rel_run, capsys):
    long = ValueError("word " * 100)
    text = first_line(long, 50)
    assert text.endswith(" …") and all(w == "word" for w in text[:-2].split())
    with pytest.raises(CTTransferError) as info:
        D.decode_any(b"GIF87a" + b"\0" * 20, "<bytes>")  # PIL's message names a BytesIO object
    assert " at 0x" not in str(info.value) and "BytesIO" not in str(info.value)
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    assert main(["predict", "--run", str(rel_run), str(fake)]) == 2
    err = one_line(capsys)
    assert str(fake) in err and " at 0x" not in err and "<_io" not in err
    # a huge value is shortened in the message, with an ellipsis, not printed whole
    assert main(["split", "--data", "x" * 5000, "--out", str(tmp_path / "s.csv")]) == 2
    assert len(one_line(capsys)) < 700
