"""The report package on a real tiny grid: paper tables, ratios, external results, HTML, plots, split."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_transfer import report as R
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError
from ct_transfer.report import paper as P

PAPER_JSON = Path(__file__).resolve().parents[2] / "shared" / "paper" / "pardede2023.json"
RUN = "EfficientNetLite0__imagenet__seed0"
EXTERNAL = {"name": "ucsd-dev", "data": "/elsewhere/ucsd", "metrics": {
    "n": 541, "accuracy": 0.543, "precision": 0.5, "recall": 0.612, "f1": 0.55, "specificity": 0.483,
    "roc_auc": 0.571, "confusion_matrix": [[140, 150], [97, 154]], "positive_class": "COVID",
    "ci95": {"accuracy": [0.501, 0.585], "recall": [0.55, 0.67], "specificity": [0.425, 0.541],
             "f1": [0.5, 0.6], "roc_auc": [0.522, 0.62]}}}


def md_table(md: str, heading: str) -> list[list[str]]:
    """Body rows (cells as text) of the first markdown table after ``## heading``."""
    lines = md.splitlines()
    start = lines.index(f"## {heading}")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif rows:
            break
    return rows[2:]  # header and separator


def by_model(rows):
    return {r[0]: r for r in rows}


@pytest.fixture(scope="module")
def paper_json():
    return json.loads(PAPER_JSON.read_text())


@pytest.fixture(scope="module")
def report(tiny_grid, tmp_path_factory):
    """The report of the untouched grid: (out dir, report.md, summary)."""
    out = tmp_path_factory.mktemp("report")
    summary = R.write_report(tiny_grid, out)
    return out, (out / "report.md").read_text(), summary


@pytest.fixture(scope="module")
def external_report(tiny_grid, tmp_path_factory):
    """The report of a copy of the grid where one run has an external results file."""
    grid = tmp_path_factory.mktemp("ext") / "grid"
    shutil.copytree(tiny_grid, grid)
    target = grid / "runs" / RUN / "external" / "ucsd-dev"
    target.mkdir(parents=True)
    (target / "metrics.json").write_text(json.dumps(EXTERNAL))
    out = grid / "report"
    summary = R.write_report(grid, out)
    return grid, (out / "report.md").read_text(), summary


def test_resource_is_the_shared_paper_json(paper_json):
    assert R.paper_results() == paper_json
    assert "Pardede" in R.paper_results()["citation"]


@pytest.mark.parametrize("subset", ["val", "test"])
@pytest.mark.parametrize("key, table", [("accuracy", "val_accuracy"), ("f1", "val_f1")])
def test_tables_6_7_carry_every_paper_architecture(report, paper_json, subset, key, table):
    _, md, _ = report
    title = {"accuracy": "Table 6 — accuracy", "f1": "Table 7 — F1 score"}[key]
    rows = by_model(md_table(md, f"{title} ({subset})"))
    # the paper's 12 architectures, none run here: one line naming them, their values in report.json
    [collapsed] = [r for r in rows.values() if r[0].startswith("12 architectures not run: ")]
    assert collapsed[4] == collapsed[5] == "not run"
    assert [m.strip() for m in collapsed[0].split(": ", 1)[1].split(",")] == [t["model"] for t in paper_json["tables"]]
    assert not set(rows) & {t["model"] for t in paper_json["tables"]}
    beside = {r["model"]: r for r in report[2]["paper"]["beside"][subset][key]}
    for t in paper_json["tables"]:
        row = beside[t["model"]]
        assert row["paper"]["without"] == t[table]["without"] and row["paper"]["with"] == t[table]["with"]
        assert row["ours"] is None
    ours = rows["EfficientNetLite0"]  # ran here, not in the paper
    assert ours[1] == ours[2] == "not in paper"
    runs, _ = R.collect_runs(report[2]["grid"])
    value = {r["weights"]: r["metrics"][subset][key] for r in runs}
    assert ours[4] == f"{value['none']:.3f} (n=1)" and ours[5] == f"{value['imagenet']:.3f} (n=1)"
    assert float(ours[6]) == pytest.approx(value["imagenet"] - value["none"], abs=1e-3)


