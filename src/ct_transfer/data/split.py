"""Finding images (folder per class) and splitting them: stratified 80:10:10, the paper's Table 1,
split files (``path,class,subset[,group,patient,source,slice]``) read and written through one place,
and ``build_split``, the one split builder that train, experiment and tune share.

The sample record is a split row (a dict): ``path`` (relative to its dataset, POSIX), ``class``,
``subset``, and when known ``group`` (what must stay in one subset: near-duplicates, patients),
``patient`` (the patient id itself, kept apart from ``group`` so later stages can report per
patient), ``source`` (which dataset, with several) and ``slice`` (index in a file holding several)."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _io
from ..errors import ConfigError, CTTransferError
from .decode import DICOM_EXTENSIONS, IMAGE_EXTENSIONS
from .volume import VOLUME_SLICES, SliceRef, is_nifti_name, is_volume_path

SUBSETS = ("train", "val", "test")
DEFAULT_POSITIVE = "COVID"
PAPER_PER_CLASS = {"train": 976, "val": 122, "test": 122}  # Table 1 of the paper
PRESETS = ("stratified", "paper", "grouped")
SAMPLE_FIELDS = ("path", "class", "subset", "group", "patient", "source", "slice")  # the sample record


@dataclass(frozen=True)
class Item:
    path: str  # relative to the dataset root, POSIX separators
    label: str
    slice: int | None = None  # index inside a volume (NIfTI, multi-frame DICOM, DICOM series folder)
    patient: str = ""  # DICOM slices and volumes: PatientID (else series, folder or file name)


def _slice_key(r) -> int:
    s = r.get("slice") if isinstance(r, dict) else r.slice
    return -1 if s in (None, "") else int(s)


def _row_order(r: dict):
    return (SUBSETS.index(r["subset"]), r["class"], r["path"], _slice_key(r))


def _sample(it: Item) -> dict:
    return {"path": it.path, "class": it.label} | ({} if it.slice is None else {"slice": it.slice})


def shown(path) -> str:
    """A path for a message: undecodable bytes of a file name as ``\\xff`` escapes."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def check_name(path) -> None:
    """A file name must be text (UTF-8): it goes into CSV and JSON files and onto the web page."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CTTransferError(f"{shown(path)}: file name is not valid UTF-8 text; rename the file") from None


def resolve_inside(root, rel: str) -> Path:
    """``root/rel`` with symlinks resolved; a file that resolves outside ``root`` is refused (a link
    to /etc/passwd or to another dataset is not part of this one)."""
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(Path(root) / rel))
    if real != base and base not in real.parents:
        raise CTTransferError(f"{shown(Path(root) / rel)}: is a link to {shown(real)}, outside the data folder "
                              f"{shown(root)}; copy the file in instead")
    return real


def scan_folder(root: str | os.PathLike, *, volume_slices: int = VOLUME_SLICES) -> tuple[list[Item], list[str]]:
    """List ``root/<class>/**/<image, DICOM slice or volume>``; returns the items (sorted) and the
    class names (sorted).

    Volumes are expanded into one item per slice used (``slice`` = its index in scan order): NIfTI
    files (``.nii``, ``.nii.gz``), multi-frame DICOM files, and DICOM series, i.e. a sub-folder of
    the class folder whose DICOM files are two or more single-frame slices of one
    ``SeriesInstanceUID`` (the item's path is then the folder). The slices used are the lung slices
    (``volume.select_slices``), at most ``volume_slices`` per volume, evenly spaced, so a 600-slice
    scan does not flood the dataset. A volume that cannot be read (damaged, 2-D, not CT, missing
    slices ...) is a one-line error naming it; so is a folder holding several DICOM series.

    Hidden files and folders are skipped (OS metadata, notebook checkpoints); a file that links
    outside ``root``, or two names of one file (a symlink to another listed file), are errors. The
    DICOM slices and volume slices of one patient are kept in one subset by ``split_folder``."""
    if isinstance(volume_slices, bool) or not isinstance(volume_slices, int) or volume_slices < 1:
        raise ConfigError("volume_slices", volume_slices, "choose an integer >= 1 (slices per training volume)")
    root = Path(root)
    if not root.is_dir():
        raise CTTransferError(f"{shown(root)}: dataset folder not found")
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        items: list[Item] = []
        empty = []
        seen: dict[Path, str] = {}
        for class_dir in class_dirs:
            check_name(class_dir)
            files = []
            for folder, dirs, names in os.walk(class_dir):  # symlinked sub-folders are not followed
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(folder) / n for n in names
                          if not n.startswith(".") and (Path(n).suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS
                                                        or is_nifti_name(n))]
            files = sorted(f for f in files if f.is_file())
            if not files:
                empty.append(shown(class_dir))
            for f in files:
                check_name(f)
                rel = f.relative_to(root).as_posix()
                real = resolve_inside(root, rel)
                if real in seen:
                    raise CTTransferError(f"{shown(root)}: {seen[real]} and {rel} are the same file ({shown(real)}); "
                                          "keep one")
                seen[real] = rel
            items += _class_items(root, class_dir, files, volume_slices)
    except OSError as exc:
        raise CTTransferError(f"{shown(root)}: cannot list ({(exc.strerror or str(exc)).lower()})") from None
    if empty:
        raise CTTransferError(f"{', '.join(empty)}: class folder holds no images "
                              f"({'/'.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)}/.nii/.nii.gz)")
    classes = [d.name for d in class_dirs]
    if len(classes) < 2:
        found = classes[0] if classes else "none"
        raise CTTransferError(f"{shown(root)}: need at least two class folders, found {len(classes)} ({found})")
    return items, classes


def _dicom_head(path: Path) -> tuple[int, str, str] | None:
    """(frames, SeriesInstanceUID, PatientID) of a DICOM file; None when its header is unreadable
    (decoding the slice later says why, or skips it)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                             specific_tags=["NumberOfFrames", "SeriesInstanceUID", "PatientID"])
        return (max(1, int(getattr(ds, "NumberOfFrames", 1) or 1)), str(getattr(ds, "SeriesInstanceUID", "") or ""),
                str(getattr(ds, "PatientID", "") or ""))
    except Exception:  # pydicom raises many types on damaged files
        return None


