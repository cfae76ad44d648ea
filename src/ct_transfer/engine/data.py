"""The engine's data: a run's rows decoded once into uint8 tensors on the training device, or into a
disk store read per batch (data/store.py) when the memory estimate says they do not fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as D
from ..data import data_root, load_subset
from ..data.store import build_store
from ..errors import ConfigError, CTTransferError

log = logging.getLogger("ct_transfer.engine")


@dataclass
class Subset:
    x: torch.Tensor  # N x 3 x S x S uint8
    y: torch.Tensor  # N labels
    rows: list[dict]  # the rows that decoded


def split_rows(cfg) -> list[dict]:
    """The config's split (``data.build_split``: its split files, else a fresh preset split; class
    map and ``limit`` applied)."""
    class_map = None
    if cfg.class_map:
        from ..config import parse_class_map

        class_map = parse_class_map(cfg.class_map)
    return D.build_split(cfg.datasets, split_files=cfg.split_files, preset=cfg.split_preset, seed=cfg.split_seed,
                         groups_file=cfg.split_groups, class_map=class_map, limit=cfg.limit,
                         volume_slices=cfg.volume_slices)


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_need(n_images: int, image_size: int) -> int:
    """Bytes an in-memory load needs: the uint8 set plus float batches/augmentation headroom."""
    return n_images * 3 * image_size * image_size * 5


def fits_in_memory(n_images: int, image_size: int) -> bool:
    avail = available_memory()
    return avail is None or memory_need(n_images, image_size) <= 0.8 * avail


def check_memory(n_images: int, image_size: int) -> None:
    """Refuse, with the numbers, a decoded set that cannot fit in memory (before decoding any)."""
    if not fits_in_memory(n_images, image_size):
        need, avail = memory_need(n_images, image_size), available_memory()
        raise ConfigError("image_size", image_size,
                          f"{n_images} images at {image_size} px need about {need / 2**30:.1f} GB, "
                          f"{avail / 2**30:.1f} GB available; choose a smaller size, a limit= or store=disk")


def store_dir(cfg) -> Path:
    """Where disk stores go: ``cache_dir/store``, else the user's ct-transfer cache."""
    from ..models import cache_root

    return Path(cfg.cache_dir) / "store" if cfg.cache_dir else cache_root() / "store"


def use_store(cfg, n_images: int, image_size: int) -> bool:
    """``store``: disk, memory (refused when the estimate does not fit), or auto = the estimate decides."""
    mode = getattr(cfg, "store", "auto")
    if mode == "memory":
        check_memory(n_images, image_size)
        return False
    if mode == "disk":
        return True
    if fits_in_memory(n_images, image_size):
        return False
    log.info("%d images at %d px do not fit in memory (about %.1f GB needed): decoding them into a disk "
             "store under %s, read per batch", n_images, image_size, memory_need(n_images, image_size) / 2**30,
             store_dir(cfg))
    return True


def load_subsets(cfg, rows, classes, preprocess, device, progress=False, *,
                 names=D.SUBSETS) -> tuple[dict[str, Subset], list[str]]:
    """The ``names`` subsets decoded (``tune`` leaves out test); each must hold images. Their ``x`` is
    a uint8 tensor, or with a disk store (``use_store``) a ``StoredImages`` indexed the same way."""
    rows = [r for r in rows if r["subset"] in names]
    stored = use_store(cfg, len(rows), preprocess.image_size)
    subsets, skipped = {}, []
    for subset in names:
        if stored:
            x, y, kept, bad = load_subset_stored(rows, subset, classes, data_root(cfg.data), preprocess,
                                                 store_dir(cfg), on_bad=cfg.on_bad, progress=progress)
        else:
            x, y, kept, bad = load_subset(rows, subset, classes, data_root(cfg.data), preprocess,
                                          cache_dir=cfg.cache_dir, on_bad=cfg.on_bad, progress=progress)
        if len(kept) == 0:
            raise CTTransferError(f"{', '.join(cfg.datasets)}: the {subset} subset is empty (too few images or limit= too small)")
        subsets[subset] = Subset(x.to(device), y.to(device), kept)
        skipped += bad
    if skipped:
        log.warning("\n  ".join([f"skipped {len(skipped)} unreadable file(s):", *skipped]))
    return subsets, skipped


def load_subset_stored(rows, subset, classes, data_dir, preprocess, folder, *, on_bad="error", progress=False):
    """``load_subset`` through a disk store: (StoredImages, labels tensor, kept rows, bad-file messages)."""
    sub = [r for r in rows if r["subset"] == subset]
    x, kept, bad = build_store([D.row_input(r, data_dir) for r in sub], preprocess, folder, on_bad=on_bad,
                               progress=progress, desc=f"decode {subset}")
    kept_rows = [sub[i] for i in kept]
    labels = torch.tensor([classes.index(r["class"]) for r in kept_rows], dtype=torch.long)
    return x, labels, kept_rows, bad
