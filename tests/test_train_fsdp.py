"""`--parallel fsdp` (FSDP2, fully_shard): `torchrun` with 2 gloo processes on CPU.

With gradient accumulation (2 micro-batches) and clipping (threshold below the gradient norms):
(a) FSDP trains the same model as DDP on the same batches: losses and grad norms of every step
    and the final weights agree within float32 rounding;
(b) a run interrupted at step 3 and resumed from its sharded checkpoint equals the uninterrupted
    run exactly (every loss, the final weights);
(c) the ordinary checkpoints an FSDP run writes (final and periodic) load with `load_model` and
    hold the trained weights: the periodic one equals its sharded (DCP) twin, the final one
    reproduces the trainer's own held-out evaluation;
(d) the sharded checkpoint of 2 processes resumes in 1 process with twice the accumulation (the
    same batches), and a checkpoint of the other `--parallel` mode is refused clearly;
(e) two torchrun agents joined by c10d rendezvous (`--nnodes 2`, the multi-machine command run
    on one machine) train what one agent with 2 processes trains.
The torchrun runs are shared by the tests (module fixtures).
Run: python -m pytest tests/test_train_fsdp.py -v -s   (-s prints the compared figures)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from test_train import TINY, metrics, run_train, write_corpus

from elas_serve.models import load_model
from elas_serve.tokenizer import Tokenizer
from elas_serve.train.data import prepare_shards, read_texts, train_tokenizer
from elas_serve.train.evaluate import evaluate

STEPS, CLIP = 6, 0.5
COMMON = ("--grad-accum-steps", "2", "--grad-clip", str(CLIP), "--log-interval", "1")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(root: Path, out: str, launcher: tuple[str, ...], *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher,
            "-m", "elas_serve.train", "--data", str(root / "corpus"), "--out", str(root / out),
            *TINY, "--max-steps", str(STEPS), "--num-threads", "1", *COMMON,
            "--tokenizer", str(root / "tokenizer.json"), "--cache-dir", str(root / "tokens"),
            *extra]


def torchrun(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = train_cmd(root, out, ("--standalone", "--nproc-per-node", "2"), *extra)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """ddp/ and fsdp/: 6 steps each, each saving step_000003/."""
    root = tmp_path_factory.mktemp("fsdp")
    corpus = write_corpus(root)
    train_tokenizer([t for _, t in read_texts([str(corpus)])], 300, root / "tokenizer.json")
    assert "2 process(es) on cpu, DDP" in torchrun(root, "ddp", "--parallel", "ddp",
                                                   "--save-interval", "3").stdout
    assert "2 process(es) on cpu, FSDP" in torchrun(root, "fsdp", "--parallel", "fsdp",
                                                    "--save-interval", "3").stdout
    return root


@pytest.fixture(scope="module")
def resumed(runs) -> Path:
    """resumed/: fsdp/ interrupted after step 3 (nothing left of it but step_000003/), resumed."""
    (runs / "resumed").mkdir()
    shutil.copytree(runs / "fsdp" / "step_000003", runs / "resumed" / "step_000003")
    shutil.copy(runs / "fsdp" / "metrics.jsonl", runs / "resumed" / "metrics.jsonl")
    proc = torchrun(runs, "resumed", "--parallel", "fsdp", "--save-interval", "3", "--resume")
    assert "resumed at step 3" in proc.stdout
    return runs / "resumed"


def train_rows(run: Path) -> list[dict]:
    return [m for m in metrics(run) if m["kind"] == "train"]


def test_fsdp_loss_curve_equals_ddp(runs):
    ddp, fsdp = train_rows(runs / "ddp"), train_rows(runs / "fsdp")
    print("\nstep  DDP loss    FSDP loss   |diff|    DDP grad-norm  FSDP grad-norm")
    for a, b in zip(ddp, fsdp):
        print(f"{a['step']:>4}  {a['loss']:.7f}   {b['loss']:.7f}   {abs(a['loss'] - b['loss']):.1e}"
              f"   {a['grad_norm']:.7f}      {b['grad_norm']:.7f}")
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"] == a["step"] * 2 * 2 * 4 * 32
    assert max(r["grad_norm"] for r in fsdp) > CLIP  # clipping was active
    assert fsdp[-1]["loss"] < fsdp[0]["loss"] - 0.5  # and it learned
    a, b = load_file(str(runs / "ddp" / "model.safetensors")), load_file(str(runs / "fsdp" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    final = [json.loads((runs / r / "training_state.json").read_text())["final_eval"]["loss"]
             for r in ("ddp", "fsdp")]
    print(f"final held-out loss: DDP {final[0]:.7f}, FSDP {final[1]:.7f}")
    assert final[1] == pytest.approx(final[0], rel=1e-6)


def test_resumed_fsdp_run_equals_the_uninterrupted_one(runs, resumed):
    full, again = train_rows(runs / "fsdp"), train_rows(resumed)
    print("\nstep  uninterrupted  resumed")
    for a, b in zip(full, again):
        print(f"{a['step']:>4}  {a['loss']:.7f}      {b['loss']:.7f}")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in again] == \
           [(r["step"], r["loss"], r["grad_norm"]) for r in full]
    a = load_file(str(runs / "fsdp" / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    state = json.loads((resumed / "training_state.json").read_text())
    assert state["global_step"] == STEPS and state["parallel"] == "fsdp" and state["world_size"] == 2
    assert state["final_eval"] == json.loads((runs / "fsdp" / "training_state.json").read_text())["final_eval"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load in one process
def test_fsdp_ordinary_checkpoints_load_and_hold_the_trained_weights(runs):
    step = runs / "fsdp" / "step_000003"
    assert {p.name for p in step.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "training_state.json", "sharded"}
    # the periodic checkpoint: its full weights equal the sharded model state of the same step
    model = load_model(step)
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(step / "sharded"), no_dist=True)  # reads every shard
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state["model"][name], rtol=0, atol=0, msg=name)
    # the final checkpoint reproduces the evaluation the trainer made on the sharded model
    final = runs / "fsdp"
    model, tok = load_model(final), Tokenizer.from_path(final)
    _, val = prepare_shards([str(runs / "corpus")], [], 0.05, tok, final / "tokenizer.json",
                            runs / "tokens")
    again = evaluate(model, val, 32, 4, torch.device("cpu"))
    expected = json.loads((final / "training_state.json").read_text())["final_eval"]["loss"]
    print(f"\nfinal checkpoint via load_model: held-out loss {again.loss:.7f}; "
          f"the trainer's (sharded) {expected:.7f}")
    assert again.loss == pytest.approx(expected, rel=1e-6)


def test_sharded_checkpoint_resumes_on_another_world_size(runs, tmp_path, capsys):
    (tmp_path / "one").mkdir()
    shutil.copytree(runs / "fsdp" / "step_000003", tmp_path / "one" / "step_000003")
    shutil.copytree(runs / "corpus", tmp_path / "corpus")
    flags = ("--num-threads", "1", "--log-interval", "1", "--grad-clip", str(CLIP),
             "--tokenizer", str(runs / "tokenizer.json"))
    # one process, 4 micro-batches = the batches of 2 processes with 2 each
    assert run_train(tmp_path, "one", *flags, "--grad-accum-steps", "4", "--parallel", "fsdp",
                     "--resume", steps=STEPS) == 0
    assert "1 process(es) on cpu, FSDP, resumed at step 3" in capsys.readouterr().out
    two = {r["step"]: r["loss"] for r in train_rows(runs / "fsdp")}
    one = {r["step"]: r["loss"] for r in train_rows(tmp_path / "one")}
    with capsys.disabled():
        print(f"\nsteps 4-6, 2 processes: {[round(two[s], 7) for s in (4, 5, 6)]}; resumed in "
              f"1 process: {[round(one[s], 7) for s in (4, 5, 6)]}")
    assert sorted(one) == [4, 5, 6]
    for s in one:
        assert one[s] == pytest.approx(two[s], rel=1e-6, abs=1e-6)
    # a checkpoint of the other mode is refused, naming the flag to use
    for mode, other in (("ddp", "fsdp"), ("fsdp", "ddp")):
        assert run_train(tmp_path, "refused", *flags, "--parallel", mode, "--resume",
                         str(runs / other / "step_000003"), steps=STEPS) == 2
        err = capsys.readouterr().err
        assert f"saved with --parallel {other} " in err and f"resume it with --parallel {other}" in err


def test_two_nodes_by_c10d_rendezvous(runs):
    with socket.socket() as sock:  # a free port for the rendezvous store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-two-nodes")
    nodes = [subprocess.Popen(train_cmd(runs, "two_nodes", launcher, "--parallel", "fsdp"),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert any("2 process(es) on cpu, FSDP" in out for out, _ in outputs)
    for a, b in zip(train_rows(runs / "fsdp"), train_rows(runs / "two_nodes"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)


def test_unknown_parallel_mode_is_one_error_line(tmp_path, capsys):
    assert run_train(tmp_path, "bad", "--parallel", "zero3", steps=2) == 2
    err = capsys.readouterr().err
    assert err.startswith("elas-serve: error: argument --parallel: invalid choice: 'zero3'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.gpu
def test_fsdp_on_cuda_bf16_policy_trains_like_autocast(tmp_path):
    """One GPU, a process group of one: FSDP's bf16 policy against DDP's autocast (one process)."""
    flags = ("--device", "cuda", *COMMON, "--save-interval", "3")
    assert run_train(tmp_path, "autocast", *flags, steps=STEPS) == 0
    assert run_train(tmp_path, "fsdp", *flags, "--parallel", "fsdp", "--tokenizer",
                     str(tmp_path / "autocast" / "tokenizer.json"), steps=STEPS) == 0
    a, b = train_rows(tmp_path / "autocast"), train_rows(tmp_path / "fsdp")
    # the same initial model in bf16 compute either way; later steps drift by bf16 rounding
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-2)
    assert b[-1]["loss"] < b[0]["loss"] - 0.5
    assert (tmp_path / "fsdp" / "step_000003" / "sharded" / ".metadata").exists()
    saved = load_file(str(tmp_path / "fsdp" / "model.safetensors"))  # the float32 master weights
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert load_model(tmp_path / "fsdp").state_dict().keys() == saved.keys()
