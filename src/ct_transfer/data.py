"""Data: find images, decode them to one fixed mode, cache them, split them, augment batches.

Every image becomes an ``H x W x 3`` uint8 RGB array whatever its file mode (L, RGB, RGBA, P,
16-bit) or metadata, so the RGB/RGBA encoding difference between the classes of the original
SARS-CoV-2 download cannot leak into a model. Decoded, resized arrays are kept in memory (and
optionally on disk, keyed by file content) so epochs never re-decode a PNG.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CTTransferError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUBSETS = ("train", "val", "test")
DEFAULT_POSITIVE = "COVID"

# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: str  # relative to the dataset root, POSIX separators
    label: str


def scan_folder(root: str | os.PathLike) -> tuple[list[Item], list[str]]:
    """List ``root/<class>/**/<image>``; returns the items (sorted) and the class names (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise CTTransferError(f"{root}: dataset folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Item] = []
    empty = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(str(class_dir))
        items.extend(Item(p.relative_to(root).as_posix(), class_dir.name) for p in files)
    if empty:
        raise CTTransferError(f"{', '.join(empty)}: class folder holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
    classes = [d.name for d in class_dirs]
    if len(classes) < 2:
        found = classes[0] if classes else "none"
        raise CTTransferError(f"{root}: need at least two class folders, found {len(classes)} ({found})")
    return items, classes


def class_order(classes: list[str], positive: str | None) -> list[str]:
    """Class index order: for two classes the positive class gets index 1 (so metrics use it)."""
    if positive is None or len(classes) != 2:
        return sorted(classes)
    if positive not in classes:
        raise CTTransferError(f"--positive {positive}: not a class folder (classes: {', '.join(classes)})")
    return [c for c in classes if c != positive] + [positive]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> ``H x W x 3`` uint8. Alpha, palette, ICC profile and bit depth are dropped."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # full 16-bit range onto 8 bits
        elif mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr / 257.0 if arr.max() > 255 else arr
        else:  # float or out-of-range integers: stretch what is there
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_bytes(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # force full decode so truncated files fail here, not later
        return image
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = "empty file" if not data else str(exc).split("\n")[0]
        raise CTTransferError(f"{name}: cannot decode image ({reason})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file at full resolution to ``H x W x 3`` uint8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot read ({exc.strerror})") from None
    return to_rgb_array(decode_bytes(data, str(path)))


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size x size`` like Keras ``target_size`` (no crop); PIL bilinear antialiases."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


# Decoded, resized arrays for the life of the process (several runs of a grid share them).
_MEMORY: dict[tuple, np.ndarray] = {}


class ImageCache:
    """Decode + resize each file once; memory always, disk (keyed by sha256 of the file) optionally."""

    def __init__(self, image_size: int, cache_dir: str | os.PathLike | None = None):
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _disk_path(self, digest: str) -> Path:
        return self.cache_dir / f"{self.image_size}px" / digest[:2] / f"{digest}.npy"

    def get(self, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise CTTransferError(f"{path}: image file not found") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, self.image_size)
        hit = _MEMORY.get(key)
        if hit is not None:
            return hit
        data = path.read_bytes()
        arr = None
        if self.cache_dir is not None:
            disk = self._disk_path(hashlib.sha256(data).hexdigest())
            if disk.exists():
                try:
                    arr = np.load(disk)
                except (OSError, ValueError):
                    arr = None  # damaged cache entry: decode again and overwrite it
            if arr is None:
                arr = resize_array(to_rgb_array(decode_bytes(data, str(path))), self.image_size)
                disk.parent.mkdir(parents=True, exist_ok=True)
                tmp = disk.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, disk)
        else:
            arr = resize_array(to_rgb_array(decode_bytes(data, str(path))), self.image_size)
        _MEMORY[key] = arr
        return arr

    def load_many(self, paths, on_bad: str = "error", progress: bool = False, desc: str = "decode"):
        """Stack images into ``N x 3 x S x S`` uint8; returns (array, indices kept, bad messages)."""
        if on_bad not in ("error", "skip"):
            raise CTTransferError(f"--on-bad {on_bad}: choose error or skip")
        out, kept, bad = [], [], []
        iterator = enumerate(paths)
        if progress and len(paths) > 200:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(paths), desc=desc, leave=False, disable=None, mininterval=1.0)
        for i, p in iterator:
            try:
                out.append(self.get(p))
                kept.append(i)
            except CTTransferError as exc:
                bad.append(str(exc))
        if bad and on_bad == "error":
            more = f" (and {len(bad) - 1} more; --on-bad skip skips them)" if len(bad) > 1 else " (--on-bad skip skips it)"
            raise CTTransferError(bad[0] + more)
        if not out:
            return np.zeros((0, 3, self.image_size, self.image_size), np.uint8), kept, bad
        return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)), kept, bad


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------

PAPER_PER_CLASS = {"train": 976, "val": 122, "test": 122}  # Table 1 of the paper


