"""``worldflux-registry export``: export a model to a deployable artifact (progress per graph)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigError
from ._args import check_output_dir, positive_int

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["register"]

#: Graph names ``--graphs`` takes: the protocol steps, the fused rollout and the agent steps
#: (an exporter refuses those the model does not advertise), and ``all`` for every step.
GRAPH_NAMES: Final = ("encode", "transition", "update", "decode", "rollout", "plan", "act")


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
    p.add_argument("--format", default="onnx", help="exporter name")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="artifact directory to write: new, empty, or an earlier export (replaced)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's pinned one, 18)")
    p.add_argument(
        "--graphs",
        type=_graph_list,
        default=["encode", "transition", "decode"],
        help="comma-separated graphs; 'all' is every protocol step the model advertises "
        "(update too where supported) and combines with the others: 'rollout' adds the fused "
        "rollout graph, 'plan' / 'act' the agent step the contract declares (e.g. all,rollout) "
        "(default: encode,transition,decode)",
    )
    p.add_argument(
        "--rollout-horizon",
        type=positive_int,
        metavar="N",
        help="steps unrolled in the fused rollout graph (default: the exporter's, 16)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="weights and compute: fp32, fp16 (inputs and outputs stay float32) or int8 "
        "(dynamic int8 MatMul/Gemm)",
    )
    p.add_argument(
        "--mode-graphs",
        action="store_true",
        help="also export '<graph>.mode' graphs: deterministic=True, no noise inputs",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the parity check (default: run it and store its summary in the manifest)",
    )
    p.set_defaults(func=_cmd_export, preflight=_preflight)


def _graph_list(text: str) -> list[str]:
    graphs = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in graphs if g != "all" and g not in GRAPH_NAMES]
    if unknown or not graphs:
        from ..errors import did_you_mean

        hint = did_you_mean(unknown[0], (*GRAPH_NAMES, "all")) if unknown else ""
        raise argparse.ArgumentTypeError(
            f"unknown graph {unknown[0]!r}.{hint} Choose from all, {', '.join(GRAPH_NAMES)}"
            if unknown
            else "no graph named"
        )
    return graphs


def _preflight(args: argparse.Namespace) -> None:
    """What can be refused from the arguments alone, before the model (and torch) loads."""
    from ..registry._registry import registry

    registry.get_exporter(args.format)
    check_output_dir(args.out, "--out")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ConfigError(
            f"--out {args.out} is not empty and holds no export (no manifest.json): "
            "nothing else is replaced",
            hint="choose a new or empty directory",
        )


def _cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..exporting._export import check_export, export
    from ..registry._registry import registry

    err = Console(stderr=True, highlight=False)
    graphs: Any = args.graphs
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
    )
    report = None
    with Progress(*columns, console=err, transient=True) as progress:
        # One task for the whole export: graphs done / total, and the step running now.
        task = progress.add_task(f"export {escape(args.ref)}", total=None, step="loading model")
        model = registry.load(args.ref)
        queued: list[str] = []
        started = [time.perf_counter()]
        extra = 1 if args.check else 0

        def on_graph(graph: str, stage: str) -> None:
            if stage == "queued":
                queued.append(graph)
                progress.update(task, total=len(queued) + extra)
            elif stage == "start":
                started[0] = time.perf_counter()
                progress.update(task, step=f"{graph}: starting")
            elif stage == "done":
                took = time.perf_counter() - started[0]
                progress.console.print(f"[green]✓[/] exported {graph} in {took:.1f} s")
                progress.advance(task)
                progress.update(task, step="")
            else:
                progress.update(task, step=f"{graph}: {stage}")

        # Only options the user asked for: other exporters need not know ONNX's.
        options: dict[str, Any] = {"mode_graphs": True} if args.mode_graphs else {}
        if args.rollout_horizon is not None:
            options["rollout_horizon"] = args.rollout_horizon
        progress.update(task, step="starting")
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
            progress.update(task, step="parity check")
            t0 = time.perf_counter()
            report = check_export(model, out, args.format)
            verdict = "skipped" if report is None else "passed" if report.passed else "FAILED"
            colour = "green" if verdict == "passed" else "red"
            progress.console.print(
                f"[{colour}]✓[/] parity check {verdict} in {time.perf_counter() - t0:.1f} s"
            )
            progress.advance(task)
    console = Console(highlight=False)
    console.print(_summary(Path(out), console.width))
    passed = True
    if args.check and report is not None:
        report.print(console)
        passed = bool(report.passed)
    print(out)
    return 0 if passed else 1


def _summary(out: Path, width: int) -> Table:
    """The graphs written: file and size on disk (external data included); each graph's
    export time was printed as it finished."""
    from rich.table import Table

    from .._rich import fit_words
    from ..registry._artifact import read_artifact_manifest

    manifest = read_artifact_manifest(out)
    details = [str(manifest.get(k)) for k in ("format", "precision") if manifest.get(k) is not None]
    if manifest.get("opset") is not None:
        details.append(f"opset {manifest['opset']}")
    table = Table(title=f"Export {out} ({', '.join(details)})", title_justify="left")
    table.add_column("graph")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, entry in (manifest.get("graphs") or {}).items():
        files = [
            entry.get("file", ""),
            *(e.get("file", "") for e in entry.get("external_data", [])),
        ]
        size = sum((out / f).stat().st_size for f in files if f and (out / f).is_file())
        table.add_row(name, str(entry.get("file", "?")), _size(size))
    fit_words(table, width)
    return table


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"
