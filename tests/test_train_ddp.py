"""Multi-process training: `torchrun` with 2 gloo processes on CPU (DDP).

Two processes with one micro-batch each must train exactly the model that one process trains with
two accumulated micro-batches (same batches by construction, gradients averaged either way).
Run: python -m pytest tests/test_train_ddp.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_train import TINY, run_train


def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    assert run_train(tmp_path, "single", "--grad-accum-steps", "2", steps=6) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "elas_serve.train", "--data", str(tmp_path / "corpus"), "--out",
           str(tmp_path / "ddp"), *TINY, "--max-steps", "6", "--num-threads", "1",
           "--tokenizer", str(tmp_path / "single" / "tokenizer.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    state = json.loads((tmp_path / "ddp" / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["tokens_seen"] == 6 * 2 * 4 * 32
    single = json.loads((tmp_path / "single" / "training_state.json").read_text())
    assert abs(state["final_eval"]["loss"] - single["final_eval"]["loss"]) < 1e-5
