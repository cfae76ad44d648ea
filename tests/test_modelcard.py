"""Model cards (#23): written at the end of fit and by `ct-transfer card`, from what the run recorded;
internal and external results with their intervals, and "not measured" for what the run lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from ct_transfer.cli import main
from ct_transfer.modelcard import NOT_MEASURED, card_facts, model_card

UCSD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ucsd-covid-ct-dev"


def _row(card: str, name: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(f"| {name} |"))


def test_fit_writes_a_card_that_says_what_was_not_measured(trained_run):
    out, metrics = trained_run
    card = (out / "model_card.md").read_text()
    assert card == model_card(out)  # the same generator, from the same files
    assert "EfficientNetLite0" in card and "tf_efficientnet_lite0" in card and "SARS-CoV-2 CT-scan dataset" in card
    test = metrics["test"]
    lo, hi = test["ci95"]["accuracy"]
    assert f"{test['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in _row(card, "internal test")
    assert f"| {test['n']} |" in _row(card, "internal test")
    # this run has no external result, no grouped split, no calibration, no audit; fit gave it a guard
    assert NOT_MEASURED in _row(card, "external") and NOT_MEASURED in _row(card, "grouped-split test")
    facts = card_facts(out)
    for what in ("external validation", "grouped-split performance", "calibration",
                 "patient-level performance", "by subgroup"):
        assert any(what in x for x in facts["not_measured"]), what
    assert not any("distribution-shift guard" in x for x in facts["not_measured"])
    guard = card.split("## Distribution-shift guard", 1)[1].split("##", 1)[0]
    assert f"detector {facts['guard']['detector']}" in guard and "threshold" in guard
    assert "## Not measured" in card and "Leakage audit: not measured" in card
    split_counts = facts["split"]["counts"]
    assert sum(sum(c.values()) for c in split_counts.values()) == 120  # 60 per class


def test_card_command_lists_external_results_and_calibration(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    assert main(["evaluate", "--run", str(run_dir), "--data", str(UCSD), "--split-file", str(UCSD / "SPLIT.csv"),
                 "--subset", "val", "--name", "ucsd"]) == 0
    assert main(["calibrate", "--run", str(run_dir), "--force"]) == 0
    capsys.readouterr()
    (run_dir / "model_card.md").unlink()
    assert main(["card", "--run", str(run_dir)]) == 0
    assert str(run_dir / "model_card.md") in capsys.readouterr().out
    card = (run_dir / "model_card.md").read_text()
    ext = json.loads((run_dir / "external" / "ucsd" / "metrics.json").read_text())
    m = ext["metrics"]
    row = _row(card, "external ucsd")
    assert f"| {m['n']} |" in row and f"{m['accuracy']:.3f} [{m['ci95']['accuracy'][0]:.3f}" in row
    assert "(stale)" not in row  # refreshed by calibrate
    cal = json.loads((run_dir / "predictor.json").read_text())["calibration"]
    assert "Status: **fitted** (forced)" in card and f"temperature {cal['temperature']:.4g}" in card
    assert not any("external validation" in x for x in card_facts(run_dir)["not_measured"])
    assert main(["card", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err
