"""The command line as a user meets it: --version, one error for a bare call, help with every default,
one name per option (old spellings still work), results on stdout and progress on stderr even when
neither is a terminal, and README's command table in step with the parser."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import ct_transfer
from ct_transfer.cli import _HelpFormatter, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _cli(*args, env=None, timeout=300):
    """`ct-transfer ...` in a fresh interpreter with pipes for stdout and stderr (not terminals)."""
    return subprocess.run([sys.executable, "-m", "ct_transfer.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _commands(parser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"ct-transfer {ct_transfer.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", ct_transfer.__version__)


def test_bare_command_prints_one_usage_and_one_error():
    proc = _cli()
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("usage: ct-transfer")
    assert lines[1].startswith("ct-transfer: error: choose a command: models, split")
    assert "ct-transfer: ct-transfer" not in proc.stderr  # the doubled prefix of before


def test_usage_error_is_one_line_naming_the_command():
    proc = _cli("train", "--epochs", "3")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "ct-transfer: error: train: the following arguments are required: --data, --model, --out"]


def test_every_flag_has_help_and_says_its_default():
    commands = _commands(build_parser())
    assert {"train", "experiment", "split", "predict", "report"} <= set(commands)
    missing = []
    for name, p in commands.items():
        formatter = _HelpFormatter(prog=p.prog)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # -h, and old spellings kept as hidden aliases
            text = formatter._get_help_string(action) or ""
            if not text.strip():
                missing.append(f"{name} {action.option_strings or action.dest}: no help")
            takes_value = action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction)
            if action.option_strings and takes_value and not action.required and "default" not in text:
                missing.append(f"{name} {action.option_strings[0]}: no default in {text!r}")
    assert missing == []
    # the rendered help shows them (what a user reads)
    train_help = commands["train"].format_help()
    assert "--bf16, --no-bf16" in train_help and "--channels-last, --no-channels-last" in train_help
    assert "(default: 100)" in train_help and "(default: on)" in train_help


def test_one_name_per_option_old_spellings_still_parse():
    parser = build_parser()
    base = ["split", "--data", "d", "--out", "o.csv"]
    new = parser.parse_args(base + ["--split-preset", "grouped", "--split-seed", "3", "--split-groups", "g.csv"])
    old = parser.parse_args(base + ["--preset", "grouped", "--seed", "3", "--groups", "g.csv"])
    assert vars(new) == vars(old) and new.split_preset == "grouped" and new.split_seed == 3
    assert "--preset" not in _commands(parser)["split"].format_help()  # one name in the help
    # train's split options have the same names and defaults as split's
    train, split = ({a.dest: a for a in _commands(parser)[c]._actions if a.help != argparse.SUPPRESS}
                    for c in ("train", "split"))
    for dest in ("split_preset", "split_seed", "split_groups"):
        assert train[dest].option_strings == split[dest].option_strings
    assert split["split_preset"].default == ct_transfer.TrainConfig.__dataclass_fields__["split_preset"].default
    grid = ["experiment", "--data", "d", "--out", "g"]
    assert parser.parse_args(grid + ["--preset", "offline"]).model_set == "offline"
    assert parser.parse_args(grid + ["--model-set", "offline"]).model_set == "offline"
    from ct_transfer.config import GRID_PRESETS
    from ct_transfer.experiment import PRESETS

    assert sorted(PRESETS) == sorted(GRID_PRESETS)  # the CLI's list is the registry's


def test_boolean_flags_can_be_turned_off():
    from ct_transfer.cli import config_from_args

    parser = build_parser()
    base = ["train", "--data", "d", "--model", "EfficientNetLite0", "--out", "o"]
    assert not hasattr(parser.parse_args(base), "bf16")  # unset: TrainConfig's default (auto) holds
    assert parser.parse_args(base + ["--no-bf16"]).bf16 is False
    assert parser.parse_args(base + ["--bf16"]).bf16 is True
    assert parser.parse_args(base + ["--no-channels-last", "--no-augment"]).channels_last is False
    # a recipe's choice is undone by the flag
    args = parser.parse_args(base + ["--recipe", "cpu-fast", "--no-augment", "--augment"])
    assert config_from_args(args).augment is True


def test_predict_results_on_stdout_progress_on_stderr_through_pipes(trained_run, data_dir):
    run_dir, _ = trained_run
    images = sorted((data_dir / "COVID").iterdir())[:6] + sorted((data_dir / "non-COVID").iterdir())[:6]
    proc = _cli("predict", "--run", run_dir, "--batch-size", "4", *images,
                env={"CT_TRANSFER_PROGRESS_SECONDS": "0"})
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert out[0].startswith("path") and len(out) == 1 + len(images)  # the table, nothing else
    progress = [line for line in err if line.startswith("predict: ")]
    assert progress[0] == "predict: 12 imgs" and progress[-1].startswith("predict: 12/12 imgs done")
    assert any(re.match(r"predict: [48]/12 imgs \(\d+%\)", line) for line in progress), err
    assert not any(line.startswith("predict:") for line in out)


def test_linear_probe_reports_its_feature_extraction_and_says_probe(data_dir, caplog, monkeypatch):
    from ct_transfer import TrainConfig, fit

    monkeypatch.setenv("CT_TRANSFER_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="ct_transfer")
    cfg = TrainConfig(data=str(data_dir), model="EfficientNetLite0", weights="none", strategy="linear",
                      limit=10, image_size=64, epochs=100)
    fit(cfg, progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("features train: 16/16 imgs done") for line in lines), lines
    assert any(line.startswith("linear probe: train loss") for line in lines), lines
    assert not any(re.match(r"epoch \d+/", line) for line in lines), lines  # not "epoch 1/100"


def _readme_table() -> dict[str, str]:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `ct-transfer (\w[\w-]*)(.*?)` \|", line)
        if m:
            rows[m[1]] = m[2]
    return rows


def test_readme_command_table_matches_the_parser():
    commands = _commands(build_parser())
    table = _readme_table()
    assert sorted(table) == sorted(commands)  # every subcommand, and no command that is not there
    for name, usage in table.items():
        visible = {s for a in commands[name]._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", usage))
        assert flags <= visible, (name, sorted(flags - visible))
