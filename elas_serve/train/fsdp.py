"""`--parallel fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) sharding and its checkpoints.

Every decoder layer and the root `ElasForCausalLM` (embeddings, final norm, lm_head) are sharded
over all processes (one 1-D device mesh): each rank holds 1/world of the float32 weights,
gradients and AdamW state, and all-gathers a layer's weights just before its forward and backward.
Invariants:
- the root keeps its own parameters gathered from its forward until the backward
  (`reshard_after_forward=False`), because `compute_logits` reads lm_head outside `forward`;
- on CUDA, compute is bfloat16 over float32 sharded master weights (`MixedPrecisionPolicy`: bf16
  params, fp32 gradient reduction); on CPU (gloo) everything is float32;
- a sharded checkpoint (torch.distributed.checkpoint, one directory) holds the model, the
  optimizer, the progress (`step`, `tokens_seen`) and every rank's RNG state; model and optimizer
  load on any world size (DCP reshards), the RNG states only on the world size that saved them;
- `full_state_dict` gathers the full float32 weights on rank 0 only (in CPU memory, one tensor
  at a time), for the ordinary checkpoint directory the server loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from elas_serve.models import ElasForCausalLM

SHARDED_DIR = "sharded"  # the DCP directory inside a step_* checkpoint


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; plain float32 elsewhere."""
    # NOTE: layer inputs are not cast: the RoPE cos/sin stay float32, as the server computes them.
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def shard_model(model: ElasForCausalLM, device: torch.device) -> None:
    """Shard `model` (float32, on any device) in place over the default process group."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # NOTE: the root stays gathered after forward so that compute_logits (outside forward)
    # sees a plain lm_head; its backward reshards it.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def clip_grad_norm(parameters: Iterator[nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` over plain or DTensor gradients; returns the total norm before clipping."""
    norm = nn.utils.clip_grad_norm_(parameters, max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


@contextmanager
def gathered(model: ElasForCausalLM) -> Iterator[None]:
    """All weights gathered on every rank for the block (evaluation).

    Evaluation deals windows round-robin, so ranks may run different numbers of forwards; with
    the weights gathered up front and kept, a forward needs no collective.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in fsdp_modules if m is not model]
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in fsdp_modules:  # NOTE: the same order on every rank (each unshard is an all-gather)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)


def _rng_states(device: torch.device) -> torch.Tensor:
    """(world, N) uint8: every rank's CPU RNG state (and CUDA's, on CUDA), row = rank."""
    mine = torch.get_rng_state()
    if device.type == "cuda":
        mine = torch.cat([mine, torch.cuda.get_rng_state(device)])
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    return torch.stack(rows)


def _set_rng_state(row: torch.Tensor, device: torch.device) -> None:
    cpu_numel = torch.get_rng_state().numel()
    torch.set_rng_state(row[:cpu_numel].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(row[cpu_numel:].clone(), device)


def save_sharded(path: Path, model: ElasForCausalLM, optimizer: torch.optim.Optimizer,
                 progress: dict[str, int], device: torch.device) -> None:
    """Write the sharded checkpoint `path` (a directory; every rank writes its own shards)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "progress": dict(progress),
             "rng": _rng_states(device)}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: Path, model: ElasForCausalLM, optimizer: torch.optim.Optimizer,
                 device: torch.device, saved_world_size: int) -> dict[str, int]:
    """Load `path` into the sharded `model` and `optimizer`; returns the saved progress.

    The RNG states are restored only when the world size is the one that saved them.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd,
                             "progress": {"step": -1, "tokens_seen": -1}}
    world = dist.get_world_size()
    same_world = saved_world_size == world
    if same_world:
        state["rng"] = _rng_states(device)  # right shape; overwritten by the load
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    if same_world:
        _set_rng_state(state["rng"][dist.get_rank()], device)
    return state["progress"]


def full_state_dict(model: ElasForCausalLM) -> dict[str, torch.Tensor]:
    """The full float32 state dict on rank 0 (CPU); an empty dict on the other ranks.

    Every rank must call it (it all-gathers each parameter in turn).
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def unsharded_copy(model: ElasForCausalLM, state: dict[str, torch.Tensor]) -> ElasForCausalLM:
    """A plain (CPU) `ElasForCausalLM` of `model`'s architecture holding the full `state`."""
    with torch.device("meta"):
        plain = ElasForCausalLM(model.config, model.projection_specs())
    plain.load_state_dict(state, strict=True, assign=True)
    rotary = plain.model.rotary_emb  # NOTE: its non-persistent buffer is not in `state`
    rotary.inv_freq = rotary.compute_inv_freq()
    return plain
