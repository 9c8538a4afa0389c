"""The Ray Serve application: one deployment whose replicas each run an export on ONNX Runtime.

Python callers reach it through a `DeploymentHandle` (`Client.connect`), everyone else over
HTTP: ``POST /v1/<op>`` with a binary envelope (``application/x-worldflux-serve``) or a JSON
body, ``GET /v1/info``. Requests of many callers are gathered by ``@serve.batch`` and run as one
batch along the contract's batch axis (`Engine.handle`); a bad request gets its own typed error
with a 4xx status and the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve

from worldflux_registry import WorldFluxRegistryError

from .engine import Engine
from .errors import ServeError, status_of
from .serve import ServeOptions
from .wire import (
    BINARY,
    JSON,
    Reply,
    Request,
    decode_request,
    encode_error,
    encode_reply,
    reply_to_json,
    request_from_json,
)

__all__ = ["DEPLOYMENT", "WorldModelServer", "build_app"]

DEPLOYMENT = "WorldModelServer"
#: The Ray namespace Serve registers its replica actors in.
SERVE_NAMESPACE = "serve"


def _load(export_dir: str, threads: int) -> Any:
    import onnxruntime as ort

    from worldflux_registry import registry

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return registry.load(export_dir, device="cpu", session_options=options)


def _replica_alive(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


@serve.deployment(name=DEPLOYMENT)
class WorldModelServer:
    """A replica: an `Engine` over the export, batched entry points for handle and HTTP."""

    def __init__(self, export_dir: str, options: dict[str, Any]) -> None:
        import ray

        from worldflux_registry.plugin_api import read_artifact_manifest

        opts = ServeOptions(**options)
        model = _load(export_dir, opts.threads)
        tag = ray.get_runtime_context().get_actor_name() or f"pid{os.getpid()}"
        self.engine = Engine(
            model,
            read_artifact_manifest(export_dir),
            tag=tag,
            owner_alive=_replica_alive,
            max_sessions=opts.max_sessions,
        )
        batched: Any = self._batched  # serve.batch adds these setters
        batched.set_max_batch_size(opts.max_batch_size)
        batched.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=4096)  # type: ignore[untyped-decorator,misc]
    async def _session_slot(self, key: str) -> str:
        """Registers a session's routing key on this replica, so Serve routes its requests
        here (multiplexed model ids); the State itself lives in the engine."""
        return key

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, requests: list[Request]) -> list[Reply | WorldFluxRegistryError]:
        # ONNX Runtime releases the GIL: run off the event loop so requests keep arriving.
        return await asyncio.to_thread(self.engine.handle, requests)

    async def _answer(self, request: Request) -> Reply | WorldFluxRegistryError:
        try:
            if request.op == "info":
                return Reply(info=self.engine.info())
            if request.session is not None and request.op != "open_session":
                self.engine.check_owner(request.session)
                await self._session_slot(self.engine.session_key(request.session))
            elif request.op == "open_session":
                # The caller picks the routing key (its multiplexed model id) when it wants
                # the session's later requests routed here from the start.
                key = serve.get_multiplexed_model_id() or self.engine.new_session_key()
                request.session = key
                await self._session_slot(key)
            return await self._batched(request)
        except WorldFluxRegistryError as exc:
            return exc

    async def call(self, payload: bytes) -> bytes:
        """One binary envelope in, one out (an error envelope for a bad request)."""
        try:
            request = decode_request(payload)
        except WorldFluxRegistryError as exc:
            return encode_error(exc)
        result = await self._answer(request)
        if isinstance(result, BaseException):
            return encode_error(result)
        return encode_reply(result)

    async def __call__(self, http: Any) -> Any:
        from starlette.responses import Response

        path = http.url.path.rstrip("/").rsplit("/", 1)[-1]
        body = await http.body()
        as_json = BINARY not in http.headers.get("content-type", "")
        try:
            if http.method == "GET" and path == "info":
                request = Request(op="info", fingerprint="")
            elif http.method != "POST":
                raise ServeError(f"use POST /v1/<op>, not {http.method}", status=405)
            elif as_json:
                request = request_from_json(body)
            else:
                request = decode_request(body)
            if path not in ("call", request.op):
                raise ServeError(f"path /{path} does not match op {request.op!r}", status=400)
            result = await self._answer(request)
        except WorldFluxRegistryError as exc:
            result = exc
        status = status_of(result) if isinstance(result, WorldFluxRegistryError) else 200
        if as_json:
            return Response(reply_to_json(result), status_code=status, media_type=JSON)
        data = encode_error(result) if isinstance(result, BaseException) else encode_reply(result)
        return Response(data, status_code=status, media_type=BINARY)


def build_app(export_dir: str, options: ServeOptions | None = None) -> Any:
    """The Serve application serving ``export_dir`` (bind it with `serve.run`)."""
    import dataclasses

    opts = options or ServeOptions()
    server: Any = WorldModelServer  # a serve Deployment, typed as the class
    deployment = server.options(
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_ongoing_requests,
        ray_actor_options={"num_cpus": opts.replica_cpus},
    )
    return deployment.bind(os.path.abspath(export_dir), dataclasses.asdict(opts))
