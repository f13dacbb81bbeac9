"""Trainer: a few steps lower the loss; checkpoints round-trip through the loader and `generate`.

Also holds the helpers the other test_train_*.py files use (a small corpus, a tiny model's flags).
Run: python -m pytest tests/test_train.py -v
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from elas_serve.cli import main as cli_main
from elas_serve.models import load_model, save_checkpoint
from elas_serve.tokenizer import Tokenizer
from elas_serve.train import TrainConfig
from elas_serve.train.data import prepare_shards
from elas_serve.train.evaluate import evaluate
from elas_serve.train.presets import build_model, init_weights

from authors_ckpt import Variant, make_config
from conftest import TEXT

# A model small enough for a few CPU seconds: hidden 64, 2 layers, LORO ranks 16 / 24.
TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--intermediate-size", "86", "--attn-rank", "16", "--mlp-rank", "24", "--seq-len", "32",
        "--batch-size", "4", "--vocab-size", "300", "--warmup-steps", "3", "--lr", "1e-2",
        "--eval-interval", "0", "--no-progress"]


def write_corpus(root: Path) -> Path:
    """A small English corpus: two documents in a folder."""
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "a.txt").write_text(TEXT * 3)
    (root / "corpus" / "b.txt").write_text(TEXT.upper() * 2)
    return root / "corpus"


def run_train(tmp: Path, out: str, *extra: str, steps: int = 20) -> int:
    corpus = tmp / "corpus" if (tmp / "corpus").exists() else write_corpus(tmp)
    return cli_main(["train", "--data", str(corpus), "--out", str(tmp / out), *TINY,
                     "--max-steps", str(steps), *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_lower_the_loss(tmp_path):
    assert run_train(tmp_path, "run", "--log-interval", "1", steps=25) == 0
    train_losses = [m["loss"] for m in metrics(tmp_path / "run") if m["kind"] == "train"]
    assert len(train_losses) == 25
    state = json.loads((tmp_path / "run" / "training_state.json").read_text())
    vocab = json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"]
    # starts near uniform (ln V), ends far below it, on train and held-out text alike
    assert abs(train_losses[0] - math.log(vocab)) < 0.5
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 1.5
    assert state["final_eval"]["loss"] < math.log(vocab) - 1.5
    assert state["final_eval"]["bits_per_byte"] > 0
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def test_trained_checkpoint_round_trips(tmp_path, capsys):
    assert run_train(tmp_path, "run", steps=15) == 0
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    # the authors' config.json fields, as the loader's tests write them
    assert set(make_config(Variant("x"))) - {"transformers_version"} <= set(config)
    assert config["squ_relu"] == "relu2" and config["activation_2by4"] is True
    model = load_model(run)  # no conversion
    tok = Tokenizer.from_path(run)
    # the loaded model reproduces the trainer's own final evaluation
    cfg = TrainConfig(data=[str(tmp_path / "corpus")], out_dir=str(run))
    _, val = prepare_shards(cfg.data, [], cfg.val_fraction, tok, run / "tokenizer.json", run / "tokens")
    state = json.loads((run / "training_state.json").read_text())
    again = evaluate(model, val, 32, 4, torch.device("cpu"))
    assert again.loss == pytest.approx(state["final_eval"]["loss"], rel=1e-5)
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(run), "--prompt", "It is a truth",
                     "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("It is a truth")


@pytest.mark.parametrize("flags", [
    dict(),  # ELAS: LORO everywhere, relu2 + 2:4
    dict(two_by_four=False),
    dict(ffn="swiglu"),
    dict(lowrank_scope="none"),
    dict(lowrank_scope="attn", tie_word_embeddings=True),
    dict(lowrank_scope="mlp", num_kv_heads=1),
])
def test_save_checkpoint_round_trips_every_variant(tmp_path, flags):
    cfg = TrainConfig(data=["unused"], out_dir=str(tmp_path), hidden_size=64, num_layers=2,
                      num_heads=4, intermediate_size=86, attn_rank=16, mlp_rank=24, seq_len=32,
                      **flags)
    model = build_model(cfg, vocab_size=300, eos_token_id=0, device=torch.device("cpu"))
    save_checkpoint(model, tmp_path / "ckpt", training_fields={"activation_dense_warmup_steps": 7})
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.projection_specs() == model.projection_specs()
    assert loaded.config == model.config
    ids = torch.randint(0, 300, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.compute_logits(loaded(ids, pos)),
                                   model.compute_logits(model(ids, pos)), rtol=0, atol=0)
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw.get("activation_dense_warmup_steps", 7) == 7


def test_bf16_save_loads_in_float32(tmp_path):
    cfg = TrainConfig(data=["unused"], out_dir=str(tmp_path), hidden_size=64, num_layers=1,
                      num_heads=4, intermediate_size=86, attn_rank=16, mlp_rank=24, seq_len=32)
    model = build_model(cfg, 300, 0, torch.device("cpu"))
    save_checkpoint(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path / "ckpt", dtype=torch.float32)
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight_in"]
    torch.testing.assert_close(loaded.state_dict()["model.layers.0.mlp.up_proj.weight_in"],
                               w.bfloat16().float(), rtol=0, atol=0)


def test_loro_init_gives_products_of_init_std():
    cfg = TrainConfig(data=["unused"], out_dir="unused", hidden_size=256, num_layers=1,
                      num_heads=4, intermediate_size=688, attn_rank=64, mlp_rank=64)
    model = build_model(cfg, 300, 0, torch.device("cpu"))
    init_weights(model, 0.02, seed=1)
    up = model.model.layers[0].mlp.up_proj
    product = up.weight_in @ up.weight_out.T  # (in, out)
    assert product.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones(256))


def test_demo_checkpoint_is_a_trained_english_model(capsys):
    """The bundled default model: it reads English far better than the same words shuffled."""
    from elas_serve.utils import DEMO_CHECKPOINT

    model, tok = load_model(DEMO_CHECKPOINT), Tokenizer.from_path(DEMO_CHECKPOINT)
    text = ("The weather was fine, and she walked to the village with her sister to visit their "
            "friends, who were very glad to see them.")

    def loss(s: str) -> float:
        ids = torch.tensor([tok.encode(s)])
        with torch.no_grad():
            logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    words = text.split()
    shuffled = " ".join(words[1::2] + words[::2])
    assert loss(text) < 5.0 < loss(shuffled) - 1.0
    assert cli_main(["generate", "--prompt", "It is a truth universally", "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It is a truth universally") and len(out.split()) >= 15
