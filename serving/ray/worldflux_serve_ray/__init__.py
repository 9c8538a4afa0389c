"""worldflux-serve-ray: serve worldflux-registry exports on Ray Serve, write Triton repositories.

``import worldflux_serve_ray`` is cheap (no ray, no torch): names load on first access.

- `serve_export` / ``worldflux-registry serve EXPORT_DIR``: a Ray Serve application with
  dynamic batching along the contract's batch axis and optional server-side sessions;
- `Client` (DeploymentHandle or HTTP), `Session`, `RemoteWorldModel` (the `WorldModel`
  protocol forwarded to the server, so user code is unchanged);
- `write_triton_repository` / ``worldflux-registry triton EXPORT_DIR --out REPO``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import PayloadError, ReplicaUnavailableError, ServeError, SessionLostError

if TYPE_CHECKING:
    from .client import Client, RemoteWorldModel, Session
    from .engine import Engine
    from .serve import ServeOptions, serve_export
    from .triton import write_triton_repository

__all__ = [
    "Client",
    "Engine",
    "PayloadError",
    "RemoteWorldModel",
    "ReplicaUnavailableError",
    "ServeError",
    "ServeOptions",
    "Session",
    "SessionLostError",
    "__version__",
    "serve_export",
    "write_triton_repository",
]
__version__ = "0.1.0"

_LAZY = {
    "Client": ".client",
    "RemoteWorldModel": ".client",
    "Session": ".client",
    "Engine": ".engine",
    "ServeOptions": ".serve",
    "serve_export": ".serve",
    "write_triton_repository": ".triton",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
