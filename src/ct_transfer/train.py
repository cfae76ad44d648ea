"""Train: the fast CPU/GPU engine, the fine-tuning strategies, checkpoints and resume.

The engine keeps every decoded image in one uint8 tensor, augments whole batches with tensor ops
(independent random parameters per image), and runs without DataLoader workers. Every epoch's
random state derives from (seed, epoch), so a resumed run continues exactly as an unbroken one.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from . import evaluate as E
from . import models as M
from .errors import CTTransferError

STRATEGIES = ("full", "partial", "frozen")


@dataclass
class TrainConfig:
    data: str
    model: str
    out: str
    weights: str = "none"
    split_file: str | None = None
    split_preset: str = "stratified"  # used only when no split file is given
    split_seed: int = 0
    epochs: int = 100
    image_size: int | None = None  # None: the model table's size (64, 71 or 75)
    batch_size: int = 32
    lr: float = 1e-4
    dropout: float = 0.8
    seed: int = 0
    limit: int | None = None
    augment: bool = True
    strategy: str = "full"
    freeze_until: int | None = None  # partial: last frozen parameter group (timm group_matcher)
    frozen_views: int = 2  # frozen + augment: augmented views cached per train image
    positive: str | None = None  # None: COVID if present, else the last class in sorted order
    on_bad: str = "error"
    cache_dir: str | None = None
    channels_last: bool = True
    bf16: bool = False
    compile: bool = False
    threads: int | None = None
    device: str = "auto"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------


def limit_rows(rows: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """At most ``limit`` images per class, keeping each class's subset proportions (>= 1 each)."""
    rng = np.random.RandomState(seed)
    out = []
    for label in sorted({r["class"] for r in rows}):
        class_rows = [r for r in rows if r["class"] == label]
        for subset in D.SUBSETS:
            sub = [r for r in class_rows if r["subset"] == subset]
            if not sub:
                continue
            k = max(1, int(round(limit * len(sub) / len(class_rows))))
            idx = sorted(rng.permutation(len(sub))[:k])
            out.extend(sub[i] for i in idx)
    return out


def prepare_rows(cfg: dict, data_dir=None, split_file=None) -> list[dict]:
    data_dir = data_dir or cfg["data"]
    split_file = split_file or cfg.get("split_file")
    if split_file:
        rows = D.read_split(split_file, data_dir)
    else:
        items, _ = D.scan_folder(data_dir)
        rows = D.make_split(items, cfg.get("split_preset", "stratified"), cfg.get("split_seed", 0))
    if cfg.get("limit"):
        rows = limit_rows(rows, int(cfg["limit"]), cfg.get("split_seed", 0))
    return rows


def resolve_classes(rows: list[dict], positive: str | None) -> list[str]:
    classes = sorted({r["class"] for r in rows})
    if len(classes) < 2:
        raise CTTransferError(f"split has {len(classes)} class(es) ({', '.join(classes)}); need at least two")
    if positive is None:
        positive = D.DEFAULT_POSITIVE if D.DEFAULT_POSITIVE in classes else classes[-1]
    return D.class_order(classes, positive)


