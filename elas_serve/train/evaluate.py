"""Held-out evaluation: mean next-token loss, perplexity and bits per byte.

Windows of `seq_len` targets tile the held-out split (`data.eval_windows`), so a full evaluation
predicts every token but the first exactly once, each with the context of its own window.
Bits per byte = total loss in bits / UTF-8 bytes of the text those tokens encode; on a partial
evaluation (`max_windows`) the split's average bytes per token stands in for the exact count.
With several processes the windows are dealt round-robin and the sums all-reduced. With
`progress`, a tqdm bar counts this process's windows (a full evaluation can take minutes on a CPU).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from elas_serve.models import ElasForCausalLM

from .data import TokenSplit, eval_windows


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens predicted

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def token_nll(model: ElasForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float32 scalar) of rows x (B, S) with targets y (B, S)."""
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)  # (B, S)
    logits = model.compute_logits(model(x, positions))  # (B, S, V) float32
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")


@torch.no_grad()
def evaluate(model: ElasForCausalLM, split: TokenSplit, seq_len: int, batch_size: int,
             device: torch.device, max_windows: int | None = None,
             autocast: AbstractContextManager | None = None, progress: bool = False,
             desc: str = "eval") -> EvalResult:
    """Loss / perplexity / bits per byte of `model` on `split` (all of it unless `max_windows`)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    starts = eval_windows(split, seq_len)
    if max_windows is not None:
        starts = starts[:max_windows]
    mine = starts[rank::world]
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    # NOTE: not left behind; tqdm puts it under the training bar when a periodic evaluation runs.
    bar = tqdm(total=len(mine), desc=desc, unit="window", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    for i in range(0, len(mine), batch_size):
        group = mine[i:i + batch_size]
        # NOTE: windows are grouped by length so the short last window gets its own batch.
        by_len: dict[int, list[int]] = {}
        for s in group:
            by_len.setdefault(min(seq_len, len(split) - 1 - s), []).append(s)
        for length, ss in by_len.items():
            rows = torch.stack([torch.from_numpy(split.tokens[s:s + length + 1].astype("int64"))
                                for s in ss]).to(device)  # (B, L + 1)
            with autocast or nullcontext():
                nll += token_nll(model, rows[:, :-1], rows[:, 1:]).double()
            count += rows.shape[0] * length
        bar.update(len(group))
    bar.close()
    if world > 1:
        dist.all_reduce(nll)
        dist.all_reduce(count)
    model.train(was_training)
    tokens = int(count.item())
    loss = nll.item() / max(tokens, 1)
    if max_windows is None:
        num_bytes = split.num_bytes
    else:  # partial evaluation: bytes estimated from the split's bytes per token
        num_bytes = tokens * split.num_bytes / len(split)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)),
                      bits_per_byte=nll.item() / math.log(2) / num_bytes, tokens=tokens)
