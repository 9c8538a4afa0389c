"""`serve_export`: start (or join) Ray, and run the Serve application for one export."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ServeOptions", "serve_export"]


@dataclass(frozen=True)
class ServeOptions:
    """How the application runs.

    ``max_batch_size`` counts requests per batch (each may hold several rows);
    ``batch_wait_timeout_s`` is how long a partly filled batch waits for more; ``threads`` is
    ONNX Runtime's intra-op threads per replica; ``replica_cpus`` the Ray CPUs each replica
    reserves (0 lets replicas share a small machine's cores); ``max_sessions`` bounds the
    server-side sessions one replica holds.
    """

    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    threads: int = 1
    replica_cpus: float = 0.0
    max_ongoing_requests: int = 256
    max_sessions: int = 4096


def serve_export(
    export_dir: str | os.PathLike[str],
    options: ServeOptions | None = None,
    *,
    app: str = "worldflux",
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    num_cpus: int | None = None,
) -> Any:
    """Serve ``export_dir`` as the Serve application ``app``; return its `DeploymentHandle`.

    Without ``address`` (and outside a Ray cluster) a local Ray instance is started with
    ``num_cpus``; ``address="auto"`` or ``"ray://host:10001"`` joins an existing cluster,
    whose nodes must all see ``export_dir`` at the same path. HTTP listens on ``host:port``
    (``POST /v1/<op>``, ``GET /v1/info``). Returns once every replica is running.

    Raises:
        ExportError: ``export_dir`` is not a readable export (checked before Ray starts).
    """
    import ray
    from ray import serve

    from worldflux_registry.plugin_api import read_artifact_manifest

    from .server import build_app

    directory = os.path.abspath(os.fspath(export_dir))
    read_artifact_manifest(directory)
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(directory, options), name=app, route_prefix=route_prefix)