def load_subset(rows, subset, classes, data_dir, image_size, cache_dir=None, on_bad="error", progress=False):
    """(uint8 tensor N x 3 x S x S, labels tensor, kept rows, bad-file messages) of one subset."""
    sub = [r for r in rows if r["subset"] == subset]
    cache = D.ImageCache(image_size, cache_dir)
    arr, kept, bad = cache.load_many([Path(data_dir) / r["path"] for r in sub], on_bad, progress, desc=f"decode {subset}")
    kept_rows = [sub[i] for i in kept]
    labels = torch.tensor([classes.index(r["class"]) for r in kept_rows], dtype=torch.long)
    return torch.from_numpy(arr), labels, kept_rows, bad


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def parameter_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's stages in order (stem first), from timm's own group_matcher."""
    from timm.models import group_parameters

    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def default_freeze_until(backbone: nn.Module) -> int:
    return max(0, len(parameter_groups(backbone)) // 2 - 1)


def apply_strategy(model: M.Classifier, strategy: str, freeze_until: int | None) -> dict:
    """Set requires_grad; returns what was frozen (module names kept in eval mode)."""
    if strategy not in STRATEGIES:
        raise CTTransferError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    for p in model.parameters():
        p.requires_grad_(True)
    if strategy == "full":
        return {"frozen_groups": 0, "frozen_params": 0}
    groups = parameter_groups(model.backbone)
    if strategy == "frozen":
        upto = len(groups) - 1
    else:
        upto = default_freeze_until(model.backbone) if freeze_until is None else int(freeze_until)
        if not 0 <= upto < len(groups) - 1:
            raise CTTransferError(f"--freeze-until {freeze_until}: choose 0..{len(groups) - 2} for {model.backbone.__class__.__name__}")
    frozen = {n for g in groups[:upto + 1] for n in g}
    params = dict(model.backbone.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    if strategy == "frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return {"frozen_groups": upto + 1, "frozen_params": int(sum(params[n].numel() for n in frozen))}


def set_train_mode(model: M.Classifier):
    """train() for trainable parts; frozen modules (all params frozen) stay in eval (BN stats fixed)."""
    model.train()
    for module in model.backbone.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_run(run_dir, checkpoint: str = "best.pt"):
    """(model, config, classes, transform) of a finished or running run."""
    run_dir = E.check_run_dir(run_dir)
    ckpt_path = run_dir / checkpoint
    if not ckpt_path.is_file():
        ckpt_path = run_dir / "last.pt"
    if not ckpt_path.is_file():
        raise CTTransferError(f"{run_dir}: no checkpoint (best.pt / last.pt)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CTTransferError(f"{ckpt_path}: cannot load checkpoint ({str(exc).splitlines()[0][:120]})") from None
    cfg = json.loads((run_dir / "config.json").read_text())
    classes = ckpt["classes"]
    model = M.create_model(cfg["model"], "none", len(classes), cfg.get("dropout", 0.8))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise CTTransferError(f"{ckpt_path}: checkpoint does not fit {cfg['model']} (another architecture?)") from None
    model.eval()
    mean, std = M.normalization(model)
    transform = D.batch_transform(mean, std, augment=False)
    return SimpleNamespace(model=model, config=cfg, classes=classes, transform=transform,
                           image_size=cfg["image_size"], mean=mean, std=std, checkpoint=str(ckpt_path))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CTTransferError("--device cuda: no CUDA device available")
    return name


def _epoch_generator(seed: int, epoch: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 100_003 + epoch)
    return g


def _batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator, device=generator.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1 or n == 1:  # a lone last image would break BatchNorm
            yield idx


def _train_epoch_full(model, opt, x_u8, y, transform, cfg, device, g, step_fn, progress_bar):
    set_train_mode(model)
    # Sums stay on the device: no host sync per step (matters on CUDA); the bar syncs only when shown.
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    show = progress_bar is not None and not progress_bar.disable
    for idx in _batches(len(x_u8), cfg.batch_size, g):
        xb = transform(x_u8[idx], g)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y[idx]
        loss, logits = step_fn(xb, yb)
        total_loss += loss * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(idx)
        if show:
            progress_bar.update(len(idx))
            progress_bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.3f}")
    return float(total_loss) / max(seen, 1), int(correct) / max(seen, 1)


@torch.inference_mode()
def pooled_features(model, x_u8, transform, cfg, device, generator=None, batch_size=256):
    """Backbone features after global average pooling (frozen strategy's cache)."""
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch_size):
        xb = transform(x_u8[start:start + batch_size], generator)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with E.autocast(cfg.bf16, device):
            out.append(model.pooled(xb).float())
    return torch.cat(out)


