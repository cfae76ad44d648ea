"""Engine switches: channels-last, bf16 autocast, torch.compile — speed and accuracy, same run.

Speed: train steps/s on random 64 px batches of 32 (no data loading) for each combination.
Accuracy (--accuracy): EfficientNetLite0 with ImageNet weights trained a few epochs on the paper
split with each switch, same seed; val/test accuracy should agree within noise.

    python bench/switches.py                 # speed only (~1 min without --compile)
    python bench/switches.py --compile --accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, paper_split  # noqa: E402


def step_rate(model_name: str, channels_last: bool, bf16: bool, compile_: bool, steps: int = 15) -> dict:
    from ct_transfer import models as M

    torch.manual_seed(0)
    model = M.create_model(model_name, "none", num_classes=2, dropout=0.8)
    x = torch.randn(32, 3, 64, 64)
    y = torch.randint(0, 2, (32,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    from ct_transfer import TrainConfig
    from ct_transfer.engine.loop import make_optimizer, make_step

    fwd = torch.compile(model) if compile_ else model
    opt = make_optimizer(TrainConfig(data="-", model=model_name), model.parameters())
    model.train()
    engine_step = make_step(fwd, opt, bf16=bf16, ema_source=model)  # the engine's own step

    def step():
        engine_step(x, y)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"img_per_s": 32 * steps / (time.perf_counter() - t0), "warmup_s": warm}


def accuracy(switch: dict, epochs: int, split: Path) -> dict:
    from ct_transfer import TrainConfig, fit

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=str(DATA), model="EfficientNetLite0", weights="imagenet", out=tmp + "/r",
                          epochs=epochs, split_file=str(split), seed=0, **switch)
        m = fit(cfg, progress=False).metrics
    return {"val_acc": m["val"]["accuracy"], "test_acc": m["test"]["accuracy"], "train_seconds": m["train_seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="EfficientNetV2B0,EfficientNetLite0")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "switches.json"))
    args = p.parse_args()
    combos = [dict(channels_last=cl, bf16=bf, compile_=False) for cl in (False, True) for bf in (False, True)]
    if args.compile:
        combos.append(dict(channels_last=True, bf16=False, compile_=True))
    speed = []
    print("| model | channels_last | bf16 | compile | train img/s | warm-up s |\n|---|---|---|---|---|---|")
    for model in args.models.split(","):
        base = None
        for c in combos:
            r = {"model": model, **c, **step_rate(model, **c)}
            base = base or r["img_per_s"]
            r["vs_default_torch"] = r["img_per_s"] / base
            speed.append(r)
            print(f"| {model} | {c['channels_last']} | {c['bf16']} | {c['compile_']} | {r['img_per_s']:.0f} "
                  f"(×{r['vs_default_torch']:.2f}) | {r['warmup_s']:.1f} |", flush=True)
    acc = []
    if args.accuracy:
        split = paper_split(Path(args.out).parent)
        print(f"\n| switch | val acc | test acc | train s ({args.epochs} epochs) |\n|---|---|---|---|")
        for name, sw in (("fp32 channels-last (default)", {}), ("bf16", {"bf16": True}),
                         ("fp32 contiguous", {"channels_last": False})):
            r = {"switch": name, **accuracy(sw, args.epochs, split)}
            acc.append(r)
            print(f"| {name} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | {r['train_seconds']:.0f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**machine_info(), "speed": speed, "accuracy": acc}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
