"""Benchmark State I/O: wire-format serialize + deserialize, and shared-memory attach.

For States of 1, 16 and 256 MiB (two float32 tensors), measures

- ``copy``: one plain memory copy of the same bytes into fresh memory (``bytes(view)``), the
  baseline; ``copy_warm`` copies into an already touched buffer (no page faults) for reference;
- ``serialize``, ``deserialize`` and their sum, ``roundtrip`` (``deserialize(serialize())``);
- ``shm_create`` (``to_shared_memory``) and ``shm_attach`` (``from_shared_memory`` + close).

Targets (issue 2): roundtrip within 4x one memory copy at 256 MiB; attach time flat in size.
Writes ``benchmarks/results/state_io.json`` and ``state_io.md``.

    python benchmarks/state_io.py            # full run
    python benchmarks/state_io.py --quick    # fewer repeats, for a smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from worldflux_registry import State

MIB = 1 << 20
SIZES_MIB = (1, 16, 256)
REPEATS = {1: 50, 16: 20, 256: 9}
RESULTS = Path(__file__).resolve().parent / "results"


def measure(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Run ``fn`` once to warm up, then ``repeats`` times; seconds as median/min/max/IQR."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": times[0],
        "max_s": times[-1],
        "iqr_s": q[2] - q[0],
        "repeats": repeats,
    }


def make_state(size_mib: int) -> State:
    numel = size_mib * MIB // 4
    generator = torch.Generator().manual_seed(0)
    deter = torch.randn(numel // 4, generator=generator).reshape(-1, 256)
    stoch = torch.randn(numel - deter.numel(), generator=generator).reshape(-1, 32, 32)
    return State({"deter": deter, "stoch": stoch}, {"latent_type": "categorical", "step": 1})


def bench_size(size_mib: int, repeats: int) -> dict[str, object]:
    state = make_state(size_mib)
    raw = np.concatenate([t.reshape(-1).view(torch.uint8).numpy() for t in state.tensors.values()])
    view = memoryview(raw)
    warm = np.empty_like(raw)
    warm[:] = 0
    payload = state.serialize()

    results: dict[str, object] = {"size_mib": size_mib, "nbytes": raw.nbytes}
    results["copy"] = measure(lambda: bytes(view), repeats)
    results["copy_warm"] = measure(lambda: np.copyto(warm, raw), repeats)
    results["serialize"] = measure(state.serialize, repeats)
    results["deserialize"] = measure(lambda: State.deserialize(payload), repeats)
    results["roundtrip"] = measure(lambda: State.deserialize(state.serialize()), repeats)

    descriptor = state.to_shared_memory(namespace="wfbench")
    try:

        def attach() -> None:
            State.from_shared_memory(descriptor).close_shared_memory()

        results["shm_attach"] = measure(attach, repeats)

        def create() -> None:
            State.unlink_shared_memory(state.to_shared_memory(namespace="wfbench"))

        results["shm_create"] = measure(create, max(3, repeats // 3))
        attached = State.from_shared_memory(descriptor)
        assert torch.equal(attached["deter"], state["deter"])
        attached.close_shared_memory()
    finally:
        State.unlink_shared_memory(descriptor)

    copy = results["copy"]["median_s"]  # type: ignore[index]
    roundtrip = results["roundtrip"]["median_s"]  # type: ignore[index]
    results["roundtrip_over_copy"] = roundtrip / copy
    results["roundtrip_over_copy_warm"] = roundtrip / results["copy_warm"]["median_s"]  # type: ignore[index]
    results["roundtrip_gib_s"] = raw.nbytes / roundtrip / (1 << 30)
    return results


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / (1 << 30), 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _load(value: object) -> str:
    return "n/a" if not isinstance(value, list) else "/".join(f"{v:.1f}" for v in value)


def ms(entry: dict[str, float]) -> str:
    return f"{entry['median_s'] * 1e3:.3f} ({entry['min_s'] * 1e3:.3f}..{entry['max_s'] * 1e3:.3f})"


def verdict(rows: list[dict[str, object]]) -> list[str]:
    big = next(r for r in rows if r["size_mib"] == 256)
    small = next(r for r in rows if r["size_mib"] == 1)
    ratio = float(big["roundtrip_over_copy"])  # type: ignore[arg-type]
    attach_big = big["shm_attach"]["median_s"]  # type: ignore[index]
    attach_small = small["shm_attach"]["median_s"]  # type: ignore[index]
    flat = attach_big / attach_small
    fresh = big["copy"]["median_s"] / big["copy_warm"]["median_s"]  # type: ignore[index]
    warm_ratio = float(big["roundtrip_over_copy_warm"])  # type: ignore[arg-type]
    return [
        f"- serialize + deserialize at 256 MiB: {ratio:.2f}x one memory copy "
        f"(target <= 4x): {'met' if ratio <= 4 else 'NOT met'}.",
        f"- shared-memory attach: {attach_small * 1e6:.0f} us at 1 MiB, "
        f"{attach_big * 1e6:.0f} us at 256 MiB ({flat:.2f}x for 256x the bytes): "
        f"{'flat in size (zero-copy)' if flat < 3 else 'NOT flat'}.",
        "- smaller States (the target is set at 256 MiB only): "
        + ", ".join(
            f"{r['size_mib']} MiB {float(r['roundtrip_over_copy']):.1f}x"  # type: ignore[arg-type]
            for r in rows
            if r["size_mib"] != 256
        )
        + ". Small sizes are dominated by fixed costs (JSON, tensor creation: ~0.1 ms) and by "
        "the allocator (the copy baseline reuses warm heap memory; the round trip holds two "
        "buffers at once and may get fresh pages), so their ratio is noisy.",
        f"- the baseline matters: at 256 MiB a copy into fresh memory takes {fresh:.1f}x a copy "
        "into already touched memory (page faults). A round trip returns new bytes and new "
        "tensors, so it pays for fresh memory twice; against the warm copy it is "
        f"{warm_ratio:.1f}x. The target is read against the fresh copy, what `bytes(x)` or "
        "`tensor.clone()` costs.",
    ]


def write(rows: list[dict[str, object]], info: dict[str, object], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = verdict(rows)
    load = info.get("load_average_at_start")
    cpus = info.get("cpus")
    if isinstance(load, list) and isinstance(cpus, int) and load[0] > cpus:
        lines.append(
            f"- the machine was shared while this ran (load {load[0]:.1f} on {cpus} CPUs): "
            "medians move between runs; compare ratios, not absolute times."
        )
    document = {
        "benchmark": "state_io",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "units": "seconds",
        "results": rows,
        "verdict": [line.removeprefix("- ") for line in lines],
    }
    (out / "state_io.json").write_text(json.dumps(document, indent=2) + "\n")

    md = [
        "# State I/O benchmark",
        "",
        f"Generated by `benchmarks/state_io.py` on {document['date']}.",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory_gib']} GiB; "
        f"{info['platform']}; Python {info['python']}, torch {info['torch']}, "
        f"numpy {info['numpy']}; load average (1, 5, 15 min) at start "
        f"{_load(info['load_average_at_start'])}, at end {_load(info.get('load_average_at_end'))}.",
        "",
        "Times in milliseconds: median (min..max) over the repeats; each State is two float32",
        "tensors. `copy` is one plain copy of the same bytes into fresh memory (`bytes(view)`),",
        "`copy warm` a copy into an already touched buffer. `round trip` is",
        "`State.deserialize(state.serialize())`; `attach` is `from_shared_memory(copy=False)`",
        "followed by `close_shared_memory()`.",
        "",
        "| size | copy | copy warm | serialize | deserialize | round trip | round trip / copy "
        "| round trip / copy warm | shm create | shm attach |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        md.append(
            f"| {row['size_mib']} MiB | {ms(row['copy'])} | {ms(row['copy_warm'])} "  # type: ignore[arg-type]
            f"| {ms(row['serialize'])} | {ms(row['deserialize'])} "  # type: ignore[arg-type]
            f"| {ms(row['roundtrip'])} | {row['roundtrip_over_copy']:.2f}x "  # type: ignore[arg-type]
            f"| {row['roundtrip_over_copy_warm']:.2f}x "
            f"| {ms(row['shm_create'])} | {ms(row['shm_attach'])} |"  # type: ignore[arg-type]
        )
    md += ["", "## What we saw", "", *lines, ""]
    (out / "state_io.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats per size")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)

    info = machine()
    rows = []
    for size in SIZES_MIB:
        rows.append(bench_size(size, 3 if args.quick else REPEATS[size]))
        print(f"{size:>4} MiB: round trip {rows[-1]['roundtrip_over_copy']:.2f}x copy", flush=True)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    write(rows, info, args.out)
    print("\n".join(verdict(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
