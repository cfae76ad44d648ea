"""Near-duplicate groups: exact pixel hashes, perceptual hashes, and the groups they form.

Below the engine on purpose: a grouped split (``make_split(..., preset="grouped")``) and the
leakage audit both use these functions. Exact duplicates share decoded pixels (sha256 of the RGB
array); near-duplicates have a pHash Hamming distance <= ``threshold`` (``imagehash.phash`` of the
grayscale image with ``hash_size=16``: 256 bits; the default 64-bit hash is too coarse for CT slices,
whose low frequencies all look alike: at distance <= 4 it already pairs COVID with non-COVID slices). Groups are the connected components of "duplicate of" pairs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _io
from ..config import NEAR_DUPLICATE_THRESHOLD
from ..errors import CTTransferError
from .decode import read_input

log = logging.getLogger(__name__)

HASH_SIZE = 16  # 16 x 16 = 256-bit pHash
# Chosen on sarscov2-ct by looking at pairs (docs/results/audit-paper-split/): every pair at distance
# <= 36 we looked at is the same slice or a neighbouring slice of one scan; the first COVID/non-COVID
# pair (necessarily two patients) appears at 40. 32 keeps a margin: 207 pairs, groups of <= 6 images.
DEFAULT_THRESHOLD = NEAR_DUPLICATE_THRESHOLD


@dataclass(frozen=True)
class Fingerprint:
    path: str  # as given (relative to the dataset root in splits)
    sha256: str  # of the decoded RGB pixels and their shape
    phash: str  # 256-bit perceptual hash, hex


_SEEN: dict = {}  # (resolved path, size, mtime) -> (sha256, phash): a run's images are hashed once per process
_SEEN_MAX = 200_000


def fingerprint(file: str | os.PathLike, name: str | None = None) -> Fingerprint:
    import imagehash
    from PIL import Image

    try:
        st = os.stat(file)
        key = (os.path.realpath(file), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key in _SEEN:
        return Fingerprint(name if name is not None else str(file), *_SEEN[key])
    arr = read_input(file)  # DICOM slices too
    digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    ph = imagehash.phash(Image.fromarray(arr).convert("L"), hash_size=HASH_SIZE)
    if key is not None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        _SEEN[key] = (digest, str(ph))
    return Fingerprint(name if name is not None else str(file), digest, str(ph))


def fingerprints(data_dir, paths: list[str], *, progress: bool = False) -> list[Fingerprint]:
    """Fingerprints of ``data_dir/path`` for each relative path (decoding each file once)."""
    from ..progress import track

    return [fingerprint(Path(data_dir) / p, p) for p in track(paths, desc="hash", enabled=progress)]


def _words(fps: list[Fingerprint]) -> np.ndarray:
    """Hex hashes -> ``N x 4`` uint64 words."""
    raw = b"".join(bytes.fromhex(f.phash) for f in fps)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(fps), -1)


def hamming_matrix(a: list[Fingerprint], b: list[Fingerprint] | None = None) -> np.ndarray:
    """pHash Hamming distances, ``len(a) x len(b)`` (``b`` defaults to ``a``)."""
    wa = _words(a)
    wb = wa if b is None else _words(b)
    d = np.zeros((len(wa), len(wb)), dtype=np.int16)
    for k in range(wa.shape[1]):  # one 64-bit word at a time keeps memory at N x M
        d += np.bitwise_count(wa[:, None, k] ^ wb[None, :, k]).astype(np.int16)
    return d


def close_pairs(a: list[Fingerprint], b: list[Fingerprint] | None = None, *, threshold: int = DEFAULT_THRESHOLD):
    """``(i, j, distance, exact)`` for pairs at pHash distance <= threshold or with identical pixels.

    Within one list (``b is None``) each unordered pair appears once (i < j).
    """
    d = hamming_matrix(a, b)
    same = b is None
    if same:
        d = np.where(np.triu(np.ones_like(d, dtype=bool), 1), d, 999)
    ii, jj = np.nonzero(d <= threshold)
    other = a if same else b
    pairs = {(int(i), int(j)): int(d[i, j]) for i, j in zip(ii, jj)}
    by_sha: dict[str, list[int]] = {}
    for j, f in enumerate(other):
        by_sha.setdefault(f.sha256, []).append(j)
    for i, f in enumerate(a):  # identical pixels count whatever their pHash says
        for j in by_sha.get(f.sha256, ()):
            if not same or i < j:
                pairs.setdefault((i, j), int(d[i, j]))
    return sorted(((i, j, dist, a[i].sha256 == other[j].sha256) for (i, j), dist in pairs.items()),
                  key=lambda t: (t[2], t[0], t[1]))


def connected_groups(n: int, pairs) -> np.ndarray:
    """Union-find over ``pairs`` (i, j, ...): a group id per item (scipy's connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return np.arange(n)
    i = np.array([p[0] for p in pairs])
    j = np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def read_groups(path) -> dict[str, str]:
    """``path,group`` (or ``path,...,patient`` like UCSD's SPLIT.csv) -> {path: group}."""
    rows = _io.read_csv(path, required=("path",), what="groups file")
    if not rows:
        raise CTTransferError(f"{path}: groups file lists no images")
    column = next((c for c in ("group", "patient") if c in rows[0]), None)
    if column is None:
        raise CTTransferError(f"{path}: groups file needs a 'group' or 'patient' column")
    empty = [r["path"] for r in rows if not (r[column] or "").strip()]
    if empty:
        raise CTTransferError(f"{path}: {len(empty)} row(s) with an empty {column}, e.g. {empty[0]}")
    return {r["path"]: r[column].strip() for r in rows}


def image_groups(data_dir, paths: list[str], *, threshold: int = DEFAULT_THRESHOLD,
                 groups_file=None, patients: dict[str, str] | None = None) -> list[str]:
    """One group label per path: near-duplicates (and, with ``groups_file`` or ``patients``
    ({path: patient}, e.g. the DICOM slices of one patient), patients) merged."""
    fps = fingerprints(data_dir, paths, progress=True)
    pairs = list(close_pairs(fps, threshold=threshold))
    given = dict(patients or {})
    if groups_file is not None:
        given.update(read_groups(groups_file))
        missing = [p for p in paths if p not in given]
        if missing:
            raise CTTransferError(f"{groups_file}: {len(missing)} image(s) have no group, e.g. {missing[0]}")
    if given:
        first: dict[str, int] = {}
        for k, p in enumerate(paths):  # chain every patient's images together
            if p not in given:
                continue
            j = first.setdefault(given[p], k)
            if j != k:
                pairs.append((j, k))
    ids = connected_groups(len(paths), pairs)
    # a label that does not depend on the order of discovery: the group's first path
    first_path: dict[int, str] = {}
    for p, g in sorted(zip(paths, ids)):
        first_path.setdefault(int(g), p)
    return [first_path[int(g)] for g in ids]