def _class_items(root: Path, class_dir: Path, files: list[Path], volume_slices: int) -> list[Item]:
    """One class folder's items: images and single DICOM slices as they are; volumes (NIfTI,
    multi-frame DICOM, series folders) expanded into their selected slices."""
    from .volume import training_slices

    label = class_dir.name
    heads = {f: _dicom_head(f) for f in files if f.suffix.lower() in DICOM_EXTENSIONS}
    volumes = [f for f in files if is_nifti_name(f.name) or (heads.get(f) and heads[f][0] > 1)]
    singles: dict[Path, list[Path]] = defaultdict(list)
    for f, h in heads.items():
        if f.parent != class_dir and (h is None or h[0] == 1):
            singles[f.parent].append(f)
    for folder, fs in sorted(singles.items()):
        uids = defaultdict(int)
        for f in fs:
            uids[heads[f][1] if heads[f] else ""] += 1
        if len(fs) >= 2 and len(uids) == 1 and "" not in uids:  # one series: one volume
            check_name(folder)
            volumes.append(folder)
        elif any(u and n >= 2 for u, n in uids.items()):  # a row names a folder, not a series inside it
            raise CTTransferError(f"{shown(folder)}: holds {len(fs)} DICOM slices of {len(uids)} series (or without a "
                                  "SeriesInstanceUID); a series folder holds one series: put each in a folder of its own")
    in_volume = set(volumes) | {f for folder in volumes if folder.is_dir() for f in singles[folder]}
    items = []
    for f in files:
        if f in in_volume:
            continue
        patient = ""
        if f in heads:  # a single DICOM slice: its patient, else its series, else its folder
            h = heads[f]
            patient = (h and (h[2] or h[1])) or f.parent.relative_to(root).as_posix()
        items.append(Item(f.relative_to(root).as_posix(), label, None, patient))
    for v in volumes:
        used, patient, _ = training_slices(v, max_slices=volume_slices)
        rel = v.relative_to(root).as_posix()
        items += [Item(rel, label, int(i), patient) for i in used]
    items.sort(key=lambda it: (it.path, _slice_key(it)))
    return items


