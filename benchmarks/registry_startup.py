"""Startup cost of the registry with 1, 10 and 100 plugin distributions installed.

Measures the wall time of fresh processes:

- ``worldflux-registry list`` (the console script),
- ``python -c "from worldflux_registry import registry; registry.list()"``,

each with N synthetic plugin distributions on ``PYTHONPATH``, against
``python -c "import torch"`` on the same machine. The synthetic distributions are generated as
installed wheels are laid out (``<name>-<version>.dist-info`` with ``METADATA``,
``entry_points.txt`` and ``RECORD`` beside a package whose plugin module declares one family),
so ``importlib.metadata`` finds them exactly as it finds pip-installed ones.

Target: with 100 plugins, listing takes under a quarter of ``import torch``.

Usage: ``python benchmarks/registry_startup.py [--repeats 7] [--counts 1 10 100]``; results go
to ``benchmarks/results/registry_startup.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

PLUGIN = '''"""Synthetic benchmark plugin {i}."""

from worldflux_registry import FamilySpec, IOContract, TensorSpec
from worldflux_registry.hookspecs import hookimpl


def contract(config):
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", config["obs_dim"])),),
        action=TensorSpec("action", "float32", ("batch", config["action_dim"])),
        state=(TensorSpec("deter", "float32", ("batch", config["hidden"])),),
        predictions=(TensorSpec("reward", "float32", ("batch",)),),
    )


@hookimpl
def worldflux_registry_families():
    return [
        FamilySpec(
            name="benchfamily{i}",
            summary="synthetic family {i} for the startup benchmark",
            model="wfbench_plugin_{i}.model:Model",
            defaults={{"obs_dim": 4, "action_dim": 2, "hidden": 16}},
            presets={{"small": {{}}, "large": {{"hidden": 64}}}},
            default_preset="small",
            contract=contract,
            capabilities=frozenset({{"encode", "transition"}}),
        )
    ]
'''


def make_plugins(root: Path, count: int) -> None:
    """Write ``count`` installed-style plugin distributions into ``root``."""
    for i in range(count):
        package = f"wfbench_plugin_{i}"
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "plugin.py").write_text(PLUGIN.format(i=i))
        info = root / f"{package}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: wfbench-plugin-{i}\nVersion: 0.1.0\n"
        )
        (info / "entry_points.txt").write_text(
            f"[worldflux_registry]\nbenchfamily{i} = {package}.plugin\n"
        )
        (info / "INSTALLER").write_text("benchmark\n")
        (info / "RECORD").write_text(
            "".join(
                f"{p},,\n"
                for p in (
                    f"{package}/__init__.py",
                    f"{package}/plugin.py",
                    f"{info.name}/METADATA",
                    f"{info.name}/entry_points.txt",
                    f"{info.name}/RECORD",
                )
            )
        )


def time_command(cmd: list[str], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median / min / max wall seconds of ``cmd`` over ``repeats`` runs after one warm-up."""
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    python = sys.executable
    script = shutil.which("worldflux-registry", path=str(Path(python).parent))
    if script is None:
        parser.error("the worldflux-registry console script is not installed next to python")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("WORLDFLUX_REGISTRY_")}
    base_env.pop("PYTHONPATH", None)
    # Installed packages carry bytecode (pip compiles on install); let the plugins have it too.
    base_env.pop("PYTHONDONTWRITEBYTECODE", None)

    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    torch_time = time_command([python, "-c", "import torch"], base_env, args.repeats)
    print(f"import torch: {torch_time['median_s']:.3f} s")
    rows = []
    for count in args.counts:
        with tempfile.TemporaryDirectory(prefix="wf-bench-plugins-") as tmp:
            make_plugins(Path(tmp), count)
            env = {**base_env, "PYTHONPATH": tmp}
            check = subprocess.run(
                [
                    python,
                    "-c",
                    "import sys; from worldflux_registry import registry; "
                    "names = registry.list('benchfamily*'); "
                    "print(len(names), 'torch' in sys.modules)",
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            if check != [str(count), "False"]:
                raise SystemExit(f"expected {count} families and no torch import, got {check}")
            cli = time_command([script, "list"], env, args.repeats)
            api = time_command(
                [python, "-c", "from worldflux_registry import registry; registry.list()"],
                env,
                args.repeats,
            )
        rows.append({"plugins": count, "cli_list": cli, "python_list": api})
        print(
            f"{count:>4} plugins: worldflux-registry list {cli['median_s']:.3f} s, "
            f"registry.list() {api['median_s']:.3f} s"
        )

    largest = max(rows, key=lambda r: r["plugins"])
    ratio = largest["cli_list"]["median_s"] / torch_time["median_s"]
    result = {
        "benchmark": "registry_startup",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": _torch_version(python, base_env),
            "load_average_at_start": load_at_start,
        },
        "repeats": args.repeats,
        "import_torch": torch_time,
        "rows": rows,
        "target": {
            "plugins": largest["plugins"],
            "cli_over_import_torch": ratio,
            "limit": 0.25,
            "met": ratio < 0.25,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "registry_startup.md").write_text(_markdown(result))
    print(f"target (< 0.25 x import torch at {largest['plugins']} plugins): ratio {ratio:.3f}")
    return 0 if ratio < 0.25 else 1


def _torch_version(python: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "not installed"


def _markdown(result: dict) -> str:
    m = result["machine"]
    t = result["import_torch"]["median_s"]
    lines = [
        "# Registry startup",
        "",
        f"Wall time of fresh processes, median of {result['repeats']} runs after one warm-up, "
        f"on {m['platform']}, Python {m['python']}, {m['cpus']} CPUs, torch {m['torch']}; "
        f"load average at start {m['load_average_at_start']} (a shared machine: absolute times "
        "are inflated, the ratio to `import torch` on the same machine is the measure).",
        "Produced by `python benchmarks/registry_startup.py`.",
        "",
        f'`python -c "import torch"`: **{t:.3f} s**',
        "",
        "| plugins | `worldflux-registry list` | `registry.list()` | list / import torch |",
        "|--:|--:|--:|--:|",
    ]
    for row in result["rows"]:
        cli, api = row["cli_list"]["median_s"], row["python_list"]["median_s"]
        lines.append(f"| {row['plugins']} | {cli:.3f} s | {api:.3f} s | {cli / t:.2f} |")
    target = result["target"]
    verdict = "met" if target["met"] else "NOT met"
    lines += [
        "",
        f"Target: with {target['plugins']} plugins, `worldflux-registry list` under "
        f"{target['limit']} x `import torch`: ratio {target['cli_over_import_torch']:.3f}, "
        f"**{verdict}**.",
        "",
        "The listing never imports torch (checked by the script for every plugin count).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
