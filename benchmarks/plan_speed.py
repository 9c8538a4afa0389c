"""Planning speed of TD-MPC2's MPPI planner: torch eager, torch.compile and ONNX Runtime CPU.

    python benchmarks/plan_speed.py                 # ~10 min on a shared 2-core box

Model: the official single-task TD-MPC2 reference checkpoint (``tests/data/official/tdmpc2``,
imported with ``episode_length=500``), with the official planner settings (horizon 3, 6
iterations, 512 samples, 64 elites, 24 policy trajectories). One *plan* is what a deployer
calls once per environment step: ``encode`` of the observation, then ``plan_step``
(``deterministic=True``, the official ``eval_mode``) with a warm start and every noise input
given (drawn once, outside the timing; drawing it is timed on its own). Environment batch 1
and 32.

The ONNX export (``encode`` + ``plan``) must first pass ``parity.check`` against the torch model
at both batch sizes; a failing parity refuses the ONNX speed. Parity compares the elites per
iteration and accepts a near-tie (other elites whose values agree within tolerance, rank by
rank), reported in the results. Backends run interleaved, round
after round, each with one intra-op thread (torch.set_num_threads(1), ORT
``intra_op_num_threads=1``); the speed is the median over rounds of each round's median.

Writes ``benchmarks/results/plan_speed_cpu.json`` (with the machine: `bench` environment record)
and ``plan_speed_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHECKPOINT = ROOT / "tests" / "data" / "official" / "tdmpc2" / "single-task" / "checkpoint.pt"
BACKENDS = ("torch-eager", "torch-compile", "ort-cpu")


def _timed(fn: Any, calls: int) -> float:
    """Median seconds of ``calls`` calls of ``fn``."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_batch(
    model: Any, onnx_model: Any, batch: int, rounds: int, calls: int
) -> tuple[list[dict[str, Any]], float, float]:
    """Rows of every backend at ``batch``, the noise draw (ms), torch.compile's first call (s)."""
    from worldflux_registry import ConditionPayload, State
    from worldflux_registry.plugin_api import make_noise

    contract = model.io_contract()
    gen = torch.Generator().manual_seed(batch)
    obs = {"vector": torch.randn(batch, contract.observations[0].shape[1], generator=gen)}
    noise = make_noise(contract, "plan", (batch,), gen)
    extras = {f"wf.noise.{k}": v for k, v in noise.items()}
    cond = ConditionPayload(extras)
    with torch.inference_mode():
        warm = model.plan_step(model.encode(obs), None, cond, True)["plan_mean"]
    noise_ms = 1e3 * _timed(lambda: make_noise(contract, "plan", (batch,), gen), 20)

    def eager() -> torch.Tensor:
        state = model.encode(obs)
        state = State({**state.tensors, "plan_mean": warm})
        return model.plan_step(state, None, cond, True)["plan_action"]

    def step(vector: torch.Tensor, mean: torch.Tensor, *eps: torch.Tensor) -> torch.Tensor:
        state = model.encode({"vector": vector})
        state = State({**state.tensors, "plan_mean": mean})
        c = ConditionPayload(dict(zip(extras, eps, strict=True)))
        return model.plan_step(state, None, c, True)["plan_action"]

    compiled = torch.compile(step, dynamic=False)
    eps = tuple(extras.values())
    start = time.perf_counter()
    with torch.inference_mode():
        ref = eager()
        got = compiled(obs["vector"], warm, *eps)
    compile_s = time.perf_counter() - start

    def ort_plan() -> torch.Tensor:
        state = onnx_model.encode(obs)
        state = State({**state.tensors, "plan_mean": warm})
        return onnx_model.plan_step(state, None, cond, True)["plan_action"]

    errors = {
        "torch-eager": 0.0,
        "torch-compile": float((ref - got).abs().max()),
        "ort-cpu": float((ref - ort_plan()).abs().max()),
    }
    fns = {
        "torch-eager": eager,
        "torch-compile": lambda: compiled(obs["vector"], warm, *eps),
        "ort-cpu": ort_plan,
    }
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    with torch.inference_mode():
        for fn in fns.values():
            _timed(fn, 2)  # warm-up
        for _ in range(rounds):
            for name in BACKENDS:
                times[name].append(_timed(fns[name], calls))
    rows = []
    for name in BACKENDS:
        med = statistics.median(times[name])
        rows.append(
            {
                "backend": name,
                "batch": batch,
                "calls_per_round": calls,
                "median_ms": round(1e3 * med, 3),
                "round_medians_ms": [round(1e3 * r, 3) for r in times[name]],
                "plans_per_s": round(1.0 / med, 2),
                "env_steps_per_s": round(batch / med, 2),
                "max_abs_vs_eager": errors[name],
            }
        )
    return rows, noise_ms, compile_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--calls", type=int, default=10, help="calls per backend per round at batch 1 (/ sqrt(B))"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_speed_cpu")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import onnxruntime as ort
    from worldflux_tdmpc2.importer import import_checkpoint

    from worldflux_registry import export, parity
    from worldflux_registry.bench import environment

    torch.set_num_threads(1)
    model = import_checkpoint(CHECKPOINT, {"episode_length": "500"}).model.eval()
    contract = model.io_contract()
    agent = contract.agent
    assert agent is not None
    tmp = Path(tempfile.mkdtemp(prefix="plan-speed-"))
    start = time.perf_counter()
    out = export(model, "onnx", tmp / "onnx", graphs=("encode", "plan"), check=False)
    export_s = time.perf_counter() - start
    from worldflux_onnx.runtime import load_artifact

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    onnx_model = load_artifact(out, providers=["cpu"], session_options=options)
    report = parity.check(model, onnx_model, batch_sizes=batches, modes=("step",))
    worst = {}
    for c in report.checks():
        if c.graph == "plan":
            worst[c.output] = max(worst.get(c.output, 0.0), c.metrics.max_abs or 0.0)

    results: list[dict[str, Any]] = []
    noise_ms: dict[int, float] = {}
    compile_s: dict[int, float] = {}
    for batch in batches:
        # Fewer calls per round for large batches: a round stays a few seconds per backend.
        calls = max(2, round(args.calls / batch**0.5))
        rows, noise_ms[batch], compile_s[batch] = _bench_batch(
            model, onnx_model, batch, args.rounds, calls
        )
        for row in rows:
            row["refused"] = row["backend"] == "ort-cpu" and not report.passed
        results.extend(rows)

    def med(backend: str, batch: int) -> float:
        return next(
            r["median_ms"] for r in results if r["backend"] == backend and r["batch"] == batch
        )

    ratios = {
        f"batch{b}": {
            "ort_vs_eager": round(med("torch-eager", b) / med("ort-cpu", b), 2),
            "ort_vs_compile": round(med("torch-compile", b) / med("ort-cpu", b), 2),
            "compile_vs_eager": round(med("torch-eager", b) / med("torch-compile", b), 2),
        }
        for b in batches
    }
    doc = {
        "format": "worldflux.bench.plan",
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "model": {
            "source": str(CHECKPOINT.relative_to(ROOT)),
            "config": {
                k: model.config[k]
                for k in (
                    "obs_dim",
                    "action_dim",
                    "latent_dim",
                    "mlp_dim",
                    "num_q",
                    "horizon",
                    "iterations",
                    "num_samples",
                    "num_elites",
                    "num_pi_trajs",
                )
            },
            "fingerprint": contract.fingerprint(),
        },
        "threads": {"torch": torch.get_num_threads(), "ort_intra_op": 1},
        "export_seconds": round(export_s, 1),
        "compile_seconds": {str(b): round(s, 1) for b, s in compile_s.items()},
        "noise_draw_ms": {str(b): round(v, 3) for b, v in noise_ms.items()},
        "parity": {
            "passed": report.passed,
            "plan_max_abs": worst,
            # Elites per iteration: near-ties are accepted, scores that disagree are not.
            "selections": [c.to_dict() for c in report.selections],
        },
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0 if report.passed else 1


def _selection(check: dict[str, Any]) -> str:
    """``batch 1: 1/1 agree`` plus its near-ties and first failing iteration."""
    text = f"batch {check['batch']}: {check['agreed']}/{check['batch']} agree"
    ties = [f"row {t['row']} near-tie at iteration {t['iteration']}" for t in check["near_ties"]]
    if ties:
        text += " (" + ", ".join(ties) + ")"
    if check["first_failing_iteration"] is not None:
        text += f", FAIL from iteration {check['first_failing_iteration']}"
    return text


def _markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [
        "# TD-MPC2 planning speed (CPU)",
        "",
        f"Created {doc['created']} by `benchmarks/plan_speed.py`.",
        "",
        f"- Machine: {env.get('cpu')} ({env.get('cpu_affinity')} usable cores), "
        f"{env.get('platform')}; load average {env.get('loadavg')}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}",
        f"- Model: `{doc['model']['source']}`, {doc['model']['config']}",
        f"- One plan = `encode` + `plan_step(deterministic=True)` with a warm start, noise given; "
        f"threads: torch {doc['threads']['torch']}, ORT intra-op {doc['threads']['ort_intra_op']}",
        f"- Export (encode + plan) {doc['export_seconds']} s; torch.compile first call "
        f"{doc['compile_seconds']} s; drawing the noise {doc['noise_draw_ms']} ms",
        f"- Parity of the ONNX plan graph: {'pass' if doc['parity']['passed'] else 'FAIL'}, "
        f"max abs {doc['parity']['plan_max_abs']}; elites: "
        + "; ".join(_selection(c) for c in doc["parity"].get("selections", [])),
        f"- Median over {doc['rounds']} interleaved rounds (eager, compile, ORT, repeat) of the "
        f"median of {doc['calls_per_round']} calls per round at batch 1 (/ sqrt(batch) above)",
        "",
        "| backend | batch | median | plans / s | env steps / s | max abs vs eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['median_ms']:.2f} ms | {r['plans_per_s']:,.1f}"
            f" | {r['env_steps_per_s']:,.1f} | {r['max_abs_vs_eager']:.1e} |"
        )
    lines += [
        "",
        "| batch | ORT vs eager | ORT vs compile | compile vs eager |",
        "|---|---:|---:|---:|",
    ]
    for key, r in doc["ratios"].items():
        lines.append(
            f"| {key.removeprefix('batch')} | {r['ort_vs_eager']}x | {r['ort_vs_compile']}x "
            f"| {r['compile_vs_eager']}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