def class_order(classes: list[str], positive: str | None) -> list[str]:
    """Class index order: for two classes the positive class gets index 1 (so metrics use it)."""
    if positive is None or len(classes) != 2:
        return sorted(classes)
    if positive not in classes:
        raise ConfigError("positive", positive, f"not a class (classes: {', '.join(sorted(classes))})")
    return [c for c in sorted(classes) if c != positive] + [positive]


def resolve_classes(rows: list[dict], positive: str | None) -> list[str]:
    classes = sorted({r["class"] for r in rows})
    if len(classes) < 2:
        raise CTTransferError(f"split has {len(classes)} class(es) ({', '.join(classes)}); need at least two")
    if positive is None:
        positive = DEFAULT_POSITIVE if DEFAULT_POSITIVE in classes else classes[-1]
    return class_order(classes, positive)


def make_split(items: list[Item], preset: str = "stratified", seed: int = 0,
               ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), *, groups: list[str] | None = None) -> list[dict]:
    """Per-class shuffled split. ``paper``: 976/122/122 per class (1220 sampled per class).
    ``grouped``: stratified 80:10:10 keeping every group (``groups[i]`` for ``items[i]``) in one subset."""
    if preset not in PRESETS:
        raise ConfigError("preset", preset, f"choose {', '.join(PRESETS)}")
    if preset == "grouped":
        if groups is None or len(groups) != len(items):
            raise ConfigError("preset", preset, "needs one group per image (use split_folder or image_groups)")
        return _grouped_split(items, groups, seed)
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    rng = np.random.RandomState(seed)
    rows = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda it: (it.path, _slice_key(it)))
        order = rng.permutation(len(group))
        if preset == "paper":
            need = sum(PAPER_PER_CLASS.values())
            if len(group) < need:
                raise ConfigError("preset", "paper", f"class {label} has {len(group)} images, needs {need}")
            counts = [PAPER_PER_CLASS[s] for s in SUBSETS]
        else:
            n_val = int(round(len(group) * ratios[1]))
            n_test = int(round(len(group) * ratios[2]))
            counts = [len(group) - n_val - n_test, n_val, n_test]
        start = 0
        for subset, count in zip(SUBSETS, counts):
            for j in order[start:start + count]:
                rows.append({**_sample(group[j]), "subset": subset})
            start += count
    rows.sort(key=_row_order)
    return rows


def _grouped_split(items: list[Item], groups: list[str], seed: int) -> list[dict]:
    """Ten stratified group folds (scikit-learn): fold 0 is test, fold 1 val, the rest train."""
    from sklearn.model_selection import StratifiedGroupKFold

    order = sorted(range(len(items)), key=lambda i: (items[i].path, _slice_key(items[i])))  # independent of the listing order
    labels = [items[i].label for i in order]
    group_ids = [groups[i] for i in order]
    per_class = defaultdict(set)
    for label, g in zip(labels, group_ids):
        per_class[label].add(g)
    few = sorted((len(g), c) for c, g in per_class.items() if len(g) < 10)
    if few:  # ten folds: fewer groups than that cannot fill val and test with every class
        raise ConfigError("preset", "grouped", f"class {few[0][1]} has {few[0][0]} independent group(s) of images; "
                          "a grouped split needs at least 10 per class (use the stratified preset or more images)")
    folds = StratifiedGroupKFold(n_splits=10, shuffle=True, random_state=seed)
    subset = ["train"] * len(order)
    for fold, (_, held) in enumerate(folds.split(np.zeros(len(order)), labels, group_ids)):
        if fold < 2:
            for k in held:
                subset[k] = ("test", "val")[fold]
    rows = [{**_sample(items[i]), "subset": subset[k], "group": group_ids[k]} for k, i in enumerate(order)]
    rows.sort(key=_row_order)
    return rows


