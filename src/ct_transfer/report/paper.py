"""The paper's published numbers (Pardede & Purohita 2023) and what follows from them.

Tables 6-8 give, per architecture, validation accuracy, validation F1 and training time without
and with ImageNet weights. The abstract states averages and ratios that do not follow exactly from
those tables, so both are offered: ``abstract_ratios`` (as printed) and ``table_ratios`` (recomputed).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

from ..errors import CTTransferError

RESOURCE = "resources/pardede2023.json"

# our metric key -> the paper's table key (Tables 6, 7, 8)
TABLE_KEYS = {"accuracy": "val_accuracy", "f1": "val_f1", "train_seconds": "train_time"}
TABLE_NUMBERS = {"accuracy": 6, "f1": 7, "train_seconds": 8}


@lru_cache(maxsize=1)
def _paper_text() -> str:
    return resources.files("ct_transfer").joinpath(RESOURCE).read_text(encoding="utf-8")


def paper_results() -> dict:
    """The paper's numbers as stored (a fresh dict per call, so callers may change it)."""
    return json.loads(_paper_text())


def parse_hms(text: str) -> int:
    """'0:21:48' -> 1308 seconds."""
    try:
        h, m, s = (int(x) for x in text.split(":"))
    except ValueError:
        raise CTTransferError(f"{RESOURCE}: time '{text}' is not H:MM:SS") from None
    return h * 3600 + m * 60 + s


def format_hms(seconds: float, *, decimals: int = 0) -> str:
    """Seconds as H:MM:SS, the way Table 8 prints times (``decimals``: fractions of a second)."""
    sign = "-" if seconds < 0 else ""
    total = round(abs(seconds), decimals)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    width = 2 + (decimals + 1 if decimals else 0)
    return f"{sign}{int(h)}:{int(m):02d}:{s:0{width}.{decimals}f}"


def paper_models(paper: dict | None = None) -> list[str]:
    """The paper's architectures in its row order."""
    paper = paper or paper_results()
    return [t["model"] for t in paper["tables"]]


def _time_value(entry: dict, cond: str) -> float:
    # seconds are stored beside the printed H:MM:SS; fall back to parsing when absent
    seconds = entry.get(f"{cond}_seconds")
    return float(seconds) if seconds is not None else float(parse_hms(entry[cond]))


def paper_rows(key: str, *, paper: dict | None = None) -> list[dict]:
    """Rows of Table 6 (``accuracy``), 7 (``f1``) or 8 (``train_seconds``, in seconds).

    Each row: model, image_size, without, with, difference (with - without; for Tables 6-7 the
    difference as the paper prints it).
    """
    if key not in TABLE_KEYS:
        raise CTTransferError(f"{key}: no paper table for this metric (use {', '.join(TABLE_KEYS)})")
    paper = paper or paper_results()
    rows = []
    for t in paper["tables"]:
        entry = t[TABLE_KEYS[key]]
        if key == "train_seconds":
            wo, wi = _time_value(entry, "without"), _time_value(entry, "with")
            diff = wi - wo
        else:
            wo, wi = float(entry["without"]), float(entry["with"])
            diff = float(entry.get("difference", wi - wo))
        rows.append({"model": t["model"], "image_size": t.get("image_size"), "without": wo, "with": wi,
                     "difference": diff})
    return rows


def paper_table_means(*, paper: dict | None = None) -> dict:
    """Per table: the mean over the paper's architectures of without, with and difference."""
    paper = paper or paper_results()
    out = {}
    for key in TABLE_KEYS:
        rows = paper_rows(key, paper=paper)
        out[key] = {c: float(np.mean([r[c] for r in rows])) for c in ("without", "with", "difference")}
        out[key]["n_models"] = len(rows)
    return out


def abstract_ratios(*, paper: dict | None = None) -> dict:
    """The abstract's averages and ratios exactly as printed (rounded by the authors)."""
    a = (paper or paper_results())["abstract"]
    return {
        "accuracy_without": a["mean_accuracy_without"], "accuracy_with": a["mean_accuracy_with"],
        "seconds_without": a["mean_train_hours_without"] * 3600, "seconds_with": a["mean_train_hours_with"] * 3600,
        "hours_without": a["mean_train_hours_without"], "hours_with": a["mean_train_hours_with"],
        "accuracy_ratio": a["accuracy_ratio"], "time_ratio": a["time_ratio"],
    }


def table_ratios(*, paper: dict | None = None) -> dict:
    """The abstract's two ratios recomputed from Table 6 and Table 8 means.

    accuracy_ratio = mean accuracy with / without TL; time_ratio = mean time without / with TL
    (the abstract's direction: how many times longer training from scratch takes).
    """
    means = paper_table_means(paper=paper)
    acc, t = means["accuracy"], means["train_seconds"]
    return {
        "accuracy_without": acc["without"], "accuracy_with": acc["with"],
        "seconds_without": t["without"], "seconds_with": t["with"],
        "hours_without": t["without"] / 3600, "hours_with": t["with"] / 3600,
        "accuracy_ratio": acc["with"] / acc["without"], "time_ratio": t["without"] / t["with"],
        "n_models": acc["n_models"],
    }


def text_claims(*, paper: dict | None = None) -> dict:
    """Averages the paper's running text states (e.g. mean training times as H:MM:SS)."""
    return dict((paper or paper_results()).get("text_claims", {}))


def beside_paper(our_rows: list[dict], key: str, *, paper: dict | None = None) -> list[dict]:
    """Our rows of one metric joined to the paper's table by architecture name.

    Every paper architecture comes first in the paper's order (``ours`` None when we did not run
    it), then architectures we ran that the paper does not have (``paper`` None).
    """
    ours = {r["model"]: r for r in our_rows}
    out = [{"model": p["model"], "paper": p, "ours": ours.pop(p["model"], None)}
           for p in paper_rows(key, paper=paper)]
    out += [{"model": model, "paper": None, "ours": row} for model, row in ours.items()]
    return out
