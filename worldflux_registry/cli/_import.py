"""``worldflux-registry import``: bring an official checkpoint in as a checkpoint directory."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``import`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "import",
        help="import a checkpoint written by a family's official code",
        description="Read SOURCE (an official checkpoint file or folder) with FAMILY's importer "
        "and write a checkpoint directory (config.json + model.safetensors) that "
        "registry.load(OUT) loads. Every source tensor is mapped or dropped with its reason; "
        "both lists are printed and recorded as provenance in config.json.",
    )
    p.add_argument("family", metavar="FAMILY", help="family name or alias (e.g. tdmpc2)")
    p.add_argument("source", metavar="SOURCE", help="the official checkpoint file or folder")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="what the source does not record (repeatable); the error names what is missing",
    )
    p.add_argument(
        "--format", dest="source_format", help="source format, when the family has several"
    )
    p.add_argument("--json", action="store_true", help="print the provenance record as JSON")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .._rich import fit_words
    from ..registry._import import parse_config_pairs
    from ..registry._registry import registry

    config = parse_config_pairs(args.config)
    console = Console(stderr=True, highlight=False)
    with console.status(f"importing {args.source}"):
        result = registry.import_checkpoint(
            args.family, args.source, args.out, config=config, source_format=args.source_format
        )
    record = result.provenance()
    if args.json:
        sys.stdout.write(json.dumps({"out": args.out, **record}, indent=2) + "\n")
        return 0
    out = Console(highlight=False)
    out.print(
        f"imported {result.source_format} {result.source_sha256[:19]} as "
        f"{result.model.family} into [bold]{args.out}[/bold] "
        f"(matches official {result.official_commit or '?'})"
    )
    if result.inferred:
        out.print("inferred: " + ", ".join(f"{k}={v}" for k, v in result.inferred.items()))
    table = Table(title_justify="left", show_edge=False)
    table.add_column("source tensor", overflow="fold")
    table.add_column("kept as / dropped because", overflow="fold")
    for src, dst in sorted(result.mapped.items()):
        table.add_row(src, dst)
    for src, why in sorted(result.dropped.items()):
        table.add_row(f"[dim]{src}[/dim]", f"[yellow]dropped[/yellow]: {why}")
    out.print(fit_words(table, out.width))
    out.print(
        f"{len(result.mapped)} tensors kept, {len(result.dropped)} dropped; "
        f"load it with registry.load({args.out!r})"
    )
    for note in result.notes:
        out.print(f"note: {note}")
    return 0
