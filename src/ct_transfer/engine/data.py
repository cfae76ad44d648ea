"""The engine's data: a run's rows decoded once into uint8 tensors on the training device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as D
from ..errors import ConfigError, CTTransferError

log = logging.getLogger("ct_transfer.engine")


@dataclass
class Subset:
    x: torch.Tensor  # N x 3 x S x S uint8
    y: torch.Tensor  # N labels
    rows: list[dict]  # the rows that decoded


def split_rows(cfg) -> list[dict]:
    """The config's split: its split file, else a fresh preset split; ``limit`` applied."""
    if cfg.split_file:
        rows = D.read_split(cfg.split_file, cfg.data)
    else:
        rows = D.split_folder(cfg.data, cfg.split_preset, cfg.split_seed, groups_file=cfg.split_groups)
    if cfg.limit:
        rows = D.limit_rows(rows, int(cfg.limit), cfg.split_seed)
    return rows


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
                          f"{avail / 2**30:.1f} GB available; choose a smaller size or a --limit")


def load_subset(rows, subset, classes, data_dir, preprocess, *, cache_dir=None, on_bad="error", progress=False):
    """(uint8 tensor N x 3 x S x S, labels tensor, kept rows, bad-file messages) of one subset."""
    sub = [r for r in rows if r["subset"] == subset]
    cache = D.ImageCache(preprocess, cache_dir)
    arr, kept, bad = cache.load_many([Path(data_dir) / r["path"] for r in sub], on_bad, progress,
                                     desc=f"decode {subset}")
    kept_rows = [sub[i] for i in kept]
    labels = torch.tensor([classes.index(r["class"]) for r in kept_rows], dtype=torch.long)
    return torch.from_numpy(arr), labels, kept_rows, bad


def load_subsets(cfg, rows, classes, preprocess, device, progress=False) -> tuple[dict[str, Subset], list[str]]:
    check_memory(len(rows), preprocess.image_size)
    subsets, skipped = {}, []
    for subset in D.SUBSETS:
        x, y, kept, bad = load_subset(rows, subset, classes, cfg.data, preprocess, cache_dir=cfg.cache_dir,
                                      on_bad=cfg.on_bad, progress=progress)
        if len(kept) == 0:
            raise CTTransferError(f"{cfg.data}: the {subset} subset is empty (too few images or --limit too small)")
        subsets[subset] = Subset(x.to(device), y.to(device), kept)
        skipped += bad
    if skipped:
        log.warning("\n  ".join([f"skipped {len(skipped)} unreadable file(s):", *skipped]))
    return subsets, skipped