def test_table_8_times_equal_the_json(report, paper_json):
    rows = by_model(md_table(report[1], "Table 8 — training time"))
    beside = {r["model"]: r["paper"] for r in report[2]["paper"]["beside"]["test"]["train_seconds"]}
    for t in paper_json["tables"]:  # not run here: collapsed in the table, the values in report.json
        assert P.format_hms(beside[t["model"]]["without"]) == t["train_time"]["without"]
        assert P.format_hms(beside[t["model"]]["with"]) == t["train_time"]["with"]
    assert any(r[0].startswith("12 architectures not run") for r in rows.values())
    mean = next(r for r in rows.values() if r[0].startswith("**mean**"))
    by_hand = sum(t["train_time"]["without_seconds"] for t in paper_json["tables"]) / len(paper_json["tables"])
    assert by_hand == 2207 and mean[1] == "0:36:47"  # the paper's text says 0:36:52


def test_ratios_from_table_means_are_computed_by_hand(report, paper_json):
    _, md, summary = report
    tables = paper_json["tables"]
    acc_wo = sum(t["val_accuracy"]["without"] for t in tables) / len(tables)
    acc_wi = sum(t["val_accuracy"]["with"] for t in tables) / len(tables)
    sec_wo = sum(t["train_time"]["without_seconds"] for t in tables) / len(tables)
    sec_wi = sum(t["train_time"]["with_seconds"] for t in tables) / len(tables)
    ratios = summary["ratios"]["paper_tables"]
    assert ratios["accuracy_ratio"] == pytest.approx(acc_wi / acc_wo) == pytest.approx(1.1628, abs=1e-4)
    assert ratios["time_ratio"] == pytest.approx(sec_wo / sec_wi)
    assert summary["ratios"]["paper_abstract"]["accuracy_ratio"] == paper_json["abstract"]["accuracy_ratio"]
    rows = md_table(md, "Headline ratios")
    abstract = next(r for r in rows if r[0].startswith("paper, abstract"))
    from_tables = next(r for r in rows if r[0].startswith("paper, from its Table 6"))
    assert abstract[3] == "1.13×" and abstract[6] == "1.1×" and abstract[4].startswith("0.58 h")
    assert from_tables[3] == f"{acc_wi / acc_wo:.3f}×" and from_tables[6] == f"{sec_wo / sec_wi:.3f}×"
    # ours: the same formula on our runs
    runs, _ = R.collect_runs(summary["grid"])
    acc = {r["weights"]: r["metrics"]["test"]["accuracy"] for r in runs}
    ours = next(r for r in rows if r[0].startswith("ours, test"))
    expected = acc["imagenet"] / acc["none"] if acc["none"] else None
    assert ours[3] == ("—" if expected is None else f"{expected:.3f}×")
    assert "do not follow from the paper's own tables" in md


def test_without_external_results_the_report_says_so(report):
    md = report[1]
    section = md[md.index("## Internal vs external"):md.index("## Plots")]
    assert "No external validation was run" in section and "slice-level split is optimistic" in section
    assert report[2]["external"] == []


def test_external_results_appear_beside_internal(external_report):
    grid, md, summary = external_report
    section = md[md.index("## Internal vs external"):md.index("## Plots")]
    assert "No external validation" not in section
    assert "### EfficientNetLite0 — ImageNet weights" in section
    rows = md_table(section.replace("### EfficientNetLite0 — ImageNet weights", "## t"), "t")
    internal, external = rows
    test = json.loads((grid / "runs" / RUN / "metrics.json").read_text())["test"]
    def with_ci(key):  # one seed: the 95% interval the evaluation wrote (over images)
        lo, hi = test["ci95"][key]
        return f"{test[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    assert internal[0] == "internal test" and internal[3] == with_ci("accuracy")
    assert internal[4] == with_ci("recall") and internal[5] == with_ci("specificity")
    assert external[0] == "ucsd-dev (`/elsewhere/ucsd`)" and external[1:3] == ["1", "541"]
    assert external[3:] == ["0.543 [0.501, 0.585]", "0.612 [0.550, 0.670]", "0.483 [0.425, 0.541]",
                            "0.550 [0.500, 0.600]", "0.571 [0.522, 0.620]"]
    [group] = summary["external"]
    assert group["weights"] == "imagenet" and group["sets"][1]["metrics"]["accuracy"]["ci95"] == [0.501, 0.585]


