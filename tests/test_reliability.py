"""One test per class of failure (issue #9), on real files: read-only and full output folders, a
corrupt checkpoint on --resume, outputs aimed at a run's own files, a grid whose runs all fail,
empty subsets, a layer without a spatial map, and what messages may contain."""

from __future__ import annotations

import csv

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ct_transfer import data as D
from ct_transfer.cli import main
from ct_transfer.engine.data import check_memory
from ct_transfer.errors import ConfigError, CTTransferError, first_line

from .conftest import ROOT, error_line, small_dataset


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    return error_line(capsys.readouterr().err)


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
    err = capsys.readouterr().err  # log lines: stderr
    assert "last.pt: cannot load checkpoint (the file is damaged or truncated)" in err
    assert "resuming from last.prev.pt (epoch 1)" in err
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


# -- issue #22: identity of files, options that mean what they say, outputs that never collide --------

def _write_split(path: Path, rows) -> Path:
    path.write_text("path,class,subset\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows), encoding="utf-8")
    return path


def test_a_leaked_split_is_refused_and_audit_reports_it_first(tmp_path, rel_data, capsys):
    """One file in train and test, spelled three ways (as is, ./COVID//x, a symlink): an error naming
    both lines; train writes nothing; audit --split-file reports the leak as its first line."""
    covid = sorted(p.name for p in (rel_data / "COVID").iterdir())
    other = sorted(p.name for p in (rel_data / "non-COVID").iterdir())
    base = [(f"COVID/{n}", "COVID", s) for n, s in zip(covid[1:], ["train"] * 5 + ["val", "test"])]
    base += [(f"non-COVID/{n}", "non-COVID", s) for n, s in zip(other, ["train"] * 6 + ["val", "test"])]
    data = tmp_path / "data"
    shutil.copytree(rel_data, data)
    (data / "COVID" / "alias.png").symlink_to(data / "COVID" / covid[0])
    for k, alias in enumerate([f"COVID/{covid[0]}", f"./COVID//{covid[0]}", "COVID/alias.png"]):
        split = _write_split(tmp_path / f"leak{k}.csv", base + [(f"COVID/{covid[0]}", "COVID", "train"),
                                                                 (alias, "COVID", "test")])
        with pytest.raises(CTTransferError, match=r"lines \d+ and \d+ list the same file"):
            D.read_split(split, data)
        out = tmp_path / f"run{k}"
        assert main(["train", "--data", str(data), "--model", "EfficientNetLite0", "--split-file", str(split),
                     "--epochs", "1", "--out", str(out), "--quiet"]) == 2
        assert "list the same file" in one_line(capsys)
        assert not out.exists()
    capsys.readouterr()
    (data / "COVID" / "alias.png").unlink()  # scanning refuses two names of one file (tested below)
    assert main(["audit", "--data", str(data), "--split-file", str(tmp_path / "leak1.csv"), "--out",
                 str(tmp_path / "audit")]) == 0
    first = capsys.readouterr().out.splitlines()[0]  # results on stdout (the "hashing" log line is on stderr)
    assert first.startswith("LEAK: split lines") and covid[0] in first, first
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["n_same_file_in_split"] == 1 and summary["same_file_in_split"][0]["subset_b"] == "test"


def test_hidden_files_links_out_and_odd_names_are_never_data(tmp_path, rel_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(rel_data, data)
    real = sorted((data / "COVID").iterdir())[0]
    (data / "COVID" / ".ipynb_checkpoints").mkdir()
    shutil.copy(real, data / "COVID" / ".ipynb_checkpoints" / real.name)
    (data / "COVID" / "._x.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not a PNG
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    items, classes = D.scan_folder(data)
    assert classes == ["COVID", "non-COVID"] and len(items) == 16
    assert not any("ipynb" in it.path or "._" in it.path for it in items)
    assert main(["split", "--data", str(data), "--out", str(tmp_path / "s.csv")]) == 0
    assert "ipynb" not in (tmp_path / "s.csv").read_text()
    from ct_transfer.predict import collect_inputs

    dicom = data / "COVID" / "sub" / "slice0001"  # DICOM without an extension, found by its preamble
    dicom.parent.mkdir()
    shutil.copy(Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm")), dicom)
    found = collect_inputs([str(data)])
    assert dicom in found and len(found) == 17 and not any(p.name.startswith(".") or ".ipynb" in str(p) for p in found)
    dicom.unlink()
    capsys.readouterr()
    # a link leaving the folder, and a file name that is not text: one line, and split writes nothing
    for bad in ("link", "name"):
        if bad == "link":
            (data / "COVID" / "evil.png").symlink_to("/etc/passwd")
        else:
            (data / "COVID" / "evil.png").unlink()
            Path(os.fsdecode(os.fsencode(data / "COVID") + b"/\xff\xfe.png")).write_bytes(real.read_bytes())
        out = tmp_path / f"s-{bad}.csv"
        assert main(["split", "--data", str(data), "--out", str(out)]) == 2
        err = one_line(capsys)
        assert ("outside the data folder" in err) if bad == "link" else ("not valid UTF-8" in err and "\\xff" in err)
        assert not out.exists()
    with pytest.raises(CTTransferError, match="not valid UTF-8"):
        collect_inputs([str(data)])


def test_split_writes_nothing_when_it_fails_and_grouped_limits_are_one_line(tmp_path, rel_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(rel_data, data)
    (data / "COVID" / "empty.png").write_bytes(b"")
    out = tmp_path / "s.csv"
    assert main(["split", "--data", str(data), "--out", str(out)]) == 2
    assert "empty.png" in one_line(capsys) and not out.exists()
    (data / "COVID" / "empty.png").unlink()
    assert main(["split", "--data", str(data), "--out", str(out), "--preset", "grouped", "--threshold", "100000"]) == 2
    assert "--threshold 100000" in one_line(capsys)
    assert main(["split", "--data", str(data), "--out", str(out), "--preset", "grouped"]) == 2  # 8 + 8 images
    assert "at least 10 per class" in one_line(capsys) and not out.exists()


def test_one_source_twice_and_class_map_typos_are_refused(tmp_path, rel_data, capsys):
    with pytest.raises(ConfigError, match="given twice"):
        from ct_transfer import TrainConfig

        TrainConfig(data=[str(rel_data), str(rel_data) + "/./"], model="EfficientNetLite0")
    base = ["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "1", "--quiet"]
    for extra, expect in ((["--class-map", "COVD=COVID"], "no class folder 'COVD'"),
                          (["--class-map", "COVID=A,COVID=B"], "mapped twice"),
                          (["--batch-size", "1"], "need at least 2 images per batch")):
        out = tmp_path / "run"
        assert main(base + extra + ["--out", str(out)]) == 2
        assert expect in one_line(capsys) and not out.exists()


def test_batch_size_one_trains_where_no_batchnorm_learns(tmp_path, rel_data):
    """Frozen BatchNorm statistics: batch size 1 is allowed, and it really trains (weights move)."""
    from ct_transfer import TrainConfig, fit

    cfg = TrainConfig(data=str(rel_data), model="EfficientNetLite0", epochs=1, batch_size=1, bn_stats="frozen",
                      limit=4, image_size=32, out=None)
    run = fit(cfg, progress=False)
    assert run.history[0]["train_loss"] > 0  # batches ran (before: every one-image batch was skipped, loss 0.0)


def test_resume_refuses_other_options_and_train_refuses_any_run(tmp_path, rel_data, rel_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    before = tree_hash(run)
    other = tmp_path / "other"
    shutil.copytree(rel_data, other)
    base = ["train", "--model", "EfficientNetLite0", "--epochs", "3", "--out", str(run), "--quiet"]
    for extra, named in ((["--data", str(rel_data), "--resume", "--lr", "0.01"], "lr 0.01"),
                         (["--data", str(other), "--resume"], "data"),
                         (["--data", str(rel_data), "--resume", "--strategy", "frozen"], "strategy frozen")):
        assert main(base + extra) == 2
        err = one_line(capsys)
        assert "these differ" in err and named in err, err
    (run / "last.pt").unlink()
    (run / "last.prev.pt").unlink()
    before = tree_hash(run)
    assert main(base + ["--data", str(rel_data)]) == 2  # a finished run without last.pt is still a run
    err = one_line(capsys)
    assert "already holds a run" in err and "--overwrite" in err, err
    assert tree_hash(run) == before
    (run / "external" / "old").mkdir(parents=True)
    (run / "external" / "old" / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "1", "--limit", "4",
                 "--image-size", "32", "--out", str(run), "--quiet", "--overwrite"]) == 0
    assert not (run / "external").exists() and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["image_size"] == 32


def test_two_concurrent_trains_on_one_folder(tmp_path, rel_data, capsys):
    """The second writer is refused by RUN/.lock (naming the first's pid); the first finishes;
    a stale lock (its process gone) and a killed writer's temporary files are cleaned on the next start."""
    import time

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--epochs", "1", "--limit", "4",
            "--image-size", "32", "--out", str(out), "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "ct_transfer.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / ".lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").exists(), first.communicate()
        assert main(argv) == 2
        err = one_line(capsys)
        assert f"pid {first.pid}" in err and "another process" in err, err
    finally:
        _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert not (out / ".lock").exists() and (out / "best.safetensors").is_file()
    import socket

    dead = 2**22 + 12345  # above the default pid_max: no such process
    (out / ".lock").write_text(f"{dead} {socket.gethostname()}\n")
    (out / "..last.pt.new.abc123.tmp").write_bytes(b"partial")
    (out / ".last.pt.new").write_bytes(b"partial")
    assert main(argv + ["--resume"]) == 0
    assert not any(p.name.endswith(".tmp") or p.name in (".last.pt.new", ".lock") for p in out.iterdir())


def test_explain_gives_each_input_its_own_output(tmp_path, rel_data, rel_run, capsys):
    from ct_transfer.explain import output_stems

    png = sorted((rel_data / "COVID").iterdir())
    inputs = []
    for folder, source in (("a", png[0]), ("b", png[1])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "scan.png")
        inputs.append(tmp_path / folder / "scan.png")
    shutil.copy(Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm")),
                tmp_path / "a" / "scan.dcm")
    inputs.append(tmp_path / "a" / "scan.dcm")
    for name, source in (("снимок.png", png[2]), ("検査.png", png[3])):  # both become "_" in safe characters
        shutil.copy(source, tmp_path / name)
        inputs.append(tmp_path / name)
    out = tmp_path / "ex"
    assert main(["explain", "--run", str(rel_run), *map(str, inputs), "--out", str(out), "--method", "cam"]) == 0
    written = sorted(out.iterdir())
    assert len(written) == len(inputs) == 5, written
    assert output_stems(inputs) == output_stems(list(reversed(inputs)))[::-1]  # stable, order-independent
    assert output_stems([tmp_path / "Covid (7).png"]) == ["Covid_7_"]  # a unique name keeps its old form


def test_external_set_must_be_apart_from_the_training_data(tmp_path, rel_data, rel_run, capsys):
    """The run's own folder (or a byte copy) is refused, the run unchanged; JPEG re-encodes of its
    images (near-duplicates) are evaluated but labelled not independent, in metrics.json and the card."""
    from PIL import Image

    from ct_transfer.run import load_run
    from ct_transfer.serve import run_card

    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    before = tree_hash(run)
    copy = tmp_path / "copy"
    shutil.copytree(rel_data, copy)
    for data in (rel_data, copy):
        assert main(["evaluate", "--run", str(run), "--data", str(data)]) == 2
        assert "the run's own data" in one_line(capsys)
    assert tree_hash(run) == before
    rec = load_run(run).evaluate_external(copy, name="copy", write=False, allow_shared=True, near_duplicates=False)
    in_split = len(list(csv.DictReader(open(run / "split.csv"))))  # the images the run used (--limit 6 per class)
    assert rec["independent"] is False and rec["independence"]["same_files"] == in_split  # the API's opt-in: labelled
    near = tmp_path / "near"
    for cls in ("COVID", "non-COVID"):
        (near / cls).mkdir(parents=True)
        for f in sorted((rel_data / cls).iterdir()):
            Image.open(f).convert("L").save(near / cls / (f.stem + ".jpg"), quality=85)
    assert main(["evaluate", "--run", str(run), "--data", str(near)]) == 0
    assert "NOT an external validation" in capsys.readouterr().out
    rec = json.loads((run / "external" / "near" / "metrics.json").read_text())
    assert rec["independent"] is False and rec["independence"]["near_duplicates"] >= 1
    card = run_card("r", load_run(run))
    assert any("Not an external validation" in w for w in card["warnings"])
    assert any("No external validation" in w for w in card["warnings"])  # near copies do not count as one


def test_calibrate_checks_sensitivity_like_train_and_writes_nothing_on_failure(tmp_path, rel_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(rel_run, run)
    before = tree_hash(run)
    for value in ("nan", "1.5", "0", "-1"):
        assert main(["calibrate", "--run", str(run), "--sensitivity", value]) == 2
        assert "--sensitivity" in one_line(capsys)
    assert tree_hash(run) == before
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone")}))
    before = tree_hash(run)
    assert main(["calibrate", "--run", str(run)]) == 2  # the data folder is gone: nothing written
    one_line(capsys)
    assert tree_hash(run) == before


def test_dicom_rescale_tags_are_checked(caplog):
    import io
    import logging

    import pydicom

    source = Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm"))
    for slope in (0, float("nan"), float("inf"), 1e308, -2e4):
        ds = pydicom.dcmread(source)
        ds.RescaleSlope = slope
        buf = io.BytesIO()
        ds.save_as(buf)
        with pytest.raises(CTTransferError, match="RescaleSlope .* is unusable"):
            D.decode_any(buf.getvalue(), "x.dcm")
    ds = pydicom.dcmread(source)
    del ds.RescaleSlope, ds.RescaleIntercept
    buf = io.BytesIO()
    ds.save_as(buf)
    with caplog.at_level(logging.WARNING, logger="ct_transfer"):
        assert D.decode_any(buf.getvalue(), "x.dcm").shape == (128, 128, 3)
    assert "no RescaleSlope/RescaleIntercept" in caplog.text


def test_recipe_and_space_values_are_checked_where_they_enter(tmp_path, rel_data, capsys):
    base = ["train", "--data", str(rel_data), "--model", "EfficientNetLite0", "--out", str(tmp_path / "r"),
            "--quiet"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    for text, expect in (('batch_size: "8"\n', "batch_size: 8: is text ('8'), not an integer"),
                         ("dropout: false\n", "dropout: False: is false, not a number"),
                         ("lr: .nan\n", "lr: nan: choose a finite number"),
                         ("1: 2\n", "key 1 is int"),
                         (bomb, "aliases")):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        assert main(base + ["--recipe-file", str(recipe)]) == 2
        err = one_line(capsys)
        assert str(recipe) in err and expect in err, err
    assert not (tmp_path / "r").exists()
    space = tmp_path / "space.yaml"
    for text, expect in (("epochs: {type: int, low: 1, high: 3, step: x}\n", "step x"), (bomb, "aliases")):
        space.write_text(text)
        assert main(["tune", "--data", str(rel_data), "--model", "EfficientNetLite0", "--space", str(space),
                     "--trials", "1", "--out", str(tmp_path / "t")]) == 2
        assert expect in one_line(capsys)
    assert not (tmp_path / "t").exists()


def test_tune_that_fails_leaves_nothing(tmp_path, rel_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(rel_data, data)
    for f in (data / "COVID").iterdir():
        f.write_bytes(b"")  # every trial fails on decoding
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\n")
    out = tmp_path / "nested" / "q?x=1"
    # a subprocess: Optuna's own log handler keeps the stderr of whichever test first used it
    proc = subprocess.run([sys.executable, "-m", "ct_transfer.cli", "tune", "--data", str(data), "--model",
                           "EfficientNetLite0", "--space", str(space), "--trials", "1", "--epochs", "1", "--image-size",
                           "32", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    err = error_line(proc.stderr)  # after tune's log line naming the failed trial
    assert "no trial completed; trial 0 failed" in err and "cannot decode" in err and "trials.csv" not in err, err
    assert not (tmp_path / "nested").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "space.yaml"]


def test_audit_against_a_one_class_folder_leaves_nothing(tmp_path, rel_data, capsys):
    one = tmp_path / "one"
    shutil.copytree(rel_data / "COVID", one / "COVID")
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(rel_data), "--against", str(one), "--out", str(out)]) == 2
    assert "need at least two class folders" in one_line(capsys) and not out.exists()


def test_export_never_touches_an_unrelated_file(tmp_path, rel_run, capsys):
    mine = tmp_path / ".m.onnx.tmp.onnx"  # the temporary name export used to take (and delete)
    mine.write_text("my notes")
    assert main(["export", "--run", str(rel_run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert mine.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.tmp.onnx", "m.onnx", "m.onnx.json"]


def test_experiment_weights_files_with_one_name_get_their_own_runs(tmp_path):
    from ct_transfer.experiment import run_name

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    weights = [str(tmp_path / "a" / "w.pt"), str(tmp_path / "b" / "w.pt"), "none"]
    names = {run_name("EfficientNetLite0", w, 0, others=weights) for w in weights}
    assert len(names) == 3
    assert run_name("EfficientNetLite0", weights[0], 0, others=weights[:1]) == "EfficientNetLite0__file-w__seed0"


def test_report_with_a_non_numeric_metric_is_one_line(tmp_path, tiny_grid, capsys):
    grid = tmp_path / "grid"
    shutil.copytree(tiny_grid, grid)
    metrics = next((grid / "runs").iterdir()) / "metrics.json"
    doc = json.loads(metrics.read_text())
    doc["test"]["accuracy"] = "high"
    metrics.write_text(json.dumps(doc))
    assert main(["report", str(grid), "--out", str(tmp_path / "rep"), "--no-gallery"]) == 2
    assert "test.accuracy is high, not a number" in one_line(capsys)
