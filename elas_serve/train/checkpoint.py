"""What a run writes to disk: the step checkpoints `<out>/step_NNNNNN/` and the final `<out>/`.

Every step directory is an ordinary checkpoint the server loads (`config.json`, float32
`model.safetensors`, `tokenizer.json`, written by `save_checkpoint`) plus what `--resume` needs:
- `--parallel ddp` (and one process): `optimizer.pt`, the full AdamW state (rank 0 writes it);
- `--parallel fsdp`: `sharded/`, a torch.distributed.checkpoint directory of the sharded model
  and optimizer, the progress and the RNG states (every rank writes its shards; fsdp.py);
and `training_state.json` last (rank 0), so a directory that has it is complete. The newest
`keep_last` step directories are kept. The learning-rate schedule is a function of the step
(`lr_at`), and the batches are drawn from (seed, step, micro-batch, rank), so the step is the
whole scheduler and data position. Every function here is called by every rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from elas_serve.models import ElasForCausalLM, save_checkpoint
from elas_serve.utils import DTYPES

from .config import TrainConfig
from .fsdp import SHARDED_DIR, full_state_dict, load_sharded, save_sharded, unsharded_copy

# The file each --parallel mode resumes from (next to the weights and training_state.json).
RESUME_FILES = {"ddp": "optimizer.pt", "fsdp": f"{SHARDED_DIR}/.metadata"}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def training_fields(cfg: TrainConfig) -> dict[str, Any]:
    """Extra config.json keys of the checkpoints of this run."""
    return {"activation_dense_warmup_steps": cfg.dense_warmup_steps,
            "max_sequence_length": cfg.seq_len}


def training_state(cfg: TrainConfig, step: int, tokens_seen: int, elapsed: float, world: int,
                   num_params: int) -> dict[str, Any]:
    """training_state.json (the authors' `global_step` / `update_step` / `tokens_seen` names)."""
    return {"global_step": step, "update_step": step, "tokens_seen": tokens_seen,
            "elapsed_s": elapsed, "world_size": world, "parallel": cfg.parallel,
            "num_parameters": num_params, "train_config": cfg.to_dict(),
            "torch_version": torch.__version__}


def _write_weights(model: ElasForCausalLM, path: Path, cfg: TrainConfig, tokenizer_file: Path,
                   dtype: torch.dtype | None) -> None:
    """The ordinary checkpoint at `path`; under FSDP the full weights are gathered to rank 0."""
    if cfg.parallel == "fsdp":
        state = full_state_dict(model)  # every rank takes part; rank 0 receives
        model = unsharded_copy(model, state) if _is_main() else model
    if _is_main():
        save_checkpoint(model, path, dtype=dtype, tokenizer_file=tokenizer_file,
                        training_fields=training_fields(cfg))


def save_step(out: Path, model: ElasForCausalLM, optimizer: torch.optim.Optimizer,
              tokenizer_file: Path, state: dict[str, Any], cfg: TrainConfig,
              device: torch.device) -> Path:
    """Write `<out>/step_{N:06d}/` after N = state["global_step"] updates and prune old ones."""
    step = state["global_step"]
    path = out / f"step_{step:06d}"
    if cfg.parallel == "fsdp":
        save_sharded(path / SHARDED_DIR, model, optimizer,
                     {"step": step, "tokens_seen": state["tokens_seen"]}, device)
    _write_weights(model, path, cfg, tokenizer_file, dtype=None)
    if _is_main():
        if cfg.parallel != "fsdp":
            torch.save(optimizer.state_dict(), path / "optimizer.pt")
        (path / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
        old = sorted(p for p in out.glob("step_*") if p.is_dir() and p != path)
        for stale in old[:max(0, len(old) - (cfg.keep_last - 1))]:
            shutil.rmtree(stale)
    _barrier()
    return path


def save_final(out: Path, model: ElasForCausalLM, tokenizer_file: Path, state: dict[str, Any],
               cfg: TrainConfig) -> None:
    """The final checkpoint in `<out>/` itself, in `--save-dtype`."""
    _write_weights(model, out, cfg, tokenizer_file, dtype=DTYPES[cfg.save_dtype])
    if _is_main():
        (out / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
    _barrier()


def load_step(path: Path, state: dict[str, Any], model: nn.Module,
              optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device) -> None:
    """Load the weights and optimizer of step directory `path` (training_state `state`)."""
    if cfg.parallel == "fsdp":
        progress = load_sharded(path / SHARDED_DIR, model, optimizer, device, state["world_size"])
        if progress["step"] != state["global_step"]:
            raise ValueError(f"--resume {path}: {SHARDED_DIR}/ holds step {progress['step']} but "
                             f"training_state.json says {state['global_step']}")
        return
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=True))
