"""Decode + preprocess each file once: a bounded in-memory LRU (shared by the runs of a process)
and, optionally, a disk cache keyed by the file's sha256 and the preprocessing."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import CTTransferError
from .decode import decode_any, read_bytes
from .preprocess import Preprocess
from .split import row_input
from .volume import SliceRef, VolumeReader, volume_signature

DEFAULT_MEMORY_MB = int(os.environ.get("CT_TRANSFER_MEMORY_CACHE_MB", "2048"))


class MemoryCache:
    """Least-recently-used arrays up to ``max_bytes`` (a long-running predict or server stays bounded)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # the web server decodes from several threads

    def get(self, key):
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self):
        return len(self._items)


MEMORY = MemoryCache(DEFAULT_MEMORY_MB * 2**20)


class ImageCache:
    """Preprocessed arrays of files: memory always (bounded), disk optionally."""

    def __init__(self, preprocess: Preprocess | int, cache_dir: str | os.PathLike | None = None,
                 memory: MemoryCache | None = None):
        self.preprocess = Preprocess(int(preprocess)) if isinstance(preprocess, int) else preprocess
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory = MEMORY if memory is None else memory
        self.volumes = VolumeReader()  # the last volume stays open: its slices come one after another

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def _disk_path(self, digest: str) -> Path:
        tag = hashlib.sha256(self.preprocess.key.encode()).hexdigest()[:12]
        return self.cache_dir / f"{self.image_size}px-{tag}" / digest[:2] / f"{digest}.npy"

    def get(self, path: str | os.PathLike | SliceRef) -> np.ndarray:
        if isinstance(path, SliceRef):
            return self._get_slice(path)
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise CTTransferError(f"{path}: image file not found") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, self.preprocess.key)
        hit = self.memory.get(key)
        if hit is not None:
            return hit
        data = read_bytes(path)
        arr = None
        if self.cache_dir is not None:
            disk = self._disk_path(hashlib.sha256(data).hexdigest())
            if disk.exists():
                try:
                    arr = np.load(disk)
                    if arr.shape != (self.image_size, self.image_size, 3) or arr.dtype != np.uint8:
                        arr = None
                except (OSError, ValueError):
                    arr = None  # damaged cache entry: decode again and overwrite it
            if arr is None:
                arr = self.preprocess(decode_any(data, str(path), self.preprocess.window))
                self._save(disk, arr)
        else:
            arr = self.preprocess(decode_any(data, str(path), self.preprocess.window))
        self.memory.put(key, arr)
        return arr

    def _get_slice(self, ref: SliceRef) -> np.ndarray:
        """Slice ``ref.index`` of a volume: HU through the run's window, then the preprocessing;
        keyed by the volume's files (size, mtime) and the slice index."""
        signature = volume_signature(ref.path)
        key = (os.path.realpath(ref.path), signature, ref.index, self.preprocess.key)
        hit = self.memory.get(key)
        if hit is not None:
            return hit
        arr = disk = None
        if self.cache_dir is not None:
            disk = self._disk_path(hashlib.sha256("\0".join(map(str, key[:3])).encode()).hexdigest())
            try:
                arr = np.load(disk) if disk.exists() else None
                if arr is not None and (arr.shape != (self.image_size, self.image_size, 3) or arr.dtype != np.uint8):
                    arr = None
            except (OSError, ValueError):
                arr = None  # damaged cache entry: decode again and overwrite it
        if arr is None:
            arr = self.preprocess(self.volumes.rgb(ref, self.preprocess.window, signature))
            if disk is not None:
                self._save(disk, arr)
        self.memory.put(key, arr)
        return arr

    def _save(self, disk: Path, arr: np.ndarray) -> None:
        try:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, disk)
        except OSError as exc:
            raise CTTransferError(f"{self.cache_dir}: cannot write the image cache "
                                  f"({(exc.strerror or str(exc)).lower()})") from None

    def load_many(self, paths, on_bad: str = "error", progress: bool = False, desc: str = "decode"):
        """Stack images into ``N x 3 x S x S`` uint8; returns (array, indices kept, bad messages)."""
        if on_bad not in ("error", "skip"):
            raise CTTransferError(f"on_bad={on_bad}: choose error or skip")
        out, kept, bad = [], [], []
        from ..progress import track

        for i, p in track(enumerate(paths), total=len(paths), desc=desc, enabled=progress and len(paths) > 200):
            try:
                out.append(self.get(p))
                kept.append(i)
            except CTTransferError as exc:
                bad.append(str(exc))
        if bad and on_bad == "error":
            more = f" (and {len(bad) - 1} more; on_bad=skip skips them)" if len(bad) > 1 else " (on_bad=skip skips it)"
            raise CTTransferError(bad[0] + more)
        if not out:
            return np.zeros((0, 3, self.image_size, self.image_size), np.uint8), kept, bad
        return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)), kept, bad


def stack(arrays: list[np.ndarray]):
    """``S x S x 3`` arrays -> ``N x 3 x S x S`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))


def load_subset(rows, subset, classes, data_dir, preprocess, *, cache_dir=None, on_bad="error", progress=False):
    """(uint8 tensor N x 3 x S x S, labels tensor, kept rows, bad-file messages) of one subset."""
    sub = [r for r in rows if r["subset"] == subset]
    cache = ImageCache(preprocess, cache_dir)
    arr, kept, bad = cache.load_many([row_input(r, data_dir) for r in sub], on_bad, progress,
                                     desc=f"decode {subset}")
    kept_rows = [sub[i] for i in kept]
    labels = torch.tensor([classes.index(r["class"]) for r in kept_rows], dtype=torch.long)
    return torch.from_numpy(arr), labels, kept_rows, bad