def make_split(items: list[Item], preset: str = "stratified", seed: int = 0,
               ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[dict]:
    """Per-class shuffled split. ``paper``: 976/122/122 per class (1220 sampled per class)."""
    if preset not in ("stratified", "paper"):
        raise CTTransferError(f"--preset {preset}: choose stratified or paper")
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    rng = np.random.RandomState(seed)
    rows = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda it: it.path)
        order = rng.permutation(len(group))
        if preset == "paper":
            need = sum(PAPER_PER_CLASS.values())
            if len(group) < need:
                raise CTTransferError(f"--preset paper: class {label} has {len(group)} images, needs {need}")
            counts = [PAPER_PER_CLASS[s] for s in SUBSETS]
        else:
            n_val = int(round(len(group) * ratios[1]))
            n_test = int(round(len(group) * ratios[2]))
            counts = [len(group) - n_val - n_test, n_val, n_test]
        start = 0
        for subset, count in zip(SUBSETS, counts):
            for j in order[start:start + count]:
                rows.append({"path": group[j].path, "class": label, "subset": subset})
            start += count
    rows.sort(key=lambda r: (SUBSETS.index(r["subset"]), r["class"], r["path"]))
    return rows


def write_split(rows: list[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "class", "subset"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_split(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read a split CSV; with ``data_dir`` every listed file must exist there."""
    path = Path(path)
    if not path.is_file():
        raise CTTransferError(f"{path}: split file not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "class", "subset"} <= set(reader.fieldnames):
            raise CTTransferError(f"{path}: split file needs the columns path, class, subset")
        rows = [dict(r) for r in reader]
    bad = [r["subset"] for r in rows if r["subset"] not in SUBSETS]
    if bad:
        raise CTTransferError(f"{path}: unknown subset '{bad[0]}' (use train, val, test)")
    if data_dir is not None:
        missing = [r["path"] for r in rows if not (Path(data_dir) / r["path"]).is_file()]
        if missing:
            raise CTTransferError(f"{path}: {len(missing)} listed file(s) missing under {data_dir}, e.g. {missing[0]}")
    return rows


def split_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        counts[r["subset"]][r["class"]] += 1
    return {s: dict(c) for s, c in counts.items()}


def pixel_duplicates_across_subsets(rows: list[dict], data_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Pairs of files with identical decoded pixels that sit in different subsets."""
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        arr = read_image(Path(data_dir) / r["path"])
        digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
        by_hash[digest].append(r)
    pairs = []
    for group in by_hash.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if group[i]["subset"] != group[j]["subset"]:
                    pairs.append((f"{group[i]['path']} ({group[i]['subset']})", f"{group[j]['path']} ({group[j]['subset']})"))
    return pairs


# ---------------------------------------------------------------------------------------------
# Batch transforms (MONAI style: small composable objects; here they act on whole batches)
# ---------------------------------------------------------------------------------------------


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class ToFloat:
    """uint8 0..255 -> float 0..1 (the paper's 1/255 rescale)."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype

    def __call__(self, x, generator=None):
        return x.to(self.dtype).div_(255.0)

    def __repr__(self):
        return "ToFloat()"


class Normalize:
    """The model's own mean/std (from timm's pretrained_cfg)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x, generator=None):
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _uniform(n, low, high, generator, device):
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


class RandomAffine:
    """Rotation, shift and flips with independent parameters per image, one grid_sample per batch.

    Matches Keras ``ImageDataGenerator(rotation_range, width/height_shift_range, horizontal_flip,
    vertical_flip)`` with its default ``fill_mode='nearest'`` (border padding here).
    """

    def __init__(self, degrees=36.0, shift=0.2, hflip=True, vflip=True):
        self.degrees, self.shift, self.hflip, self.vflip = float(degrees), float(shift), hflip, vflip

    def __call__(self, x, generator=None):
        n, dev = x.shape[0], x.device
        angle = _uniform(n, -self.degrees, self.degrees, generator, dev) * (math.pi / 180.0)
        tx = _uniform(n, -self.shift, self.shift, generator, dev) * 2.0  # grid coords span 2
        ty = _uniform(n, -self.shift, self.shift, generator, dev) * 2.0
        ones = torch.ones(n, device=dev)
        sx = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -ones, ones) if self.hflip else ones
        sy = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -ones, ones) if self.vflip else ones
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, tx], dim=1),
            torch.stack([sin * sx, cos * sy, ty], dim=1),
        ], dim=1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __repr__(self):
        return f"RandomAffine(degrees={self.degrees}, shift={self.shift}, hflip={self.hflip}, vflip={self.vflip})"


class RandomBrightness:
    """Multiply each image by a factor in [low, high] (Keras ``brightness_range``)."""

    def __init__(self, low=0.8, high=1.0):
        self.low, self.high = float(low), float(high)

    def __call__(self, x, generator=None):
        factor = _uniform(x.shape[0], self.low, self.high, generator, x.device).to(x.dtype)
        return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def __repr__(self):
        return f"RandomBrightness({self.low}, {self.high})"


def paper_augmentation() -> Compose:
    """The paper's train-time augmentation (applied after the 1/255 rescale)."""
    return Compose([RandomAffine(36.0, 0.2, True, True), RandomBrightness(0.8, 1.0)])


def batch_transform(mean, std, augment: bool) -> Compose:
    steps = [ToFloat()]
    if augment:
        steps += paper_augmentation().transforms
    steps.append(Normalize(mean, std))
    return Compose(steps)
