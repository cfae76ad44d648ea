"""Scale: peak memory, decode-once time, images/s and disk use as the dataset grows (issue #25).

Builds 2.5k, 10k and 40k slice files from the real SARS-CoV-2 slices (each a random rotation,
scale, shift and flip plus a random gamma and contrast of a real slice), written as 8-bit grayscale
PNG at 256 px (not the native ~400-500 px: 40k native PNGs would take ~10 GB) into a temporary
folder. Then, per size, in a fresh process: decode once into the engine's image source (the disk
store of data/store.py, or the in-memory array), then a fixed number of the engine's training
steps of EfficientNetLite0 at 224 px (batches drawn at random from the whole set, gathered per
batch, augmented, forward, backward, Adam) — a whole 224 px epoch of 40k images would take hours
on 2 cores. Reports peak RSS (getrusage), decode-once seconds, train images/s, disk used.

    python bench/scale.py                                   # 2.5k/10k/40k on the disk store + 2.5k in memory
    python bench/scale.py --sizes 2500,10000 --steps 20     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, machine_info, write_json  # noqa: E402


def make_slices(folder: Path, n: int, px: int, seed: int = 0) -> float:
    """``n`` PNG files (half per class) made from the real slices; returns the seconds it took."""
    import numpy as np
    from PIL import Image, ImageOps

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for cls in ("COVID", "non-COVID"):
        out = folder / cls
        out.mkdir(parents=True, exist_ok=True)
        have = len(list(out.iterdir()))
        sources = sorted((DATA / cls).iterdir())
        bases = {}
        for i in range(have, n // 2):
            src = sources[i % len(sources)]
            if src not in bases:
                bases[src] = Image.open(src).convert("L").resize((px, px), Image.BILINEAR)
            if len(bases) > 64:  # keep a few decoded sources, not all of them
                bases.pop(next(iter(bases)))
            img = bases[src].rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                                    translate=tuple(rng.uniform(-0.08, 0.08, 2) * px))
            s = float(rng.uniform(0.9, 1.1))
            img = ImageOps.fit(img.resize((int(px * s), int(px * s)), Image.BILINEAR), (px, px))
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
            a = np.asarray(img, np.float32) / 255.0
            a = np.clip((a ** rng.uniform(0.8, 1.25)) * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1)
            Image.fromarray((a * 255).astype(np.uint8)).save(out / f"s{i:06d}.png", compress_level=1)
    return time.perf_counter() - t0


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from ct_transfer import TrainConfig
    from ct_transfer import data as D
    from ct_transfer import models as M
    from ct_transfer.engine.data import load_subsets
    from ct_transfer.engine.loop import _batches, _epoch_generator, make_optimizer

    root = Path(args.folder)
    rows = []
    for cls in ("COVID", "non-COVID"):
        files = sorted((root / cls).iterdir())[: args.n // 2]
        rows += [{"path": f"{cls}/{f.name}", "class": cls, "subset": "train"} for f in files]
    cfg = TrainConfig(data=str(root), model="EfficientNetLite0", image_size=args.image_size, store=args.store,
                      cache_dir=args.cache_dir, batch_size=args.batch_size)
    pre = D.Preprocess(args.image_size)
    rss0 = rss_now_mb()
    t0 = time.perf_counter()
    subsets, _ = load_subsets(cfg, rows, ["COVID", "non-COVID"], pre, "cpu", names=("train",))
    decode_s = time.perf_counter() - t0
    rss_after_decode = rss_now_mb()
    x, y = subsets["train"].x, subsets["train"].y
    if args.steps == 0:  # the data path alone: random batches gathered from the store (no model)
        g = _epoch_generator(0, 0, "cpu")
        t, k = time.perf_counter(), 0
        for k, idx in enumerate(_batches(len(x), args.batch_size, g), 1):
            x[idx]
            if k == args.gather_batches:
                break
        gather_s = time.perf_counter() - t
        return {"n": args.n, "store": args.store, "source": type(x).__name__, "decode_seconds": round(decode_s, 1),
                "decode_ips": round(args.n / decode_s, 1), "steps": 0, "batch_size": args.batch_size,
                "train_ips": None, "gather_ips": round(k * args.batch_size / gather_s, 1),
                "gather_ms_per_batch": round(1000 * gather_s / k, 2), "rss_start_mb": round(rss0),
                "rss_after_decode_mb": round(rss_after_decode),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    torch.manual_seed(0)
    model = M.create_model("EfficientNetLite0", weights="none", num_classes=2, dropout=cfg.dropout).train()
    model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model.parameters())
    tf = D.batch_transform(*M.normalization(model), augment=True)
    g = _epoch_generator(0, 0, "cpu")
    times, gather = [], 0.0
    for k, idx in enumerate(_batches(len(x), args.batch_size, g)):
        if k == args.steps + args.warmup:
            break
        t = time.perf_counter()
        xb_u8 = x[idx]
        gather += time.perf_counter() - t if k >= args.warmup else 0.0
        xb = tf(xb_u8, g).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= args.warmup:
            times.append(time.perf_counter() - t)
    train_s = sum(times)
    return {"n": args.n, "store": args.store, "source": type(x).__name__, "decode_seconds": round(decode_s, 1),
            "decode_ips": round(args.n / decode_s, 1), "steps": len(times), "batch_size": args.batch_size,
            "train_ips": round(len(times) * args.batch_size / train_s, 2),
            "gather_ms_per_batch": round(1000 * gather / max(len(times), 1), 2),
            "rss_start_mb": round(rss0), "rss_after_decode_mb": round(rss_after_decode),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2500,10000,40000")
    p.add_argument("--memory-sizes", default="2500", help="sizes also run with store=memory (today's path)")
    p.add_argument("--px", type=int, default=256, help="size of the PNG files written")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--gather-batches", type=int, default=200, help="with --steps 0: random batches gathered")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", help="where the PNGs and stores go (default: a temporary folder, removed)")
    p.add_argument("--out", default=str(RESULTS / "scale.json"))
    for name in ("folder", "n", "store", "cache-dir"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.n = int(args.n)
        print(json.dumps(worker(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    mem_sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="ct-scale-")
    work = Path(args.workdir or tmp)
    results = []
    try:
        folder = work / "slices"
        gen_s = make_slices(folder, max(sizes), args.px)
        print(f"wrote {max(sizes)} PNG files at {args.px} px in {gen_s:.0f} s", flush=True)
        png_bytes = {}
        for cls in ("COVID", "non-COVID"):
            files = sorted((folder / cls).iterdir())
            for n in sizes:
                png_bytes[n] = png_bytes.get(n, 0) + sum(f.stat().st_size for f in files[: n // 2])
        cells = [(n, "disk") for n in sizes] + [(n, "memory") for n in mem_sizes]
        for n, store in cells:
            cache = work / f"cache-{n}-{store}"
            cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--n", str(n), "--store", store,
                   "--cache-dir", str(cache), "--image-size", str(args.image_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--gather-batches", str(args.gather_batches)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"n={n} store={store} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["png_mb"] = round(png_bytes[n] / 2**20)
            r["store_mb"] = round(du(cache) / 2**20) if cache.exists() else 0
            r["load_average"] = os.getloadavg()
            results.append(r)
            rate = f"train {r['train_ips']:6.2f}" if r["train_ips"] else f"gather {r['gather_ips']:8.1f}"
            print(f"n={n:>6} {store:<6} decode {r['decode_seconds']:>7.1f} s  {rate} img/s  "
                  f"peak RSS {r['peak_rss_mb']} MB  disk {r['png_mb']} + {r['store_mb']} MB", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    base = next((r for r in results if r["store"] == "disk"), None)
    rate = "train_ips" if args.steps else "gather_ips"
    what = f"train img/s ({args.steps} steps of {args.batch_size}, {args.image_size} px)" if args.steps else \
        f"gather img/s ({args.gather_batches} random batches of {args.batch_size}, no model)"
    print()
    print(f"| slices | images held | decode once s (img/s) | {what} | × first | gather ms/batch | peak RSS MB | × first | "
          "PNG MB | store MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else "–"
        print(f"| {r['n']} | {r['store']} | {r['decode_seconds']:.0f} ({r['decode_ips']:.0f}) | {r[rate]:.2f} | "
              f"{ratio(rate)} | {r['gather_ms_per_batch']:.1f} | {r['peak_rss_mb']} | {ratio('peak_rss_mb')} | "
              f"{r['png_mb']} | {r['store_mb']} |")
    write_json(Path(args.out), {**machine_info(), "png_px": args.px, "png_seconds": round(gen_s, 1),
                                "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
