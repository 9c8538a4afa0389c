"""Benchmark serving on Ray Serve against running the export in one process (CPU, this machine).

For the ``tdmpc2:ci`` export (random weights; deterministic, so no noise to send), measures

- ``single process``: `OnnxWorldModel.transition` called in a loop, at batch sizes 1, 8, 32
  (rows per call): steps/s = rows/s;
- ``serve, R replicas``: C client threads (1, 8, 32), each sending batch-1 ``transition``
  requests through the `DeploymentHandle` for a fixed time; steps/s = answered rows/s over all
  clients, with the median request latency;
- ``batching overhead``: what the server adds to each request besides running the model, in one
  process: the envelope (encode + decode both ways) and `Engine.handle` validating,
  concatenating and splitting a batch of B requests, minus one model call on the same rows.

Writes ``benchmarks/results/serve_ray_cpu.json`` and ``serve_ray_cpu.md``.

    python benchmarks/serve_ray.py                 # ~3 minutes
    python benchmarks/serve_ray.py --seconds 1     # shorter windows
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from worldflux_serve_ray import Client, Engine, ServeOptions, serve_export
from worldflux_serve_ray.wire import (
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

from worldflux_registry import export, registry
from worldflux_registry.plugin_api import make_actions, make_observations

RESULTS = Path(__file__).resolve().parent / "results"
REF = "tdmpc2:ci"


def _inputs(contract, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_observations(contract, (batch,), g), make_actions(contract, (batch,), g)


def single_process(model, seconds):
    rows = []
    contract = model.io_contract()
    for batch in (1, 8, 32):
        obs, action = _inputs(contract, batch)
        state = model.encode(obs)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.transition(state, action)
            n += 1
        elapsed = time.perf_counter() - start
        rows.append(
            {"batch": batch, "calls_per_s": n / elapsed, "steps_per_s": n * batch / elapsed}
        )
    return rows


def overhead(model, requests_per_batch=(1, 8, 32), repeats=200):
    engine = Engine(model, model.manifest)
    contract = model.io_contract()
    obs, action = _inputs(contract, 1)
    state = model.encode(obs)
    fp = model.contract_fingerprint()
    request = Request("transition", fp, state=state, inputs={"action": action})
    rows = []
    for b in requests_per_batch:
        big = torch.cat([action] * b)
        big_state = type(state)({k: torch.cat([v] * b) for k, v in state.tensors.items()})
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.transition(big_state, big)
        model_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            engine.handle([request] * b)
        engine_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            for _ in range(b):
                decode_request(encode_request(request))
        wire_in = (time.perf_counter() - t0) / repeats / b
        reply = engine.handle([request])[0]
        t0 = time.perf_counter()
        for _ in range(repeats):
            for _ in range(b):
                decode_reply(encode_reply(reply))
        wire_out = (time.perf_counter() - t0) / repeats / b
        rows.append(
            {
                "requests_per_batch": b,
                "model_call_us": model_s * 1e6,
                "engine_us": engine_s * 1e6,
                "engine_overhead_per_request_us": (engine_s - model_s) / b * 1e6,
                "envelope_per_request_us": (wire_in + wire_out) * 1e6,
            }
        )
    return rows


def served(client, contract, clients, seconds):
    latencies: list[float] = []
    counts = [0] * clients
    lock = threading.Lock()
    stop = [0.0]
    # the window opens once every client has its State (the action runs before any release)
    ready = threading.Barrier(
        clients + 1, action=lambda: stop.__setitem__(0, time.perf_counter() + seconds)
    )

    def run(i):
        obs, action = _inputs(contract, 1, seed=i)
        state = client.encode(obs)
        mine = []
        ready.wait()
        while time.perf_counter() < stop[0]:
            t0 = time.perf_counter()
            client.transition(state, action)
            mine.append(time.perf_counter() - t0)
            counts[i] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = stop[0] - seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "steps_per_s": sum(counts) / elapsed,
        "p50_latency_ms": statistics.median(latencies) * 1e3 if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window per cell")
    args = parser.parse_args()
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")
    import onnxruntime as ort
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        out = export(registry.load(REF), "onnx", Path(tmp) / "export", check=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        model = registry.load(out, device="cpu", session_options=options)
        contract = model.io_contract()
        results = {
            "ref": REF,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "ray": ray.__version__,
                "load_average_at_start": os.getloadavg(),
            },
            "seconds_per_cell": args.seconds,
            "single_process": single_process(model, args.seconds),
            "overhead": overhead(model),
            "serve": [],
        }
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for replicas in (1, 2):
                serve_export(out, ServeOptions(replicas=replicas, max_batch_size=32), port=0)
                client = Client.connect()
                served(client, contract, 4, 0.5)  # warm-up
                for clients in (1, 8, 32):
                    row = served(client, contract, clients, args.seconds)
                    results["serve"].append({"replicas": replicas, **row})
                    print(results["serve"][-1], flush=True)
                serve.delete("worldflux")
        finally:
            serve.shutdown()
            ray.shutdown()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_ray_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "serve_ray_cpu.md").write_text(render(results))
    print(render(results))


def render(r) -> str:
    lines = [
        f"# Serving `{r['ref']}` on Ray Serve vs one process (CPU)",
        "",
        f"Measured {r['created']} on {r['machine']['cpus']} CPUs shared with other jobs "
        f"({r['machine']['platform']}, Python {r['machine']['python']}, ray "
        f"{r['machine']['ray']}); {r['seconds_per_cell']} s per cell; ONNX Runtime with one "
        "intra-op thread per process; `transition` steps (one step = one batch row).",
        "",
        "## Single process (`OnnxWorldModel.transition` in a loop)",
        "",
        "| batch | calls/s | steps/s |",
        "|---:|---:|---:|",
        *(
            f"| {x['batch']} | {x['calls_per_s']:.0f} | {x['steps_per_s']:.0f} |"
            for x in r["single_process"]
        ),
        "",
        "## Ray Serve (batch-1 requests from C client threads over the DeploymentHandle)",
        "",
        "| replicas | clients | steps/s | p50 latency (ms) |",
        "|---:|---:|---:|---:|",
        *(
            f"| {x['replicas']} | {x['clients']} | {x['steps_per_s']:.0f} | "
            f"{x['p50_latency_ms']:.2f} |"
            for x in r["serve"]
        ),
        "",
        "## Batching overhead per request (in one process, no Ray)",
        "",
        "| requests per batch | model call (us) | Engine.handle (us) | engine overhead / request "
        "(us) | envelope / request (us) |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {x['requests_per_batch']} | {x['model_call_us']:.0f} | {x['engine_us']:.0f} | "
            f"{x['engine_overhead_per_request_us']:.0f} | {x['envelope_per_request_us']:.0f} |"
            for x in r["overhead"]
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