def _val_loss_acc(model, x_u8, y, transform, cfg, device):
    proba = E.predict_proba(model, x_u8, transform, bf16=cfg.bf16, device=device, channels_last=cfg.channels_last)
    p = torch.from_numpy(proba).clamp_min(1e-7)
    yy = y.cpu()
    return float(F.nll_loss(p.log(), yy)), float((p.argmax(1) == yy).float().mean())


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False, callback=None) -> dict:
    """Train one run into ``cfg.out``; returns its metrics (also written to metrics.json).

    ``callback(row, model)``, if given, runs after each epoch outside the timed part; returning
    True stops training there (benchmarks use it to measure time-to-accuracy).
    """
    out = Path(cfg.out)
    if (out / "last.pt").exists() and not resume:
        raise CTTransferError(f"{out}: already holds a run; add --resume to continue it or choose another --out")
    if resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        # the run's own split (already limited): a resumed run sees exactly the same images
        cfg = TrainConfig.from_dict({**saved, "out": str(out), "epochs": cfg.epochs,
                                     "split_file": str(out / "split.csv"), "limit": None})
    spec = M.resolve(cfg.model)
    cfg.image_size = int(cfg.image_size or spec.image_size)
    if cfg.strategy not in STRATEGIES:
        raise CTTransferError(f"--strategy {cfg.strategy}: choose {', '.join(STRATEGIES)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or not 0 <= cfg.dropout < 1:
        raise CTTransferError("--epochs/--batch-size must be >= 1, --lr > 0, 0 <= --dropout < 1")
    device = pick_device(cfg.device)
    cfg.bf16 = cfg.bf16 or device == "cuda"  # on a GPU mixed precision is the default
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    # Data first: bad input fails before anything is written.
    rows = prepare_rows(asdict(cfg))
    classes = resolve_classes(rows, cfg.positive)
    cfg.positive = classes[1] if len(classes) == 2 else None
    subsets, skipped = {}, []
    for subset in D.SUBSETS:
        x, y, kept, bad = load_subset(rows, subset, classes, cfg.data, cfg.image_size, cfg.cache_dir, cfg.on_bad, progress)
        if len(kept) == 0:
            raise CTTransferError(f"{cfg.data}: the {subset} subset is empty (too few images or --limit too small)")
        subsets[subset] = (x.to(device), y.to(device), kept)
        skipped += bad
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", *skipped, sep="\n  ")

    torch.manual_seed(cfg.seed)  # the head's init depends on the seed alone, not on what ran before
    model = M.create_model(cfg.model, cfg.weights, len(classes), cfg.dropout)  # weight errors: before writing

    out.mkdir(parents=True, exist_ok=True)
    used_rows = [r for s in D.SUBSETS for r in subsets[s][2]]
    D.write_split(used_rows, out / "split.csv")
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    saved_cfg = asdict(cfg)
    saved_cfg["timm_name"] = spec.timm_name
    saved_cfg["classes"] = classes
    E.write_json(out / "config.json", saved_cfg)

    frozen_info = apply_strategy(model, cfg.strategy, cfg.freeze_until)
    mean, std = M.normalization(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_tf = D.batch_transform(mean, std, augment=cfg.augment)
    eval_tf = D.batch_transform(mean, std, augment=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    history, start_epoch, best, train_seconds = [], 0, None, 0.0
    if resume and (out / "last.pt").exists():
        state = torch.load(out / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        best, train_seconds = state["best"], state["train_seconds"]

    fwd = torch.compile(model) if cfg.compile else model

    def step(xb, yb):
        with E.autocast(cfg.bf16, device):
            logits = fwd(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach()

    x_tr, y_tr, _ = subsets["train"]
    x_va, y_va, _ = subsets["val"]
    feats = None
    if cfg.strategy == "frozen" and start_epoch < cfg.epochs:
        t0 = time.perf_counter()
        views = max(1, cfg.frozen_views) if cfg.augment else 1
        feats = [pooled_features(model, x_tr, train_tf, cfg, device, _epoch_generator(cfg.seed, -1 - v, device))
                 for v in range(views)]
        val_feats = pooled_features(model, x_va, eval_tf, cfg, device)
        train_seconds += time.perf_counter() - t0

    bar = None
    if progress:
        from tqdm import tqdm
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout; exact on resume
        g = _epoch_generator(cfg.seed, epoch, device)
        if progress:
            bar = tqdm(total=len(x_tr), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="img",
                       disable=None, mininterval=1.0)  # no bar when stderr is not a terminal (logs)
        if feats is not None:  # frozen: only the head trains, on cached features
            f = feats[epoch % len(feats)]
            model.train()
            tl, tc, seen = 0.0, 0, 0
            for idx in _batches(len(f), cfg.batch_size, g):
                logits = model.head(f[idx])
                loss = F.cross_entropy(logits, y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tl += float(loss.detach()) * len(idx)
                tc += int((logits.argmax(1) == y_tr[idx]).sum())
                seen += len(idx)
            train_loss, train_acc = tl / seen, tc / seen
            model.eval()
            with torch.inference_mode():
                vp = torch.softmax(model.head(val_feats), 1).cpu().clamp_min(1e-7)
            val_loss = float(F.nll_loss(vp.log(), y_va.cpu()))
            val_acc = float((vp.argmax(1) == y_va.cpu()).float().mean())
            if bar is not None:
                bar.update(len(x_tr))
            loop_seconds = time.perf_counter() - t0
        else:
            train_loss, train_acc = _train_epoch_full(model, opt, x_tr, y_tr, train_tf, cfg, device, g, step, bar)
            loop_seconds = time.perf_counter() - t0
            val_loss, val_acc = _val_loss_acc(model, x_va, y_va, eval_tf, cfg, device)
        train_seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": round(train_seconds, 3),
               "train_ips": round(len(x_tr) / max(loop_seconds, 1e-9), 2)}
        history.append(row)
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f} acc {train_acc:.4f}  "
                  f"val_loss {val_loss:.4f} val_acc {val_acc:.4f}  [{train_seconds:.0f}s]", flush=True)
        # Best on val accuracy; ties go to the lower val loss.
        if best is None or (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"]):
            best = {"epoch": epoch + 1, "val_acc": val_acc, "val_loss": val_loss}
            atomic_save({"model": model.state_dict(), "classes": classes, "epoch": epoch + 1}, out / "best.pt")
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                     "history": history, "best": best, "train_seconds": train_seconds, "classes": classes},
                    out / "last.pt")
        _write_history(history, out / "history.csv")
        if callback is not None and callback(row, model):
            break

    # Final evaluation with the best-on-val weights.
    best_state = torch.load(out / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best_state["model"])
    metrics = evaluate_subsets(model, used_rows, classes, saved_cfg, cfg.data, out, progress, device=device)
    metrics.update({
        "train_seconds": round(train_seconds, 3), "epochs": history[-1]["epoch"], "best_epoch": best["epoch"],
        "model": spec.name, "timm_name": spec.timm_name, "weights": cfg.weights, "image_size": cfg.image_size,
        "seed": cfg.seed, "strategy": cfg.strategy, "classes": classes, **frozen_info,
    })
    E.write_json(out / "metrics.json", metrics)
    E.plot_curves(history, out / "curves.png", f"{spec.name} · weights={Path(cfg.weights).name} · seed {cfg.seed}")
    return metrics


def _write_history(history, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def evaluate_subsets(model, rows, classes, cfg: dict, data_dir, out: Path, progress=False, device="cpu") -> dict:
    """Metrics + predictions CSV for val and test; confusion_matrix.png for test."""
    mean, std = M.normalization(model)
    tf = D.batch_transform(mean, std, augment=False)
    result = {}
    for subset in ("val", "test"):
        x, y, kept, _ = load_subset(rows, subset, classes, data_dir, cfg["image_size"], cfg.get("cache_dir"), "skip", progress)
        proba = E.predict_proba(model, x.to(device), tf, bf16=cfg.get("bf16", False), device=device,
                                channels_last=cfg.get("channels_last", True))
        result[subset] = E.compute_metrics(y.numpy(), proba, classes)
        E.write_predictions(out / f"predictions_{subset}.csv", [r["path"] for r in kept], y.tolist(), proba, classes)
    E.plot_confusion_matrix(result["test"]["confusion_matrix"], classes, out / "confusion_matrix.png",
                            f"{cfg['model']} · test")
    return result
