"""Test-time BatchNorm adaptation (AdaBN, Li et al. 2016) of runs trained without UCSD: does
re-estimating every BatchNorm layer's statistics on the new site's unlabelled images make a
SARS-CoV-2 model carry over?

For each run: metrics on UCSD-dev's official val patients (118 images) as trained, then after the
running means/variances of every BatchNorm layer are recomputed (cumulative average, no labels, no
augmentation) on UCSD-dev's *train* patients (423 images). Nothing else changes and the val
patients' images are not used for the statistics. A script, not a test.

    PYTHONPATH=src python bench/adapt_bn.py --runs runs/sars-transfer12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json  # noqa: E402
from generalization import UCSD, UCSD_SPLIT, fmt, with_intervals  # noqa: E402

from ct_transfer import data as D  # noqa: E402
from ct_transfer import load_run  # noqa: E402
from ct_transfer.evaluate import compute_metrics  # noqa: E402


def ucsd_subset(run, subset: str):
    rows = D.read_split(UCSD_SPLIT, UCSD)
    x, y, _, _ = D.load_subset(rows, subset, run.classes, UCSD, run.preprocess, on_bad="skip")
    return x, y.numpy()


@torch.no_grad()
def adapt_batchnorm(run, x: torch.Tensor, *, batch_size: int = 64) -> None:
    """Recompute every BatchNorm layer's running statistics on ``x`` (uint8 images, the run's
    preprocessing): torch's own ``update_bn`` (cumulative average over all batches), fed the
    run's normalised batches."""
    batches = (run.transform(x[i:i + batch_size].to(run.device)).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(x), batch_size))
    torch.optim.swa_utils.update_bn(batches, run.model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run directories (not trained on UCSD)")
    ap.add_argument("--out", default=str(RESULTS / "adapt_bn.json"))
    args = ap.parse_args()
    results = []
    for path in args.runs:
        run = load_run(path)
        (xtr, _), (xva, yva) = ucsd_subset(run, "train"), ucsd_subset(run, "val")
        row = {"run": path, "n_adapt": len(xtr)}
        for when in ("as trained", "BN adapted"):
            if when == "BN adapted":
                adapt_batchnorm(run, xtr)
            proba = torch.softmax(run._logits(xva), 1).numpy()
            row[when] = with_intervals(compute_metrics(yva, proba, run.classes))
        results.append(row)
    print(f"{'run':32s} {'':11s} {'acc':>20s} {'sens':>20s} {'spec':>20s} {'AUC':>6s}")
    for row in results:
        for when in ("as trained", "BN adapted"):
            m = row[when]
            print(f"{Path(row['run']).name:32s} {when:11s} {fmt(m, 'accuracy'):>20s} {fmt(m, 'sensitivity'):>20s} "
                  f"{fmt(m, 'specificity'):>20s} {m['roc_auc']:6.3f}")
    write_json(Path(args.out), {"machine": machine_info(), "external": "UCSD-dev val patients",
                                "adapted_on": "UCSD-dev train patients (unlabelled)", "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
