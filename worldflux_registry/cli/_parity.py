"""``worldflux-registry parity``: check an export against its PyTorch model.

Exit codes: 0 the check passed, 1 it ran and failed, 2 it could not run as asked (usage: a bad
argument, a directory that is no export, a reference that cannot be loaded or has another
contract, a tolerance key naming no output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WorldFluxRegistryError
from ..registry._artifact import read_artifact_manifest
from ._args import check_device, check_output_file, device

if TYPE_CHECKING:
    from rich.console import Console

    from ..protocol._model import WorldModel

__all__ = ["register"]

_MODES = ("step", "teacher_forced", "free_running")


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    (value,) = _positive_ints(text) or [0]
    return value


def _tolerance(text: str) -> tuple[str, tuple[float, float]]:
    key, sep, values = text.partition("=")
    parts = values.replace(":", ",").split(",")
    try:
        rtol, atol = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected KEY=RTOL,ATOL (e.g. transition/state.deter=1e-4,1e-5), got {text!r}"
        ) from None
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=RTOL,ATOL, got {text!r}")
    return key, (rtol, atol)


def register(subparsers: Any) -> None:
    """Add the ``parity`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "parity",
        help="check that an export agrees with its PyTorch model (exit 1 if not)",
        description="Run the export and its PyTorch reference on the same seeded inputs: every "
        "graph and output, single steps, teacher-forced and free-running rollouts. Prints a "
        "table; exit 0 when it passes, 1 when it fails, 2 when it cannot run as asked.",
    )
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory written by export")
    p.add_argument(
        "--reference",
        metavar="REF_OR_CHECKPOINT",
        help="the torch model to compare with: a checkpoint directory (save_pretrained) or a "
        "registry ref. Default: the manifest's family and config with the weights read back "
        "from the export's initializers (then corrupted weights cannot be caught)",
    )
    p.add_argument(
        "--horizon", type=_positive, default=16, metavar="H", help="rollout length in steps"
    )
    p.add_argument(
        "--batch",
        type=_positive_ints,
        nargs="+",
        metavar="B",
        help="batch sizes, e.g. --batch 1 7 or --batch 1,7 (default: 1 7)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument(
        "--mode",
        action="append",
        choices=_MODES,
        help="run only these modes (repeatable; default: all three)",
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        action="append",
        metavar="KEY=RTOL,ATOL",
        help="override a tolerance: KEY is graph/output, output or graph (repeatable; "
        "default: per dtype and precision)",
    )
    p.add_argument(
        "--precision",
        help="precision the default tolerances follow: fp32, fp16, bf16 (default: the "
        "looser of the two sides')",
    )
    p.add_argument(
        "--strict-tf32", action="store_true", help="turn torch TF32 off during the check"
    )
    p.add_argument(
        "--providers",
        help="ONNX Runtime providers for the export, comma-separated (default: auto)",
    )
    p.add_argument("--device", type=device, help="device of the torch reference (default: cpu)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the JSON report")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of the error per rollout step")
    p.set_defaults(func=_cmd_parity, preflight=_preflight)


def _preflight(args: argparse.Namespace) -> None:
    """Output paths, checked before the models (and torch) load."""
    check_output_file(args.json_path, "--json")
    check_output_file(args.plot, "--plot")


def _usage(console: Console, message: str) -> int:
    from rich.markup import escape

    console.soft_wrap = True  # one line, however narrow the terminal
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return 2


def _cmd_parity(args: argparse.Namespace) -> int:
    from rich.console import Console

    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    export_dir = Path(args.export_dir)
    if not (export_dir / "manifest.json").is_file():
        return _usage(
            err,
            f"{export_dir} is not an export directory (no manifest.json) (write one with "
            f"`worldflux-registry export REF --out {export_dir}`)",
        )
    try:
        manifest = read_artifact_manifest(export_dir)
    except WorldFluxRegistryError as exc:
        return _usage(err, str(exc))
    try:
        from .. import parity
        from ..registry._registry import registry

        options: dict[str, Any] = {}
        if args.providers:
            options["providers"] = [p.strip() for p in args.providers.split(",") if p.strip()]
        candidate = registry.load(str(export_dir.resolve()), **options)
        reference, note = _reference(args, export_dir, manifest)
        batches = [b for group in (args.batch or [[1, 7]]) for b in group]
        report = parity.check(
            reference,
            candidate,
            batch_sizes=batches,
            horizon=args.horizon,
            seed=args.seed,
            tolerances=dict(args.tolerance) if args.tolerance else None,
            modes=tuple(args.mode) if args.mode else _MODES,
            precision=args.precision,
            strict_tf32=args.strict_tf32,
        )
    except WorldFluxRegistryError as exc:
        return _usage(err, str(exc))
    if note:
        report.notes.insert(0, note)  # printed under the table with the check's own notes
    report.print(out)
    try:
        if args.json_path:
            report.to_json(args.json_path)
            err.print(f"wrote the JSON report to {args.json_path}")
        if args.plot:
            report.plot(args.plot)
            err.print(f"wrote the plot to {args.plot}")
    except (ImportError, OSError) as exc:
        return _usage(err, str(exc))
    return 0 if report.passed else 1


def _reference(
    args: argparse.Namespace, export_dir: Path, manifest: dict[str, Any]
) -> tuple[WorldModel, str | None]:
    from ..registry._registry import is_path_ref, registry

    device = args.device or "cpu"
    check_device(device)
    if args.reference:
        ref = args.reference
        if Path(ref).is_dir() and not is_path_ref(ref):
            ref = "./" + ref  # a bare directory name would read as a family name
        return registry.load(ref, device=device), None
    import torch

    from ..registry._from_export import model_from_export, weight_conflicts

    # Tensors the export does not hold keep this seeded init: unused by the exported graphs
    # they cannot matter, and folded into them they make parity fail, which says so.
    torch.manual_seed(args.seed)
    model, missing = model_from_export(export_dir, manifest)
    note = (
        "no --reference: the torch model was rebuilt with weights read from the export itself, "
        "so this checks the graphs' computation but cannot catch corrupted weights"
    )
    conflicts = weight_conflicts(export_dir)
    if conflicts:
        files = sorted({f for odd in conflicts.values() for f in odd})
        name, odd = next(iter(sorted(conflicts.items())))
        note += (
            f"; the graph files disagree on {len(conflicts)} weights (e.g. {name!r}: "
            f"{', '.join(odd)} differ from the other files): the reference takes the copy most "
            f"files hold, so the damaged file is most likely {', '.join(files)}"
        )
    if missing:
        note += (
            f"; {len(missing)} tensors are not in the export (e.g. {missing[0]!r}: unused by its "
            "graphs, or folded into them) and keep a seeded init: if parity fails, pass "
            "--reference CHECKPOINT_DIR"
        )
    return model.to(device), note


if __name__ == "__main__":  # pragma: no cover
    from ._main import main

    sys.exit(main(["parity", *sys.argv[1:]]))