def split_folder(data_dir, preset: str = "stratified", seed: int = 0, *, groups_file=None,
                 threshold: int | None = None, volume_slices: int = VOLUME_SLICES) -> list[dict]:
    """Scan ``data_dir`` and split it; ``grouped`` first finds near-duplicate (and patient) groups.
    Volume slices (``scan_folder``) are grouped by their patient, with that patient's DICOM slices."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)
                                  or not 0 <= threshold <= 256):
        raise ConfigError("threshold", threshold, "choose an integer in 0..256 (Hamming distance of 256-bit hashes)")
    if preset not in PRESETS:
        raise ConfigError("preset", preset, f"choose {', '.join(PRESETS)}")
    items, _ = scan_folder(data_dir, volume_slices=volume_slices)
    # DICOM slices and volumes: their patient (PatientID, else the series, folder or file name); a
    # volume's rows share its path, so {path: patient} holds for both
    patients = {it.path: it.patient for it in items if it.patient}
    flat = [it for it in items if it.slice is None]
    groups = None
    if preset == "grouped":
        from .groups import DEFAULT_THRESHOLD, image_groups

        flat_groups = image_groups(data_dir, [it.path for it in flat], groups_file=groups_file,
                                   patients={it.path: it.patient for it in flat if it.patient},
                                   threshold=DEFAULT_THRESHOLD if threshold is None else threshold) if flat else []
        group_of = {it.path: g for it, g in zip(flat, flat_groups)}
        # a volume joins the group of its patient's DICOM slices, else its patient is its group
        by_patient = {it.patient: group_of[it.path] for it in flat if it.patient}
        groups = [group_of[it.path] if it.slice is None else by_patient.get(it.patient, f"patient:{it.patient}")
                  for it in items]
    elif groups_file is not None:
        raise ConfigError("groups", groups_file, "only with the grouped preset")
    else:
        slices = [it.patient for it in items if it.patient]
        if len(set(slices)) < len(slices):
            raise ConfigError("preset", preset, "the dataset holds several DICOM or volume slices of one patient; use "
                                                "the grouped preset (every slice of a patient in one subset)")
    rows = make_split(items, preset, seed, groups=groups)
    if groups_file is not None:  # the patient ids themselves survive beside the merged groups
        from .groups import read_groups

        patients = {**patients, **read_groups(groups_file)}
    if patients:
        rows = [{**r, "patient": patients.get(r["path"], "")} for r in rows]
    return rows


def build_split(datasets, *, split_files=None, preset: str = "stratified", seed: int = 0, groups_file=None,
                class_map: dict | None = None, limit: int | None = None, subsets=SUBSETS,
                carve_seed: int | None = None, volume_slices: int = VOLUME_SLICES) -> list[dict]:
    """The one split builder (train, experiment and tune): each dataset split on its own (its split
    file, else the preset; with several datasets rows get a ``source``), the class map applied,
    only ``subsets`` kept, then ``limit`` images per class. ``volume_slices``: at most this many
    slices per volume (NIfTI, multi-frame DICOM, DICOM series folder) become rows.

    A split file without test rows (UCSD's official train/val) gets its val as the test and a val
    carved from its train by patient (``carve_test``); one split file with a ``source`` column (a
    run's split.csv) serves several datasets at once.
    """
    import logging

    datasets = [str(d) for d in ([datasets] if isinstance(datasets, (str, os.PathLike)) else datasets)]
    files = list(split_files or [None] * len(datasets))
    if len(files) == 1 and len(datasets) > 1 and files[0]:
        rows = read_split(files[0], source_names(datasets))
    else:
        if len(files) != len(datasets):
            raise ConfigError("split_files", files, f"give one split file per dataset ({len(datasets)})")
        rows = []
        named = source_names(datasets) if len(datasets) > 1 else {"": datasets[0]}
        for (name, folder), split_file in zip(named.items(), files):
            if split_file:
                part = read_split(split_file, folder)
                if not any(r["subset"] == "test" for r in part):
                    logging.getLogger(__name__).info(
                        "%s: no test rows; its val becomes the test and a val is carved from its train "
                        "(by patient where the file names them)", split_file)
                    part = carve_test(part, seed if carve_seed is None else carve_seed)
            else:
                part = split_folder(folder, preset, seed, groups_file=groups_file, volume_slices=volume_slices)
            rows += [{**r, "source": name} for r in part] if name else part
    if class_map:
        found = sorted({r["class"] for r in rows})
        absent = [src for src in class_map if src not in found]
        if absent:  # a typo would otherwise train a model with one class more
            raise ConfigError("class_map", ",".join(f"{k}={v}" for k, v in class_map.items()),
                              f"no class folder '{absent[0]}' in {', '.join(datasets)} (found: {', '.join(found)})")
        rows = apply_class_map(rows, class_map)
    rows = [r for r in rows if r["subset"] in subsets]
    if limit:
        rows = limit_rows(rows, int(limit), seed)
    return rows


def dicom_patient(path: Path) -> str:
    """A DICOM slice's patient for splitting: PatientID, else its series, else its folder."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                             specific_tags=["PatientID", "SeriesInstanceUID"])
        pid, series = str(getattr(ds, "PatientID", "") or ""), str(getattr(ds, "SeriesInstanceUID", "") or "")
    except Exception:  # an unreadable header: decoding the slice later says why
        pid = series = ""
    return pid or series or Path(path).parent.as_posix()


def limit_rows(rows: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """At most ``limit`` images per class (and per source), keeping each class's subset proportions."""
    sources = sorted({r.get("source", "") for r in rows})
    if len(sources) > 1:
        return [r for s in sources for r in limit_rows([r for r in rows if r.get("source", "") == s], limit, seed)]
    rng = np.random.RandomState(seed)
    out = []
    for label in sorted({r["class"] for r in rows}):
        class_rows = [r for r in rows if r["class"] == label]
        for subset in SUBSETS:
            sub = [r for r in class_rows if r["subset"] == subset]
            if not sub:
                continue
            k = max(1, int(round(limit * len(sub) / len(class_rows))))
            idx = sorted(rng.permutation(len(sub))[:k])
            out.extend(sub[i] for i in idx)
    return out


def source_names(data_dirs) -> dict[str, str]:
    """``{source name: folder}`` for several datasets: each folder's name (numbered when names repeat)."""
    names: dict[str, str] = {}
    for d in data_dirs:
        base = Path(d).resolve().name or "data"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names[name] = str(d)
    return names


def source_ids(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    """(sorted source names, per-row index into them) of split rows; rows of one dataset have one
    unnamed source ``""``."""
    names = sorted({r.get("source") or "" for r in rows})
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[r.get("source") or ""] for r in rows], dtype=np.int64)


def source_weights(rows: list[dict]) -> np.ndarray:
    """Per-row weights 1 / (rows of its source): every source weighs the same in total."""
    _, ids = source_ids(rows)
    return 1.0 / np.bincount(ids)[ids]


def data_root(cfg_data):
    """What ``load_subset`` reads rows from: one folder, or ``{source: folder}`` for several."""
    if isinstance(cfg_data, (list, tuple)):
        return source_names(cfg_data) if len(cfg_data) > 1 else cfg_data[0]
    return cfg_data


def row_path(row: dict, data_dir) -> Path:
    """A split row's file: under ``data_dir``, or, for ``{source: folder}``, under its source's folder."""
    if isinstance(data_dir, dict):
        src = row.get("source") or ""
        if src not in data_dir:
            raise CTTransferError(f"{row['path']}: unknown source '{src}' (sources: {', '.join(data_dir)})")
        return Path(data_dir[src]) / row["path"]
    return Path(data_dir) / row["path"]


def row_input(row: dict, data_dir):
    """What decoding reads for a split row: its file (``row_path``), or for a row with a ``slice``
    in a volume (NIfTI, multi-frame DICOM, series folder) a ``volume.SliceRef``."""
    path = row_path(row, data_dir)
    if row.get("slice") not in (None, "") and is_volume_path(path):
        try:
            return SliceRef(path, int(row["slice"]))
        except (TypeError, ValueError):
            raise CTTransferError(f"{row['path']}: slice '{row['slice']}' is not a slice index") from None
    return path


def row_exists(row: dict, data_dir) -> bool:
    """A split row's file is there (a series folder for a volume row)."""
    path = row_path(row, data_dir)
    return path.is_file() or (row.get("slice") not in (None, "") and path.is_dir())


def apply_class_map(rows: list[dict], class_map: dict[str, str]) -> list[dict]:
    return [{**r, "class": class_map.get(r["class"], r["class"])} for r in rows]


def carve_test(rows: list[dict], seed: int = 0, val_fraction: float = 0.125) -> list[dict]:
    """A split file without test rows (e.g. UCSD's official train/val): its val becomes the test
    (untouched: never used to pick an epoch) and a new val is carved from its train, by patient
    (``group``) when the file names them, so no patient crosses subsets."""
    if any(r["subset"] == "test" for r in rows):
        return rows
    rng = np.random.RandomState(seed)
    out = [{**r, "subset": "test"} for r in rows if r["subset"] == "val"]
    train = [r for r in rows if r["subset"] == "train"]
    for label in sorted({r["class"] for r in train}):
        cls = [r for r in train if r["class"] == label]
        groups = sorted({r.get("group") or r["path"] for r in cls})
        order = rng.permutation(len(groups))
        chosen, n = set(), 0
        for j in order:  # whole patients until about val_fraction of the class's slices
            if n >= val_fraction * len(cls):
                break
            chosen.add(groups[j])
            n += sum(1 for r in cls if (r.get("group") or r["path"]) == groups[j])
        out += [{**r, "subset": "val" if (r.get("group") or r["path"]) in chosen else "train"} for r in cls]
    out.sort(key=lambda r: (SUBSETS.index(r["subset"]), r["class"], r["path"]))
    return out


def write_split(rows: list[dict], path: str | os.PathLike) -> None:
    fields = ["path", "class", "subset"] + [k for k in SAMPLE_FIELDS[3:] if any(r.get(k) not in (None, "") for r in rows)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _io.write_csv(path, [{k: r.get(k, "") for k in fields} for r in rows], fields)


def normalise_path(text: str) -> str:
    """One spelling per relative path: ``./COVID//x.png`` -> ``COVID/x.png``."""
    return posixpath.normpath(text) if text else text


def read_split(path: str | os.PathLike, data_dir: str | os.PathLike | dict | None = None, *,
               duplicates: str = "error") -> list[dict]:
    """Read a split CSV; with ``data_dir`` every listed file must exist there (inside it: a link
    leaving the folder is refused). Paths are normalised; a file listed twice (also as
    ``./COVID//x.png`` or through a symlink) is an error naming both lines, unless
    ``duplicates="keep"`` (the audit reports them instead)."""
    path = Path(path)
    rows = _io.read_csv(path, required=("path", "class", "subset"), what="split file")
    for r in rows:  # a patient column (UCSD's SPLIT.csv) is the grouping, and stays the patient id
        if not r.get("group") and r.get("patient"):
            r["group"] = r["patient"]
        for k in [k for k in r if k not in SAMPLE_FIELDS or r[k] in (None, "")]:
            if k not in ("path", "class", "subset"):
                del r[k]
    if not rows:
        raise CTTransferError(f"{path}: split file lists no images")
    bad = [r["subset"] for r in rows if r["subset"] not in SUBSETS]
    if bad:
        raise CTTransferError(f"{path}: unknown subset '{bad[0][:40]}' (use train, val, test)")
    unsafe = [r["path"] for r in rows if Path(r["path"]).is_absolute() or ".." in Path(normalise_path(r["path"])).parts]
    if unsafe:
        raise CTTransferError(f"{path}: paths must be relative to the dataset folder, e.g. not {unsafe[0][:80]}")
    for r in rows:
        r["path"] = normalise_path(r["path"])
    if data_dir is not None:
        missing = [r["path"] for r in rows if not row_exists(r, data_dir)]
        if missing:
            raise CTTransferError(f"{path}: {len(missing)} listed file(s) missing under {data_dir}, e.g. {missing[0]}")
        for i, r in enumerate(rows, 2):
            try:
                _row_real(r, data_dir)  # a link out of the data folder is refused
            except CTTransferError as exc:
                raise CTTransferError(f"{path}: line {i}: {exc}") from None
    if duplicates == "error":
        same = same_file_rows(rows, data_dir)
        if same:
            (i, a), (j, b) = same[0]
            also = f" (and {len(same) - 1} more)" if len(same) > 1 else ""
            raise CTTransferError(f"{path}: lines {i + 2} and {j + 2} list the same file ({a['path']} in "
                                  f"{a['subset']}, {b['path']} in {b['subset']}){also}; each file belongs to one "
                                  "subset")
    return rows


def _row_real(row: dict, data_dir) -> Path:
    if isinstance(data_dir, dict):
        src = row.get("source") or ""
        if src not in data_dir:
            raise CTTransferError(f"{row['path']}: unknown source '{src}' (sources: {', '.join(data_dir)})")
        return resolve_inside(data_dir[src], row["path"])
    return resolve_inside(data_dir, row["path"])


def file_identity(row: dict, data_dir=None):
    """What identifies a split row's file: its resolved path (symlinks followed) when the data folder
    is known, else its source and normalised relative path; with the slice index for a volume row."""
    if data_dir is None:
        key = (row.get("source") or "", normalise_path(row["path"]))
    else:
        key = str(_row_real(row, data_dir))
    return key if row.get("slice") in (None, "") else (key, _slice_key(row))


def same_file_rows(rows: list[dict], data_dir=None) -> list[tuple[tuple[int, dict], tuple[int, dict]]]:
    """Pairs ``((i, row_i), (j, row_j))`` of rows naming one file (first occurrence, repeat)."""
    first: dict = {}
    pairs = []
    for j, r in enumerate(rows):
        key = file_identity(r, data_dir)
        if key in first:
            pairs.append((first[key], (j, r)))
        else:
            first[key] = (j, r)
    return pairs


def content_digests(files) -> dict[str, str]:
    """``{file: sha256 of its bytes}`` for the files whose size another file shares (only those can
    be byte-identical, so a dataset is read once at most)."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for f in files:
        try:
            by_size[os.stat(f).st_size].append(str(f))
        except OSError:
            continue
    out = {}
    for same in by_size.values():
        if len(same) > 1:
            for f in same:
                out[f] = _sha256(f)
    return out


def _sha256(file) -> str:
    h = hashlib.sha256()
    try:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise CTTransferError(f"{shown(file)}: cannot read ({(exc.strerror or str(exc)).lower()})") from None
    return h.hexdigest()


def split_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        counts[r["subset"]][r["class"]] += 1
    return {s: dict(c) for s, c in counts.items()}


def pixel_duplicates_across_subsets(rows: list[dict], data_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Pairs of files with identical decoded pixels that sit in different subsets."""
    from .decode import read_input
    from .volume import VolumeReader

    by_hash: dict[str, list[dict]] = defaultdict(list)
    volumes = VolumeReader()
    for r in rows:
        ref = row_input(r, data_dir)
        arr = volumes.rgb(ref) if isinstance(ref, SliceRef) else read_input(ref)
        digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
        by_hash[digest].append(r)
    pairs = []
    for group in by_hash.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if group[i]["subset"] != group[j]["subset"]:
                    pairs.append((f"{group[i]['path']} ({group[i]['subset']})", f"{group[j]['path']} ({group[j]['subset']})"))
    return pairs
