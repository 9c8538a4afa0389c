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


def _time(models: dict[str, Any], batch: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    import torch

    from worldflux_registry.bench._backends import _initial_state, _make_inputs
    from worldflux_registry.bench._measure import _Series
    from worldflux_registry.protocol._inputs import conditions_payload

    reference = next(iter(models.values()))
    series = {}
    with torch.inference_mode():
        for name, model in models.items():
            inputs = _make_inputs(reference, batch, 1, 0)
            state = _initial_state(model, inputs)
            cond = conditions_payload(inputs.step_noise, inputs.conds)
            s = _Series(
                lambda m=model, st=state, c=cond, a=inputs.action: m.transition(st, a, c),
                lambda: None,
                10,
                repeats,
            )
            s.warm()
            series[name] = s
        # Ten rounds in a new random order each: a setting's neighbours change from round to
        # round. A spinning pool keeps spinning a while after its block, taking the core from
        # whoever runs next; the short pause between blocks lets it go back to sleep.
        rng = random.Random(0)
        while True:
            active = [s for s in series.values() if not s.done(20, max_seconds)]
            if not active:
                break
            rng.shuffle(active)
            for s in active:
                time.sleep(0.05)
                s.time_block(max(1, repeats // 10), 20, max_seconds)
    out = {}
    for name, s in series.items():
        t = s.timing()
        out[name] = {"median_s": t.median, "samples": len(s.samples), "min_s": min(s.samples)}
    return out


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
