"""A disk store of decoded, preprocessed images for datasets that do not fit in memory.

One raw uint8 file ``N x 3 x S x S`` (C order, what ``load_many`` stacks) per preprocessing key and
file list, plus a JSON file that commits it. Both are written once through a temporary file and a
rename, the JSON last: a store whose writer was killed has no JSON (or a data file of the wrong
size) and is rebuilt, never read half-written. Later runs with the same files and preprocessing
reuse it.

Batches are read by index with ``os.preadv`` into a fresh array: the operating system's page cache
keeps a small store in memory (in-memory speed), while the process holds one batch. A
``np.memmap`` of the whole file would do the same reads, but every page it touches counts in the
process's resident memory until the kernel takes it back, so peak RSS would grow with the dataset;
``StoredImages.memmap()`` still gives that view for users who want one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from .. import _io
from ..errors import CTTransferError
from .cache import ImageCache, MemoryCache
from .preprocess import Preprocess
from .volume import SliceRef, volume_signature

log = logging.getLogger("ct_transfer.data")

FORMAT = 1  # bump when the layout changes: old stores are then rebuilt, not misread
STALE_TMP_SECONDS = 600  # a temporary file untouched this long belongs to a killed writer


def store_name(paths, preprocess: Preprocess) -> str:
    """Identifies a store: the preprocessing and every file's resolved path, size and mtime (a
    changed file gives a new store; stat of 40k files takes well under a second)."""
    h = hashlib.sha256(f"{FORMAT}|{preprocess.key}\n".encode())
    for p in paths:
        if isinstance(p, SliceRef):  # a volume's slice: its files' sizes and mtimes, and the index
            h.update(f"{os.path.realpath(p.path)}#{p.index}\0{volume_signature(p.path)}\n".encode())
            continue
        p = Path(p)
        try:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())  # decoding reports it (or skips it with on_bad=skip)
    return f"{preprocess.image_size}px-{h.hexdigest()[:24]}"


class StoredImages:
    """``N x 3 x S x S`` uint8 images in a store file, read on demand.

    Indexing works like a tensor's for what the engine does: ``x[i]``, ``x[a:b]`` (one contiguous
    read) and ``x[index_tensor]`` (one read per image, in file order) return uint8 tensors on
    ``device``; ``len(x)``, ``x.shape``, ``x.to(device)``.
    """

    dtype = torch.uint8

    def __init__(self, path: str | os.PathLike, n: int, image_size: int, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.shape = torch.Size((int(n), 3, int(image_size), int(image_size)))
        self.device = torch.device(device)
        self.item_bytes = 3 * int(image_size) ** 2
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoredImages({str(self.path)!r}, n={len(self)}, size={self.shape[-1]}, device={self.device})"

    def to(self, device, non_blocking: bool = False) -> "StoredImages":
        device = torch.device(device)
        return self if device == self.device else StoredImages(self.path, len(self), self.shape[-1], device)

    def memmap(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=tuple(self.shape))

    def _read(self, out: np.ndarray, offset: int) -> None:
        got = os.preadv(self._fd, [memoryview(out).cast("B")], offset)
        if got != out.nbytes:
            raise CTTransferError(f"{self.path}: image store is shorter than its index says (changed while in use?)")

    def _out(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def __getitem__(self, key) -> torch.Tensor:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                out = np.empty((max(0, stop - start), *self.shape[1:]), np.uint8)
                if len(out):
                    self._read(out, start * self.item_bytes)
                return self._out(out)
            key = range(start, stop, step)
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.ndim == 0):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} images")
            return self[i % n:i % n + 1][0]
        idx = key.detach().cpu().numpy() if torch.is_tensor(key) else np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        idx = idx % n if len(idx) else idx
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        for j in np.argsort(idx, kind="stable"):  # file order: sequential reads where batches allow
            self._read(out[j], int(idx[j]) * self.item_bytes)
        return self._out(out)


def _clean_stale(folder: Path, name: str) -> None:
    """Temporary files of writers that were killed (a live writer touches its file constantly)."""
    now = time.time()
    for tmp in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()


def open_store(folder: str | os.PathLike, name: str, image_size: int) -> tuple[StoredImages, dict] | None:
    """The committed store ``name`` in ``folder``, or None when it is missing or incomplete."""
    folder = Path(folder)
    data, meta_path = folder / f"{name}.u8", folder / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["n"])
        ok = meta.get("format") == FORMAT and int(meta["image_size"]) == image_size \
            and data.stat().st_size == n * 3 * image_size ** 2
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        log.warning("%s: image store incomplete or from another version; rebuilding it", data)
        return None
    return StoredImages(data, n, image_size), meta


def build_store(paths, preprocess: Preprocess, folder: str | os.PathLike, *, on_bad: str = "error",
                progress: bool = False, desc: str = "decode") -> tuple[StoredImages, list[int], list[str]]:
    """Decode ``paths`` once into the store (or reuse the committed one): (images, indices kept, bad
    messages), as ``ImageCache.load_many`` returns them, but on disk."""
    if on_bad not in ("error", "skip"):
        raise CTTransferError(f"on_bad={on_bad}: choose error or skip")
    paths = [p if isinstance(p, SliceRef) else str(p) for p in paths]
    folder = Path(folder)
    name = store_name(paths, preprocess)
    found = open_store(folder, name, preprocess.image_size)
    if found is not None:
        images, meta = found
        if meta["bad"] and on_bad == "error":
            raise CTTransferError(_bad_message(meta["bad"]))
        return images, list(meta["kept"]), list(meta["bad"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTTransferError(f"{folder}: cannot create the image store ({_io.why(exc)})") from None
    _clean_stale(folder, name)
    # No memory LRU here: keeping each decoded image would grow memory with the dataset again.
    cache = ImageCache(preprocess, None, memory=MemoryCache(0))
    kept, bad = [], []
    t0 = time.perf_counter()
    iterator = enumerate(paths)
    if progress and len(paths) > 200:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(paths), desc=desc, leave=False, disable=None, mininterval=1.0)
    data = folder / f"{name}.u8"
    with _io.atomic_open(data, "wb") as fh:
        for i, p in iterator:
            try:
                arr = cache.get(p)
            except CTTransferError as exc:
                bad.append(str(exc))
                if on_bad == "error":
                    raise CTTransferError(_bad_message(bad)) from None
                continue
            fh.write(np.ascontiguousarray(arr.transpose(2, 0, 1)).tobytes())
            kept.append(i)
        fh.flush()
        os.fsync(fh.fileno())  # the data is on disk before the JSON that commits it
    meta = {"format": FORMAT, "n": len(kept), "image_size": preprocess.image_size, "preprocess": preprocess.key,
            "files": len(paths), "kept": kept, "bad": bad, "decode_seconds": round(time.perf_counter() - t0, 3)}
    _io.write_text(folder / f"{name}.json", json.dumps(meta) + "\n")
    log.info("image store %s: %d images decoded in %.1f s", data, len(kept), meta["decode_seconds"])
    return StoredImages(data, len(kept), preprocess.image_size), kept, bad


def _bad_message(bad: list[str]) -> str:
    more = f" (and {len(bad) - 1} more; on_bad=skip skips them)" if len(bad) > 1 else " (on_bad=skip skips it)"
    return bad[0] + more
