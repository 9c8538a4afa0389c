"""``worldflux-registry export``: export a model to a deployable artifact (progress per graph)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._args import check_output_dir

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (encode/transition/decode graphs + manifest)",
        description="Export REF (a family, family:preset or checkpoint directory) with an "
        "exporter plugin, then run the parity check of the export against the torch model and "
        "record it in the manifest. Load the result with registry.load(OUT).",
    )
    p.add_argument("ref", metavar="REF", help="registry ref or checkpoint directory")
    p.add_argument("--format", default="onnx", help="exporter name (default: onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's pinned one)")
    p.add_argument(
        "--graphs",
        default="encode,transition,decode",
        help="comma-separated graphs, or 'all' to add update where supported; 'rollout' adds "
        "the fused rollout graph, 'plan' / 'act' the agent step the contract declares "
        "(e.g. all,plan) (default: encode,transition,decode)",
    )
    p.add_argument(
        "--rollout-horizon",
        type=int,
        metavar="N",
        help="steps unrolled in the fused rollout graph (default: the exporter's, 16)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument(
        "--mode-graphs",
        action="store_true",
        help="also export '<graph>.mode' graphs: deterministic=True, no noise inputs",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the parity check")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..exporting._export import check_export, export
    from ..registry._registry import registry

    check_output_dir(args.out, "--out")
    console = Console(stderr=True, highlight=False)
    graphs: Any = (
        args.graphs
        if args.graphs == "all"
        else [g.strip() for g in args.graphs.split(",") if g.strip()]
    )
    with console.status(f"loading {args.ref}"):
        model = registry.load(args.ref)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    started: dict[str, float] = {}
    report = None
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def on_graph(graph: str, stage: str) -> None:
            if stage == "start":
                started[graph] = time.perf_counter()
                tasks[graph] = progress.add_task(f"export {graph}", total=1, state="tracing")
            else:
                took = time.perf_counter() - started.get(graph, time.perf_counter())
                progress.update(tasks[graph], completed=1, state=f"done in {took:.1f}s")

        # Only options the user asked for: other exporters need not know ONNX's.
        options: dict[str, Any] = {"mode_graphs": True} if args.mode_graphs else {}
        if args.rollout_horizon is not None:
            options["rollout_horizon"] = args.rollout_horizon
        out = export(
            model,
            args.format,
            args.out,
            opset=args.opset,
            graphs=graphs,
            precision=args.precision,
            check=False,
            progress=on_graph,
            **options,
        )
        if args.check:
            task = progress.add_task("parity check", total=1, state="running")
            report = check_export(model, out, args.format)
            state = "skipped" if report is None else "passed" if report.passed else "FAILED"
            progress.update(task, completed=1, state=state)
    passed = True
    if args.check and report is not None:
        report.print(Console(highlight=False))
        passed = bool(report.passed)
    print(out)
    return 0 if passed else 1
