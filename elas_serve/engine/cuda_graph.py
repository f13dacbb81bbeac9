"""CUDA graphs for decode-only steps (one new token per request), as nano-vllm/vLLM capture them.

Captured once per batch size in `capture_sizes(max_num_seqs)` over static input buffers sharing one
memory pool; a step of `b` requests replays the smallest captured size >= b with the extra rows
padded: token 0 at position 0 writing into the null block, length 1. Attention in the graph reads
sequence lengths from a tensor over the full block-table width (`decode_attention_ref`), so the
replay does no host synchronisation. Prefill and mixed steps, and batches larger than the largest
captured size, run eagerly.
"""

from __future__ import annotations

import torch

from elas_serve.models import AttentionMetadata, ElasForCausalLM


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    return sizes + list(range(16, max_num_seqs + 1, 16))


class CUDAGraphRunner:
    """`capture=False` runs the same padded static-buffer steps eagerly: how the CPU tests check
    everything here but the capture itself."""

    def __init__(self, model: ElasForCausalLM, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_blocks_per_seq: int, capture: bool = True):
        device = model.output_weight.device
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, model.config.hidden_size, dtype=model.output_weight.dtype, device=device)
        self.model = model
        self.args = {b: (self.input_ids[:b], self.positions[:b],
                         AttentionMetadata(self.slot_mapping[:b], self.block_tables[:b], [1] * b, [1] * b,
                                           seq_lens_tensor=self.seq_lens[:b]), kv_caches)
                     for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not capture:
            return
        pool = None
        with torch.inference_mode():
            for b in reversed(self.sizes):
                self.hidden[:b] = model(*self.args[b])  # warm-up (allocator, cuBLAS handles)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[:b] = model(*self.args[b])
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()

    def can_run(self, query_lens: list[int]) -> bool:
        return len(query_lens) <= self.sizes[-1] and all(q == 1 for q in query_lens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        b = len(seq_lens)
        padded = next(s for s in self.sizes if s >= b)
        self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.slot_mapping[:b] = slot_mapping
        self.input_ids[b:padded] = 0
        self.positions[b:padded] = 0
        self.slot_mapping[b:padded] = 0  # NOTE: slot 0 lies in the null block
        self.block_tables[:padded] = 0
        self.block_tables[:b, :block_tables.shape[1]] = block_tables
        self.seq_lens[:padded] = 1
        self.seq_lens[:b] = torch.tensor(seq_lens, dtype=torch.int32, device=input_ids.device)
        if self.graphs:
            self.graphs[padded].replay()
        else:
            self.hidden[:padded] = self.model(*self.args[padded])
        return self.hidden[:b]
