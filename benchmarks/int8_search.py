"""Which layers of an int8 export must stay float32 for it to pass free-running parity.

    python benchmarks/int8_search.py                      # dreamerv3:size12m, batch 64
    python benchmarks/int8_search.py --sets "dyn.,enc." --sets "dec."

Exports the model once in float32 (encode, transition, decode), then for each candidate
``keep_in_fp32`` set quantizes those graphs dynamically (as ``export(..., precision="int8")``
does, every MatMul/Gemm except the set's) and runs the bench's int8 verdict
(``flip_budget_verdict``: step and teacher-forced parity within the int8 tolerances, categorical
flip rate at most ``--max-flip-rate`` over a free-running rollout of ``--horizon`` steps). Every
variant's transition is then timed against the fp32 export, interleaved in one process, one
ORT thread each. Writes ``benchmarks/results/int8_search_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GRAPHS = ("encode", "transition", "decode")

#: Candidate keep-in-fp32 sets: the model's own default first, then each module group added to
#: it one at a time, then unions. The names are module-path prefixes of the DreamerV3 model.
DEFAULT_SETS = {
    "none": (),
    "default": ("dyn.obslogit", "dyn.priorlogit", "rew.", "val.", "slowval."),
}
GROUPS = {
    "+enc": ("encoder.",),
    "+dec": ("decoder.",),
    "+dyn.in": ("dyn.dynin",),
    "+dyn.hid": ("dyn.dynhid",),
    "+dyn.gru": ("dyn.dyngru",),
    "+dyn.prior": ("dyn.prior",),
    "+dyn.obs": ("dyn.obs",),
    "+con": ("con.",),
}


def _requantize(fp32: Path, out: Path, keep: tuple[str, ...]) -> Path:
    """Copy the fp32 export at ``fp32`` to ``out`` with every graph quantized to int8 except
    the MatMul/Gemm of ``keep``; the manifest says int8 and lists the new files' digests."""
    from worldflux_onnx._manifest import sha256_file
    from worldflux_onnx.export import _quantize_int8

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp32, out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for graph, entry in manifest["graphs"].items():
        path = out / entry["file"]
        # The signature only names the graph in error messages.
        _quantize_int8(path, SimpleNamespace(graph=graph), keep)  # type: ignore[arg-type]
        for stale in out.iterdir():
            if stale.name.startswith(path.name) and stale != path:
                stale.unlink()
        entry["sha256"] = sha256_file(path)
        entry.pop("external_data", None)
    manifest["precision"] = "int8"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def _verdict(
    reference: Any, candidate: Any, batch: int, horizon: int, budget: float, seed: int
) -> dict:
    from worldflux_registry.bench import flip_budget_verdict

    report, summary, reasons = flip_budget_verdict(
        reference, candidate, batch, horizon, budget, seed=seed
    )
    worst: dict[str, float | None] = {}
    for curve in report.rollouts:
        if curve.mode == "teacher_forced" and curve.key.startswith("decode/"):
            worst[curve.key + " tol_ratio"] = curve.worst("tol_ratio")
            worst[curve.key + " max_abs"] = curve.worst("max_abs")
    return {
        "passed": not reasons,
        "reasons": reasons,
        "free_running_flip_rate": summary["free_running_flip_rate"],
        "first_flip_step": summary["first_flip_step"],
        "decode": worst,
    }


