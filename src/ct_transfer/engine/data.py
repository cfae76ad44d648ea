"""The engine's data: a run's rows decoded once into uint8 tensors on the training device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as D
from ..data import data_root, load_subset
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
                         groups_file=cfg.split_groups, class_map=class_map, limit=cfg.limit)


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(n_images: int, image_size: int) -> None:
    """Refuse, with the numbers, a decoded set that cannot fit in memory (before decoding any)."""
    need = n_images * 3 * image_size * image_size * 5  # uint8 set + float batches/augmentation headroom
    avail = available_memory()
    if avail is not None and need > 0.8 * avail:
        raise ConfigError("image_size", image_size,
                          f"{n_images} images at {image_size} px need about {need / 2**30:.1f} GB, "
                          f"{avail / 2**30:.1f} GB available; choose a smaller size or a limit=")


def load_subsets(cfg, rows, classes, preprocess, device, progress=False, *,
                 names=D.SUBSETS) -> tuple[dict[str, Subset], list[str]]:
    """The ``names`` subsets decoded (``tune`` leaves out test); each must hold images."""
    rows = [r for r in rows if r["subset"] in names]
    check_memory(len(rows), preprocess.image_size)
    subsets, skipped = {}, []
    for subset in names:
        x, y, kept, bad = load_subset(rows, subset, classes, data_root(cfg.data), preprocess, cache_dir=cfg.cache_dir,
                                      on_bad=cfg.on_bad, progress=progress)
        if len(kept) == 0:
            raise CTTransferError(f"{', '.join(cfg.datasets)}: the {subset} subset is empty (too few images or limit= too small)")
        subsets[subset] = Subset(x.to(device), y.to(device), kept)
        skipped += bad
    if skipped:
        log.warning("\n  ".join([f"skipped {len(skipped)} unreadable file(s):", *skipped]))
    return subsets, skipped
