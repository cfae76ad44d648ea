"""Shared fixtures: the real dataset beside the repo, and one short real training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "sarscov2-ct"
ORIGINALS = ROOT.parent / "shared" / "datasets" / "sarscov2-ct-originals"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # converted Lite weights and disk caches go to a per-session folder, not the user's home
    os.environ["CT_TRANSFER_CACHE"] = str(tmp_path_factory.mktemp("ct-cache"))
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"dataset missing: {DATA} (tests read ../shared/datasets in place)")
    return DATA


@pytest.fixture(scope="session")
def originals_dir() -> Path:
    return ORIGINALS


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """EfficientNetLite0 with ImageNet weights, 60 images per class, 2 epochs."""
    from ct_transfer import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "lite0"
    cfg = TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="imagenet", out=str(out),
                      epochs=2, limit=60, seed=0)
    run = fit(cfg, progress=False)
    return out, run.metrics


def small_dataset(root: Path, data_dir: Path, per_class: int = 12) -> Path:
    """A folder-per-class copy of a few real images (tests may break it on purpose)."""
    import shutil

    for cls in ("COVID", "non-COVID"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        files = sorted((data_dir / cls).iterdir())[:per_class]
        for f in files:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory, data_dir):
    """A real grid: EfficientNetLite0 x {none, imagenet} x seed 0, 1 epoch, 20 images per class.

    Read-only for tests: copy it (shutil.copytree) before changing anything inside.
    """
    from ct_transfer.experiment import run_grid

    out = tmp_path_factory.mktemp("tiny-grid")
    results = run_grid(str(data_dir), str(out), ["EfficientNetLite0"], ["none", "imagenet"], [0],
                       base=dict(epochs=1, limit=20), progress=False)
    assert [r["status"] for r in results] == ["done", "done"]
    return out



def error_line(err: str) -> str:
    """The CLI's error on stderr: exactly one ``ct-transfer: error: ...`` line, the last one, no traceback.
    Lines before it are the command's log and progress lines (stderr is where they go, like git's and
    pip's), e.g. ``hash: 2481 imgs`` before a groups file is found wanting."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("ct-transfer: error:")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], err
    assert "Traceback" not in err and " at 0x" not in err, err
    return errors[0]
