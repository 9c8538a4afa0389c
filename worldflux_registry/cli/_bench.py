"""``worldflux-registry bench``: time a model on several backends, each gated by parity."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._args import check_device, check_output_dir, check_output_file, positive_int

__all__ = ["register"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark a model on torch and ONNX Runtime backends (parity-gated)",
        description="Time one transition and whole rollouts of a model on each backend and batch "
        "size. A registry ref is exported to ONNX first (export timed); an export directory is "
        "compared with the torch model of its manifest's family/preset. A backend whose parity "
        "check fails is reported as refused, without a speed.",
    )
    p.add_argument("ref", metavar="REF_OR_EXPORT", help="registry ref or ONNX export directory")
    p.add_argument(
        "--backends",
        type=_names,
        default=["torch", "ort-cpu"],
        help="comma-separated: torch, torch-compile, torch-cudagraph, ort-cpu, ort-cuda, "
        "ort-cuda-graph, and ort-*-fused variants that roll out through the fused rollout "
        "graph (a ref is then exported with one of --horizon steps) (default: torch,ort-cpu)",
    )
    p.add_argument("--batch", type=_ints, default=[1], help="comma-separated batch sizes")
    p.add_argument("--horizon", type=int, default=16, help="rollout length (default 16)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the JSON document")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown tables")
    p.add_argument(
        "--reference", metavar="CHECKPOINT", help="torch checkpoint to compare an export with"
    )
    p.add_argument("--export-dir", metavar="DIR", help="keep the export of a ref here")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch backends' device"
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--repeats", type=int, default=50, help="timed transitions (default 50)")
    p.add_argument("--rollout-repeats", type=int, default=20, help="timed rollouts (default 20)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop repeating after this long")
    p.add_argument("--threads", type=positive_int, help="torch and ORT intra-op threads")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on both sides (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench as _bench

    _bench.check_backend_names(args.backends)
    check_output_file(args.json_path, "--json")
    check_output_file(args.markdown, "--markdown")
    check_output_dir(args.export_dir, "--export-dir")
    check_device(args.device)
    if args.horizon < 1:
        raise ConfigError(f"--horizon must be >= 1, got {args.horizon}")
    ort_options: dict[str, Any] = {}
    if args.threads:
        ort_options["intra_op_num_threads"] = args.threads
    run = _bench.run(
        args.ref,
        backends=args.backends,
        batches=args.batch,
        horizon=args.horizon,
        # --reference names a checkpoint directory: a bare name must not read as a family.
        reference=Path(args.reference) if args.reference else None,
        export_dir=args.export_dir,
        device=args.device,
        seed=args.seed,
        warmup=args.warmup,
        repeats=args.repeats,
        rollout_repeats=args.rollout_repeats,
        max_seconds=args.max_seconds,
        tf32=args.tf32,
        torch_threads=args.threads,
        ort_options=ort_options,
    )
    doc = _bench.document([run])
    _bench.write(doc, args.json_path, args.markdown)
    print(_bench.to_markdown(doc))
    bad = [r for r in run.results if r.status in ("refused", "error")]
    return 1 if bad else 0
