"""`--resume` continues the same run: same batches, same optimizer state, same final weights.

Run: python -m pytest tests/test_train_resume.py -v
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file
from test_train import metrics, run_train


def test_resume_continues_the_same_run(tmp_path, capsys):
    common = ("--save-interval", "6", "--keep-last", "3", "--dense-warmup-steps", "4",
              "--log-interval", "1")
    assert run_train(tmp_path, "full", *common, steps=12) == 0
    assert sorted(p.name for p in (tmp_path / "full").glob("step_*")) == ["step_000006"]
    # a second run interrupted after step 6: resume from that checkpoint
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "model.safetensors").unlink()  # nothing of the finished run is used
    capsys.readouterr()
    assert run_train(tmp_path, "resumed", *common, "--resume", steps=12) == 0
    assert "resumed at step 6" in capsys.readouterr().out
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # one continuous metrics history, identical to the uninterrupted one
    strip = [{k: v for k, v in m.items() if k not in ("elapsed_s", "tokens_per_s")}
             for m in metrics(tmp_path / "full")]
    assert [{k: v for k, v in m.items() if k not in ("elapsed_s", "tokens_per_s")}
            for m in metrics(tmp_path / "resumed")] == strip
    assert [m["step"] for m in metrics(tmp_path / "resumed") if m["kind"] == "train"] == list(range(1, 13))
    state = json.loads((tmp_path / "resumed" / "training_state.json").read_text())
    assert state["global_step"] == 12 and state["tokens_seen"] == 12 * 4 * 32


def test_resume_refuses_a_different_model(tmp_path, capsys):
    assert run_train(tmp_path, "run", "--save-interval", "3", steps=4) == 0
    capsys.readouterr()
    assert run_train(tmp_path, "run", "--save-interval", "3", "--ffn", "swiglu", "--resume",
                     steps=4) == 2
    err = capsys.readouterr().err
    assert err.startswith("elas-serve: error: --resume") and "ffn: 'relu2' -> 'swiglu'" in err


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert run_train(tmp_path, "empty", "--resume", steps=2) == 2
    assert "no step_* checkpoint" in capsys.readouterr().err