def test_html_is_markdown_with_images_inlined(report):
    out, md, _ = report
    html = (out / "report.html").read_text()
    n_tables = sum(1 for line in md.splitlines() if line.startswith("|---"))
    assert html.count("<table>") == n_tables >= 6
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", html)
    assert len(images) == len(re.findall(r"^!\[", md, flags=re.M)) >= 6
    assert all(src.startswith("data:image/png;base64,") for src in images)
    png = base64.b64decode(images[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert "<h2>Table 6 — accuracy (val)</h2>" in html and "<strong>" in html


def test_figures_are_png_files(report):
    out, md, _ = report
    names = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", md, flags=re.M)
    assert "confusion_matrices.png" in names and "accuracy_val.png" in names
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200


def test_split_is_stated_at_the_top(report, tiny_grid, tmp_path):
    md = report[1]
    assert md.splitlines()[2].startswith("**Split: paper**")  # run_grid's default, recorded in grid.json
    assert report[2]["split"]["counts"]["test"] == {"COVID": 122, "non-COVID": 122}
    grid = tmp_path / "grid"
    shutil.copytree(tiny_grid, grid)
    info = json.loads((grid / "grid.json").read_text())
    assert info["split_preset"] == "paper"
    del info["split_preset"]
    (grid / "grid.json").write_text(json.dumps(info))  # an older grid.json: inferred from the counts
    assert R.describe_split(grid, R.read_grid_info(grid))["how"].startswith("inferred")
    info["settings"]["split_preset"] = "stratified"
    (grid / "grid.json").write_text(json.dumps(info))
    assert R.describe_split(grid, R.read_grid_info(grid))["name"] == "stratified"
    info["split_preset"] = "grouped"  # near-duplicate groups only: not patient-level, and the report says so
    (grid / "grid.json").write_text(json.dumps(info))
    split = R.describe_split(grid, R.read_grid_info(grid))
    assert split["name"] == "grouped" and not split["patient_level"]
    info["split_file"] = "/somewhere/ucsd_SPLIT.csv"
    (grid / "grid.json").write_text(json.dumps(info))
    assert R.describe_split(grid, R.read_grid_info(grid))["name"] == "ucsd_SPLIT.csv"


def test_bad_input_is_one_line_naming_the_file(tiny_grid, tmp_path, capsys):
    with pytest.raises(CTTransferError, match=f"^{re.escape(str(tmp_path))}: not a grid directory"):
        R.collect_runs(tmp_path)
    grid = tmp_path / "grid"
    shutil.copytree(tiny_grid, grid)
    bad = grid / "runs" / RUN / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(CTTransferError, match=f"^{re.escape(str(bad))}: not a readable JSON file"):
        R.collect_runs(grid)
    assert main(["report", str(grid), "--no-gallery"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err


def test_paper_rows_and_join():
    rows = P.paper_rows("train_seconds")
    assert [r["model"] for r in rows] == P.paper_models() and len(rows) == 12
    assert all(r["without"] == P.parse_hms(P.format_hms(r["without"])) for r in rows)
    joined = P.beside_paper([{"model": "EfficientNetV2L"}, {"model": "EfficientNetLite0"}], "accuracy")
    assert [j["model"] for j in joined][-1] == "EfficientNetLite0" and joined[-1]["paper"] is None
    assert next(j for j in joined if j["model"] == "EfficientNetV2L")["ours"] == {"model": "EfficientNetV2L"}
    assert next(j for j in joined if j["model"] == "DenseNet201")["ours"] is None


XSS = '<script>alert(1)</script><img src=x onerror=alert(2)>[click](javascript:alert(3))'


def test_strings_from_runs_are_escaped_in_report_html(tiny_grid, tmp_path):
    """A model name, a run's external set and its data path carrying HTML and a javascript: link:
    report.html shows them as text (Jinja2 autoescape before Markdown), nothing of them is live."""
    grid = tmp_path / "grid"
    shutil.copytree(tiny_grid, grid)
    for metrics_path in (grid / "runs").glob("*/metrics.json"):
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, "model": XSS}))
    target = grid / "runs" / RUN / "external" / "evil"
    target.mkdir(parents=True)
    (target / "metrics.json").write_text(json.dumps({**EXTERNAL, "name": XSS, "data": "/x/`` <b>y</b> ``"}))
    R.write_report(grid, grid / "report")
    html = (grid / "report" / "report.html").read_text()
    md = (grid / "report" / "report.md").read_text()
    for live in ("<script>alert", "<img src=x", "onerror=alert(2)>", 'href="javascript:', "<b>y</b>"):
        assert live not in html, live
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text
    assert html.count("&lt;script&gt;") >= 3  # summary line, tables, external section
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md


def test_report_opens_with_the_answer(external_report):
    grid, md, summary = external_report
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## The answer" and headings.index("## The answer") < headings.index(
        "## Table 6 — accuracy (val)")
    rows = md_table(md, "The answer")
    assert sorted(r[:3] for r in rows) == [["EfficientNetLite0", "imagenet", "1"], ["EfficientNetLite0", "none", "1"]]
    imagenet, scratch = sorted(rows, key=lambda r: r[1])
    test = json.loads((grid / "runs" / RUN / "metrics.json").read_text())["test"]
    lo, hi = test["ci95"]["accuracy"]
    assert imagenet[3] == f"{test['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert imagenet[4] == "not run"  # the paper split; no grouped grid given
    assert imagenet[5:9] == ["ucsd-dev (n=541)", "0.543 [0.501, 0.585]", "0.612 [0.550, 0.670] / 0.483 [0.425, 0.541]",
                             "0.571 [0.522, 0.620]"]
    assert "holds on ucsd-dev" in imagenet[9] or "drops on ucsd-dev" in imagenet[9]
    assert scratch[5] == "not run" and scratch[9].startswith("no external validation")
    [answer] = [a for a in summary["answer"] if a["weights"] == "imagenet"]
    assert answer["external"][0]["metrics"]["accuracy"]["ci95"] == [0.501, 0.585]


