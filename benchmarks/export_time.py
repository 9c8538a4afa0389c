"""Where the time of an ONNX export goes: each step graph, split by exporter stage.

    python benchmarks/export_time.py                       # dreamerv3:size12m, its step graphs
    python benchmarks/export_time.py --models dreamerv3:ci,tdmpc2:ci

Writes ``benchmarks/results/export_time_cpu.{json,md}``. Stages are timed by wrapping the
functions the exporter calls (no profiler overhead): ``torch.export`` (tracing the step with a
symbolic batch), ``run_decompositions`` (torch.onnx re-tracing the program to the ATen ops it
translates), the ONNX translation, the onnxscript optimiser, ``onnx.checker`` and the rest
(saving, hashing, checks of our own). The target: every step graph of ``dreamerv3:size12m``
exported in under 15 s in total.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 15.0


@contextlib.contextmanager
def _timed(owner: Any, name: str, stage: str, spent: dict[str, float]) -> Iterator[None]:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _stages(spent: dict[str, float]) -> contextlib.ExitStack:
    import onnx
    import torch
    import worldflux_onnx.export as exp
    from torch.onnx._internal.exporter import _onnx_program

    stack = contextlib.ExitStack()
    wraps: list[tuple[Any, str, str]] = [
        (exp, "_trace", "torch.export"),
        (exp, "_torch_export", "torch.onnx (all)"),
        (torch.export.ExportedProgram, "run_decompositions", "run_decompositions"),
        (_onnx_program.ONNXProgram, "optimize", "onnxscript optimize"),
        (onnx.checker, "check_model", "onnx.checker"),
        (exp, "_quantize_int8", "int8 quantization"),
    ]
    for owner, name, stage in wraps:
        if hasattr(owner, name):
            stack.enter_context(_timed(owner, name, stage, spent))
    return stack


def measure(
    ref: str, graphs: str, precision: str, out: Path, *, registry_cache: bool = True
) -> dict[str, Any]:
    """Export ``ref`` once; ``registry_cache=False`` takes ``torch.onnx.export``'s public path,
    which builds torchlib's translation registry afresh for every graph (the old behaviour)."""
    import torch
    import worldflux_onnx.export as exp

    from worldflux_registry import export, registry

    torch.manual_seed(0)
    model = registry.load(ref)
    per_graph: dict[str, float] = {}
    started: dict[str, float] = {}

    def progress(graph: str, stage: str) -> None:
        if stage == "start":
            started[graph] = time.perf_counter()
        else:
            per_graph[graph] = time.perf_counter() - started[graph]

    spent: dict[str, float] = defaultdict(float)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cached = exp._cached_registry_export
    if not registry_cache:
        exp._cached_registry_export = lambda opset: None  # type: ignore[assignment]
    with _stages(spent), contextlib.ExitStack() as undo:
        undo.callback(setattr, exp, "_cached_registry_export", cached)
        export(
            model, "onnx", out, graphs=graphs, precision=precision, check=False, progress=progress
        )
    total = time.perf_counter() - t0
    stages = dict(spent)
    inner = stages.get("torch.onnx (all)", 0.0)
    stages["torch.onnx other (translation, registry)"] = max(
        0.0, inner - stages.get("run_decompositions", 0.0) - stages.get("onnxscript optimize", 0.0)
    )
    stages["rest (save, hashes, our checks)"] = max(
        0.0,
        total
        - stages.get("torch.export", 0.0)
        - inner
        - stages.get("onnx.checker", 0.0)
        - stages.get("int8 quantization", 0.0),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "model": ref,
        "variant": "registry built once per process"
        if registry_cache
        else "public torch.onnx.export (registry rebuilt per graph)",
        "precision": precision,
        "graphs": list(manifest["graphs"]),
        "total_s": total,
        "per_graph_s": per_graph,
        "stages_s": stages,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg()[0],
    }


def to_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Export time, created {doc['created']} on {doc['machine']} "
        f"({doc['cpu_count']} cores); target: every step graph of dreamerv3:size12m in under "
        f"{TARGET_S:g} s.",
        "",
    ]
    for run in doc["runs"]:
        verdict = ""
        if (
            run["model"] == "dreamerv3:size12m"
            and run["precision"] == "fp32"
            and (run["variant"].startswith("registry"))
        ):
            verdict = " — target **{}**".format("met" if run["total_s"] < TARGET_S else "missed")
        lines += [
            f"### {run['model']} ({run['precision']}, {run['variant']}): "
            f"{run['total_s']:.1f} s{verdict}",
            "",
            f"Graphs {', '.join(run['graphs'])}; 1-min load average {run['loadavg_before']:.1f} "
            f"before, {run['loadavg_after']:.1f} after.",
            "",
            "| graph | seconds |",
            "|---|---:|",
            *(f"| {g} | {s:.1f} |" for g, s in run["per_graph_s"].items()),
            "",
            "| stage | seconds | share |",
            "|---|---:|---:|",
        ]
        for stage, s in run["stages_s"].items():
            if stage == "torch.onnx (all)":
                continue
            lines.append(f"| {stage} | {s:.1f} | {100 * s / run['total_s']:.0f}% |")
        lines.append("")
    if doc["notes"]:
        lines += ["### Notes", "", *(f"- {n}" for n in doc["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dreamerv3:size12m")
    parser.add_argument("--graphs", default="all", help="graphs to export (default: all steps)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=RESULTS / "export_time_cpu.json")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument(
        "--compare",
        action="store_true",
        help="export each model twice: public torch.onnx.export path first, then the cached one",
    )
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        # Pay the process's one-time costs (imports, first trace) before anything is timed.
        measure("tdmpc2:ci", "encode", "fp32", Path(tmp) / "warm")
    for ref in args.models.split(","):
        for cache in (False, True) if args.compare else (True,):
            with tempfile.TemporaryDirectory() as tmp:
                run = measure(
                    ref, args.graphs, args.precision, Path(tmp) / "export", registry_cache=cache
                )
            print(json.dumps(run, indent=2), flush=True)
            runs.append(run)
    cores = len(os.sched_getaffinity(0))
    notes = list(args.note)
    if any(r["loadavg_before"] > cores for r in runs):
        notes.append(
            f"Measured loaded: other processes shared the {cores} cores (load averages above); "
            "times are wall-clock and inflated accordingly."
        )
    doc = {
        "format": "worldflux.export_time",
        "version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "cpu_count": cores,
        "runs": runs,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(doc))
    print(to_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
