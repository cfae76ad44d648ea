"""Where the time of one engine training step goes (torch.profiler, CPU), by operator group, and
what the optimizer implementation costs: the engine's (``make_optimizer``: foreach) against
PyTorch's CPU default (a per-parameter loop), same model, same batches, timed in the same run.

    python bench/profile_step.py --model EfficientNetV2B0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info  # noqa: E402

GROUPS = [("convolution backward", ("convolution_backward",)),
          ("convolution forward", ("mkldnn_convolution", "_convolution", "conv2d")),
          ("batch norm", ("batch_norm",)), ("activations", ("silu", "relu", "hardswish", "hardsigmoid", "sigmoid")),
          ("optimizer (Adam)", ("_foreach", "adam")), ("augmentation", ("grid_sampler", "affine_grid"))]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="EfficientNetV2B0")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(RESULTS / "profile_step.json"))
    args = p.parse_args()
    from ct_transfer import data as D
    from ct_transfer import models as M

    from ct_transfer import TrainConfig
    from ct_transfer.engine.loop import make_optimizer, make_step

    torch.manual_seed(0)
    model = M.create_model(args.model, "none").to(memory_format=torch.channels_last).train()
    cfg = TrainConfig(data="-", model=args.model)
    tf = D.batch_transform(*M.normalization(model), augment=True)
    x_u8 = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
    y = torch.randint(0, 2, (32,))
    g = torch.Generator().manual_seed(0)

    opt = engine_step = None

    def step():  # the engine's own step (make_step) on an augmented channels-last batch
        x = tf(x_u8, g).contiguous(memory_format=torch.channels_last)
        engine_step(x, y)

    rates = {}
    for label, make in (("per-parameter loop (PyTorch CPU default)",
                         lambda: torch.optim.Adam(model.parameters(), 1e-4, foreach=False)),
                        ("engine (foreach)", lambda: make_optimizer(cfg, model.parameters()))):
        opt = make()
        engine_step = make_step(model, opt)
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps * 2):
            step()
        rates[label] = 32 * args.steps * 2 / (time.perf_counter() - t0)
    print("| optimizer | train img/s |\n|---|---|")
    for label, r in rates.items():
        print(f"| {label} | {r:.1f} |")
    print()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    total = 0.0
    groups = defaultdict(float)
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        name = ev.key.lower()
        for label, keys in GROUPS:
            if any(k in name for k in keys):
                groups[label] += t
                break
        else:
            groups["other"] += t
    print(f"| {args.model}, batch 32, 64 px | share of CPU time |\n|---|---|")
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    for label, t in rows:
        print(f"| {label} | {100 * t / total:.1f}% |")
    print("\ntop operators:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**machine_info(), "model": args.model,
                                          "optimizer_img_per_s": rates,
                                          "shares": {k: v / total for k, v in rows}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
