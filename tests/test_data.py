"""Decoding, caching, splitting and batch augmentation on the real dataset and files made here."""

from __future__ import annotations

import csv
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ct_transfer import data as D
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError

from .conftest import error_line


def test_originals_decode_exactly_like_reencoded_copies(data_dir, originals_dir):
    rows = list(csv.reader(open(originals_dir / "SHA256SUMS.tsv"), delimiter="\t"))
    assert len(rows) == 13
    modes = set()
    for rel, sha in rows:
        original = originals_dir / rel
        assert hashlib.sha256(original.read_bytes()).hexdigest() == sha
        modes.add(Image.open(original).mode)
        a, b = D.read_image(original), D.read_image(data_dir / rel)
        assert a.dtype == np.uint8 and a.shape[2] == 3
        np.testing.assert_array_equal(a, b)
    assert {"RGB", "RGBA"} <= modes  # the encoding shortcut is present in the originals ...
    # ... and gone after decoding: an RGB original and an RGBA original give the same array layout
    assert D.read_image(originals_dir / "COVID/Covid (413).png").shape[2] == D.read_image(originals_dir / "COVID/Covid (414).png").shape[2] == 3


def _save(img: Image.Image, path, fmt=None):
    img.save(path, format=fmt)
    return path


def test_every_mode_decodes_to_rgb_uint8(tmp_path):
    gray = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
    l_img = Image.fromarray(gray, "L")
    expected = np.repeat(gray[:, :, None], 3, axis=2)
    files = {
        "l.png": _save(l_img, tmp_path / "l.png"),
        "rgb.png": _save(l_img.convert("RGB"), tmp_path / "rgb.png"),
        "rgba.png": _save(l_img.convert("RGBA"), tmp_path / "rgba.png"),
        "bmp.bmp": _save(l_img, tmp_path / "bmp.bmp"),
        "tif.tif": _save(l_img, tmp_path / "tif.tif"),
    }
    for name, path in files.items():
        np.testing.assert_array_equal(D.read_image(path), expected, err_msg=name)
    # palette image
    p_img = l_img.convert("P")
    _save(p_img, tmp_path / "p.png")
    np.testing.assert_array_equal(D.read_image(tmp_path / "p.png"), np.asarray(p_img.convert("RGB")))
    # 16-bit: full range maps onto 8 bits
    arr16 = (gray.astype(np.uint16) * 257)
    Image.fromarray(arr16).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = D.read_image(tmp_path / "i16.png")
    np.testing.assert_array_equal(out[:, :, 0], gray)
    # a .png that holds JPEG bytes
    buf = io.BytesIO()
    l_img.save(buf, format="JPEG", quality=95)
    (tmp_path / "jpeg_inside.png").write_bytes(buf.getvalue())
    jpg = D.read_image(tmp_path / "jpeg_inside.png")
    assert jpg.shape == (48, 64, 3) and np.abs(jpg.astype(int) - expected).mean() < 3


def test_bad_images_name_the_file(tmp_path, data_dir):
    (tmp_path / "empty.png").write_bytes(b"")
    raw = (data_dir / "COVID" / "Covid (1).png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    for name in ("empty.png", "truncated.png", "garbage.png"):
        with pytest.raises(CTTransferError, match=name):
            D.read_image(tmp_path / name)


def test_cache_memory_and_disk(tmp_path, data_dir, monkeypatch):
    path = data_dir / "COVID" / "Covid (2).png"
    cache = D.ImageCache(48, cache_dir=tmp_path / "cache")
    first = cache.get(path)
    assert first.shape == (48, 48, 3)
    assert cache.get(path) is first  # memory hit: no second decode
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    D.MEMORY.clear()

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the disk cache")

    monkeypatch.setattr(D.cache, "decode_any", no_decode)
    np.testing.assert_array_equal(D.ImageCache(48, tmp_path / "cache").get(path), first)


def test_paper_split_reproduces_table1_and_is_byte_stable(tmp_path, data_dir):
    items, classes = D.scan_folder(data_dir)
    assert classes == ["COVID", "non-COVID"] and len(items) == 2481
    rows = D.make_split(items, "paper", seed=0)
    counts = D.split_counts(rows)
    for cls in classes:
        assert [counts[s][cls] for s in D.SUBSETS] == [976, 122, 122]
    D.write_split(rows, tmp_path / "a.csv")
    D.write_split(D.make_split(items, "paper", seed=0), tmp_path / "b.csv")
    D.write_split(D.make_split(items, "paper", seed=1), tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    strat = D.split_counts(D.make_split(items, "stratified", seed=0))
    assert strat["train"]["COVID"] == 1002 and strat["val"]["COVID"] == 125 and strat["test"]["non-COVID"] == 123
    assert D.read_split(tmp_path / "a.csv", data_dir) == rows


def test_split_reports_exact_duplicates_across_subsets(data_dir):
    rows = [{"path": "COVID/Covid (128).png", "class": "COVID", "subset": "train"},
            {"path": "COVID/Covid (129).png", "class": "COVID", "subset": "test"},
            {"path": "COVID/Covid (134).png", "class": "COVID", "subset": "val"},
            {"path": "COVID/Covid (135).png", "class": "COVID", "subset": "val"},
            {"path": "COVID/Covid (1).png", "class": "COVID", "subset": "test"}]
    pairs = D.pixel_duplicates_across_subsets(rows, data_dir)
    assert pairs == [("COVID/Covid (128).png (train)", "COVID/Covid (129).png (test)")]


def test_split_cli_counts_and_duplicates(tmp_path, data_dir, capsys):
    assert main(["split", "--data", str(data_dir), "--out", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "train COVID: 1002  non-COVID: 983" in out
    assert "exact duplicates (same decoded pixels) across subsets:" in out


@pytest.mark.parametrize("case", ["missing", "empty_class", "one_class"])
def test_bad_dataset_folders_give_one_line_errors(tmp_path, case, capsys):
    root = tmp_path / "ds"
    if case != "missing":
        (root / "COVID").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "COVID" / "a.png")
    if case == "empty_class":
        (root / "non-COVID").mkdir()
    code = main(["split", "--data", str(root), "--out", str(tmp_path / "s.csv")])
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert {"missing": "ds", "empty_class": "non-COVID", "one_class": "at least two"}[case] in err
    assert not (tmp_path / "s.csv").exists()


def test_batch_augmentation_is_per_image_and_seeded():
    x = torch.full((8, 3, 32, 32), 0.0)
    x[:, :, 8:16, 4:12] = 1.0  # an off-centre square: every rotation/flip/shift moves it
    aug = D.paper_augmentation()
    a = aug(x.clone(), torch.Generator().manual_seed(1))
    b = aug(x.clone(), torch.Generator().manual_seed(1))
    c = aug(x.clone(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = a.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 8))  # independent per image
    assert a.min() >= 0 and a.max() <= 1
    bright = D.RandomBrightness(0.8, 1.0)(torch.ones(64, 3, 4, 4), torch.Generator().manual_seed(0))
    assert 0.8 <= bright.min() and bright.max() <= 1.0 and bright.std() > 0
    norm = D.batch_transform((0.5,) * 3, (0.5,) * 3, augment=False)
    out = norm(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(out, torch.ones_like(out))
