"""The ``ct-transfer`` command line: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CTTransferError


def _add_train_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    p.add_argument("--data", required=True, help="dataset folder, one sub-folder per class")
    p.add_argument("--split-file", help="split CSV (path,class,subset) to reuse")
    p.add_argument("--split-preset", choices=["stratified", "paper"], default="stratified",
                   help="split made when no --split-file is given (default: stratified 80:10:10)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--image-size", type=int, help="default: the model table's size (64; Xception 71; InceptionResNetV2 75)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dropout", type=float, default=0.8)
    p.add_argument("--limit", type=int, help="at most N images per class (quick trials)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="switch off the paper's augmentation")
    p.add_argument("--freeze-until", type=int, help="partial: last frozen stage (timm parameter group, 0 = stem)")
    p.add_argument("--frozen-views", type=int, default=2, help="frozen + augmentation: augmented views cached per image")
    p.add_argument("--positive", help="positive class (default COVID if present)")
    p.add_argument("--on-bad", choices=["error", "skip"], default="error", help="unreadable images: stop, or skip and list them")
    p.add_argument("--cache-dir", help="on-disk cache of decoded images, keyed by file content")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fp32 master weights)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if not grid:
        p.add_argument("--model", required=True, help="paper name (see `ct-transfer models`) or any timm name")
        p.add_argument("--weights", default="none", help="none | imagenet | PATH to a timm state dict")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--strategy", choices=["full", "partial", "frozen"], default="full")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")


def _train_config(args, **overrides):
    from .train import TrainConfig

    keys = ["data", "split_file", "split_preset", "split_seed", "epochs", "image_size", "batch_size", "lr",
            "dropout", "limit", "augment", "freeze_until", "frozen_views", "positive", "on_bad", "cache_dir",
            "channels_last", "bf16", "compile", "threads", "device"]
    d = {k: getattr(args, k) for k in keys}
    for k in ("model", "weights", "seed", "strategy", "out"):
        if hasattr(args, k):
            d[k] = getattr(args, k)
    d.update(overrides)
    return TrainConfig(**d)


def cmd_models(args):
    from .models import model_table_rows

    rows = model_table_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<20}{'timm name':<26}{'size':>5}{'params (M)':>12}  {'ImageNet offline':<17}in paper")
    for r in rows:
        print(f"{r['name']:<20}{r['timm_name']:<26}{r['image_size']:>5}{r['params_m']:>12.2f}  "
              f"{'yes' if r['imagenet_offline'] else 'no':<17}{'yes' if r['in_paper'] else 'no'}")


def cmd_split(args):
    from . import data as D

    items, classes = D.scan_folder(args.data)
    rows = D.make_split(items, args.preset, args.seed)
    D.write_split(rows, args.out)
    counts = D.split_counts(rows)
    for subset in D.SUBSETS:
        print(f"{subset:<6}" + "  ".join(f"{c}: {counts.get(subset, {}).get(c, 0)}" for c in classes))
    if not args.no_duplicates:
        pairs = D.pixel_duplicates_across_subsets(rows, args.data)
        print(f"exact duplicates (same decoded pixels) across subsets: {len(pairs)}")
        for a, b in pairs:
            print(f"  {a} = {b}")
    print(f"wrote {args.out}")


def cmd_train(args):
    from .train import train

    metrics = train(_train_config(args), progress=not args.quiet, resume=args.resume)
    _print_metrics(metrics, args.out)


def _print_metrics(metrics, where):
    for subset in ("val", "test"):
        m = metrics[subset]
        auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.4f}"
        print(f"{subset:<5} acc {m['accuracy']:.4f}  prec {m['precision']:.4f}  rec {m['recall']:.4f}  "
              f"f1 {m['f1']:.4f}  auc {auc}  cm {m['confusion_matrix']}  (n={m['n']})")
    if "train_seconds" in metrics:
        print(f"train_seconds {metrics['train_seconds']:.1f}")
    print(f"wrote {Path(where) / 'metrics.json'}")


def cmd_evaluate(args):
    from .evaluate import evaluate_run

    metrics = evaluate_run(args.run, args.data, args.split_file, progress=False)
    _print_metrics(metrics, args.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ct-transfer", description="CT-scan classification by transfer learning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="the model table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("split", help="write a train/val/test split CSV")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=["stratified", "paper"], default="stratified")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-duplicates", action="store_true", help="skip the cross-subset duplicate check")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", help="train and evaluate one model")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint on val and test")
    p.add_argument("--run", required=True)
    p.add_argument("--data")
    p.add_argument("--split-file")
    p.set_defaults(func=cmd_evaluate)

    _add_later_commands(sub)
    return parser


def _add_later_commands(sub) -> None:
    """experiment / report / predict / explain / export (registered from their modules)."""
    for name in ("experiment", "report", "predict", "explain", "export"):
        try:
            module = __import__(f"ct_transfer.{name}", fromlist=["add_cli"])
        except ImportError as exc:
            if exc.name and exc.name.startswith("ct_transfer"):
                continue
            raise
        module.add_cli(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CTTransferError as exc:
        print(f"ct-transfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ct-transfer: interrupted (a run continues with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
