"""CUDA graphs for decode-only steps (one new token per request), captured over the (compiled) decoder.

Captured once per batch size in `capture_sizes(max_num_seqs)` over static input buffers sharing one
memory pool; a step of `b` requests replays the smallest captured size >= b with the extra rows
padded: token 0 at position 0 writing into slot 0 of the null block, length 1, a block table of
null blocks. The attention op reads the step's lengths and block tables from the static metadata
tensors (`AttentionMetadata` with no host lists), and the Triton kernel walks only the blocks each
sequence uses, so a replay does no host synchronisation and costs O(context), not
O(max_model_len). Prefill and mixed steps, and batches larger than the largest captured size, run
the decoder without a graph.
"""

from __future__ import annotations

import torch

from elas_serve.models import AttentionMetadata
from elas_serve.models.attention import forward_context

from .compilation import Decoder


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    return sizes + list(range(16, max_num_seqs + 1, 16))


class CUDAGraphRunner:
    """`capture=False` runs the same padded static-buffer steps without graphs: how the CPU tests
    check everything here but the capture itself."""

    def __init__(self, decoder: Decoder, hidden_size: int, dtype: torch.dtype, max_num_seqs: int,
                 max_blocks_per_seq: int, capture: bool = True):
        device = decoder.kv_caches[0].device
        self.decoder = decoder
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.meta = {b: self.static_metadata(b) for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not capture:
            return
        pool = None
        with torch.inference_mode():
            for b in reversed(self.sizes):
                with forward_context(self.meta[b]):
                    self.hidden[:b] = decoder(self.input_ids[:b], self.positions[:b])  # warm-up
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.hidden[:b] = decoder(self.input_ids[:b], self.positions[:b])
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize()

    def static_metadata(self, b: int) -> AttentionMetadata:
        """Over the first `b` rows of the static buffers, with no host lists (graph-safe)."""
        return AttentionMetadata(self.slot_mapping[:b], self.block_tables[:b], self.query_start_loc[:b + 1],
                                 self.seq_lens[:b])

    def can_run(self, query_lens: list[int]) -> bool:
        return len(query_lens) <= self.sizes[-1] and all(q == 1 for q in query_lens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        padded = next(s for s in self.sizes if s >= b)
        width = meta.block_tables.shape[1]
        self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.slot_mapping[:b] = meta.slot_mapping
        self.seq_lens[:b] = meta.seq_lens
        self.block_tables[:b, :width] = meta.block_tables
        if padded > b:
            self.input_ids[b:padded] = 0
            self.positions[b:padded] = 0
            self.slot_mapping[b:padded] = 0  # NOTE: slot 0 lies in the null block
            self.seq_lens[b:padded] = 1
            self.block_tables[b:padded] = 0
        if self.graphs:
            self.graphs[padded].replay()
        else:
            with forward_context(self.static_metadata(padded)):  # NOTE: fresh: the CPU path caches a plan in it
                self.hidden[:padded] = self.decoder(self.input_ids[:padded], self.positions[:padded])
        return self.hidden[:b]