def test_answer_flags_chance_and_shows_audit_and_shift_check(tiny_grid, tmp_path, data_dir):
    from ct_transfer.audit import audit

    grid = tmp_path / "grid"
    shutil.copytree(tiny_grid, grid)
    target = grid / "runs" / RUN / "external" / "ucsd-dev"
    target.mkdir(parents=True)
    at_chance = json.loads(json.dumps(EXTERNAL))
    at_chance["metrics"].update(accuracy=0.52)
    at_chance["metrics"]["ci95"]["accuracy"] = [0.478, 0.562]
    (target / "metrics.json").write_text(json.dumps(at_chance))
    shift = {"n": 541, "flagged": 0.61, "val_flagged": 0.05, "p_value": 1e-30, "shifted": True, "detector": "energy",
             "verdict": "Unlike the run's training images: 61% of 541 images flagged (val: 5%)"}
    (target / "shift.json").write_text(json.dumps(shift))
    # a real audit of a few real images, beside the grid where the report finds it
    small = tmp_path / "small"
    for cls in ("COVID", "non-COVID"):
        (small / cls).mkdir(parents=True)
        for f in sorted((data_dir / cls).iterdir())[:6]:
            shutil.copy(f, small / cls / f.name)
    shutil.copy(small / "COVID" / "Covid (1).png", small / "non-COVID" / "copy.png")  # one exact duplicate
    audit(str(small), str(tmp_path / "audit"))
    summary = R.write_report(grid, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    answer = md[md.index("## The answer"):md.index("## Protocol")]
    row = by_model(md_table(md, "The answer"))["EfficientNetLite0"]
    imagenet = [r for r in md_table(md, "The answer") if r[1] == "imagenet"][0]
    assert "at chance on ucsd-dev" in imagenet[9] and "includes 0.5" in imagenet[9], row
    assert summary["audit"]["n_exact_pairs"] == 1 and summary["audit"]["n_images"] == 13
    assert "**Leakage audit**" in answer and "1 pixel-identical pair(s)" in answer and "13 images" in answer
    assert "**Shift check**" in answer and "61% of 541 images flagged (val: 5%)" in answer  # text escaped
    # an audit folder named on the command line; a missing one is a one-line error
    with pytest.raises(CTTransferError, match="no audit.json"):
        R.build_summary(grid, audit=tmp_path / "nowhere")


def test_report_of_a_single_run(trained_run, tmp_path, capsys):
    run_dir, metrics = trained_run
    run = tmp_path / "lite0"
    shutil.copytree(run_dir, run)
    assert main(["report", str(run), "--no-gallery"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"EfficientNetLite0 (imagenet, 1 seed(s)): internal test accuracy "
                                          f"{metrics['test']['accuracy']:.3f}")
    md = (run / "report" / "report.md").read_text()  # beside the run's files, not among them
    assert md.startswith("# Run lite0: report") and "**Split: stratified** — preset (config.json)" in md
    rows = md_table(md, "The answer")
    assert len(rows) == 1 and rows[0][3].startswith(f"{metrics['test']['accuracy']:.3f} [")
    assert "## Table 6 — accuracy (val)" in md
    # the model card's "not measured" list is part of the report
    cards = md.split("## Model cards", 1)[1]
    assert "`lite0`" in cards and "external validation (no other hospital" in cards
    # every plot has something drawn: no empty axes for the condition that was not run
    for name in re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", md, flags=re.M):
        with Image.open(run / "report" / name) as im:
            assert np.asarray(im.convert("L")).std() > 5, name


def test_a_linear_probe_curves_figure_is_not_empty(tmp_path):
    from ct_transfer.evaluate import curves_figure, save_figure

    one = [{"epoch": 1, "train_loss": 0.21, "val_loss": 0.6, "train_acc": 0.98, "val_acc": 0.75}]
    fig = curves_figure(one, "probe")
    assert all(ax.patches for ax in fig.axes) and "single fit" in fig.axes[0].get_xlabel()
    save_figure(fig, tmp_path / "curves.png")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]  # the bars' value labels
    assert "0.750" in texts and "0.210" in texts


def test_explanation_figure_at_the_image_resolution_with_a_colour_bar(tmp_path, data_dir):
    from ct_transfer.data import read_image
    from ct_transfer.evaluate import save_figure
    from ct_transfer.explain import overlay_figure

    image = read_image(data_dir / "COVID" / "Covid (5).png")
    h, w = image.shape[:2]
    heat = np.linspace(0, 1, h * w).reshape(h, w)
    fig = overlay_figure(image, heat, "Grad-CAM · pred COVID (p=0.9)")
    save_figure(fig, tmp_path / "o.png", dpi=fig.dpi)
    with Image.open(tmp_path / "o.png") as im:
        width, height = im.size
        shown = np.asarray(im.convert("RGB"))
    assert height > h and width > 2 * w  # both panels at full size, plus the title and the colour bar
    panel = fig.axes[0].get_window_extent()
    assert round(panel.width) == w and round(panel.height) == h  # one image pixel, one figure pixel
    bar = fig.axes[2]
    assert bar.get_ylim() == (0.0, 1.0)  # the colour bar spans the heat map's scale
    # the input panel shows the image's own pixels, unresampled
    assert np.array_equal(shown[height - h:, :w], image[:, :, :3])


def test_grouped_split_results_beside_the_grid(tiny_grid, tmp_path):
    grouped = tmp_path / "grouped"
    shutil.copytree(tiny_grid, grouped)
    info = json.loads((grouped / "grid.json").read_text())
    info["split_preset"] = "grouped"  # as `experiment --split-preset grouped` records it
    (grouped / "grid.json").write_text(json.dumps(info))
    summary, _, _ = R.build_summary(tiny_grid, grouped=grouped)
    runs, _ = R.collect_runs(grouped)
    for a in summary["answer"]:
        [run] = [r for r in runs if r["weights"] == a["weights"]]
        assert a["grouped"]["accuracy"]["mean"] == run["metrics"]["test"]["accuracy"]
        assert a["grouped_from"] == "1 run(s) on the grouped split"
        assert not any("no grouped-split result" in n for n in a["verdict"])
    own, _, _ = R.build_summary(grouped)  # a grid on the grouped split is its own grouped figure
    assert all(a["grouped_from"] == "this split" for a in own["answer"])
    with pytest.raises(CTTransferError, match="its split is paper, not grouped"):
        R.build_summary(grouped, grouped=tiny_grid)
