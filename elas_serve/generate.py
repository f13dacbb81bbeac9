"""Single-prompt offline generation over a contiguous KV cache (no engine yet).

The cache uses the paged layout with an identity block table, so this exercises the same
attention path the engine drives.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from elas_serve.models import AttentionMetadata, ElasForCausalLM
from elas_serve.tokenizer import IncrementalDetokenizer, Tokenizer

BLOCK_SIZE = 16


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """One token id from float32 logits (V,): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set >= top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_stream(model: ElasForCausalLM, tokenizer: Tokenizer, prompt: str, max_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
                    ) -> Iterator[str]:
    """Yield text deltas of the completion of `prompt`; stops at EOS or `max_tokens`."""
    cfg = model.config
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    device = model.output_weight.device
    total = len(ids) + max_tokens
    num_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
    kv_caches = [torch.zeros(2, num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim,
                             dtype=model.output_weight.dtype, device=device)
                 for _ in range(cfg.num_hidden_layers)]
    block_table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    detok = IncrementalDetokenizer(tokenizer, ids)
    new_ids, start = ids, 0
    for _ in range(max_tokens):
        positions = torch.arange(start, start + len(new_ids), device=device)
        meta = AttentionMetadata(slot_mapping=positions, block_tables=block_table,
                                 query_lens=[len(new_ids)], seq_lens=[start + len(new_ids)])
        hidden = model(torch.tensor(new_ids, device=device), positions, meta, kv_caches)
        token = sample_next(model.compute_logits(hidden[-1]).cpu(), temperature, top_p, generator)
        start += len(new_ids)
        if token in tokenizer.eos_token_ids:
            break
        yield detok.push([token])
        new_ids = [token]
    yield detok.flush()
