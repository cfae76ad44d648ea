"""Render: report.md from a Jinja2 template, report.html from it by Python-Markdown (images inlined).

Numbers are formatted by the filters below; the templates only lay them out.

Escaping: both templates are rendered with Jinja2's autoescape, so every value that reaches a
report (a model name, a run folder, a class, a path, an error message) is HTML-escaped by the
template engine before Markdown sees it; raw HTML cannot come from data. Filters that write
Markdown syntax return ``Markup`` and escape what they wrap (``cell``) or rely on Markdown's own
escaping of code spans (``code``). Links whose scheme is not http(s)/mailto are dropped when the
HTML is made (a ``[x](javascript:...)`` written by Markdown from a value).
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
from pathlib import Path

import markdown
from jinja2 import Environment, PackageLoader, StrictUndefined
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor
from markupsafe import Markup, escape

from ..evaluate import format_with_ci
from .paper import TABLE_NUMBERS, format_hms

log = logging.getLogger(__name__)

PAPER_EPOCHS = 100
METRIC_TITLES = {"accuracy": "accuracy", "f1": "F1 score", "train_seconds": "training time"}
SETTINGS = (("batch_size", "batch {}"), ("lr", "lr {}"), ("dropout", "dropout {}"),
            ("limit", "at most {} images per class"), ("split_seed", "split seed {}"), ("device", "device {}"))
EXTERNAL_COLUMNS = (("accuracy", "accuracy"), ("recall", "sensitivity"), ("specificity", "specificity"),
                    ("f1", "F1"), ("roc_auc", "AUC"))


# ---------------------------------------------------------------------------------------------
# Filters: one place decides how a number, a statistic or a cell of text is written
# ---------------------------------------------------------------------------------------------


def cell(text) -> Markup:
    """Text safe inside a markdown table cell: HTML-escaped, no column breaks."""
    return escape(str(text)).replace("|", Markup("\\|"))


def code(text) -> Markup:
    """An inline code span (a message, a path). Markdown escapes a code span's content itself, so
    the text goes in as it is; the fence is longer than any run of backticks inside, so the text
    cannot end the span early."""
    text = " ".join(str(text).split())
    runs = [len(r) for r in re.findall(r"`+", text)]
    if not runs:
        return Markup(f"`{text}`")  # a code span: Markdown escapes its content
    fence = "`" * (max(runs) + 1)
    return Markup(f"{fence} {text} {fence}")


def num(value, key: str = "accuracy", decimals: int = 1) -> str:
    """A metric value (3 decimals) or a time (H:MM:SS.s: short test runs last seconds); '—' for None."""
    if value is None:
        return "—"
    return format_hms(value, decimals=decimals) if key == "train_seconds" else f"{value:.3f}"


def signed(value, key: str = "accuracy", decimals: int = 1) -> str:
    if value is None:
        return "—"
    if key == "train_seconds":
        return ("-" if value < 0 else "+") + format_hms(abs(value), decimals=decimals)
    return f"{value:+.3f}"


def stat(s: dict | None, key: str = "accuracy") -> str:
    """Our cell: mean ± std (n seeds) [95% interval]; 'not run' when there is no run."""
    if not s or s["mean"] is None:
        return "not run"
    spread = "" if s["std"] is None else (f" ± {s['std']:.1f} s" if key == "train_seconds" else f" ± {s['std']:.3f}")
    ci = s.get("ci95")
    interval = "" if not ci else f" [{num(ci[0], key)}, {num(ci[1], key)}]"
    return f"{num(s['mean'], key)}{spread} (n={s['n']}){interval}"


def value_ci(s: dict) -> str:
    """External tables: value [95% interval] (mean ± std over seeds first when several)."""
    if s["mean"] is None:
        return "—"
    text = f"{s['mean']:.3f}" if s["std"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
    ci = s.get("ci95")
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def metric_ci(m: dict, key: str) -> str:
    """One run's metric with the 95% interval its evaluation wrote: ``0.951 [0.915, 0.972]``."""
    return format_with_ci(m, key, digits=3, missing="—")


def operating(m: dict) -> str:
    """Sensitivity / specificity at the val-chosen threshold (with intervals); '—' for uncalibrated runs."""
    op = m.get("operating_point")
    if not op:
        return "—"
    return f"{metric_ci(op, 'sensitivity')} / {metric_ci(op, 'specificity')} (t={op['threshold']:.3f})"


def ratio(value, digits: int | None = 3) -> str:
    """1.163× ; ``digits=None`` writes the number as given (the abstract's 1.1 stays 1.1)."""
    if value is None:
        return "—"
    return f"{value:g}×" if digits is None else f"{value:.{digits}f}×"


def pvalue(p: float, n_boot: int | None = None) -> str:
    """A bootstrap p of 0 only says 'below the resolution of n_boot resamples'."""
    if p == 0 and n_boot:
        return f"< {1 / n_boot:.0e}"
    return f"{p:.2g}"


