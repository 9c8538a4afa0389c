"""``worldflux-registry bench``: time a model on several backends, each gated by parity."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
        "size, or with --agent its agent step (what a deployer calls once per environment step: "
        "encode + plan for TD-MPC2, act for DreamerV3) per batch of environments. A registry ref "
        "or checkpoint directory is exported to ONNX first (export timed); an export directory is "
        "compared with the torch model of its manifest's family/preset. A backend whose parity "
        "check fails is reported as refused, without a speed.",
        epilog="examples:\n"
        "  worldflux-registry bench dreamerv3:ci --batch 1,32\n"
        "  worldflux-registry bench ./tdmpc2-ckpt --agent --batch 1,32 --json agent.json\n\n"
        "--agent times encode + plan (TD-MPC2) or act (DreamerV3) on torch, torch-compile and "
        "ort-cpu by default; each ONNX result is gated by parity of the agent graph (MPPI elites "
        "may differ only by a near-tie: swapped candidates whose values agree). Columns: the "
        "median agent-step time (p10-p90 beneath) and environment steps per second.",
    )
    p.add_argument("ref", metavar="REF_OR_EXPORT", help="registry ref or ONNX export directory")
    p.add_argument(
        "--agent",
        action="store_true",
        help="time the contract's agent step (encode + plan, or act) per environment step "
        "instead of transitions and rollouts; --batch gives the environment batches",
    )
    p.add_argument(
        "--backends",
        type=_names,
        default=None,
        help="comma-separated: torch, torch-compile, torch-cudagraph, ort-cpu, ort-cuda, "
        "ort-cuda-graph, and ort-*-fused variants that roll out through the fused rollout "
        "graph (a ref is then exported with one of --horizon steps), ort-cpu-int8 (an int8 "
        "export, gated by the int8 tolerances) (default: torch,ort-cpu); "
        "with --agent: torch, torch-compile, ort-cpu, ort-cuda "
        "(default: torch,torch-compile,ort-cpu)",
    )
    p.add_argument(
        "--batch", type=_ints, default=[1], metavar="B,...", help="comma-separated batch sizes"
    )
    p.add_argument("--horizon", type=positive_int, default=16, metavar="H", help="rollout length")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the JSON document")
    p.add_argument(
        "--markdown", metavar="FILE", help="write the Markdown tables (environment, every target)"
    )
    p.add_argument(
        "--reference",
        metavar="CHECKPOINT",
        help="torch checkpoint to compare an export with (default: rebuilt from the export)",
    )
    p.add_argument(
        "--export-dir", metavar="DIR", help="keep the export of a ref here (default: temporary)"
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch backends' device"
    )
    p.add_argument(
        "--warmup", type=positive_int, default=5, metavar="N", help="untimed calls first"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=50,
        metavar="N",
        help="timed agent steps with --agent, else timed transitions",
    )
    p.add_argument(
        "--rollout-repeats", type=positive_int, default=20, metavar="N", help="timed rollouts"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="stop repeating a series after this many seconds of timed calls",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch and ORT intra-op threads (default: torch's)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 on both sides (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.set_defaults(func=_cmd_bench, preflight=_preflight)


def _preflight(args: argparse.Namespace) -> None:
    """Argument checks that need no model (and no torch)."""
    from .. import bench as _bench

    if args.backends is None:
        args.backends = (
            ["torch", "torch-compile", "ort-cpu"] if args.agent else ["torch", "ort-cpu"]
        )
    _bench.check_backend_names(args.backends, agent=args.agent)
    check_output_file(args.json_path, "--json")
    check_output_file(args.markdown, "--markdown")
    check_output_dir(args.export_dir, "--export-dir")


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from .. import bench as _bench

    check_device(args.device)
    ort_options: dict[str, Any] = {}
    if args.threads:
        ort_options["intra_op_num_threads"] = args.threads
    err = Console(stderr=True, highlight=False)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"bench {args.ref}: loading torch", total=None)

        def on_stage(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        run = _bench.run(
            args.ref,
            agent=args.agent,
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
            progress=on_stage,
        )
    doc = _bench.document([run])
    _bench.write(doc, args.json_path, args.markdown)
    console = Console(highlight=False)
    console.print(_bench.to_rich(doc, console.width))
    for path in (args.json_path, args.markdown):
        if path:
            err.print(f"wrote {path}")
    bad = [r for r in run.results if r.status in ("refused", "error")]
    return 1 if bad else 0
