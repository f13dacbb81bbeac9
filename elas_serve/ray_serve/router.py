"""PrefixAwareRouter: Ray Serve's request router for engine replicas, by load with prefix affinity.

Load is what each replica publishes (`EngineReplica.record_routing_stats`: requests running and
waiting in its engine, refreshed every second), or, when higher, the requests this router has
routed to it and not seen complete (fresh between two snapshots). Prefix affinity follows vLLM's and SGLang's routers: a request goes to the
replica that last served the longest block-aligned prefix of its prompt (chained hashes of
`block_size`-token blocks, as the KV cache's prefix caching hashes them), so that replica's prefix
cache hits; unless that replica carries `imbalance` more requests than the least loaded one, then
load wins. `prefix_affinity=False` routes round-robin (the baseline the benchmark compares with).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

MAX_PREFIXES = 200_000  # remembered prefix hashes (LRU)


def prefix_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's first full blocks, shortest prefix first."""
    hashes, parent = [], None
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, prefix_affinity: bool = True, block_size: int = 16, max_blocks: int = 64,
                         imbalance: int = 4) -> None:
        self.prefix_affinity, self.block_size, self.max_blocks = prefix_affinity, block_size, max_blocks
        self.imbalance = imbalance
        self.owner: OrderedDict[int, ReplicaID] = OrderedDict()  # prefix hash -> replica that served it
        self.in_flight: dict[ReplicaID, int] = {}  # routed here, not completed
        self._turn = itertools.count()

    def load(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        published = int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))
        return max(published, self.in_flight.get(replica.replica_id, 0))

    def _hashes(self, pending: PendingRequest | None) -> list[int]:
        if pending is None or not pending.args:
            return []
        prompt = pending.args[0]  # EngineReplica.generate(prompt: PreparedPrompt, ...)
        ids = getattr(prompt, "prompt_token_ids", None)
        return prefix_hashes(ids, self.block_size, self.max_blocks) if ids else []

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not self.prefix_affinity:
            start = next(self._turn) % len(candidate_replicas)
            return [[candidate_replicas[(start + i) % len(candidate_replicas)]] for i in range(len(candidate_replicas))]
        by_load = sorted(candidate_replicas, key=self.load)
        by_id = {r.replica_id: r for r in candidate_replicas}
        for h in reversed(self._hashes(pending_request)):  # longest prefix first
            owner = by_id.get(self.owner.get(h))
            if owner is not None:
                if self.load(owner) <= self.load(by_load[0]) + self.imbalance:
                    return [[owner], [r for r in by_load if r is not owner]]
                break
        return [[r] for r in by_load]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight[replica_id] = max(self.in_flight.get(replica_id, 0) - 1, 0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        if not self.prefix_affinity:
            return
        for h in self._hashes(pending_request):
            self.owner[h] = replica_id
            self.owner.move_to_end(h)
        while len(self.owner) > MAX_PREFIXES:
            self.owner.popitem(last=False)
