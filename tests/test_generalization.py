"""Robust preprocessing, domain-shift augmentation, recipes and multi-dataset training on real
slices of both datasets (SARS-CoV-2 CT and UCSD COVID-CT dev)."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from ct_transfer import data as D
from ct_transfer.config import TrainConfig
from ct_transfer.errors import ConfigError

from .conftest import ROOT

UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


def _sample(root: Path, n: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    return rng.sample(sorted(p for p in root.glob("*/*") if p.is_file()), n)


def dark_lung_pixels(arr: np.ndarray) -> np.ndarray:
    """Dark lung pixels, found independently of the crop code: pixels darker than 45% of the
    image's 99th percentile inside the (hole-filled) largest bright component, in dark regions of
    at least 1% of the image (not noise or a vessel's shadow) that do not touch the picture's edge
    (background enclosed by the body, a table line and the edge would otherwise count)."""
    g = arr.mean(2)
    tissue = g > 0.45 * np.percentile(g, 99)
    labels, _ = ndi.label(tissue)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = ndi.binary_fill_holes(labels == sizes.argmax())
    labels, _ = ndi.label(body & ~tissue)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    edge = np.unique(np.concatenate([labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(),
                                     labels[:, -3:].ravel()]))
    sizes[edge] = 0
    return np.isin(labels, np.flatnonzero(sizes >= 0.01 * g.size))


@pytest.mark.parametrize("kind", ["body", "lung"])
def test_crop_box_inside_image_and_keeps_the_lungs(kind, data_dir):
    files = _sample(data_dir, 10) + _sample(UCSD, 20)
    pre = D.Preprocess(64, crop=kind)
    step = pre.steps()[0]
    cropped_ucsd = 0
    for f in files:
        arr = D.as_rgb_array(f)
        y0, y1, x0, x1 = pre.crop_box(arr)
        h, w = arr.shape[:2]
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w, f
        lungs = dark_lung_pixels(arr)
        if lungs.sum():
            kept = lungs[y0:y1, x0:x1].sum() / lungs.sum()
            assert kept >= 0.9, f"{f.name}: {kind} crop keeps {kept:.2f} of the dark lung pixels"
        out = step(arr)
        assert out.shape == (y1 - y0, x1 - x0, 3) and out.dtype == np.uint8
        if f.is_relative_to(UCSD) and (y1 - y0) * (x1 - x0) < 0.9 * h * w:
            cropped_ucsd += 1
    if kind == "lung":  # it does crop: UCSD's whole-body slices lose their background
        assert cropped_ucsd >= 8


def test_crop_ignores_a_white_frame_and_text(data_dir):
    """A real slice pasted into a larger picture with a white frame, a caption and an arrow: the box
    finds the slice, not the frame."""
    from PIL import Image, ImageDraw

    slice_ = D.as_rgb_array(_sample(UCSD, 1, seed=3)[0])
    h, w = slice_.shape[:2]
    canvas = Image.new("RGB", (w + 160, h + 120), "black")
    canvas.paste(Image.fromarray(slice_), (80, 60))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([3, 3, w + 156, h + 116], outline="white", width=3)
    draw.text((10, 12), "Fig. 3  COVID-19 pneumonia, day 7", fill="white")
    draw.line([(20, h + 100), (70, h + 70)], fill="white", width=3)
    y0, y1, x0, x1 = D.Preprocess(64, crop="body").crop_box(np.asarray(canvas))
    assert abs(y0 - 60) <= 0.06 * h and abs(x0 - 80) <= 0.06 * w
    assert abs(y1 - (60 + h)) <= 0.06 * h and abs(x1 - (80 + w)) <= 0.06 * w


@pytest.mark.parametrize("intensity", ["percentile", "clahe"])
def test_intensity_is_valid_uint8_and_deterministic(intensity, data_dir):
    pre = D.Preprocess(64, crop="lung", intensity=intensity)
    plain = D.Preprocess(64)
    changed = 0
    for f in _sample(UCSD, 3, seed=1) + _sample(data_dir, 2, seed=1):
        a, b = pre.load(f), pre.load(f)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert np.array_equal(a[..., 0], a[..., 2])  # grey, 3 equal channels
        changed += not np.array_equal(a, plain.load(f))
        if intensity == "percentile":  # clipped and stretched to the full range
            assert a.min() == 0 and a.max() == 255
    assert changed >= 4  # (one UCSD slice already spans 0..255 and has no background to crop)


def test_preprocess_key_description_and_round_trip():
    paper, robust = D.Preprocess(64), D.Preprocess(64, crop="lung", intensity="clahe")
    assert "crop" not in paper.key and "crop=lung" in robust.key and robust.key != paper.key
    assert D.Preprocess.from_dict(robust.to_dict()) == robust
    assert D.Preprocess.from_dict({"image_size": 64}) == paper  # configs from before the steps
    assert "crop to the lungs" in robust.describe() and "CLAHE" in robust.describe()
    with pytest.raises(ConfigError, match="crop"):
        D.Preprocess(64, crop="head")


@pytest.mark.parametrize("preset", ["paper", "domain"])
def test_augmentation_presets_reproducible_and_change_images(preset, data_dir):
    x = D.stack([D.Preprocess(64).load(f) for f in _sample(data_dir, 4) + _sample(UCSD, 4)])
    tf = D.batch_transform([0.0] * 3, [1.0] * 3, augment=True, preset=preset)
    a = tf(x, torch.Generator().manual_seed(7))
    b = tf(x, torch.Generator().manual_seed(7))
    c = tf(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert (a - x.float() / 255).abs().mean() > 0.01
    plain = D.batch_transform([0.0] * 3, [1.0] * 3, augment=False, preset=preset)
    assert torch.equal(plain(x), x.float() / 255)


def test_paper_preset_is_the_papers_augmentation():
    tf = D.batch_transform([0.5] * 3, [0.5] * 3, augment=True)
    assert repr(tf.transforms[1:3]) == repr(D.paper_augmentation().transforms)


def test_jpeg_degradation_quantises_8x8_blocks(data_dir):
    x = D.stack([D.Preprocess(64).load(_sample(data_dir, 1)[0])]).float() / 255
    low = D.RandomJPEG(quality=(5, 5), p=1.0)(x, torch.Generator().manual_seed(0))
    high = D.RandomJPEG(quality=(95, 95), p=1.0)(x, torch.Generator().manual_seed(0))
    off = D.RandomJPEG(quality=(5, 5), p=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(off, x)
    assert (high - x).abs().mean() < (low - x).abs().mean()
    # at quality 5 most blocks keep only their DC term: nearly flat 8x8 blocks
    blocks = low[0, 0].reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    assert blocks.std(1).median() < x[0, 0].reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64).std(1).median()


def test_recipe_resolution_and_flag_overrides():
    from ct_transfer.cli import build_parser, config_from_args
    from ct_transfer.recipes import RECIPES, config_from_recipe

    assert config_from_recipe("paper", data="d", model="m").to_dict() == {
        **TrainConfig(data="d", model="m").to_dict(), "recipe": "paper"}
    t = config_from_recipe("transfer", data="d", model="m")
    for k, v in RECIPES["transfer"].items():
        assert getattr(t, k) == v
    assert (t.crop, t.intensity, t.augmentation, t.optimizer) == ("lung", "percentile", "domain", "adamw")
    args = build_parser().parse_args(["train", "--data", "a", "--data", "b", "--model", "m", "--out", "o",
                                      "--recipe", "transfer", "--crop", "body", "--epochs", "3"])
    cfg = config_from_args(args)
    assert (cfg.crop, cfg.epochs, cfg.intensity, cfg.recipe, cfg.data) == ("body", 3, "percentile", "transfer",
                                                                           ["a", "b"])
    one = config_from_args(build_parser().parse_args(["train", "--data", "a", "--model", "m", "--out", "o"]))
    assert one.data == "a" and one.crop == "none" and one.augmentation == "paper"


def test_bad_multi_dataset_options_are_config_errors():
    with pytest.raises(ConfigError, match="split_file"):
        TrainConfig(data=["a", "b", "c"], model="m", split_file=["x", "y"])
    with pytest.raises(ConfigError, match="class_map"):
        TrainConfig(data="a", model="m", class_map="CT_COVID")
    with pytest.raises(ConfigError, match="augmentation"):
        TrainConfig(data="a", model="m", augmentation="heavy")


def _renamed_ucsd(root: Path, per_class: int = 10) -> tuple[Path, Path]:
    """A few real UCSD patients in folders named like the original release (CT_COVID / CT_NonCOVID)
    with a split file (path,class,subset,patient) holding train and val only."""
    names = {"COVID": "CT_COVID", "non-COVID": "CT_NonCOVID"}
    rows = D.read_split(UCSD / "SPLIT.csv")
    by = defaultdict(list)
    for r in rows:
        by[(r["class"], r["subset"])].append(r)
    out = []
    for (cls, subset), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: (r["group"], r["path"]))[: per_class if subset == "train" else 4]
        for r in rs:
            target = root / names[cls] / Path(r["path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(UCSD / r["path"], target)
            out.append({"path": f"{names[cls]}/{target.name}", "class": names[cls], "subset": subset,
                        "patient": r["group"]})
    split = root.parent / "ucsd_split.csv"
    from ct_transfer import _io

    _io.write_csv(split, out, ["path", "class", "subset", "patient"])
    return root, split


def test_multi_dataset_split_keeps_each_split_and_maps_classes(tmp_path, data_dir):
    from ct_transfer.engine.data import split_rows

    ucsd, split = _renamed_ucsd(tmp_path / "ucsd")
    cfg = TrainConfig(data=[str(data_dir), str(ucsd)], model="EfficientNetLite0", split_file=["-", str(split)],
                      class_map="CT_COVID=COVID,CT_NonCOVID=non-COVID")
    rows = split_rows(cfg)
    sars = [r for r in rows if r["source"] == "sarscov2-ct"]
    other = [r for r in rows if r["source"] == "ucsd"]
    # SARS-CoV-2 split exactly as it is alone
    alone = D.make_split(D.scan_folder(data_dir)[0], "stratified", 0)
    assert [(r["path"], r["subset"]) for r in sars] == [(r["path"], r["subset"]) for r in alone]
    assert {r["class"] for r in rows} == {"COVID", "non-COVID"}
    # UCSD: its val is the test (untouched), a val carved from train; no patient crosses subsets
    original = {r["path"]: r for r in D.read_split(split)}
    assert {r["path"] for r in other if r["subset"] == "test"} == {p for p, r in original.items()
                                                                  if r["subset"] == "val"}
    assert {r["subset"] for r in other} == {"train", "val", "test"}
    subsets_of = defaultdict(set)
    for r in other:
        subsets_of[r["group"]].add(r["subset"])
    assert all(len(s) == 1 for s in subsets_of.values())
    # limit applies per source and class
    limited = split_rows(cfg.replace(limit=5))
    assert {r["source"] for r in limited} == {"sarscov2-ct", "ucsd"}
    with pytest.raises(ConfigError, match="class_map"):
        TrainConfig(data=str(ucsd), model="m", class_map="=COVID")


@pytest.mark.parametrize("strategy", ["full", "linear"])
def test_balanced_sources_draw_evenly_and_choose_on_the_mean(strategy, tmp_path, data_dir):
    """--balance sources: each epoch trains on as many images of each source as the smallest has (the
    larger one subsampled afresh every epoch), history has every source's val accuracy, and the
    val accuracy the epoch (or the probe's C) is chosen on is their mean, not the pooled one."""
    from ct_transfer import fit
    from ct_transfer.engine.callbacks import Callback
    from ct_transfer.engine.data import split_rows
    from ct_transfer.engine.loop import _epoch_generator, balanced_pool

    ucsd, split = _renamed_ucsd(tmp_path / "ucsd", per_class=12)
    cfg = TrainConfig(data=[str(data_dir), str(ucsd)], split_file=["-", str(split)], model="EfficientNetLite0",
                      weights="none", class_map="CT_COVID=COVID,CT_NonCOVID=non-COVID", epochs=2, limit=30,
                      image_size=64, seed=0, balance="sources", strategy=strategy, out=str(tmp_path / "run"))
    train = [r for r in split_rows(cfg) if r["subset"] == "train"]
    names, ids = D.source_ids(train)
    ids = torch.as_tensor(ids)
    counts = torch.bincount(ids)
    assert names == ["sarscov2-ct", "ucsd"] and counts[0] > 2 * counts[1]  # really unbalanced
    seen = set()
    for epoch in range(6):
        pool = balanced_pool(ids, _epoch_generator(0, epoch, "cpu"))
        assert torch.bincount(ids[pool]).tolist() == [int(counts[1])] * 2 and len(set(pool.tolist())) == len(pool)
        seen |= set(pool.tolist())
    assert len(seen & set(torch.nonzero(ids == 0).flatten().tolist())) > counts[1]  # other SARS images each epoch

    class Count(Callback):
        images = []

        def on_batch_end(self, state, n, loss_sum, correct):
            self.images.append(n)

    run = fit(cfg, progress=False, callbacks=[Count()])
    if strategy == "full":
        assert sum(Count.images) == 2 * 2 * int(counts[1])  # 2 epochs of 2 x the smaller source
    for row in run.history:
        per = [row["val_acc_sarscov2-ct"], row["val_acc_ucsd"]]
        assert row["val_acc"] == pytest.approx(sum(per) / 2)
    val = run.metrics["val"]["per_source"]
    if strategy == "linear":  # the probe chose C on the same source-weighted val accuracy
        assert run.metrics["probe"]["val_acc"] == pytest.approx(run.history[0]["val_acc"])
    best = run.history[run.metrics["best_epoch"] - 1]  # the kept weights give that epoch's per-source val
    assert best["val_acc_ucsd"] == pytest.approx(val["ucsd"]["accuracy"])
    assert best["val_acc_sarscov2-ct"] == pytest.approx(val["sarscov2-ct"]["accuracy"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["balance"] == "sources"


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, data_dir):
    """A tiny real multi-source run with the robust preprocessing (crop lung, percentile)."""
    from ct_transfer import fit

    tmp = tmp_path_factory.mktemp("multi")
    ucsd, split = _renamed_ucsd(tmp / "ucsd", per_class=12)
    cfg = TrainConfig(data=[str(data_dir), str(ucsd)], split_file=["-", str(split)], model="EfficientNetLite0",
                      weights="none", class_map="CT_COVID=COVID,CT_NonCOVID=non-COVID", out=str(tmp / "run"),
                      epochs=1, limit=10, image_size=64, crop="lung", intensity="percentile",
                      augmentation="domain", seed=0, tta="flips")
    return fit(cfg, progress=False), tmp


def test_multi_source_run_reports_per_source_and_records_config(multi_run):
    from ct_transfer import load_run

    run, tmp = multi_run
    for subset in ("val", "test"):
        per = run.metrics[subset]["per_source"]
        assert set(per) == {"sarscov2-ct", "ucsd"}
        assert sum(m["n"] for m in per.values()) == run.metrics[subset]["n"]
    saved = json.loads((tmp / "run" / "config.json").read_text())
    assert saved["preprocess"]["crop"] == "lung" and saved["preprocess"]["intensity"] == "percentile"
    assert saved["augmentation"] == "domain" and isinstance(saved["data"], list)
    split_csv = (tmp / "run" / "split.csv").read_text().splitlines()
    assert split_csv[0].split(",")[-1] == "source"
    loaded = load_run(tmp / "run")
    assert loaded.preprocess == run.preprocess
    again = loaded.evaluate()  # re-evaluates both sources from the run's own split
    assert again["test"]["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])


def test_predict_on_raw_external_image_equals_evaluate(multi_run, tmp_path):
    """Same preprocessing (and test-time flips) end to end: the CLI's predict on a raw UCSD file gives
    the probability evaluate wrote for it, and so do explain and the exported ONNX file; export's
    sidecar records the steps."""
    from ct_transfer import _io, load_run
    from ct_transfer.predict import predict

    run, tmp = multi_run
    loaded = load_run(tmp / "run")
    written = _io.read_csv(tmp / "run" / "predictions_test.csv")
    row = next(r for r in written if r["path"].startswith("ucsd/"))
    raw = tmp / "ucsd" / row["path"].split("/", 1)[1]
    got = predict(loaded, [str(raw)])[0]
    assert got["prob_COVID"] == pytest.approx(float(row["prob_COVID"]), abs=1e-5)
    assert loaded.predict_proba([raw])[0, 1] == pytest.approx(float(row["prob_COVID"]), abs=1e-5)
    # the flips are in it: the mean logits of the three views, not the plain image's
    import torch

    from ct_transfer.inference import predict_logits

    assert loaded.tta == "flips"
    x = loaded.load_images([raw])
    views = [predict_logits(loaded.model, v, loaded.transform) for v in (x, x.flip(-1), x.flip(-2))]
    torch.testing.assert_close(predict_logits(loaded.model, x, loaded.transform, tta="flips"),
                               sum(views) / 3, atol=1e-5, rtol=0)
    assert not torch.allclose(views[0], views[1], atol=1e-4)  # the flips do change the logits
    # the heat map lies inside the crop box on the full image
    ex = loaded.explain(str(raw))
    y0, y1, x0, x1 = loaded.preprocess.crop_box(D.as_rgb_array(raw))
    assert ex.probability == pytest.approx(max(got["prob_COVID"], got["prob_non-COVID"]), abs=1e-5)
    outside = ex.heatmap.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() == 0 and ex.heatmap.shape == D.as_rgb_array(raw).shape[:2]
    info = loaded.export(tmp_path / "m.onnx", n_check=4)
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["preprocess"]["crop"] == "lung" and side["preprocess"]["intensity"] == "percentile"
    assert side["preprocess_steps"][0].startswith("CropForeground('lung'")
    assert "crop to the lungs" in side["preprocess_text"]
    assert info["parity"]["on"] == "test images" and side["inside_the_graph"]["tta"] == "flips"
    import onnxruntime as ort

    onnx_p = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": (x.float() / 255).numpy()})[0]
    assert onnx_p[0, loaded.classes.index("COVID")] == pytest.approx(float(row["prob_COVID"]), abs=1e-4)


def test_a_run_starts_from_another_sites_run(trained_run, tmp_path):
    """Site adaptation: ``--weights RUN`` starts from a trained ct-transfer run (here one trained
    on SARS-CoV-2 slices) — its backbone, and its head when the classes are the same — and goes on
    training on another dataset (UCSD patients). A linear probe on top leaves the backbone as it
    was, so the new run's backbone is exactly the SARS-CoV-2 run's."""
    from ct_transfer import create_model, fit, load_run

    from .test_fuzz import assert_contract, cli

    src_dir, _ = trained_run
    src = load_run(src_dir)
    same = create_model("EfficientNetLite0", str(src_dir), classes=src.classes, dropout=0.5)
    for k, v in src.model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v, rtol=0, atol=0)
    other = create_model("EfficientNetLite0", str(src_dir / "best.safetensors"), classes=src.classes[::-1])
    torch.testing.assert_close(other.backbone.conv_stem.weight, src.model.backbone.conv_stem.weight, rtol=0, atol=0)
    assert not torch.equal(other.fc.weight, src.model.fc.weight)  # another class order: a fresh head
    with pytest.raises(ConfigError, match="another architecture, not EfficientNetLite1"):
        create_model("EfficientNetLite1", str(src_dir))

    cfg = TrainConfig(data=str(UCSD), split_file=str(UCSD / "SPLIT.csv"), model="EfficientNetLite0",
                      weights=src_dir, strategy="linear", limit=12, image_size=src.image_size,
                      out=str(tmp_path / "site"), cache_dir=str(tmp_path / "cache"))
    run = fit(cfg, progress=False)  # weights given as a Path, as a notebook would: config.json holds text
    for k, v in src.model.backbone.state_dict().items():
        torch.testing.assert_close(run.model.backbone.state_dict()[k], v, rtol=0, atol=0)
    assert not torch.equal(run.model.fc.weight, src.model.fc.weight)  # the probe fitted UCSD's head
    assert json.loads((tmp_path / "site" / "config.json").read_text())["weights"] == str(src_dir)
    assert run.metrics["test"]["n"] > 0

    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nope"):
        rc, _, err = cli(["train", "--data", UCSD, "--model", "EfficientNetLite0", "--weights", bad,
                          "--out", tmp_path / "bad", "--quiet"])
        assert rc == 2 and not (tmp_path / "bad").exists()
        assert_contract(rc, err, names=[str(bad)])
