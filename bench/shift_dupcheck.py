"""Does a detector's acceptance of SARS-CoV-2 val/test slices rest on near-duplicates in train?

The paper split is slice-level: val and test slices have neighbouring slices of the same scan in
train. For each val/test slice the variant is scored twice: as usual, and with the training images
of its near-duplicate group (pHash distance <= 32, ``data.groups``: same or neighbouring slices of
one scan) left out of the kNN bank (or out of the Mahalanobis fit: refitted per left-out group is
too slow, so only kNN is checked). A detector that stands on duplicates flags far more then.

    PYTHONPATH=src python bench/shift_dupcheck.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, write_json  # noqa: E402
from shift_variants import CACHE, DEFAULT_RUN, Variant, add_stage_aliases, conformal_threshold  # noqa: E402

from ct_transfer import load_run  # noqa: E402
from ct_transfer.data.groups import image_groups  # noqa: E402


def main():
    run = load_run(DEFAULT_RUN)
    F = dict(np.load(CACHE))
    taps = list(F["taps"])
    add_stage_aliases(F, taps)
    paths = {s: [r["path"] for r in run.split if r["subset"] == s] for s in ("train", "val", "test")}
    allp = paths["train"] + paths["val"] + paths["test"]
    g = np.array(image_groups(DATA, allp))
    gt = g[:len(paths["train"])]
    gv = g[len(paths["train"]):len(paths["train"]) + len(paths["val"])]
    gs = g[len(paths["train"]) + len(paths["val"]):]
    print("val slices with a train near-duplicate:", np.isin(gv, gt).mean(), " test:", np.isin(gs, gt).mean())
    blocks = ["backbone.bn1", *[t for t in taps if t.startswith("backbone.blocks.")], "feature_map"]
    out = {"val_with_train_duplicate": float(np.isin(gv, gt).mean()),
           "test_with_train_duplicate": float(np.isin(gs, gt).mean()), "rows": []}
    for k in (1, 10):
        v = Variant(f"knn k={k}: every block", taps=blocks, knn=k).fit(F)
        res = {}
        for split, gg in (("val", gv), ("test", gs)):
            f = v._knn_feats(F, split)
            sim = f @ v.bank.T
            plain = 1 - np.sort(sim, 1)[:, -k]
            sim_lo = np.where(gg[:, None] == gt[None, :], -np.inf, sim)
            lgo = 1 - np.sort(sim_lo, 1)[:, -k]
            res[split] = (plain, lgo)
        th = conformal_threshold(res["val"][0], 0.95)
        row = {"variant": v.name, "threshold": float(th)}
        for split in ("val", "test"):
            row[f"flag_{split}"] = float((res[split][0] > th).mean())
            row[f"flag_{split}_without_duplicates"] = float((res[split][1] > th).mean())
        out["rows"].append(row)
        print(row, flush=True)
    write_json(RESULTS / "shift_dupcheck.json", out)


if __name__ == "__main__":
    main()
