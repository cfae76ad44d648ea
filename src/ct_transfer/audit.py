"""Leakage audit: exact and near-duplicate images of a dataset, within and across the subsets of a
split, and the same images in a second dataset (``against``).

Exact: identical decoded pixels. Near: 256-bit pHash Hamming distance <= ``threshold`` (see
``data.groups``). Groups are connected components of the pairs. Writes ``audit.json``, ``audit.md``
and contact sheets of the closest cross-subset (and cross-dataset) pairs.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from . import _io
from . import data as D
from .data import groups as G
from .errors import ConfigError, CTTransferError
from .evaluate import save_figure

log = logging.getLogger(__name__)

SHEET_PAIRS = 12
HASH = f"pHash {G.HASH_SIZE * G.HASH_SIZE}-bit (imagehash.phash, hash_size={G.HASH_SIZE}) of the grayscale image"


def _subset_key(a: str, b: str) -> str:
    order = {s: k for k, s in enumerate(D.SUBSETS + ("unused",))}
    return "-".join(sorted((a, b), key=lambda s: order.get(s, 99)))


def _pair_record(fa, fb, dist, exact, info_a, info_b) -> dict:
    return {"a": fa.path, "b": fb.path, "distance": dist, "exact": exact, **{f"{k}_a": v for k, v in info_a.items()},
            **{f"{k}_b": v for k, v in info_b.items()}}


def audit(data, out, *, split_file=None, against=None, threshold: int = G.DEFAULT_THRESHOLD) -> dict:
    """Audit ``data`` (folder per class); returns the summary also written to ``out/audit.json``."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= 256:
        raise ConfigError("threshold", threshold, "choose an integer in 0..256 (Hamming distance of 256-bit hashes)")
    from .rundir import RunDir

    if RunDir(out).is_run():
        raise CTTransferError(f"{out}: is a run directory; choose another folder for the audit")
    items, classes = D.scan_folder(data)
    other_items = D.scan_folder(against)[0] if against else None  # a bad second folder fails before any write
    # the audit hashes image files: volume slices (NIfTI, multi-frame DICOM, series) are left out
    items = [it for it in items if it.slice is None]
    other_items = None if other_items is None else [it for it in other_items if it.slice is None]
    subset_of, same_file = {}, []
    if split_file:
        rows = D.read_split(split_file, data, duplicates="keep")  # a file listed twice is reported, first
        same_file = [{"a": a["path"], "subset_a": a["subset"], "line_a": i + 2, "b": b["path"],
                      "subset_b": b["subset"], "line_b": j + 2} for (i, a), (j, b) in D.same_file_rows(rows, data)]
        real = {D.file_identity(r, data): r["subset"] for r in reversed(rows)}
        subset_of = {it.path: real.get(D.file_identity({"path": it.path}, data), "unused") for it in items}
        for pair in same_file:  # a file in two subsets: both names, so the pair shows across subsets
            subset_of[pair["a"]] = "+".join(sorted({pair["subset_a"], pair["subset_b"]},
                                                   key=lambda s: D.SUBSETS.index(s)))
    out = _io.ensure_writable_dir(out)
    paths = [it.path for it in items]
    info = [{"class": it.label, "subset": subset_of.get(it.path, "unused") if split_file else None} for it in items]
    log.info("audit: hashing %d images of %s", len(paths), data)
    fps = G.fingerprints(data, paths, progress=True)
    pairs = G.close_pairs(fps, threshold=threshold)
    ids = G.connected_groups(len(fps), pairs)
    records = [_pair_record(fps[i], fps[j], d, e, info[i], info[j]) for i, j, d, e in pairs]

    members: dict[int, list[int]] = {}
    for k, g in enumerate(ids):
        members.setdefault(int(g), []).append(k)
    groups = [{"size": len(m), "paths": [paths[k] for k in m], "classes": sorted({info[k]["class"] for k in m}),
               "subsets": sorted({str(info[k]["subset"]) for k in m}) if split_file else None}
              for m in members.values() if len(m) > 1]
    groups.sort(key=lambda g: (-g["size"], g["paths"][0]))
    by_sha: dict[str, list[str]] = {}
    for f in fps:
        by_sha.setdefault(f.sha256, []).append(f.path)
    exact = sorted(v for v in by_sha.values() if len(v) > 1)

    summary = {
        "data": str(data), "split_file": str(split_file) if split_file else None, "hash": HASH,
        "same_file_in_split": same_file, "n_same_file_in_split": len(same_file),
        "threshold": threshold, "n_images": len(fps), "classes": classes,
        "exact_duplicate_sets": exact, "n_exact_pairs": sum(len(v) * (len(v) - 1) // 2 for v in exact),
        "n_near_pairs": len(pairs), "n_cross_class_pairs": sum(r["class_a"] != r["class_b"] for r in records),
        "distance_histogram": _histogram(fps, threshold), "n_groups": len(groups),
        "n_images_in_groups": sum(g["size"] for g in groups), "largest_group": max((g["size"] for g in groups), default=1),
        "groups": groups, "pairs": records,
    }
    sheet_pairs = records
    if split_file:
        counts = Counter(_subset_key(r["subset_a"], r["subset_b"]) for r in records)
        across = {k: n for k, n in counts.items() if len(set(k.split("-"))) == 2 and "unused" not in k}
        summary["pairs_by_subsets"] = dict(sorted(counts.items()))
        summary["n_pairs_across_subsets"] = sum(across.values())
        summary["n_pairs_train_test"] = counts.get("train-test", 0)
        summary["n_exact_pairs_across_subsets"] = sum(r["exact"] and _subset_key(r["subset_a"], r["subset_b"]) in across
                                                      for r in records)
        summary["n_groups_across_subsets"] = sum(len(set(g["subsets"]) - {"unused"}) > 1 for g in groups)
        sheet_pairs = [r for r in records if r["subset_a"] != r["subset_b"] and "unused" not in (r["subset_a"], r["subset_b"])]
    summary["contact_sheet"] = _sheet(sheet_pairs, data, data, out / "contact_sheet.png",
                                      "closest cross-subset pairs" if split_file else "closest pairs")
    if against:
        summary["against"] = _against(fps, info, against, other_items, threshold, data, out)
    summary["text"] = _text(summary)
    _io.write_json(out / "audit.json", summary)
    _io.write_text(out / "audit.md", _markdown(summary))
    return summary


def _histogram(fps, threshold: int) -> dict:
    """Number of pairs at each distance up to ``threshold + 16`` (to see where a threshold falls)."""
    d = G.hamming_matrix(fps)
    v = d[np.triu_indices(len(fps), 1)]
    top = threshold + 16
    counts = np.bincount(v[v <= top], minlength=top + 1)
    return {str(k): int(n) for k, n in enumerate(counts) if n}


def _against(fps, info, other, items, threshold, data, out) -> dict:
    other_fps = G.fingerprints(other, [it.path for it in items], progress=True)
    pairs = G.close_pairs(fps, other_fps, threshold=threshold)
    records = [_pair_record(fps[i], other_fps[j], d, e, info[i], {"class": items[j].label}) for i, j, d, e in pairs]
    return {"data": str(other), "n_images": len(other_fps), "n_pairs": len(records),
            "n_exact_pairs": sum(r["exact"] for r in records), "pairs": records,
            "contact_sheet": _sheet(records, data, other, out / "contact_sheet_against.png",
                                    f"closest pairs between {Path(data).name} and {Path(other).name}")}


def _sheet(records: list[dict], root_a, root_b, path: Path, title: str) -> str | None:
    """The closest pairs side by side (PNG); None when there are no pairs."""
    from matplotlib.figure import Figure

    chosen = sorted(records, key=lambda r: (r["distance"], r["a"], r["b"]))[:SHEET_PAIRS]
    if not chosen:
        return None
    cols = 2  # pairs per row
    rows = (len(chosen) + cols - 1) // cols
    fig = Figure(figsize=(8, 2.2 * rows))
    axes = np.atleast_2d(fig.subplots(rows, 2 * cols))
    for ax in axes.flat:
        ax.axis("off")
    for k, r in enumerate(chosen):
        for side, (key, root) in enumerate((("a", root_a), ("b", root_b))):
            ax = axes[k // cols, 2 * (k % cols) + side]
            ax.imshow(D.read_image(Path(root) / r[key]), cmap="gray")
            where = f" · {r.get('subset_' + key)}" if r.get("subset_" + key) else ""
            ax.set_title(f"{Path(r[key]).name}{where}", fontsize=6)
        axes[k // cols, 2 * (k % cols)].text(1.02, -0.06, f"d={r['distance']}{' (exact)' if r['exact'] else ''}",
                                             transform=axes[k // cols, 2 * (k % cols)].transAxes, fontsize=7,
                                             ha="center", va="top")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return str(path)


def _text(s: dict) -> str:
    lines = []
    for p in s.get("same_file_in_split") or []:  # the worst leak there is: first
        lines.append(f"LEAK: split lines {p['line_a']} and {p['line_b']} list the same file ({p['a']} in "
                     f"{p['subset_a']}, {p['b']} in {p['subset_b']})")
    lines += [f"{s['n_images']} images; {s['n_exact_pairs']} exact duplicate pair(s); {s['n_near_pairs']} near-duplicate "
             f"pair(s) at pHash distance <= {s['threshold']} ({s['n_cross_class_pairs']} across classes) in "
             f"{s['n_groups']} group(s), largest {s['largest_group']}"]
    for paths in s["exact_duplicate_sets"]:
        lines.append("  exact: " + " = ".join(paths))
    if s.get("split_file"):
        lines.append(f"split {s['split_file']}: {s['n_pairs_across_subsets']} near-duplicate pair(s) across subsets "
                     f"(train-test {s['n_pairs_train_test']}; exact {s['n_exact_pairs_across_subsets']}), "
                     f"{s['n_groups_across_subsets']} group(s) span subsets; by subsets: "
                     + ", ".join(f"{k} {n}" for k, n in s["pairs_by_subsets"].items()))
    if s.get("against"):
        a = s["against"]
        lines.append(f"against {a['data']} ({a['n_images']} images): {a['n_pairs']} pair(s) at distance <= "
                     f"{s['threshold']}, {a['n_exact_pairs']} exact")
    return "\n".join(lines)


def _markdown(s: dict) -> str:
    out = ["# Leakage audit", "", f"Dataset: `{s['data']}` ({s['n_images']} images).",
           f"Split: `{s['split_file']}`." if s.get("split_file") else "No split file given.", "",
           f"Near-duplicate: {s['hash']}, Hamming distance <= {s['threshold']} (or identical decoded pixels).", "",
           "```", s["text"], "```", "", "## Pairs per distance", "", "| distance | pairs |", "|---|---|"]
    out += [f"| {k} | {n} |" for k, n in s["distance_histogram"].items()]
    if s.get("split_file"):
        out += ["", "## Pairs by subsets", "", "| subsets | pairs |", "|---|---|"]
        out += [f"| {k} | {n} |" for k, n in s["pairs_by_subsets"].items()]
        cross = [r for r in s["pairs"] if r["subset_a"] != r["subset_b"]][:40]
        if cross:
            out += ["", "## Closest cross-subset pairs (first 40)", "", "| a | subset | b | subset | distance |",
                    "|---|---|---|---|---|"]
            out += [f"| `{r['a']}` | {r['subset_a']} | `{r['b']}` | {r['subset_b']} | {r['distance']}"
                    f"{' (exact)' if r['exact'] else ''} |" for r in cross]
    if s.get("contact_sheet"):
        out += ["", f"![closest pairs]({Path(s['contact_sheet']).name})"]
    if s.get("against"):
        a = s["against"]
        out += ["", "## Against a second dataset", "", f"`{a['data']}`: {a['n_images']} images, {a['n_pairs']} pair(s) "
                f"at distance <= {s['threshold']}, {a['n_exact_pairs']} exact.", ""]
        out += ["| this dataset | other dataset | distance |", "|---|---|---|"]
        out += [f"| `{r['a']}` | `{r['b']}` | {r['distance']}{' (exact)' if r['exact'] else ''} |" for r in a["pairs"][:40]]
        if a.get("contact_sheet"):
            out += ["", f"![closest pairs across datasets]({Path(a['contact_sheet']).name})"]
    return "\n".join(out) + "\n"
