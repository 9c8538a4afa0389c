"""``worldflux-registry serve`` and ``worldflux-registry triton`` (a core CLI extension).

Imported by every ``worldflux-registry`` invocation once this distribution is installed, so it
imports nothing heavy at module level: ray and torch load only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub: Any) -> None:
    """Add the ``serve`` and ``triton`` subcommands to the core parser's ``sub``."""
    p = sub.add_parser("serve", help="serve an ONNX export on Ray Serve (batched, HTTP + handle)")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="an ONNX export directory")
    p.add_argument("--replicas", type=_positive, default=1, help="replicas (default 1)")
    p.add_argument(
        "--max-batch-size",
        type=_positive,
        default=32,
        help="requests gathered into one batch (default 32)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a partial batch waits for more requests (default 2 ms)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="ONNX Runtime intra-op threads per replica (default 1)",
    )
    p.add_argument(
        "--replica-cpus",
        type=float,
        default=0.0,
        help="Ray CPUs reserved per replica (default 0: replicas share cores)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster ('auto', 'ray://head:10001'); "
        "default: start a local Ray instance",
    )
    p.add_argument("--app", default="worldflux", help="Serve application name")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("triton", help="write a Triton model repository for an ONNX export")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="an ONNX export directory")
    p.add_argument("--out", required=True, help="the model repository to write")
    p.add_argument(
        "--max-batch-size",
        type=_positive,
        default=64,
        help="max_batch_size of every model (default 64)",
    )
    p.add_argument(
        "--instances",
        type=_positive,
        default=1,
        help="instances per device in each instance group (default 1)",
    )
    p.add_argument(
        "--kind",
        choices=("gpu", "cpu"),
        default="gpu",
        help="instance group kind (default gpu: one group per GPU)",
    )
    p.add_argument("--prefix", default=None, help="model name prefix (default <family>_<preset>)")
    p.set_defaults(func=_cmd_triton)


def _cmd_serve(args: argparse.Namespace) -> int:
    import time

    from .serve import ServeOptions, serve_export

    options = ServeOptions(
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        threads=args.threads,
        replica_cpus=args.replica_cpus,
    )
    serve_export(
        args.export_dir, options, app=args.app, address=args.address, host=args.host, port=args.port
    )
    print(
        f"serving {args.export_dir} as '{args.app}' on http://{args.host}:{args.port}/v1/ "
        f"({args.replicas} replica(s)); Ctrl-C stops",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(args.app)
        return 0


def _cmd_triton(args: argparse.Namespace) -> int:
    from .triton import write_triton_repository

    written = write_triton_repository(
        args.export_dir,
        args.out,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        kind=args.kind,
        prefix=args.prefix,
    )
    for model in written.models:
        print(f"{model}: {written.root / model / 'config.pbtxt'}")
    return 0
