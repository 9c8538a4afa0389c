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
    p.add_argument("--target", default="cpu", help="where it will run: cpu or cuda (default cpu)")
    p.add_argument(
        "--max-flip-rate",
        type=_flip_rate,
        default=0.02,
        metavar="RATE",
        help="largest fraction of categorical samples allowed to differ (default 0.02)",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="batch size timed (default 1)")
    p.add_argument(
        "--horizon", type=positive_int, default=16, help="rollout steps timed (default 16)"
    )
    p.add_argument(
        "--metric", choices=METRICS, default="rollout", help="what fastest means (default rollout)"
    )
    p.add_argument(
        "--candidates",
        type=_names,
        help="comma-separated subset of " + ", ".join(CANDIDATES) + " (default all)",
    )
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.set_defaults(func=_cmd_optimize)


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
    else:
        sys.stdout.write(result.to_markdown())
        sys.stdout.write(f"{result.out}\n")
    return 0
