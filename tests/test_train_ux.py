"""Trainer UX: progress bars for the evaluations, warnings for a run that cannot do what it asks,
and a `--help` whose defaults are the config's and never contradict themselves.

Run: python -m pytest tests/test_train_ux.py -v
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from test_train import TINY, write_corpus

from elas_serve.cli import main as cli_main
from elas_serve.train import TrainConfig
from elas_serve.train.cli import build_train_parser, config_warnings


def test_help_shows_the_config_defaults_without_contradictions():
    parser = build_train_parser()
    text = " ".join(parser.format_help().split())  # one line: help wraps anywhere
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "BPE size to train (default 4096)" in text and text.count("4096") == 1  # said once, in words
    fmt = parser.formatter_class("elas-serve train")
    shown = {a.option_strings[0]: fmt._expand_help(a) for a in parser._actions if a.option_strings and a.help}
    for flag, default in (("--lr", "0.003"), ("--seq-len", "256"), ("--max-steps", "1000"),
                          ("--warmup-steps", "100"), ("--preset", "tiny"), ("--eval-batches", "16")):
        assert shown[flag].endswith(f"(default: {default})"), (flag, shown[flag])
    assert all(a.help for a in parser._actions), "every flag says what it does"
    configured = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    for action in parser._actions:
        if action.dest in configured and action.default is not argparse.SUPPRESS:
            assert action.default == configured[action.dest], f"{action.option_strings}: {action.default}"


def test_parsed_defaults_are_the_config_defaults():
    args = vars(build_train_parser().parse_args(["--data", "d", "--out", "o"]))
    known = {f.name for f in fields(TrainConfig)}
    assert TrainConfig(**{k: v for k, v in args.items() if k in known}) == TrainConfig(data=["d"], out_dir="o")


def test_warnings_for_warmups_longer_than_the_run():
    cfg = TrainConfig(data=["d"], out_dir="o", max_steps=40, warmup_steps=100, lr=3e-3, dense_warmup_steps=50)
    warnings = config_warnings(cfg)
    assert len(warnings) == 2
    assert "--warmup-steps 100 is longer than --max-steps 40" in warnings[0]
    assert "peaks at 0.0012, not --lr 0.003" in warnings[0]
    assert "--dense-warmup-steps 50" in warnings[1] and "2:4 sparsity is never switched on" in warnings[1]
    assert config_warnings(TrainConfig(data=["d"], out_dir="o", max_steps=200, warmup_steps=100)) == []


def train(tmp_path, *flags: str) -> int:
    return cli_main(["train", "--data", str(write_corpus(tmp_path)), "--out", str(tmp_path / "run"), *flags])


def test_train_prints_the_warning_and_shows_eval_progress(tmp_path, capsys):
    flags = [f for f in TINY if f != "--no-progress"]
    flags[flags.index("--warmup-steps") + 1] = "50"  # longer than the run
    assert train(tmp_path, *flags, "--max-steps", "4", "--eval-interval", "3", "--eval-batches", "2") == 0
    err = capsys.readouterr().err
    assert "elas-serve train: warning: --warmup-steps 50 is longer than --max-steps 4" in err
    assert "eval at step 3" in err  # the periodic evaluation's bar
    assert "final eval" in err and "window" in err  # the final, full evaluation's bar


def test_no_progress_hides_the_eval_bars(tmp_path, capsys):
    assert "--no-progress" in TINY
    assert train(tmp_path, *TINY, "--max-steps", "3", "--eval-interval", "2", "--eval-batches", "1") == 0
    err = capsys.readouterr().err
    assert "final eval" not in err and "eval at step" not in err and "warning" not in err
