"""The Ray Serve application: `EngineReplica` (one engine each: core process + front end) and the
`Ingress` (the HTTP server of `elas-serve serve`, over a `RayEngineClient`).

A replica publishes its load for the router (`record_routing_stats`, every second), streams one
prompt's outputs per `generate` call (cancelling the call aborts the request), and fails its health
check once its engine is dead, so that Ray Serve replaces it. Replicas take `replica_gpus` GPUs
each (one by default when CUDA is present) or `replica_cpus` CPUs. A replica runs its engine core
on a thread (the replica is a process of its own already).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from elas_serve.config import EngineConfig, ReplicaConfig, ServerConfig
from elas_serve.frontend import AsyncLLM, PreparedPrompt
from elas_serve.outputs import RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import Tokenizer

STATS_PERIOD_S = 1.0


class EngineReplica:
    def __init__(self, engine_config: EngineConfig):
        # NOTE: the core on a thread: the replica is a process of its own already (a Ray actor)
        self.client = AsyncLLM(engine_config, multiprocess=False)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict:
        """The model and the tokenizer (serialized: the ingress may run on another machine)."""
        tok = self.client.tokenizer
        return {"model_info": self.client.model_info, "tokenizer": tok.tok.to_str(), "name": tok.name,
                "eos_token_ids": tok.eos_token_ids, "chat_template": tok.chat_template}

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str
                       ) -> AsyncIterator[tuple[str, RequestOutput, object]]:
        """(replica id, output, the engine's stats snapshot) per output of one prompt."""
        stream = self.client.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield self.replica_id, out, self.client.stats
        finally:
            stream.close()

    def record_routing_stats(self) -> dict[str, float]:
        stats = self.client.stats
        return {"num_running": stats.num_running, "num_waiting": self.client.num_queued,
                "kv_cache_usage": stats.kv_cache_usage}

    def check_health(self) -> None:
        if self.client.dead_error is not None:
            raise self.client.dead_error


@serve.ingress()
class Ingress:
    def __init__(self, replica, engine_config: EngineConfig, server_config: ServerConfig):
        self.replica, self.engine_config, self.server_config = replica, engine_config, server_config

    async def __serve_build_asgi_app__(self):
        from tokenizers import Tokenizer as HFTokenizer

        from elas_serve.server.app import build_app

        from .client import RayEngineClient
        info = await self.replica.info.remote()
        tokenizer = Tokenizer(HFTokenizer.from_str(info["tokenizer"]), info["eos_token_ids"], info["chat_template"],
                              info["name"])
        self.client = RayEngineClient(self.replica, info["model_info"], tokenizer)
        return build_app(self.client, self.server_config, self.server_config.model_name(self.engine_config))


def build_application(engine_config: EngineConfig, server_config: ServerConfig, replicas: ReplicaConfig):
    """The bound application: `serve.run` it."""
    gpus = replicas.replica_gpus
    if gpus is None:
        import torch
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    scaling = ({"num_replicas": replicas.replicas} if replicas.replicas is not None else {
        "autoscaling_config": AutoscalingConfig(min_replicas=replicas.min_replicas, max_replicas=replicas.max_replicas,
                                                target_ongoing_requests=replicas.target_ongoing_requests)})
    router = RequestRouterConfig(
        request_router_class="elas_serve.ray_serve.router:PrefixAwareRouter",
        request_router_kwargs={"prefix_affinity": replicas.routing == "prefix",
                               "block_size": engine_config.block_size},
        request_routing_stats_period_s=STATS_PERIOD_S)
    replica = serve.deployment(EngineReplica, name="EngineReplica", request_router_config=router,
                               ray_actor_options={"num_cpus": replicas.replica_cpus, "num_gpus": gpus},
                               max_ongoing_requests=max(engine_config.max_num_seqs * 4, 64),
                               health_check_period_s=2, health_check_timeout_s=30, **scaling)
    # NOTE: the engine replica's own API key, drain and limits stay the ingress's business
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return ingress.bind(replica.bind(dataclasses.replace(engine_config)), engine_config, server_config)
