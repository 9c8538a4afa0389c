"""Rollout speed of the reference families on torch and ONNX Runtime, parity-gated.

    python benchmarks/rollout_speed.py --device cpu     # the CPU targets (about 15 min on 2 cores)
    python benchmarks/rollout_speed.py --device gpu     # the issue's GPU targets (H100)

Writes ``benchmarks/results/rollout_speed_{cpu,gpu}.json`` (format ``worldflux.bench`` v1) and the
same tables as markdown beside it. Every speed comes after a passing parity check of the same
backend; a backend that fails parity is listed as refused, without a speed. Models whose export
fails are listed as not benchmarked, with the reason.

CPU plan: the presets the speed targets name (``dreamerv3:size12m``, ``tdmpc2:size5m``) at batch
1 and 64, on torch eager, ``torch.compile`` (inductor) and ORT-CPU (step by step, and through the
fused rollout graph), all with the same number of intra-op threads (``--threads``, default 1:
the CPU target is about batch-1 latency, and on a shared 2-core machine more threads only add
contention). GPU plan: ``dreamerv3:size12m`` and
``tdmpc2:size5m`` at batch 1, 256, 1024 on every backend, fp32 with TF32 off on both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from worldflux_registry import bench as _bench

RESULTS = Path(__file__).resolve().parent / "results"

CPU_PLAN = [
    # (ref, batches): the presets the speed targets name, at batch 1 and 64
    ("tdmpc2:size5m", [1, 64]),
    ("dreamerv3:size12m", [1, 64]),
]
GPU_PLAN = [
    ("dreamerv3:size12m", [1, 256, 1024]),
    ("tdmpc2:size5m", [1, 256, 1024]),
]
# The *-fused backends roll out through the export's fused rollout graph (one session call, or
# one CUDA-graph replay, per horizon); the others call transition and decode once per step.
CPU_BACKENDS = ["torch", "torch-compile", "ort-cpu", "ort-cpu-fused"]
GPU_BACKENDS = [
    "torch",
    "torch-cudagraph",
    "ort-cuda",
    "ort-cuda-fused",
    "ort-cuda-graph",
    "ort-cuda-graph-fused",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--models", help="comma-separated refs (default: the plan's)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default: the plan's)")
    parser.add_argument(
        "--backends", help="comma-separated backends (default: the plan's; e.g. ort-cpu-int8)"
    )
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rollout-repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--out", type=Path, help="JSON path (markdown beside it)")
    parser.add_argument("--note", action="append", default=[], help="a remark for the tables")
    args = parser.parse_args(argv)

    gpu = args.device == "gpu"
    plan = GPU_PLAN if gpu else CPU_PLAN
    if args.models:
        wanted = args.models.split(",")
        plan = [p for p in plan if p[0] in wanted] or [(m, [1]) for m in wanted]
    if args.batches:
        plan = [(ref, [int(b) for b in args.batches.split(",")]) for ref, _ in plan]
    backends = args.backends.split(",") if args.backends else None
    out = args.out or RESULTS / f"rollout_speed_{args.device}.json"
    runs, failures = [], []
    started = time.perf_counter()
    for ref, batches in plan:
        t0 = time.perf_counter()
        print(f"== {ref} batches {batches}", flush=True)
        try:
            run = _bench.run(
                ref,
                backends=backends or (GPU_BACKENDS if gpu else CPU_BACKENDS),
                batches=batches,
                horizon=args.horizon,
                device="cuda" if gpu else "cpu",
                repeats=args.repeats,
                rollout_repeats=args.rollout_repeats,
                max_seconds=args.max_seconds,
                torch_threads=args.threads,
                ort_options={"intra_op_num_threads": args.threads},
            )
        except Exception as exc:  # a model that cannot be exported is a result too
            print(f"   not benchmarked: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            failures.append({"model": ref, "reason": f"{type(exc).__name__}: {exc}"[:600]})
            continue
        runs.append(run)
        for r in run.results:
            speed = "-" if r.step is None else f"step {r.step.median * 1e6:.0f} us"
            print(f"   {r.backend:16s} b={r.batch:<5d} {r.status:8s} {speed} {r.reason or ''}")
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    notes = list(args.note)
    cores = len(os.sched_getaffinity(0))
    loads = [x for run in runs for x in (run.settings.get("loadavg_before") or [])[:1]]
    if loads and max(loads) > cores:
        notes.append(
            f"Other processes shared this machine (1-min load average up to {max(loads):.1f} on "
            f"{cores} cores): millisecond-long rollouts are preempted more than microsecond-long "
            "transitions, so rollout medians are inflated; the rollout min is the better guide "
            "here. Rerun on a quiet machine for clean numbers."
        )
    notes += _int8_notes(runs)
    notes.append(f"whole benchmark took {time.perf_counter() - started:.0f} s")
    if not gpu:
        notes.append(
            "No GPU was available to the session that produced this file: every GPU target is "
            "'not-measured' here, never estimated."
        )
    doc = _bench.document(runs, failures=failures, notes=notes)
    _bench.write(doc, out, out.with_suffix(".md"))
    print(_bench.to_markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _int8_notes(runs: list) -> list[str]:
    """The int8 target: at batch 64, int8 ORT at least 2x faster than torch.compile."""
    notes = []
    for run in runs:
        by = {(r.backend, r.batch): r for r in run.results}
        for (backend, batch), r in by.items():
            if backend != "ort-cpu-int8":
                continue
            peer = by.get(("torch-compile", batch))
            if r.step is None or peer is None or peer.step is None:
                why = r.reason or "no torch-compile timing beside it"
                notes.append(f"{run.model} batch {batch}: int8 ORT not compared ({why})")
                continue
            ratio = peer.step.median / r.step.median
            verdict = "met" if ratio >= 2.0 and batch == 64 else "missed"
            notes.append(
                f"{run.model} batch {batch}, one transition: int8 ORT {r.step.median * 1e3:.2f} ms "
                f"vs torch.compile {peer.step.median * 1e3:.2f} ms = {ratio:.2f}x "
                f"(target >= 2x at batch 64: {verdict}); parity: free-running over "
                f"{run.horizon} steps within the int8 tolerances passed"
            )
    return notes


if __name__ == "__main__":
    sys.exit(main())
