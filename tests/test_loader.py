"""Broken checkpoints are refused with one clear message naming the file and tensor, and the CLI
exits 2 on them.

Run: python -m pytest tests/test_loader.py -v
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from elas_serve.cli import main
from elas_serve.models import CheckpointError, load_model

from authors_ckpt import Variant, write_checkpoint


def _edit_weights(path, fn):
    f = path / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def _edit_config(path, **changes):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def _drop(name):
    return lambda sd: sd.pop(name)


def _add(name, shape):
    return lambda sd: sd.__setitem__(name, torch.randn(*shape))


def _reshape(name, shape):
    return lambda sd: sd.__setitem__(name, torch.randn(*shape))


CASES = {
    "missing_tensor": (lambda p: _edit_weights(p, _drop("model.layers.1.mlp.down_proj.weight_out")),
                       ["model.safetensors", "missing tensor 'model.layers.1.mlp.down_proj.weight_out'"]),
    "missing_projection": (lambda p: _edit_weights(p, lambda sd: [sd.pop(f"model.layers.0.self_attn.k_proj.{s}")
                                                                   for s in ("weight_in", "weight_out")]),
                           ["missing tensor 'model.layers.0.self_attn.k_proj.weight'",
                            "weight_in"]),
    "missing_norm": (lambda p: _edit_weights(p, _drop("model.norm.weight")),
                     ["missing tensor 'model.norm.weight'"]),
    "missing_lm_head": (lambda p: _edit_weights(p, _drop("lm_head.weight")),
                        ["missing tensor 'lm_head.weight'"]),
    "unexpected_gate": (lambda p: _edit_weights(p, _add("model.layers.0.mlp.gate_proj.weight", (129, 64))),
                        ["unexpected tensor 'model.layers.0.mlp.gate_proj.weight'", "no gate_proj"]),
    "unexpected_other": (lambda p: _edit_weights(p, _add("model.layers.0.extra.weight", (3,))),
                         ["model.safetensors", "unexpected tensor 'model.layers.0.extra.weight'"]),
    "rank_mismatch": (lambda p: _edit_weights(p, _reshape("model.layers.0.mlp.up_proj.weight_out", (129, 23))),
                      ["tensor 'model.layers.0.mlp.up_proj.weight_out' has shape [129, 23]",
                       "expected [129, 24]"]),
    "dense_wrong_shape": (lambda p: _edit_weights(p, _reshape("model.embed_tokens.weight", (320, 63))),
                          ["'model.embed_tokens.weight' has shape [320, 63]", "expected [320, 64]"]),
    "both_dense_and_lowrank": (lambda p: _edit_weights(p, _add("model.layers.1.self_attn.q_proj.weight", (64, 64))),
                               ["'model.layers.1.self_attn.q_proj' is stored both dense"]),
    "integer_tensor": (lambda p: _edit_weights(p, lambda sd: sd.__setitem__(
        "model.norm.weight", torch.ones(64, dtype=torch.int32))),
                       ["'model.norm.weight' has dtype torch.int32"]),
    "truncated_safetensors": (lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:5000]),
                              ["model.safetensors: cannot read weights"]),
    "garbage_safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64),
                            ["model.safetensors: cannot read weights"]),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), ["no weights found"]),
    "no_config": (lambda p: (p / "config.json").unlink(), ["config.json: no such file"]),
    "bad_json_config": (lambda p: (p / "config.json").write_text("{not json"), ["config.json: cannot read config"]),
    "sparse_method_mvue": (lambda p: _edit_config(p, activation_sparse_method="mvue"),
                           ["config.json", "activation_sparse_method='mvue' is not supported"]),
    "unknown_squ_relu": (lambda p: _edit_config(p, squ_relu="gelu"), ["squ_relu='gelu' is not supported"]),
    "config_intermediate_contradicts_weights": (
        lambda p: _edit_config(p, intermediate_size=100),
        ["'model.layers.0.mlp.up_proj.weight_out' has shape [129, 24]", "int(1.5 * intermediate_size=100) = 150"]),
    "config_fewer_layers": (lambda p: _edit_config(p, num_hidden_layers=1),
                            ["unexpected tensor 'model.layers.1.", "num_hidden_layers=1"]),
    "config_more_layers": (lambda p: _edit_config(p, num_hidden_layers=3),
                           ["missing tensor 'model.layers.2.self_attn.q_proj.weight'"]),
    "config_vocab": (lambda p: _edit_config(p, vocab_size=999), ["model.embed_tokens.weight", "vocab_size=999"]),
    "config_heads_not_divisible": (lambda p: _edit_config(p, num_key_value_heads=3), ["num_key_value_heads=3"]),
    "config_missing_field": (lambda p: _edit_config(p, hidden_size=None), ["missing required field(s): hidden_size"]),
    "config_wrong_type": (lambda p: _edit_config(p, num_hidden_layers="2"), ["num_hidden_layers must be a positive integer, got '2'"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_broken_checkpoint_gives_clear_error(tmp_path, case, capsys):
    write_checkpoint(tmp_path, Variant("broken"))
    breaker, expected = CASES[case]
    breaker(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message
    assert "\n" not in message
    # the CLI reports the same message and exits 2
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert message in capsys.readouterr().err


def test_missing_shard(tmp_path):
    write_checkpoint(tmp_path, Variant("shards", fmt="sharded"))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: lists shard "
                                              "model-00002-of-00002.safetensors, which does not exist"):
        load_model(tmp_path)


def test_tensor_in_two_shards(tmp_path):
    write_checkpoint(tmp_path, Variant("shards", fmt="sharded"))
    first = tmp_path / "model-00001-of-00002.safetensors"
    sd = load_file(str(first))
    sd["model.norm.weight"] = torch.ones(64)
    save_file(sd, str(first))
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' also in"):
        load_model(tmp_path)


def test_bin_with_arbitrary_pickle_is_refused(tmp_path):
    """weights_only=True: a pickle that is not plain tensors is not executed, it is refused."""
    write_checkpoint(tmp_path, Variant("bin", fmt="bin"))
    torch.save({"model.norm.weight": torch.ones(64), "evil": shutil.rmtree}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        load_model(tmp_path)


def test_truncated_bin(tmp_path):
    write_checkpoint(tmp_path, Variant("bin", fmt="bin"))
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        load_model(tmp_path)


def test_console_script_exits_2_on_broken_checkpoint(tmp_path):
    write_checkpoint(tmp_path, Variant("broken"))
    _edit_weights(tmp_path, _drop("model.norm.weight"))
    proc = subprocess.run([sys.executable, "-m", "elas_serve.cli", "generate", "--model", str(tmp_path),
                           "--prompt", "x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing tensor 'model.norm.weight'" in proc.stderr
    assert "Traceback" not in proc.stderr