def settings_text(settings: dict) -> str:
    """The grid's training settings that grid.json records, in a fixed order."""
    parts = [label.format(settings[key]) for key, label in SETTINGS if settings.get(key) is not None]
    if "augment" in settings:
        parts.append(f"augmentation {'on' if settings['augment'] else 'off'}")
    return ", ".join(parts)


def hours(h: float) -> str:
    return f"{h:g} h ({format_hms(h * 3600)})"


def _env() -> Environment:
    # autoescape for every template (the names end in .j2, which select_autoescape would not match)
    env = Environment(loader=PackageLoader("ct_transfer.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(cell=cell, code=code, num=num, signed=signed, stat=stat, value_ci=value_ci, ratio=ratio,
                       metric_ci=metric_ci, operating=operating,
                       pvalue=pvalue, hours=hours, hms=format_hms,
                       settings_text=settings_text)
    return env


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _run_rows(runs: list[dict]) -> list[dict]:
    return [{"name": r["name"], "test": r["metrics"]["test"], "val": r["metrics"]["val"],
             "best_epoch": r["metrics"].get("best_epoch", "—"), "train_seconds": r["metrics"].get("train_seconds"),
             "external": [e["name"] for e in r["external"]],
             "patients": r["metrics"]["test"].get("patients"), **_card(r.get("dir"))} for r in runs]


def _card(run_dir) -> dict:
    """The run's model card (``modelcard``): where it is and what it says was not measured."""
    from ..errors import CTTransferError
    from ..modelcard import card_facts

    if run_dir is None:
        return {"card": None, "not_measured": []}
    try:
        facts = card_facts(run_dir)
    except CTTransferError:
        return {"card": None, "not_measured": []}
    path = Path(run_dir) / "model_card.md"
    return {"card": str(path) if path.is_file() else None, "not_measured": facts.get("not_measured") or []}


def render_markdown(summary: dict, *, runs: list[dict], plots: dict[str, str], extra_sections: list[str]) -> str:
    """report.md's text from report.json's content (``summary``) and the written plots."""
    protocol = summary["protocol"]
    context = {
        **summary, "plots": plots, "extra_sections": extra_sections,
        "run_rows": _run_rows(runs), "table_numbers": TABLE_NUMBERS, "titles": METRIC_TITLES,
        "external_columns": EXTERNAL_COLUMNS, "paper_epochs": PAPER_EPOCHS,
        # a linear probe is one convex fit: epochs do not apply to it
        "reduced": bool(protocol["epochs"]) and max(protocol["epochs"]) < PAPER_EPOCHS
                   and protocol["strategies"] != ["linear"],
    }
    return _env().get_template("report.md.j2").render(context)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _EmbedImages(Treeprocessor):
    """Replace each <img src="relative/file"> under ``base_dir`` by a data: URI."""

    def __init__(self, md, base_dir: Path):
        super().__init__(md)
        self.base_dir = base_dir.resolve()

    def run(self, root):
        for img in root.iter("img"):
            src = img.get("src", "")
            if src.startswith("data:"):
                continue
            path = (self.base_dir / src).resolve()
            if path.is_file() and path.is_relative_to(self.base_dir):
                img.set("src", data_uri(path))
            else:  # left as a link: the page is then not self-contained, so say so
                log.warning("report image %s not found under %s; left as a link", src, self.base_dir)


class _SafeLinks(Treeprocessor):
    """Drop link targets whose scheme could run code (``javascript:``, ``data:`` ...): only
    http(s), mailto and relative links stay."""

    SAFE = re.compile(r"^(https?:|mailto:|#|/|\.|[^:/?#]*([/?#]|$))", re.IGNORECASE)

    def run(self, root):
        for a in root.iter("a"):
            href = "".join(a.get("href", "").split())  # browsers ignore whitespace inside the scheme
            if not self.SAFE.match(href):
                log.warning("report link %r dropped (not an http(s), mailto or relative link)", href[:80])
                del a.attrib["href"]


class EmbedImages(Extension):
    def __init__(self, base_dir: Path):
        super().__init__()
        self.base_dir = Path(base_dir)

    def extendMarkdown(self, md):  # noqa: N802 (Python-Markdown's name)
        # priority below 'inline' (20): <img> elements exist only after inline patterns ran
        md.treeprocessors.register(_EmbedImages(md, self.base_dir), "embed_images", 5)
        md.treeprocessors.register(_SafeLinks(md), "safe_links", 4)


def markdown_to_html(text: str, *, image_dir) -> str:
    """The HTML body of a markdown text, images under ``image_dir`` embedded as data: URIs."""
    return markdown.markdown(text, extensions=["tables", EmbedImages(Path(image_dir))], output_format="html")


def render_html(md_text: str, *, image_dir, title: str = "ct-transfer report") -> str:
    """A self-contained HTML page of report.md."""
    body = Markup(markdown_to_html(md_text, image_dir=image_dir))  # noqa: S704 (our own converted markdown)
    return _env().get_template("report.html.j2").render(title=title, body=body)