def _time(models: dict[str, Any], batch: int, repeats: int, max_seconds: float) -> dict:
    """Median transition time of each model, in rounds of shuffled order (see ort_threads)."""
    import torch

    from worldflux_registry.plugin_api import (
        conditions_payload,
        encode_input,
        make_actions,
        make_noise,
        make_observations,
    )

    calls = {}
    samples: dict[str, list[float]] = {name: [] for name in models}
    spent = dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for name, model in models.items():
            contract = model.io_contract()
            gen = torch.Generator().manual_seed(0)
            obs = make_observations(contract, (batch,), gen)
            state = model.encode(encode_input(obs, make_noise(contract, "encode", (batch,), gen)))
            action = make_actions(contract, (batch,), gen)
            cond = conditions_payload(make_noise(contract, "transition", (batch,), gen))
            calls[name] = lambda m=model, s=state, a=action, c=cond: m.transition(s, a, c)
            for _ in range(5):
                calls[name]()
        rng = random.Random(0)
        while True:
            active = [
                n
                for n in models
                if len(samples[n]) < repeats
                and not (spent[n] > max_seconds and len(samples[n]) >= 20)
            ]
            if not active:
                break
            rng.shuffle(active)
            for name in active:
                calls[name]()
                for _ in range(max(1, repeats // 10)):
                    t0 = time.perf_counter()
                    calls[name]()
                    took = time.perf_counter() - t0
                    samples[name].append(took)
                    spent[name] += took
    return {
        n: {"median_s": statistics.median(x), "min_s": min(x), "samples": len(x)}
        for n, x in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dreamerv3:size12m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--max-flip-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="parity inputs and noise")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wf-int8-search"))
    parser.add_argument(
        "--sets",
        action="append",
        default=[],
        help="a comma-separated keep set to try (repeatable; default: the built-in search)",
    )
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--note", action="append", default=[], help="a remark for the table")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_search_cpu.json")
    args = parser.parse_args(argv)

    import torch
    from worldflux_onnx._session import session_options

    from worldflux_registry import export, registry

    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = registry.load(args.model, device="cpu").eval()
    fp32 = args.work / "fp32"
    pristine = args.work / "fp32-pristine"
    if not (pristine / "manifest.json").is_file():
        t0 = time.perf_counter()
        export(reference, "onnx", pristine, graphs=GRAPHS, check=False)
        print(f"fp32 export {time.perf_counter() - t0:.1f} s", flush=True)
    if fp32.exists():
        shutil.rmtree(fp32)
    shutil.copytree(pristine, fp32)

    if args.sets:
        sets = {s: tuple(p for p in s.split(",") if p) for s in args.sets}
    else:
        sets = dict(DEFAULT_SETS)
        for name, extra in GROUPS.items():
            sets["default" + name] = DEFAULT_SETS["default"] + extra
    options = {"session_options": session_options(1, spinning=False)}
    rows: dict[str, Any] = {}
    models: dict[str, Any] = {"fp32": registry.load(fp32, device="cpu", **options)}
    for name, keep in sets.items():
        t0 = time.perf_counter()
        out = _requantize(pristine, args.work / f"int8-{len(rows)}", keep)
        candidate = registry.load(out, device="cpu", **options)
        row = {"keep_in_fp32": list(keep)}
        row.update(
            _verdict(reference, candidate, args.batch, args.horizon, args.max_flip_rate, args.seed)
        )
        row["check_s"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        models[name] = candidate
        print(name, json.dumps(row), flush=True)
    load_before = os.getloadavg()
    timing = _time(models, args.batch, args.repeats, args.max_seconds)
    load_after = os.getloadavg()
    for name, row in rows.items():
        row["timing"] = timing[name]
        row["speedup_vs_fp32"] = timing["fp32"]["median_s"] / timing[name]["median_s"]
    doc = {
        "format": "worldflux.int8_search",
        "version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "reference": "random weights (torch.manual_seed(0))",
        "batch": args.batch,
        "horizon": args.horizon,
        "max_flip_rate": args.max_flip_rate,
        "machine": platform.platform(),
        "loadavg_before_timing": list(load_before),
        "loadavg_after_timing": list(load_after),
        "fp32_timing": timing["fp32"],
        "sets": rows,
        "notes": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


def _markdown(doc: dict[str, Any]) -> str:
    fp = doc["fp32_timing"]["median_s"] * 1e3
    lines = [
        f"int8 keep-in-fp32 search, `{doc['model']}` ({doc['reference']}), batch {doc['batch']}, "
        f"free-running horizon {doc['horizon']}, flip budget {doc['max_flip_rate']}; created "
        f"{doc['created']}.",
        "",
        "One ORT thread per session; transitions timed interleaved in one process against the "
        f"fp32 export ({fp:.2f} ms median). Load average before / after timing: "
        f"{doc['loadavg_before_timing'][0]:.2f} / {doc['loadavg_after_timing'][0]:.2f}.",
        "",
        "| kept in fp32 | decode tol ratio (teacher-forced, worst) | free-running flip rate "
        "| verdict | transition median | vs fp32 |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for row in doc["sets"].values():
        ratios = [v for k, v in row["decode"].items() if k.endswith("tol_ratio") and v is not None]
        ratio = f"{max(ratios):.2f}" if ratios else "-"
        flip = row["free_running_flip_rate"]
        verdict = "pass" if row["passed"] else "FAIL: " + "; ".join(row["reasons"])[:160]
        lines.append(
            f"| {', '.join(row['keep_in_fp32']) or '- (all int8)'} | {ratio} | "
            f"{'-' if flip is None else f'{flip:.4f}'} | {verdict} | "
            f"{row['timing']['median_s'] * 1e3:.2f} ms | {row['speedup_vs_fp32']:.2f}x |"
        )
    lines += [
        "",
        "A decode tol ratio above 1 is outside the int8 tolerance (rtol 0.1, atol 0.05).",
        "",
        *(f"- {note}" for note in doc.get("notes", [])),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
