"""ONNX Runtime thread settings on CPU: the loader's defaults against each explicit setting.

    python benchmarks/ort_threads.py                      # dreamerv3:size12m, batch 1 and 64
    python benchmarks/ort_threads.py --export DIR         # reuse an fp32 export

Writes ``benchmarks/results/ort_threads_cpu.{json,md}``. One transition of an fp32 export is
timed under each setting, all interleaved in one process (blocks in a new random order each
round, a pause between blocks so that a spinning pool goes back to sleep), twice:
with the machine as it is ("as found", load average recorded) and with one extra busy process
spinning on a core ("loaded"). Settings: ``registry.load(dir)`` with the project's defaults,
1, 2 and 4 intra-op threads with spinning off and on, and ONNX Runtime's own defaults (one
thread per core, spinning). The target: the default within 10% of the best setting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _settings(export: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from worldflux_onnx._session import session_options

    from worldflux_registry import registry

    models: dict[str, Any] = {"default (registry.load)": registry.load(export, device="cpu")}
    for threads in (1, 2, 4):
        for spinning in (False, True):
            plural = "s" if threads > 1 else ""
            name = f"{threads} thread{plural}, spinning {'on' if spinning else 'off'}"
            models[name] = registry.load(
                export,
                device="cpu",
                session_options=session_options(threads, spinning=spinning),
            )
    models["onnxruntime's own defaults"] = registry.load(
        export, device="cpu", session_options=ort.SessionOptions()
    )
    return models


def _inputs(model: Any, batch: int) -> tuple[Any, Any, Any]:
    """Seeded encode input, action and transition conditions of ``model``'s contract."""
    import torch

    from worldflux_registry.plugin_api import (
        conditions_payload,
        encode_input,
        make_actions,
        make_noise,
        make_observations,
    )

    contract = model.io_contract()
    gen = torch.Generator().manual_seed(0)
    obs = make_observations(contract, (batch,), gen)
    first = encode_input(obs, make_noise(contract, "encode", (batch,), gen))
    action = make_actions(contract, (batch,), gen)
    cond = conditions_payload(make_noise(contract, "transition", (batch,), gen))
    return first, action, cond


def _time(models: dict[str, Any], batch: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    import statistics

    import torch

    calls = {}
    samples: dict[str, list[float]] = {name: [] for name in models}
    spent = dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for name, model in models.items():
            first, action, cond = _inputs(model, batch)
            state = model.encode(first)
            calls[name] = lambda m=model, s=state, a=action, c=cond: m.transition(s, a, c)
            for _ in range(10):  # warm-up
                calls[name]()

        def done(name: str) -> bool:
            n = len(samples[name])
            return n >= repeats or (spent[name] > max_seconds and n >= 20)

        # Ten rounds in a new random order each: a setting's neighbours change from round to
        # round. A spinning pool keeps spinning a while after its block, taking the core from
        # whoever runs next; the short pause between blocks lets it go back to sleep.
        rng = random.Random(0)
        while True:
            active = [name for name in models if not done(name)]
            if not active:
                break
            rng.shuffle(active)
            for name in active:
                time.sleep(0.05)
                calls[name]()  # untimed: caches back to this setting's weights
                for _ in range(max(1, repeats // 10)):
                    if done(name):
                        break
                    t0 = time.perf_counter()
                    calls[name]()
                    dt = time.perf_counter() - t0
                    samples[name].append(dt)
                    spent[name] += dt
    return {
        name: {"median_s": statistics.median(x), "samples": len(x), "min_s": min(x)}
        for name, x in samples.items()
    }


def _busy() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _table(rows: dict[str, Any]) -> tuple[list[str], str, float]:
    best_name = min(rows, key=lambda n: rows[n]["median_s"])
    best = rows[best_name]["median_s"]
    default = rows["default (registry.load)"]["median_s"]
    lines = ["| setting | median | min | vs best |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        mark = " (best)" if name == best_name else ""
        lines.append(
            f"| {name}{mark} | {r['median_s'] * 1e6:,.0f} us | {r['min_s'] * 1e6:,.0f} us "
            f"| {r['median_s'] / best:.2f}x |"
        )
    return lines, best_name, default / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dreamerv3:size12m")
    parser.add_argument("--export", type=Path, help="an fp32 export of --model to reuse")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "ort_threads_cpu.json")
    args = parser.parse_args(argv)

    import torch
    from worldflux_onnx._session import DEFAULT_MAX_THREADS, usable_cores

    from worldflux_registry import export, registry

    tmp = None
    path = args.export
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        path = export(registry.load(args.model), "onnx", Path(tmp.name) / "e", check=False)
    torch.set_num_threads(1)
    models = _settings(path)
    runs = []
    for condition in ("as found", "loaded"):
        busy = _busy() if condition == "loaded" else None
        try:
            time.sleep(1.0 if busy else 0.0)
            for batch in (int(b) for b in args.batches.split(",")):
                load = os.getloadavg()
                rows = _time(models, batch, args.repeats, args.max_seconds)
                runs.append(
                    {
                        "condition": condition,
                        "batch": batch,
                        "loadavg": list(load),
                        "settings": rows,
                    }
                )
                print(condition, batch, json.dumps(rows), flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    doc = {
        "format": "worldflux.ort_threads",
        "version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": platform.platform(),
        "usable_cores": usable_cores(),
        "default_threads": min(usable_cores(), DEFAULT_MAX_THREADS),
        "runs": runs,
    }
    md = [
        f"ONNX Runtime thread settings, `{args.model}` fp32, one transition; created "
        f"{doc['created']}; {doc['usable_cores']} usable cores, so the default is "
        f"{doc['default_threads']} intra-op thread(s), spinning off. Target: the default "
        "within 10% of the best setting, loaded or not.",
        "",
    ]
    for run in runs:
        lines, _, ratio = _table(run["settings"])
        run["default_vs_best"] = ratio
        verdict = "met" if ratio <= 1.10 else "missed"
        md += [
            f"### {run['condition']}, batch {run['batch']} (1-min load average "
            f"{run['loadavg'][0]:.1f}): default {ratio:.2f}x the best — **{verdict}**",
            "",
            *lines,
            "",
        ]
    plural = "s" if doc["default_threads"] > 1 else ""
    twin = f"{doc['default_threads']} thread{plural}, spinning off"
    md += [
        f"The default is the same configuration as '{twin}': the gap between those two rows is "
        "the noise of this measurement on this machine.",
        "",
        "'as found' is the machine as other jobs left it (see its load average: it was not "
        "idle); 'loaded' adds one process spinning on a core.",
        "",
    ]
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
