"""End-to-end demo (``make demo``): list families, load DreamerV3, export it to ONNX, load the
export through the registry, roll it out on ONNX Runtime and compare it with torch; then import
the official TD-MPC2 reference checkpoint, export it and check its parity.

    python examples/demo.py                      # dreamerv3:ci, export in a temporary directory
    python examples/demo.py --preset size1m --out exports/dreamerv3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from worldflux_registry import registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="dreamerv3")
    parser.add_argument("--preset", default="ci", help="preset (default: ci, fast on 2 cores)")
    parser.add_argument("--out", help="export directory (default: a temporary directory)")
    parser.add_argument("--horizon", type=int, default=16, help="rollout length")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    console = Console(highlight=False)

    # 1. What is installed (no torch imported for this).
    table = Table(title="Registered world-model families", title_justify="left")
    for column in ("family", "presets", "provided by"):
        table.add_column(column)
    for name in registry.list():
        spec = registry.get(name)
        table.add_row(name, ", ".join(spec.presets), f"{spec.distribution or '-'}")
    console.print(table)

    with tempfile.TemporaryDirectory(prefix="worldflux-demo-") as tmp:
        passed = run(console, args, Path(args.out) if args.out else Path(tmp) / "export")
        passed = official(console, Path(tmp)) and passed
    return 0 if passed else 1


#: A checkpoint written by the official TD-MPC2 code (provenance in its folder's README.md).
OFFICIAL_TDMPC2 = (
    Path(__file__).resolve().parents[1] / "tests/data/official/tdmpc2/single-task/checkpoint.pt"
)


def official(console: Console, tmp: Path) -> bool:
    """Import the official TD-MPC2 reference checkpoint, export it, check parity."""
    from worldflux_registry import export

    console.print(
        f"\n[bold]7. import[/bold] the official TD-MPC2 checkpoint {OFFICIAL_TDMPC2.name}"
    )
    result = registry.import_checkpoint(
        "tdmpc2", OFFICIAL_TDMPC2, tmp / "tdmpc2-ckpt", config={"episode_length": "500"}
    )
    console.print(
        f"   {len(result.mapped)} tensors kept, {len(result.dropped)} dropped "
        f"(e.g. {next(iter(result.dropped))}: {next(iter(result.dropped.values()))}); "
        f"matches official {result.official_commit}"
    )
    start = time.perf_counter()
    out = export(registry.load(tmp / "tdmpc2-ckpt"), "onnx", tmp / "tdmpc2-onnx")  # check=True
    summary = json.loads((out / "manifest.json").read_text())["parity"]
    verdict = "[green]PASSED[/green]" if summary["passed"] else "[red]FAILED[/red]"
    console.print(
        f"[bold]8. exported[/bold] the imported model in {time.perf_counter() - start:.1f}s; "
        f"parity on ONNX Runtime {verdict}"
    )
    return bool(summary["passed"])


def run(console: Console, args: argparse.Namespace, out: Path) -> bool:
    import torch

    from worldflux_registry import export, parity
    from worldflux_registry.plugin_api import (
        check_export,
        encode_input,
        make_actions,
        make_noise,
        make_observations,
        noise_conditions,
    )

    ref = f"{args.family}:{args.preset}"
    torch.manual_seed(0)
    model = registry.load(ref)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"\n[bold]2. loaded[/bold] {ref}: {type(model).__name__}, {params:,} parameters")

    # 3. Export every graph the family supports (encode, transition, update, decode).
    start = time.perf_counter()
    export(
        model,
        "onnx",
        out,
        graphs="all",
        check=False,
        progress=lambda g, s: s == "done" and console.print(f"   exported {g}.onnx"),
    )
    console.print(f"[bold]3. exported[/bold] to {out} in {time.perf_counter() - start:.1f}s")

    # 4. The export loads through the registry like any other ref.
    onnx_model = registry.load(out)
    console.print(f"[bold]4. loaded[/bold] {onnx_model!r}")

    # 5. A rollout on ONNX Runtime, fed the same observations and noise as torch.
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(0)
    obs = make_observations(contract, (args.batch,), gen)
    first = make_noise(contract, "encode", (args.batch,), gen)
    actions = make_actions(contract, (args.horizon, args.batch), gen)
    noise = {}
    for graph in ("transition", "decode"):
        noise.update(make_noise(contract, graph, (args.horizon, args.batch), gen))
    conditions = noise_conditions(noise) if noise else None
    with torch.no_grad():
        state = model.encode(encode_input(obs, first))
        model.rollout(state, actions[:2], None)  # warm-up: first calls pay one-off costs
        onnx_model.rollout(state, actions[:2], None)
        t0 = time.perf_counter()
        ref_traj = model.rollout(state, actions, conditions)
        t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    traj = onnx_model.rollout(state, actions, conditions)
    t_ort = time.perf_counter() - t0
    console.print(
        f"[bold]5. rollout[/bold] of {args.horizon} steps x batch {args.batch}: "
        f"torch {t_torch * 1e3:.1f} ms, ONNX Runtime ({onnx_model.providers[0]}) "
        f"{t_ort * 1e3:.1f} ms"
    )
    rollout = Table(title="Free-running rollout, same noise", title_justify="left")
    for column in ("prediction", "shape", "max abs error", "torch mean", "onnx mean"):
        rollout.add_column(column)
    for key, value in traj.predictions.items():
        expected = ref_traj.predictions[key]
        err = (expected.float() - value.float()).abs().max().item()
        rollout.add_row(
            key,
            str(tuple(value.shape)),
            f"{err:.2e}",
            f"{expected.float().mean().item():+.4f}",
            f"{value.float().mean().item():+.4f}",
        )
    console.print(rollout)

    # 6. The parity checker: every graph and output, stepwise and over rollouts.
    report = check_export(model, out, "onnx", batch_sizes=(1, args.batch), horizon=args.horizon)
    if report is None:
        console.print("parity checker unavailable")
        return False
    console.print("[bold]6. parity[/bold] (summary stored in manifest.json)")
    report.print(console)
    assert isinstance(report, parity.ParityReport)
    verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
    console.print(f"parity {verdict}")
    return report.passed


if __name__ == "__main__":
    raise SystemExit(main())
