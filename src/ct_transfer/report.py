"""Report: the paper's Tables 6-8 from a grid, our statistics beside them, plots, markdown + HTML."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import stats

from .errors import CTTransferError
from .evaluate import read_predictions

CONDITIONS = ("none", "imagenet")  # "without" and "with" transfer learning


def paper_results() -> dict:
    return json.loads(resources.files("ct_transfer").joinpath("data/paper_results.json").read_text())


# ---------------------------------------------------------------------------------------------
# Collecting runs
# ---------------------------------------------------------------------------------------------


def collect_runs(grid_dir) -> tuple[list[dict], list[dict]]:
    """(finished runs, failed/unfinished runs) of a grid directory."""
    grid_dir = Path(grid_dir)
    runs_dir = grid_dir / "runs"
    if not runs_dir.is_dir():
        raise CTTransferError(f"{grid_dir}: not a grid directory (no runs/ folder)")
    done, other = [], []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if (run_dir / "metrics.json").exists():
            m = json.loads((run_dir / "metrics.json").read_text())
            cfg = json.loads((run_dir / "config.json").read_text())
            history = []
            if (run_dir / "history.csv").exists():
                with open(run_dir / "history.csv", newline="") as fh:
                    history = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
            w = cfg["weights"] if cfg["weights"] in CONDITIONS else "file"
            done.append({"dir": run_dir, "name": run_dir.name, "model": m["model"], "weights": w,
                         "seed": m["seed"], "strategy": m.get("strategy", "full"), "metrics": m,
                         "history": history, "config": cfg})
        else:
            err = (run_dir / "error.txt").read_text().strip() if (run_dir / "error.txt").exists() else "unfinished"
            other.append({"name": run_dir.name, "error": err})
    return done, other


def group_runs(runs: list[dict]) -> dict:
    """{model: {condition: [runs sorted by seed]}} in first-seen model order."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["model"], {}).setdefault(r["weights"], []).append(r)
    for conds in out.values():
        for lst in conds.values():
            lst.sort(key=lambda r: r["seed"])
    return out


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def mean_std_ci(values) -> dict:
    """Mean, sample std and a 95% t confidence interval (None where fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(v.mean())
    if len(v) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1) * std / math.sqrt(len(v)))
    return {"n": int(len(v)), "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def correctness(run: dict, subset: str = "test") -> dict[str, bool]:
    paths, true, proba, classes = read_predictions(run["dir"] / f"predictions_{subset}.csv")
    pred = [classes[i] for i in proba.argmax(1)]
    return {p: t == q for p, t, q in zip(paths, true, pred)}


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value from the discordant counts (b: only A right, c: only B right)."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)


def paired_comparison(with_runs: list[dict], without_runs: list[dict], n_boot: int = 10_000,
                      seed: int = 0, subset: str = "test") -> dict:
    """ImageNet vs scratch on the same test images.

    McNemar (exact) on discordant pairs pooled over seed pairs, and a paired bootstrap over test
    images of the accuracy difference (each image's correctness averaged over seeds).
    """
    a = [correctness(r, subset) for r in with_runs]
    b = [correctness(r, subset) for r in without_runs]
    images = sorted(set.intersection(*(set(x) for x in a + b)))
    if not images:
        return {}
    ca = np.array([[x[p] for p in images] for x in a], dtype=float)
    cb = np.array([[x[p] for p in images] for x in b], dtype=float)
    k = min(len(a), len(b))
    only_a = int(sum(((ca[i] == 1) & (cb[i] == 0)).sum() for i in range(k)))
    only_b = int(sum(((ca[i] == 0) & (cb[i] == 1)).sum() for i in range(k)))
    diff_per_image = ca.mean(0) - cb.mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(images), size=(n_boot, len(images)))
    boot = diff_per_image[idx].mean(1)
    observed = float(diff_per_image.mean())
    p_boot = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    p_mc = mcnemar_exact(only_a, only_b)
    lo, hi = float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
    if lo > 0:
        verdict = "ImageNet better"
    elif hi < 0:
        verdict = "scratch better"
    else:
        verdict = "no significant difference"
    return {"n_images": len(images), "seed_pairs": k, "n_boot": n_boot, "only_imagenet_right": only_a, "only_scratch_right": only_b,
            "mcnemar_p": p_mc, "acc_diff": observed, "bootstrap_ci95": [lo, hi], "bootstrap_p": p_boot,
            "verdict": verdict}


def metric_values(runs: list[dict], key: str, subset: str) -> list[float]:
    if key == "train_seconds":
        return [r["metrics"]["train_seconds"] for r in runs]
    return [r["metrics"][subset][key] for r in runs]


def build_tables(groups: dict, subset: str) -> dict:
    """Per metric (accuracy, f1, train_seconds): rows per model with without/with/difference."""
    tables = {}
    for key in ("accuracy", "f1", "train_seconds"):
        rows = []
        for model, conds in groups.items():
            wo = mean_std_ci(metric_values(conds.get("none", []), key, subset))
            wi = mean_std_ci(metric_values(conds.get("imagenet", []), key, subset))
            diff = wi["mean"] - wo["mean"] if wi["mean"] is not None and wo["mean"] is not None else None
            rows.append({"model": model, "without": wo, "with": wi, "difference": diff})
        both = [r for r in rows if r["difference"] is not None]
        mean_row = None
        if both:
            mean_row = {"without": float(np.mean([r["without"]["mean"] for r in both])),
                        "with": float(np.mean([r["with"]["mean"] for r in both])),
                        "difference": float(np.mean([r["difference"] for r in both])), "n_models": len(both)}
        tables[key] = {"rows": rows, "mean": mean_row}
    return tables


def headline_ratios(tables: dict) -> dict:
    """The paper's two ratios: mean accuracy with/without TL; mean time without/with TL."""
    acc, t = tables["accuracy"]["mean"], tables["train_seconds"]["mean"]
    return {
        "accuracy_ratio": acc["with"] / acc["without"] if acc and acc["without"] else None,
        "time_ratio": t["without"] / t["with"] if t and t["with"] else None,
        "n_models": acc["n_models"] if acc else 0,
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(tables: dict, key: str, path: Path, ylabel: str, title: str) -> None:
    plt = _plt()
    rows = tables[key]["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 3.6))
    for off, cond, label, color in ((-0.2, "without", "from scratch", "#999999"), (0.2, "with", "ImageNet", "#1f77b4")):
        means = [r[cond]["mean"] if r[cond]["mean"] is not None else 0 for r in rows]
        errs = [r[cond]["std"] or 0 for r in rows]
        ax.bar(x + off, means, 0.4, yerr=errs, label=label, color=color, capsize=3)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_curves(groups: dict, path: Path) -> None:
    plt = _plt()
    models = list(groups)
    cols = min(3, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for cond, color in (("none", "#999999"), ("imagenet", "#1f77b4")):
            for r in groups[model].get(cond, []):
                h = r["history"]
                ax.plot([e["epoch"] for e in h], [e["val_acc"] for e in h], color=color, alpha=0.8,
                        label=f"{'ImageNet' if cond == 'imagenet' else 'scratch'} s{r['seed']}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_grid(runs: list[dict], path: Path) -> None:
    plt = _plt()
    cols = min(6, len(runs))
    nrows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols, 2.4 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, runs):
        cm = np.asarray(r["metrics"]["test"]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        cond = "IN" if r["weights"] == "imagenet" else r["weights"]
        ax.set_title(f"{r['model']}\n{cond} s{r['seed']}", fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle("test confusion matrices (rows: true, cols: predicted; negative first)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _p(p: float, n_boot: int) -> str:
    """A bootstrap p of 0 only says 'below the resolution of n_boot resamples'."""
    return f"< {1 / n_boot:.0e}" if p == 0 else f"{p:.2g}"


def _fmt(stat: dict, key: str) -> str:
    if stat["mean"] is None:
        return "—"
    scale = 1 / 60 if key == "train_seconds" else 1
    s = f"{stat['mean'] * scale:.3f}" if key != "train_seconds" else f"{stat['mean'] * scale:.1f}"
    if stat["std"] is not None:
        s += f" ± {stat['std'] * scale:.3f}" if key != "train_seconds" else f" ± {stat['std'] * scale:.1f}"
    return s


def _table_md(table: dict, key: str, paper: dict) -> list[str]:
    unit = " (min)" if key == "train_seconds" else ""
    pkey = {"accuracy": "accuracy", "f1": "f1", "train_seconds": "hours"}[key]
    lines = [f"| model | without TL{unit} | with TL{unit} | difference | paper without | paper with | paper difference |",
             "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        diff = "—" if r["difference"] is None else (f"{r['difference'] / 60:+.1f}" if key == "train_seconds" else f"{r['difference']:+.3f}")
        p = paper.get("per_model", {}).get(r["model"], {})
        pw, pi = p.get(f"{pkey}_without"), p.get(f"{pkey}_with")
        pd = f"{pi - pw:+.3f}" if pw is not None and pi is not None else "—"
        lines.append(f"| {r['model']} | {_fmt(r['without'], key)} | {_fmt(r['with'], key)} | {diff} | "
                     f"{'—' if pw is None else pw} | {'—' if pi is None else pi} | {pd} |")
    m = table["mean"]
    if m:
        avg = paper["average"]
        pw, pi = avg.get(f"{pkey}_without"), avg.get(f"{pkey}_with")
        scale = 1 / 60 if key == "train_seconds" else 1
        fmt = (lambda v: f"{v * scale:.1f}") if key == "train_seconds" else (lambda v: f"{v:.3f}")
        lines.append(f"| **mean ({m['n_models']} models)** | {fmt(m['without'])} | {fmt(m['with'])} | "
                     f"{'+' if m['difference'] >= 0 else ''}{fmt(m['difference'])} | {'—' if pw is None else pw} | "
                     f"{'—' if pi is None else pi} | {'—' if pw is None or pi is None else f'{pi - pw:+.2f}'} |")
    return lines


def write_report(grid_dir, out_dir=None, extra_sections: list[str] | None = None) -> dict:
    """Write report.md, report.html (images embedded) and report.json into ``out_dir`` (default: grid)."""
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir else grid_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, failed = collect_runs(grid_dir)
    if not runs:
        raise CTTransferError(f"{grid_dir}: no finished runs to report")
    runs = [r for r in runs if r["weights"] in CONDITIONS]
    groups = group_runs(runs)
    paper = paper_results()
    grid_info = json.loads((grid_dir / "grid.json").read_text()) if (grid_dir / "grid.json").exists() else {}

    tables = {s: build_tables(groups, s) for s in ("val", "test")}
    ratios = headline_ratios(tables["test"])
    comparisons = {}
    for model, conds in groups.items():
        if conds.get("none") and conds.get("imagenet"):
            comparisons[model] = paired_comparison(conds["imagenet"], conds["none"])

    plot_bars(tables["test"], "accuracy", out_dir / "accuracy.png", "test accuracy", "Test accuracy (mean ± std over seeds)")
    plot_bars(tables["test"], "f1", out_dir / "f1.png", "test F1", "Test F1 (mean ± std over seeds)")
    plot_bars(tables["test"], "train_seconds", out_dir / "train_time.png", "seconds", "Training time per run")
    plot_val_curves(groups, out_dir / "val_curves.png")
    plot_confusion_grid(runs, out_dir / "confusion_matrices.png")

    epochs = sorted({r["metrics"]["epochs"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    sizes = sorted({r["metrics"]["image_size"] for r in runs})
    strategies = sorted({r["strategy"] for r in runs})
    md = ["# Transfer learning vs training from scratch: experiment report", "",
          f"Grid: `{grid_dir}` — {len(runs)} finished runs, {len(failed)} failed or unfinished. "
          f"Models: {', '.join(groups)}. Seeds: {', '.join(map(str, seeds))}. Epochs: {', '.join(map(str, epochs))}. "
          f"Image size: {', '.join(map(str, sizes))} px. Strategy: {', '.join(strategies)}.", ""]
    if epochs and max(epochs) < 100:
        md += [f"**Reduced protocol:** these runs trained {', '.join(map(str, epochs))} epochs, not the paper's 100.", ""]
    if grid_info.get("settings"):
        s = grid_info["settings"]
        md += [f"Settings: batch {s.get('batch_size')}, lr {s.get('lr')}, dropout {s.get('dropout')}, "
               f"augmentation {'on' if s.get('augment', True) else 'off'}, limit {s.get('limit') or 'none'}.", ""]
    md += [f"Paper figures: {paper['citation']}. {paper['source_note']}", ""]
    titles = {"accuracy": "Table 6 — accuracy", "f1": "Table 7 — F1 score", "train_seconds": "Table 8 — training time"}
    for subset in ("test", "val"):
        for key in ("accuracy", "f1", "train_seconds"):
            if key == "train_seconds" and subset == "val":
                continue
            heading = titles[key] if key == "train_seconds" else f"{titles[key]} ({subset})"
            md += [f"## {heading}", ""] + _table_md(tables[subset][key], key, paper) + [""]
    pa = paper["average"]
    fr = lambda v: "—" if v is None else f"{v:.2f}×"
    md += ["## Headline ratios", "",
           "| | accuracy with TL / without | time without TL / with |", "|---|---|---|",
           f"| paper (published) | {pa['accuracy_ratio']:.2f}× | {pa['time_ratio']:.1f}× |",
           f"| paper (from its averages) | {pa['accuracy_with'] / pa['accuracy_without']:.2f}× | {pa['hours_without'] / pa['hours_with']:.2f}× |",
           f"| ours, same formula (test, {ratios['n_models']} models) | {fr(ratios['accuracy_ratio'])} | {fr(ratios['time_ratio'])} |", ""]
    if comparisons:
        md += ["## Does transfer learning beat training from scratch? (test set, paired)", "",
               "Same test images for both conditions. McNemar: exact test on images only one condition got right, "
               "pooled over seed pairs. Bootstrap: 10,000 resamples of test images, accuracy difference "
               "(ImageNet − scratch) with each image's correctness averaged over seeds.", "",
               "| model | seeds | acc. ImageNet (mean, 95% CI) | acc. scratch (mean, 95% CI) | difference [95% CI] | McNemar p | bootstrap p | verdict |",
               "|---|---|---|---|---|---|---|---|"]
        rows_by_model = {r["model"]: r for r in tables["test"]["accuracy"]["rows"]}
        for model, c in comparisons.items():
            row = rows_by_model[model]
            ci = lambda s: f"{s['mean']:.3f}" + (f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["ci95"] else "")
            md.append(f"| {model} | {c['seed_pairs']} | {ci(row['with'])} | {ci(row['without'])} | {c['acc_diff']:+.3f} "
                      f"[{c['bootstrap_ci95'][0]:+.3f}, {c['bootstrap_ci95'][1]:+.3f}] | {c['mcnemar_p']:.2g} | "
                      f"{_p(c['bootstrap_p'], c['n_boot'])} | {c['verdict']} |")
        md.append("")
    md += ["## Plots", "", "![accuracy](accuracy.png)", "", "![F1](f1.png)", "", "![training time](train_time.png)", "",
           "![validation curves](val_curves.png)", "", "![confusion matrices](confusion_matrices.png)", ""]
    for section in extra_sections or []:
        md += [section, ""]
    md += ["## Runs", "", "| run | test acc | test F1 | test AUC | val acc | best epoch | train s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        auc = m["test"].get("roc_auc")
        md.append(f"| {r['name']} | {m['test']['accuracy']:.4f} | {m['test']['f1']:.4f} | "
                  f"{'—' if auc is None else f'{auc:.4f}'} | {m['val']['accuracy']:.4f} | {m.get('best_epoch', '—')} | "
                  f"{m['train_seconds']:.0f} |")
    if failed:
        md += ["", "## Failed or unfinished runs", ""] + [f"- `{f['name']}`: {f['error']}" for f in failed]
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.html").write_text(markdown_to_html(text, out_dir))
    summary = {"tables": tables, "ratios": ratios, "comparisons": comparisons,
               "runs": [r["name"] for r in runs], "failed": failed}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def markdown_to_html(text: str, image_dir: Path) -> str:
    """A small converter for the report's own markdown (headings, tables, images, paragraphs)."""
    body, table = [], []

    def inline(s):
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def flush():
        if table:
            rows = [r for r in table if not re.match(r"^\|[-|]+\|$", r)]
            out = ["<table>"]
            for i, r in enumerate(rows):
                cells = [c.strip() for c in r.strip("|").split("|")]
                tag = "th" if i == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
            body.append("\n".join(out + ["</table>"]))
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.match(r"^(#+) (.*)", line):
            body.append(f"<h{len(m.group(1))}>{inline(m.group(2))}</h{len(m.group(1))}>")
        elif m := re.match(r"^!\[(.*)\]\((.*)\)$", line):
            img = image_dir / m.group(2)
            if img.exists():
                data = base64.b64encode(img.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>ct-transfer report</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"


def cmd_report(args):
    extra = []
    if not args.no_gallery:
        from .explain import gallery_section

        section = gallery_section(args.grid_dir, args.out or args.grid_dir, args.method)
        if section:
            extra.append(section)
    summary = write_report(args.grid_dir, args.out, extra)
    where = Path(args.out or args.grid_dir)
    ratio = summary["ratios"]["accuracy_ratio"]
    ratio_text = "n/a" if ratio is None else f"{ratio:.3f}"
    print(f"{len(summary['runs'])} runs reported; accuracy ratio (with/without TL) {ratio_text}")
    print(f"wrote {where / 'report.md'} and {where / 'report.html'}")


def add_cli(sub) -> None:
    p = sub.add_parser("report", help="tables, statistics and plots of a grid (report.md + report.html)")
    p.add_argument("grid_dir")
    p.add_argument("--out", help="output folder (default: the grid directory)")
    p.add_argument("--method", default="gradcam", help="explanation method of the gallery")
    p.add_argument("--no-gallery", action="store_true", help="leave out the explanation gallery")
    p.set_defaults(func=cmd_report)
