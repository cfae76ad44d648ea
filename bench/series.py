"""Scans and patients: how fast one CT series is predicted, and what patient-level decisions give.

1. Speed and memory: a 300-slice 512x512 DICOM series (real dataset slices, squashed to 512 px,
   written with pydicom as int16 with HU rescale tags and positions, shuffled file names) predicted
   end to end by ``Run.predict_patient`` (decoding, lung-slice selection, inference split out), in a
   fresh process each time so the peak RSS is the command's own; beside it, the peer: the same 300
   files predicted as independent slices (``predict``'s slice path), also in a fresh process.
2. Accuracy: a run trained on UCSD-dev's official train patients (``--split-file SPLIT.csv``: its
   val patients become the test, a val is carved from train by patient). Slice-level metrics on the
   official val patients beside patient-level ones for every aggregator, each fitted (where it
   learns) on the carved val patients; the aggregator and the patient threshold chosen on those val
   patients (``fit_patient_decision``) are marked. 95% intervals throughout.

    PYTHONPATH=src python bench/series.py --run runs/ucsd-transfer20 [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, write_json  # noqa: E402

UCSD = ROOT.parent / "shared" / "datasets" / "ucsd-covid-ct-dev"
SARS = ROOT.parent / "shared" / "datasets" / "sarscov2-ct"


def make_series(folder: Path, n: int, size: int) -> Path:
    """``n`` real slices (SARS-CoV-2 COVID folder, cycled) as one DICOM series of ``size`` px."""
    import copy

    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.dcm"))) == n:
        return folder
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    files = sorted((SARS / "COVID").iterdir())[:150]
    uid = generate_uid()
    names = np.random.default_rng(0).permutation(n)
    for k in range(n):
        g = np.asarray(Image.open(files[k % len(files)]).convert("L").resize((size, size), Image.BILINEAR))
        raw = (np.rint(g.astype(np.float64) * 1500 / 255) + 24).astype(np.int16)  # HU + 1374
        ds = copy.deepcopy(template)
        ds.Rows, ds.Columns = raw.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = raw.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1374
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180.0, -180.0, -400.0 + 1.25 * k]
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.save_as(folder / f"{names[k]:06d}.dcm")
    return folder


def child(mode: str, run_dir: str, series: str, max_slices: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    from ct_transfer import load_run

    run = load_run(run_dir)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    if mode == "patient":
        pp = run.predict_patient(series, max_slices=max_slices)
        out = {"seconds": pp.seconds, "slices_used": len(pp.used), "slices_total": pp.n_slices,
               "lung_slices": sum(pp.lung), "probability": pp.probability}
    else:
        from ct_transfer.predict import predict

        rows = predict(run, [series], batch_size=32)
        out = {"slices_used": len(rows)}
    out.update(mode=mode, end_to_end_s=round(time.perf_counter() - t1, 3), load_run_s=round(t_load, 3),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(out))


def measure(mode: str, run_dir: str, series: Path, max_slices: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--run", run_dir, "--series", str(series),
           "--max-slices", str(max_slices)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode}: failed\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ucsd_patients(run_dir: str) -> dict:
    """Slice- and patient-level metrics on UCSD's official val patients (the run's test subset)."""
    from ct_transfer import _io
    from ct_transfer import data as D
    from ct_transfer import load_run
    from ct_transfer import patients as PT
    from ct_transfer.evaluate import compute_metrics

    run = load_run(run_dir)
    patient = {r["path"]: r["patient"] for r in _io.read_csv(UCSD / "SPLIT.csv")}
    rows = [{**r, "patient": patient[r["path"]]} for r in run.split]  # runs trained before the patient column
    out = {"run": run_dir, "model": run.config.get("model"), "recipe": run.config.get("recipe"),
           "temperature": run.temperature, "slice_threshold": run.threshold}
    subsets = {}
    for name in ("val", "test"):
        x, y, kept, _ = D.load_subset(rows, name, run.classes, UCSD, run.preprocess, on_bad="skip")
        proba = run.predictor.outputs(x).proba  # calibrated, as every prediction path
        subsets[name] = (kept, y.numpy(), proba)
    decision = PT.fit_patient_decision(*subsets["val"])
    out["chosen_on_val"] = decision.to_dict()
    kept, y, proba = subsets["test"]
    out["slice"] = compute_metrics(y, proba, run.classes, threshold=run.threshold)
    out["patients"] = {}
    val_rows, val_y, val_p = subsets["val"]
    _, index, labels = PT.group_patients(val_rows, val_y)
    per_patient = [val_p[ix, 1] for ix in index]
    for name in PT.list_aggregators():
        agg = PT.make_aggregator(name).fit(per_patient, labels)
        d = PT.PatientDecision(agg, decision.threshold if name == decision.aggregator.name else None)
        out["patients"][name] = PT.patient_metrics(kept, y, proba, run.classes, d)
    out["n_test_patients"] = len(set(r["patient"] for r in kept))
    out["n_val_patients"] = len(set(r["patient"] for r in val_rows))
    return out


def fmt(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    ci = (m.get("ci95") or {}).get(key)
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (for the accuracy part: trained on UCSD SPLIT.csv)")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--max-slices", type=int, default=64)
    p.add_argument("--series", help="(internal) series folder")
    p.add_argument("--child", choices=["patient", "slices"], help="(internal) one measurement")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "series.json"))
    args = p.parse_args()
    if args.child:
        return child(args.child, args.run, args.series, args.max_slices)
    result = {"machine": machine_info()}
    if not args.skip_speed:
        series = make_series(RESULTS / f"series-{args.slices}x{args.size}", args.slices, args.size)
        result["speed"] = {"series": f"{args.slices} slices of {args.size}x{args.size} DICOM (int16, HU tags)",
                           "patient": measure("patient", args.run, series, args.max_slices),
                           "slices_peer": measure("slices", args.run, series, args.max_slices)}
        s = result["speed"]
        print(f"{'path':<44}{'end to end (s)':>15}{'decode':>8}{'select':>8}{'infer':>8}{'peak RSS (MB)':>15}")
        pt = s["patient"]
        print(f"{'predict_patient (' + str(pt['slices_used']) + ' of ' + str(pt['slices_total']) + ' slices)':<44}"
              f"{pt['end_to_end_s']:>15.1f}{pt['seconds']['decode']:>8.1f}{pt['seconds']['select']:>8.1f}"
              f"{pt['seconds']['infer']:>8.1f}{pt['peak_rss_mb']:>15.0f}")
        pe = s["slices_peer"]
        print(f"{'peer: every file as a slice (' + str(pe['slices_used']) + ')':<44}{pe['end_to_end_s']:>15.1f}"
              f"{'':>24}{pe['peak_rss_mb']:>15.0f}")
    if not args.skip_accuracy:
        acc = ucsd_patients(args.run)
        result["ucsd"] = acc
        print(f"\nUCSD official val patients ({acc['n_test_patients']} patients, {acc['slice']['n']} slices); "
              f"aggregator chosen on {acc['n_val_patients']} val patients carved from train: "
              f"{acc['chosen_on_val']['aggregator']} (threshold {acc['chosen_on_val']['threshold']:.3f})")
        print(f"{'level':<22}{'accuracy':>22}{'sensitivity':>22}{'specificity':>22}{'AUC':>22}")
        print(f"{'slice':<22}" + "".join(f"{fmt(acc['slice'], k):>22}" for k in ("accuracy", "recall", "specificity", "roc_auc")))
        for name, m in acc["patients"].items():
            print(f"{'patient ' + name:<22}" + "".join(f"{fmt(m, k):>22}" for k in ("accuracy", "recall", "specificity", "roc_auc")))
            op = m.get("operating_point")
            if op:
                print(f"{'  at val threshold':<22}{fmt(op, 'accuracy'):>22}{fmt(op, 'sensitivity'):>22}"
                      f"{fmt(op, 'specificity'):>22}")
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
