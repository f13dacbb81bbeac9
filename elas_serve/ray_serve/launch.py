"""`elas-serve serve --replicas N`: the Ray Serve application on a local Ray (or `--ray-address`).

Ray Serve's HTTP proxy listens on `--host`/`--port` and hands requests to the ingress, which routes
each prompt to an engine replica. SIGTERM or SIGINT shuts the application down (Ray Serve lets
in-flight requests finish for its graceful-shutdown period), then Ray, and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading

from elas_serve.config import EngineConfig, ReplicaConfig, ServerConfig

log = logging.getLogger("elas_serve.ray_serve")


def serve_on_ray(engine_config: EngineConfig, server_config: ServerConfig, replicas: ReplicaConfig) -> int:
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'elas-serve[ray]'") from None
    from .deployments import build_application

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address=replicas.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options=HTTPOptions(host=server_config.host, port=server_config.port))
        serve.run(build_application(engine_config, server_config, replicas), name="elas-serve", route_prefix="/")
        count = replicas.replicas or f"{replicas.min_replicas}-{replicas.max_replicas}"
        log.info("serving %s with %s engine replica(s) on Ray Serve at http://%s:%d (routing: %s)",
                 server_config.model_name(engine_config), count, server_config.host, server_config.port,
                 replicas.routing)
        stop.wait()
        log.info("shutting down the Ray Serve application")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
