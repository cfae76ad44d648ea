"""Training throughput: a tutorial-style PyTorch pipeline vs the ct-transfer engine, same run.

(a) baseline: torchvision ImageFolder + per-image transforms.v2 with the paper's augmentation +
    DataLoader + a plain fp32 loop (what a PyTorch tutorial / Keras ImageDataGenerator user writes);
(b) engine: ``ct_transfer.fit`` (decoded once, batch augmentation, channels-last, foreach Adam).
Each variant runs in its own process so peak memory is its own. Prints a table, writes JSON.

    python bench/throughput.py --quick          # EfficientNetV2B0, 1 epoch each, < 3 min
    python bench/throughput.py                  # 3 models x 2 epochs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline(model_name: str, epochs: int, split_csv: Path, workers: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision.transforms import v2

    from ct_transfer import data as D
    from ct_transfer import models as M

    torch.manual_seed(0)
    spec = M.resolve(model_name)
    model = M.create_model(model_name, "none", num_classes=2, dropout=0.8)
    mean, std = M.normalization(model)
    size = spec.image_size
    common = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    train_tf = v2.Compose(common + [
        v2.RandomRotation(36), v2.RandomAffine(degrees=0, translate=(0.2, 0.2)),
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.ColorJitter(brightness=(0.8, 1.0)),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    eval_tf = v2.Compose(common + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    rows = D.read_split(split_csv)
    where = {r["path"]: r["subset"] for r in rows}
    train_ds = datasets.ImageFolder(str(DATA), transform=train_tf)
    val_ds = datasets.ImageFolder(str(DATA), transform=eval_tf)
    rel = [Path(p).relative_to(DATA).as_posix() for p, _ in train_ds.samples]
    # ImageFolder sorts classes alphabetically: COVID=0; ours puts the positive class at 1. Same task.
    tr_idx = [i for i, r in enumerate(rel) if where.get(r) == "train"]
    va_idx = [i for i, r in enumerate(rel) if where.get(r) == "val"]
    train_dl = DataLoader(Subset(train_ds, tr_idx), batch_size=32, shuffle=True, num_workers=workers,
                          persistent_workers=workers > 0)
    val_dl = DataLoader(Subset(val_ds, va_idx), batch_size=32, num_workers=workers, persistent_workers=workers > 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ips, epoch_s = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        seen = 0
        for x, y in train_dl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        loop = time.perf_counter() - t0
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val_dl:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        epoch_s.append(time.perf_counter() - t0)
        ips.append(seen / loop)
    return {"train_ips": ips[-1], "epoch_seconds": epoch_s[-1], "val_acc": correct / n, "setup": "first epoch included"}


def run_engine(model_name: str, epochs: int, split_csv: Path) -> dict:
    from ct_transfer import TrainConfig, fit

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = TrainConfig(data=str(DATA), model=model_name, out=tmp + "/run", epochs=epochs,
                          split_file=str(split_csv))
        fit(cfg, progress=False)
        total = time.perf_counter() - t0
        hist = [l.split(",") for l in (Path(tmp) / "run" / "history.csv").read_text().strip().splitlines()]
    head, last = hist[0], hist[-1]
    seconds = [float(r[head.index("seconds")]) for r in hist[1:]]
    return {"train_ips": float(last[head.index("train_ips")]), "epoch_seconds": seconds[-1] - (seconds[-2] if len(seconds) > 1 else 0),
            "val_acc": float(last[head.index("val_acc")]), "wall_seconds_incl_decode_eval": total}


def worker(args) -> None:
    fn = run_baseline if args.worker == "baseline" else run_engine
    extra = (args.workers,) if args.worker == "baseline" else ()
    result = fn(args.model, args.epochs, Path(args.split), *extra)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="EfficientNetV2B0 only, 1 epoch each")
    p.add_argument("--models", default="EfficientNetV2B0,MobileNetV3Large,EfficientNetLite0")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument("--out", default=str(RESULTS / "throughput.json"))
    p.add_argument("--worker", choices=["baseline", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    models = ["EfficientNetV2B0"] if args.quick else args.models.split(",")
    epochs = 1 if args.quick else args.epochs
    out = Path(args.out)
    split = paper_split(out.parent)
    results = []
    for model in models:
        row = {"model": model, "epochs": epochs}
        for variant in ("baseline", "engine"):
            cmd = [sys.executable, __file__, "--worker", variant, "--model", model, "--epochs", str(epochs),
                   "--split", str(split), "--workers", str(args.workers)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        row["speedup"] = row["engine"]["train_ips"] / row["baseline"]["train_ips"]
        results.append(row)
        print(f"{model}: baseline {row['baseline']['train_ips']:.0f} img/s, engine {row['engine']['train_ips']:.0f} img/s, "
              f"x{row['speedup']:.2f}", flush=True)
    print()
    print(f"| model | variant | train img/s | epoch s | peak RSS MB | val acc after {epochs} epoch(s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for v in ("baseline", "engine"):
            x = r[v]
            print(f"| {r['model']} | {v} | {x['train_ips']:.1f} | {x['epoch_seconds']:.1f} | {x['peak_rss_mb']:.0f} | {x['val_acc']:.3f} |")

    info = {**machine_info(), "baseline_workers": args.workers, "results": results}
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nwrote {out}")
    print(f"speedup: {results[0]['speedup']:.2f}")


if __name__ == "__main__":
    main()
