"""``worldflux-registry optimize``: export several ways, keep the fastest that passes parity."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._args import positive_int

__all__ = ["register"]


def _flip_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value:g}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: Any) -> None:
    """Add the ``optimize`` subcommand to the CLI's subparsers."""
    from ..optimizing import CANDIDATES, METRICS

    p = subparsers.add_parser(
        "optimize",
        help="export fp32, int8 and fused variants, keep the fastest that passes parity",
        description="Export a model as each candidate (fp32 and int8, step by step or through "
        "the fused rollout graph), check each against the torch model (free-running rollouts; "
        "categorical outputs by their flip rate), time the ones that pass on this machine "
        "(interleaved), and write the fastest to --out with its table.",
    )
    p.add_argument("ref", help="registry ref (family:preset) or checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory")
    p.add_argument("--target", default="cpu", help="where it will run: cpu or cuda")
    p.add_argument(
        "--max-flip-rate",
        type=_flip_rate,
        default=0.02,
        metavar="RATE",
        help="largest fraction of categorical samples allowed to differ from torch's",
    )
    p.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size timed")
    p.add_argument(
        "--horizon", type=positive_int, default=16, metavar="H", help="rollout steps timed"
    )
    p.add_argument("--metric", choices=METRICS, default="rollout", help="what fastest means")
    p.add_argument(
        "--candidates",
        type=_names,
        metavar="NAME,...",
        help="comma-separated subset of " + ", ".join(CANDIDATES) + " (default: all)",
    )
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="ONNX Runtime intra-op threads"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the parity and timing inputs")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.set_defaults(func=_cmd_optimize, preflight=_preflight)


def _preflight(args: argparse.Namespace) -> None:
    """Argument checks that need no model (and no torch)."""
    from pathlib import Path

    from ..optimizing._optimize import _check_args, _check_out

    _check_args(
        args.target, args.max_flip_rate, args.batch, args.horizon, args.metric, args.candidates
    )
    _check_out(Path(args.out))


def _cmd_optimize(args: argparse.Namespace) -> int:
    from ..optimizing import optimize

    result = optimize(
        args.ref,
        args.out,
        target=args.target,
        max_flip_rate=args.max_flip_rate,
        batch=args.batch,
        horizon=args.horizon,
        metric=args.metric,
        candidates=args.candidates,
        threads=args.threads,
        seed=args.seed,
    )
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    from .._rich import fit_words

    console = Console(highlight=False)
    table = Table(
        title=f"{result.model} on {result.target}, batch {result.batch}, "
        f"{result.horizon}-step rollout, flip budget {result.max_flip_rate:g}",
        title_justify="left",
    )
    for name, justify in (
        ("candidate", "left"),
        ("parity", "left"),
        ("flips", "right"),
        ("transition", "right"),
        ("rollout", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in result.candidates:
        flip = c.parity.get("free_running_flip_rate")
        verdict = {"chosen": "[green]chosen[/]", "passed": "pass"}.get(
            c.status, f"[red]{c.status}[/]"
        )
        table.add_row(
            c.name,
            verdict,
            "-" if flip is None else f"{100 * flip:.1f}%",
            _ms(c.latency.get("transition")),
            _ms(c.latency.get("rollout")),
        )
    console.print(fit_words(table, console.width))
    for c in result.candidates:
        if c.reasons:
            console.print(f"{c.name}: " + "; ".join(c.reasons), soft_wrap=False)
    console.print(f"wrote {result.chosen} to {result.out}")
    return 0


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
