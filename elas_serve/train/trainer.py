"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, DDP/FSDP, eval, checkpoints.

One process, or one per device under `torchrun` (gloo on CPU, NCCL on CUDA), with the model
replicated (`--parallel ddp`, DDP) or sharded (`--parallel fsdp`, FSDP2; fsdp.py). Invariants:
- batch (step s, micro-batch m, rank r) is drawn from `default_rng([seed, s, m * world + r])`, so
  `--resume` replays exactly the batches an uninterrupted run would see, and W processes with
  A accumulation steps see the same batches as one process with W * A;
- `step` counts optimizer updates done; `<out>/step_{N:06d}/` is a loadable checkpoint after N
  updates (float32 weights, plus the state `--resume` needs; checkpoint.py), and `<out>/` itself
  gets the final one;
- the ELAS 2:4 mask is off for the first `dense_warmup_steps` updates (authors' dense warm-up);
- float32 on CPU; on CUDA bfloat16 over float32 master weights (DDP: autocast; FSDP: its
  mixed-precision policy).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from elas_serve.models import ElasForCausalLM
from elas_serve.models.mlp import ElasMLP
from elas_serve.utils import resolve_device

from .checkpoint import load_step, save_final, save_step, training_state
from .config import TrainConfig
from .data import get_batch
from .evaluate import EvalResult, evaluate, token_nll
from .fsdp import clip_grad_norm, gathered, shard_model
from .metrics import MetricsLog, plot_loss_curve
from .presets import build_model, count_parameters
from .setup import prepare_data, resolve_resume


@dataclass(frozen=True, slots=True)
class TrainResult:
    out_dir: Path
    steps: int
    tokens_seen: int
    final_eval: EvalResult
    elapsed_s: float


class _LossModule(nn.Module):
    """Summed next-token NLL as a module, so DDP sees the lm_head in its forward."""

    def __init__(self, model: ElasForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return token_nll(self.model, x, y)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (projections, embeddings), none on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def set_two_by_four(model: ElasForCausalLM, enabled: bool) -> None:
    for layer in model.model.layers:
        if isinstance(layer.mlp, ElasMLP):
            layer.mlp.two_by_four = enabled


def _setup_process(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group).

    Joins the process group when started by torchrun; `--parallel fsdp` in one process without
    torchrun gets a group of one (FSDP needs one).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    created = (world > 1 or cfg.parallel == "fsdp") and not dist.is_initialized()
    if created:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun (env://)
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device, created


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training `cfg` describes; returns the final held-out evaluation."""
    rank, world, device, created_group = _setup_process(cfg)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainResult:
    main_proc = rank == 0
    fsdp = cfg.parallel == "fsdp"
    out = Path(cfg.out_dir)
    resume_dir, resume_state = resolve_resume(cfg, out)
    tokenizer, tokenizer_file, train_split, val_split = prepare_data(cfg, out, resume_dir, main_proc)

    torch.manual_seed(cfg.seed)
    # NOTE: under FSDP the full model is built in CPU memory and fully_shard moves each rank's
    # shards to the device, so no device ever holds the whole float32 model.
    model = build_model(cfg, tokenizer.vocab_size, (tokenizer.eos_token_ids or [None])[0],
                        torch.device("cpu") if fsdp else device)
    if fsdp:
        shard_model(model, device)
    optimizer = make_optimizer(model, cfg)
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_dir is not None:
        load_step(resume_dir, resume_state, model, optimizer, cfg, device)
        start_step, tokens_seen = resume_state["global_step"], resume_state["tokens_seen"]
        elapsed_before = resume_state.get("elapsed_s", 0.0)
    # NOTE: DDP all-reduces once per step (no_sync before); the FSDP root is called directly
    # and reduce-scatters every micro-batch, so no unsharded gradient outlives its backward.
    ddp = nn.parallel.DistributedDataParallel(
        _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None
    ) if world > 1 and not fsdp else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not fsdp
                else nullcontext())
    eval_context = (lambda: gathered(model)) if fsdp else nullcontext

    num_params = count_parameters(model)
    metrics = MetricsLog(out / "metrics.jsonl", start_step if resume_dir else None) if main_proc else None
    bar_on = main_proc and cfg.progress
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not bar_on,
               desc=f"train {num_params / 1e6:.2f}M params", dynamic_ncols=True, mininterval=1.0)
    if main_proc:
        bar.write(f"elas-serve train: {num_params:,} parameters, {len(train_split):,} train / "
                  f"{len(val_split):,} held-out tokens, {cfg.tokens_per_step * world:,} tokens "
                  f"per step, {world} process(es) on {device}"
                  + (f", {cfg.parallel.upper()}" if world > 1 or fsdp else "")
                  + (f", resumed at step {start_step}" if resume_dir else ""))
    t_start = time.perf_counter()
    tok_rate = 0.0
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_two_by_four(model, cfg.two_by_four and step >= cfg.dense_warmup_steps)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum_steps):
            rng = np.random.default_rng([cfg.seed, step, micro * world + rank])
            x, y = get_batch(train_split, cfg.batch_size, cfg.seq_len, rng, device)  # (B, S)
            sync = ddp is None or micro == cfg.grad_accum_steps - 1
            with (nullcontext() if sync else ddp.no_sync()), autocast:
                loss = (token_nll(model, x, y) if ddp is None else ddp(x, y)) / x.numel()
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = (clip_grad_norm(model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else float("nan"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (cfg.grad_accum_steps * world)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {step + 1}; "
                                     f"lower --lr or raise --warmup-steps")
        done = step + 1
        tokens_seen += cfg.tokens_per_step * world
        dt = time.perf_counter() - t0
        tok_rate = cfg.tokens_per_step * world / dt if tok_rate == 0 else (
            0.9 * tok_rate + 0.1 * cfg.tokens_per_step * world / dt)
        elapsed = elapsed_before + time.perf_counter() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_rate:,.0f}", lr=f"{lr:.2e}",
                        refresh=False)
        if metrics and (done % cfg.log_interval == 0 or done == cfg.max_steps or done == 1):
            metrics.write("train", done, loss=train_loss, lr=lr, grad_norm=grad_norm,
                          tokens=tokens_seen, tokens_per_s=tok_rate, elapsed_s=elapsed)
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done < cfg.max_steps:
            with eval_context():
                res = evaluate(model, val_split, cfg.seq_len, cfg.batch_size, device,
                               cfg.eval_batches * cfg.batch_size, autocast, progress=bar_on,
                               desc=f"eval at step {done}")
            if metrics:
                metrics.write("eval", done, **res.to_dict())
                bar.write(f"step {done}: held-out loss {res.loss:.4f}, perplexity "
                          f"{res.perplexity:.2f}, bits/byte {res.bits_per_byte:.4f} (partial)")
        if cfg.save_interval and done % cfg.save_interval == 0 and done < cfg.max_steps:
            state = training_state(cfg, done, tokens_seen, elapsed, world, num_params)
            save_step(out, model, optimizer, tokenizer_file, state, cfg, device)
    bar.close()

    set_two_by_four(model, cfg.two_by_four)
    with eval_context():
        final = evaluate(model, val_split, cfg.seq_len, cfg.batch_size, device, None, autocast, progress=bar_on,
                         desc="final eval (all held-out tokens)")
    elapsed = elapsed_before + time.perf_counter() - t_start
    state = training_state(cfg, cfg.max_steps, tokens_seen, elapsed, world, num_params)
    state["final_eval"] = final.to_dict()
    if main_proc:
        metrics.write("eval", cfg.max_steps, **final.to_dict())
        print(f"elas-serve train: done {cfg.max_steps} steps, {tokens_seen:,} tokens in "
              f"{elapsed:.0f} s; held-out loss {final.loss:.4f}, perplexity "
              f"{final.perplexity:.2f}, bits/byte {final.bits_per_byte:.4f}")
    save_final(out, model, tokenizer_file, state, cfg)
    if main_proc:
        plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                        title=f"{out.name}: {cfg.preset} {cfg.ffn}"
                              f"{' 2:4' if cfg.two_by_four else ''}, seed {cfg.seed}")
    _barrier()
    return TrainResult(out, cfg.max_steps, tokens_seen, final, elapsed)
