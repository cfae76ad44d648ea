"""Property-based tests (Hypothesis) over every surface that takes outside input.

Invariant: a valid result, or a one-line ``CTTransferError`` / exit 2 naming the input; never an
uncaught exception (``CT_TRANSFER_DEBUG=1`` makes the CLI re-raise, so one fails the test with its
traceback), never a changed run directory. Each property is bounded (``max_examples``) so the
file runs in about a minute; docs/reliability.md records the counts and times.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import string
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ct_transfer import data as D
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError
from ct_transfer.run import load_run

from .conftest import error_line, small_dataset

# no example database (nothing written into the repo) and no shrinking (bounded time; the failing
# example is still printed as drawn)
FAST = settings(deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CT_SMALL = Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm"))


@pytest.fixture(autouse=True)
def _debug(monkeypatch):
    monkeypatch.setenv("CT_TRANSFER_DEBUG", "1")  # an unexpected exception propagates: the test fails


@pytest.fixture(scope="module")
def fuzz_data(tmp_path_factory, data_dir):
    return small_dataset(tmp_path_factory.mktemp("fuzz-data"), data_dir, per_class=6)


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory, fuzz_data):
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    rc, _, err = cli(["train", "--data", str(fuzz_data), "--model", "EfficientNetLite0", "--epochs", "1",
                      "--limit", "4", "--out", str(out), "--quiet"])
    assert rc == 0, err
    return out


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_contract(rc, err, names=()):
    """Exit 0, or exit 2 with exactly one line ``ct-transfer: error: ...`` naming one of ``names``."""
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        line = error_line(err)
        if names:
            assert any(str(n) in line for n in names), (names, line)


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_decoded(name, data):
    try:
        arr = D.decode_any(data, name)
    except CTTransferError as exc:
        msg = str(exc)
        assert msg.startswith(name + ":") and "\n" not in msg and " at 0x" not in msg, msg
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 1


# -- image and DICOM decoding ----------------------------------------------------------------------

def _real_png(data_dir) -> bytes:
    return sorted((data_dir / "COVID").iterdir())[0].read_bytes()


@settings(FAST, max_examples=150)
@given(data=st.binary(max_size=4096), ext=st.sampled_from([".png", ".jpg", ".dcm", ".tif", ""]))
def test_random_bytes_decode_or_fail_in_one_line(data, ext):
    check_decoded(f"scan{ext}", data)


@settings(FAST, max_examples=60)
@given(cut=st.floats(0, 1), which=st.sampled_from(["png", "dicom"]))
def test_truncated_real_files(data_dir, cut, which):
    data = _real_png(data_dir) if which == "png" else CT_SMALL.read_bytes()
    check_decoded("scan.png" if which == "png" else "scan.dcm", data[:int(len(data) * cut)])


@settings(FAST, max_examples=120)
@given(which=st.sampled_from(["png", "dicom"]),
       edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_headers_of_real_files(data_dir, which, edits):
    """Random bytes written into the first KB: PNG IHDR/chunk lengths, DICOM Rows/Columns/VRs."""
    data = bytearray(_real_png(data_dir) if which == "png" else CT_SMALL.read_bytes())
    for pos, value in edits:
        data[pos] = value
    check_decoded("scan.png" if which == "png" else "scan.dcm", bytes(data))


# -- split CSV ---------------------------------------------------------------------------------------

CSV_ALPHABET = st.sampled_from(list(string.ascii_letters + string.digits + ",\"\n\r ./-_") + ["\x00", "é"])
ROW = st.tuples(st.sampled_from(["COVID/Covid (1).png", "non-COVID/Non-Covid (1).png", "../etc/passwd",
                                 "/abs.png", "COVID/missing.png", "", "COVID"]),
                st.sampled_from(["COVID", "non-COVID", "", "Flu"]),
                st.sampled_from(["train", "val", "test", "", "TEST", "holdout"]))


@settings(FAST, max_examples=120)
@given(header=st.sampled_from(["path,class,subset\n", "path,class,subset,group\n", "path;class;subset\n", ""]),
       body=st.one_of(st.text(CSV_ALPHABET, max_size=300), st.binary(max_size=300),
                      st.lists(ROW, max_size=6).map(lambda rows: "".join(f'"{p}",{c},{s}\n' for p, c, s in rows))))
def test_split_csv_parsing(tmp_path, fuzz_data, header, body):
    path = tmp_path / "split.csv"
    path.write_bytes(header.encode() + (body if isinstance(body, bytes) else body.encode("utf-8")))
    try:
        rows = D.read_split(path, fuzz_data)
    except CTTransferError as exc:
        assert str(exc).startswith(str(path) + ":") and "\n" not in str(exc)
        return
    assert rows and all(r["subset"] in D.SUBSETS and (fuzz_data / r["path"]).is_file() for r in rows)


# -- a run directory whose files are fuzzed ------------------------------------------------------------

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                       max_leaves=12)


def _mutated_json(original: dict, key, value):
    d = dict(original)
    if key is None:
        return value
    d[key] = value
    return d


@settings(FAST, max_examples=30)
@given(target=st.sampled_from(["config.json", "metrics.json", "history.csv", "split.csv"]),
       mode=st.sampled_from(["bytes", "json", "key", "truncate"]),
       raw=st.binary(max_size=200), value=JSONISH,
       key=st.sampled_from([None, "model", "classes", "preprocess", "image_size", "dropout", "calibration",
                            "channels_last", "val", "data"]),
       cut=st.floats(0, 1))
def test_load_run_and_predict_on_fuzzed_run_files(tmp_path_factory, fuzz_run, fuzz_data, target, mode, raw, value,
                                                  key, cut):
    run = tmp_path_factory.getbasetemp() / "fuzzed-run"
    if not run.exists():
        shutil.copytree(fuzz_run, run)
    original = (fuzz_run / target).read_bytes()
    try:
        if mode == "bytes":
            new = raw
        elif mode == "truncate":
            new = original[:int(len(original) * cut)]
        elif target.endswith(".json"):
            new = json.dumps(_mutated_json(json.loads(original), key, value) if mode == "key" else value).encode()
        else:
            new = json.dumps(value).encode()
        (run / target).write_bytes(new)
        before = tree_hash(run)
        try:
            load_run(run)
        except CTTransferError as exc:
            assert str(exc).startswith(str(run)) and "\n" not in str(exc), str(exc)
        image = sorted((fuzz_data / "COVID").iterdir())[0]
        rc, _, err = cli(["predict", "--run", run, image])
        assert_contract(rc, err, names=[run])
        assert tree_hash(run) == before  # reading a run never changes it
    finally:
        (run / target).write_bytes(original)


# -- CLI option values -------------------------------------------------------------------------------

def _flag_values(good, bad):
    return st.one_of(*[st.sampled_from(v) for v in (good, bad) if v])


TRAIN_FLAGS = {
    "--epochs": _flag_values(["1"], ["0", "-1", "1.5", "x", "nan", "1e9", "100001"]),
    "--image-size": _flag_values(["32", "64"], ["0", "7", "31", "5000", "-64", "abc", "1025"]),
    "--batch-size": _flag_values(["4", "32"], ["0", "-2", "65537", "2.5"]),
    "--lr": _flag_values(["0.001", "1e-4"], ["nan", "inf", "-inf", "0", "-1", "11", "abc", "1e400"]),
    "--dropout": _flag_values(["0", "0.5"], ["1", "-0.1", "nan", "inf", "2"]),
    "--seed": _flag_values(["0", "7"], ["-1", "2147483648", "x"]),
    "--split-seed": _flag_values(["0"], ["-5", "y"]),
    "--volume-slices": _flag_values(["16", "2"], ["0", "-1", "x", "100001", "2.5"]),
    "--limit": _flag_values(["4"], ["0", "-3", "x"]),
    "--threads": _flag_values(["1"], ["0", "-1", "100000", "two"]),
    "--device": _flag_values(["cpu", "auto"], ["tpu", "cuda:abc", "", "gpu", "cuda:99", "cpu:0"]),
    "--strategy": _flag_values(["full", "frozen"], ["half", ""]),
    "--freeze-until": _flag_values([], ["2", "-1", "1001"]),
    "--frozen-views": _flag_values(["1"], ["0", "65", "x"]),
    "--ema": _flag_values(["0", "0.9"], ["1", "-0.5", "nan", "x"]),  # with frozen: a config error too
    "--tta": _flag_values(["none", "flips"], ["rot90", ""]),
    "--balance": _flag_values(["none", "sources"], ["classes", ""]),
    "--split-preset": _flag_values(["stratified"], ["paper", "random"]),
    "--on-bad": _flag_values(["error", "skip"], ["ignore"]),
    "--positive": _flag_values(["COVID", "non-COVID"], ["Flu", ""]),
    "--weights": _flag_values(["none"], ["/nonexistent.pth", "", "imagenet-21k"]),
    "--model": _flag_values(["EfficientNetLite0"], ["NoSuchNet", "", "resnet50_NOPE"]),
    "--cache-dir": _flag_values(["@tmp/cache"], ["@file", "@run/best.pt"]),
    "--split-file": _flag_values([], ["@file", "@missing", "@run/config.json"]),
    "--out": _flag_values(["@tmp/new"], ["@run", "@file", "@file/sub"]),
}


@settings(FAST, max_examples=25)
@given(flags=st.fixed_dictionaries({}, optional=TRAIN_FLAGS))
def test_train_flags_good_and_bad(tmp_path_factory, fuzz_run, fuzz_data, flags):
    work = Path(tmp_path_factory.mktemp("flags"))
    afile = work / "afile.txt"
    afile.write_text("not a folder, not a split\n")
    subs = {"@tmp": str(work), "@file": str(afile), "@missing": str(work / "missing.csv"), "@run": str(fuzz_run)}

    def expand(v):
        for k, s in subs.items():
            v = v.replace(k, s)
        return v

    flags = {k: expand(v) for k, v in flags.items()}
    flags.setdefault("--model", "EfficientNetLite0")
    flags.setdefault("--out", str(work / "run"))
    flags.setdefault("--limit", "4")
    flags["--epochs"] = flags.get("--epochs", "1")
    if flags["--epochs"] == "1":
        flags.setdefault("--image-size", "32")  # keep valid draws small and quick
    argv = ["train", "--data", fuzz_data, "--quiet"] + [x for kv in flags.items() for x in kv]
    before = tree_hash(fuzz_run)
    rc, _, err = cli(argv)
    names = [k for k in flags] + [v for v in flags.values() if v] + [k.lstrip("-") for k in flags]
    assert_contract(rc, err, names=names + [str(fuzz_data), "subset", "class"])
    assert tree_hash(fuzz_run) == before  # the existing run is never touched
    if rc == 0:
        metrics = json.loads((Path(flags["--out"]) / "metrics.json").read_text())
        assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["epochs"] == 1


@settings(FAST, max_examples=25)
@given(command=st.sampled_from(["predict", "explain", "export", "split", "evaluate"]),
       batch=st.sampled_from(["1", "64", "0", "-1", "4097", "x"]),
       window=st.sampled_from([None, "1500,-600", "400,40", "0,0", "nan,1", "1,inf", "1500", "a,b", "-5,0"]),
       layer=st.sampled_from([None, "feature_map", "fc", "pool", "dropout", "backbone.conv_stem", "nope", ""]),
       out=st.sampled_from(["@tmp/x.onnx", "@tmp/p.csv", "@tmp", "@tmp/missing/p.csv", "@run/best.pt",
                            "@run/split.csv", "@run", "@run/m.onnx", "@tmp/x.pt2"]))
def test_other_commands_options(tmp_path_factory, fuzz_run, fuzz_data, command, batch, window, layer, out):
    work = Path(tmp_path_factory.mktemp("opts"))
    out = out.replace("@tmp", str(work)).replace("@run", str(fuzz_run))
    image = sorted((fuzz_data / "COVID").iterdir())[0]
    argv = {"predict": ["predict", "--run", fuzz_run, image, "--batch-size", batch, "--out", out],
            "explain": ["explain", "--run", fuzz_run, image, "--out", out],
            "export": ["export", "--run", fuzz_run, "--out", out],
            "split": ["split", "--data", fuzz_data, "--out", out, "--no-duplicates"],
            "evaluate": ["evaluate", "--run", fuzz_run, "--split-file", out]}[command]
    if window is not None and command in ("predict", "explain"):
        argv += ["--window", window]
    if layer is not None and command == "explain":
        argv += ["--target-layer", layer, "--method", "gradcam"]
    before = tree_hash(fuzz_run)
    rc, _, err = cli(argv)
    assert_contract(rc, err)
    if command != "evaluate":  # evaluate's job is to rewrite the run's metrics
        assert tree_hash(fuzz_run) == before


@settings(FAST, max_examples=25)
@given(models=st.sampled_from(["EfficientNetLite0", "NoSuchNet", "", ",", "EfficientNetLite0,EfficientNetLite0"]),
       weights=st.sampled_from(["none", "none,none", "/nope.pth", "", "imagenet-21k"]),
       seeds=st.sampled_from(["0", "0,0", "-1", "a", "", "1e3", "2147483648"]))
def test_experiment_lists(tmp_path_factory, fuzz_data, models, weights, seeds):
    grid = tmp_path_factory.getbasetemp() / "fuzz-grid"
    rc, _, err = cli(["experiment", "--data", fuzz_data, "--out", grid, "--models", models, "--weights", weights,
                      "--seeds", seeds, "--epochs", "1", "--limit", "4", "--image-size", "32",
                      "--split-preset", "stratified", "--quiet"])
    assert_contract(rc, err, names=["--models", "--weights", "--seeds", "--epochs"])
    if rc == 0:
        assert (grid / "runs" / "EfficientNetLite0__none__seed0" / "metrics.json").is_file()


# -- issue #22: split rows that name one file twice, recipe/space YAML, file names, DICOM rescale tags --

ALIASES = st.sampled_from(["{p}", "./{p}", "{d}//{n}", "{d}/./{n}", "{d}/../{d}/{n}", "link/{n}", "../{p}",
                           "/{p}", "{d}/{n}/", "out.png"])


@pytest.fixture(scope="module")
def alias_data(tmp_path_factory, fuzz_data):
    """A dataset with a symlinked folder inside (``link`` -> ``COVID``) and a link leaving it."""
    data = tmp_path_factory.mktemp("alias-data") / "data"
    shutil.copytree(fuzz_data, data)
    (data / "link").symlink_to(data / "COVID", target_is_directory=True)
    (data / "out.png").symlink_to(sorted((fuzz_data / "COVID").iterdir())[0])  # outside: the original copy
    return data


@settings(FAST, max_examples=120)
@given(rows=st.lists(st.tuples(st.integers(0, 5), ALIASES, st.sampled_from(["train", "val", "test"])),
                     min_size=1, max_size=10))
def test_split_rows_never_name_one_file_twice(tmp_path, alias_data, rows):
    """Rows drawn from aliases of a few real files: read_split returns rows naming distinct files,
    all inside the data folder, or one line naming the split file."""
    names = sorted(p.name for p in (alias_data / "COVID").iterdir())
    text = "path,class,subset\n"
    for k, alias, subset in rows:
        n = names[k % len(names)]
        text += '"' + alias.format(p=f"COVID/{n}", d="COVID", n=n) + f'",COVID,{subset}\n'
    path = tmp_path / "split.csv"
    path.write_text(text, encoding="utf-8")
    try:
        got = D.read_split(path, alias_data)
    except CTTransferError as exc:
        assert str(exc).startswith(str(path) + ":") and "\n" not in str(exc), str(exc)
        return
    real = [(alias_data / r["path"]).resolve() for r in got]
    assert len(set(real)) == len(real)  # never one file in two rows (two subsets)
    assert all(alias_data.resolve() in p.parents for p in real)


YAML_KEYS = st.sampled_from(["epochs", "batch_size", "lr", "dropout", "augment", "strategy", "image_size",
                             "crop", "tta", "sensitivity", "nope", "1", "true", "null", "[a, b]", "{x: 1}", "model"])
YAML_VALUES = st.sampled_from(["1", "8", '"8"', "'0.1'", "1e-4", "1.0e-4", ".nan", ".inf", "-1", "0", "true", "false",
                               "null", "[1, 2]", "{a: 1}", "full", "frozen", '""', "&x 3", "*x", "!!python/name:os.system",
                               "1e400", "0x10", "2147483648", "{type: int, low: 1, high: 3}",
                               "{type: int, low: 1, high: 3, step: x}", "{type: loguniform, low: 0, high: 1}",
                               "{type: choice, values: []}", "{type: choice, values: [2, 4]}",
                               "{type: uniform, low: a, high: b}", "{type: int, low: 1.5, high: 3}"])


@settings(FAST, max_examples=150)
@given(entries=st.lists(st.tuples(YAML_KEYS, YAML_VALUES), max_size=5),
       raw=st.one_of(st.none(), st.text(max_size=60)), which=st.sampled_from(["recipe", "space"]))
def test_recipe_and_space_yaml(tmp_path, entries, raw, which):
    """A recipe (train --recipe-file) or search space: valid config, or one line naming the file."""
    from ct_transfer.recipes import config_from_recipe
    from ct_transfer.tune import load_space

    path = tmp_path / ("recipe.yaml" if which == "recipe" else "space.yaml")
    path.write_text(raw if raw is not None else "".join(f"{k}: {v}\n" for k, v in entries), encoding="utf-8")
    try:
        if which == "recipe":
            cfg = config_from_recipe(str(path), data="d", model="EfficientNetLite0")
            assert isinstance(cfg.batch_size, int) and not isinstance(cfg.dropout, bool)
        else:
            load_space(path)
    except CTTransferError as exc:
        msg = str(exc)
        assert "\n" not in msg and " at 0x" not in msg and (str(path) in msg or msg.startswith("recipe=")), msg


NAMES = st.one_of(st.sampled_from(["=HYPERLINK(\"x\").png", "+cmd.png", "-1+1.png", "@SUM(A1).png",
                                   "снимок.png", "検査 1.png", "a,b.png", 'q"uote.png', "new\nline.png",
                                   "tab\t.png", " lead.png", "x" * 200 + ".png", "é.PNG", ".hidden.png"]),
                  st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                            and b not in (b".", b"..")).map(lambda b: b + b".png"))


@settings(FAST, max_examples=15)  # each example copies a dataset and loads the run: ~5 s on a loaded CPU
@given(name=NAMES)
def test_file_names_in_split_and_predict(tmp_path, fuzz_data, fuzz_run, name):
    """Any file name: split and predict give a result that names the file, or one line; never exit 1."""
    import os
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example (tmp_path is per test)
    data = tmp_path / "data"
    shutil.copytree(fuzz_data, data)
    raw = name if isinstance(name, bytes) else name.encode("utf-8")
    target = os.fsencode(data / "COVID") + b"/" + raw
    with open(target, "wb") as fh:
        fh.write(sorted((fuzz_data / "COVID").iterdir())[0].read_bytes())
    rc, _, err = cli(["split", "--data", data, "--out", tmp_path / "s.csv"])
    assert_contract(rc, err)
    if rc == 0:
        rows = D.read_split(tmp_path / "s.csv", data)
        assert len(rows) == len(D.scan_folder(data)[0])
    before = tree_hash(fuzz_run)
    rc, _, err = cli(["predict", "--run", fuzz_run, data / "COVID", "--out", tmp_path / "p.csv"])
    assert_contract(rc, err)
    assert tree_hash(fuzz_run) == before


RESCALE = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                    st.sampled_from(["abc", "", "1\\2"]))


@settings(FAST, max_examples=80)
@given(slope=RESCALE, intercept=RESCALE)
def test_dicom_rescale_tags(slope, intercept):
    import io as _io

    import pydicom

    ds = pydicom.dcmread(CT_SMALL)
    for tag, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value is None:
            delattr(ds, tag)
        else:
            try:
                setattr(ds, tag, value if isinstance(value, str) else repr(float(value))[:16])
            except Exception:  # pydicom refuses some values itself: nothing to decode
                return
    buf = _io.BytesIO()
    try:
        ds.save_as(buf)
    except Exception:
        return
    check_decoded("scan.dcm", buf.getvalue())


# -- HTTP requests to the server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, fuzz_run):
    """``ct-transfer serve`` on the fuzz run (a real process, 8 MB upload limit), warmed up, with the
    resident memory it holds then."""
    import httpx

    from .serving import memory_mb, serve_process

    log_path = tmp_path_factory.mktemp("fuzz-serve") / "serve.log"
    with serve_process([fuzz_run], log_path=log_path, args=["--max-upload-mb", "8"]) as server:
        image = min((Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sarscov2-ct" / "COVID")
                    .iterdir())
        resp = httpx.post(server["url"] + "/api/predict", files=[("files", (image.name, image.read_bytes()))],
                          timeout=300)
        assert resp.status_code == 200, resp.text
        server["baseline_mb"] = memory_mb(server["proc"].pid)["rss"]
        yield server
    assert "Traceback" not in log_path.read_text()


@functools.cache
def _payload(kind: str) -> bytes:
    from .serving import zero_png, zero_zip

    real = min((Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sarscov2-ct" / "COVID")
               .iterdir()).read_bytes()
    if kind == "real":
        return real
    if kind == "dicom":
        return CT_SMALL.read_bytes()
    if kind == "truncated":
        return real[:len(real) // 3]
    if kind == "zero_big":
        return zero_png(6300)
    if kind == "zero_small":
        return zero_png(700)
    if kind == "zip_bomb":
        return zero_zip(300)
    if kind == "zip_zeros":
        return zero_zip(60, name="zeros.png")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if kind == "zip_real":
            zf.writestr("scans/a.png", real)
            zf.writestr("scans/IM0001", CT_SMALL.read_bytes())
            zf.writestr("__MACOSX/._a.png", b"x")
        elif kind == "zip_many":
            for i in range(210):
                zf.writestr(f"{i}.png", real)
        elif kind == "zip_empty":
            zf.writestr("notes.txt", "no images")
    return buf.getvalue()


KINDS = ["real", "dicom", "truncated", "zero_big", "zero_small", "zip_bomb", "zip_zeros", "zip_real",
         "zip_many", "zip_empty", "random", "empty"]
NAME_CHARS = st.sampled_from(list("ab=+-@.() _'\"%") + ["é", "中", "\t"])
UPLOAD = st.tuples(st.text(NAME_CHARS, max_size=10), st.sampled_from(["", ".png", ".dcm", ".zip", ".txt"]),
                   st.sampled_from(KINDS), st.binary(max_size=512))


@settings(FAST, max_examples=20)
@given(uploads=st.lists(UPLOAD, min_size=0, max_size=4),
       host=st.sampled_from([None, None, "localhost", "evil.example", "127.0.0.1.nip.io"]),
       origin=st.sampled_from([None, None, "self", "null", "http://evil.example"]),
       fields=st.fixed_dictionaries({}, optional={"overlay": st.sampled_from(["true", "false", "maybe"]),
                                                  "method": st.sampled_from(["gradcam", "cam", "saliency", ""]),
                                                  "run": st.sampled_from(["run", "nope", ""])}),
       raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_http_requests_get_an_answer_or_one_line_and_stay_under_the_memory_bound(
        fuzz_server, uploads, host, origin, fields, raw):
    import httpx

    from .serving import MEMORY_BOUND_MB, memory_mb, reset_peak

    url, pid = fuzz_server["url"], fuzz_server["proc"].pid
    reset_peak(pid)
    headers = {}
    if host:
        headers["host"] = host
    if origin:
        headers["origin"] = url if origin == "self" else origin
    if raw is not None:  # a body that is not what its content type says
        resp = httpx.post(url + "/api/predict", content=raw, timeout=300,
                          headers={**headers, "content-type": "multipart/form-data; boundary=xyz"})
    else:
        files = [("files", (stem + ext, data if kind == "random" else b"" if kind == "empty" else _payload(kind),
                            "application/octet-stream")) for stem, ext, kind, data in uploads]
        resp = httpx.post(url + "/api/predict", files=files or None, data=fields, headers=headers, timeout=300)
    assert resp.status_code in (200, 400, 403, 404, 408, 413, 422), (resp.status_code, resp.text[:300])
    body = resp.json()
    if resp.status_code == 200:
        assert body["results"] and set(body["results"][0]["probabilities"]) == set(body["classes"])
        for r in body["results"]:
            assert r["label"] in body["classes"] and abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert all("\n" not in e["error"] for e in body["errors"])
    else:
        assert isinstance(body["detail"], str) and "\n" not in body["detail"] and "Traceback" not in body["detail"]
    if host == "evil.example" or origin in ("null", "http://evil.example"):
        assert resp.status_code == 403
    peak = memory_mb(pid)["peak"]
    assert peak - fuzz_server["baseline_mb"] <= MEMORY_BOUND_MB, (fuzz_server["baseline_mb"], peak)
