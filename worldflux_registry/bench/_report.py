"""The benchmark's results document: its JSON layout, the speed-target verdicts, markdown."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._files import atomic_write
from ._backends import _FUSED, _shorten
from ._measure import environment
from ._results import BenchRun

if TYPE_CHECKING:
    from rich.console import Group

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TARGETS",
    "document",
    "evaluate_targets",
    "to_markdown",
    "to_rich",
    "write",
]

#: ``format`` of the JSON document written by `write`.
FORMAT = "worldflux.bench"
#: Layout version of that document; bumped when a field changes meaning.
FORMAT_VERSION = 1


# -- documents --------------------------------------------------------------------------------
def document(
    runs: Sequence[BenchRun],
    env: Mapping[str, Any] | None = None,
    *,
    failures: Sequence[Mapping[str, str]] = (),
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The versioned JSON document for ``runs``, with the environment and the target verdicts.

    ``failures`` lists models that could not be benchmarked at all (``{"model", "reason"}``, e.g.
    their export failed); ``notes`` are free-text remarks rendered under the tables.
    """
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": dict(env) if env is not None else environment(),
        "runs": [r.to_dict() for r in runs],
        "failures": [dict(f) for f in failures],
        "notes": list(notes),
    }
    doc["targets"] = evaluate_targets(doc)
    return doc


#: The targets of the benchmark issue: (id, text, models it names).
TARGETS: tuple[tuple[str, str], ...] = (
    (
        "gpu-b1-cudagraph",
        "GPU, rollout of 16 steps at batch 1: ORT with CUDA graphs within 1.2x of a torch "
        "CUDA-graph replay, and at least 4x faster than torch eager",
    ),
    ("gpu-b1024", "GPU, rollout of 16 steps at batch 1024: ORT on CUDA no slower than torch eager"),
    ("cpu-b1-step", "CPU, batch 1, one transition: ORT at least 1.5x faster than torch eager"),
    (
        "cpu-b1-step-compile",
        "CPU, batch 1, one transition: ORT at least 1.5x faster than torch.compile (inductor)",
    ),
    ("parity", "Parity holds at every benchmarked setting"),
    (
        "cpu-b1-agent",
        "CPU, batch 1, one agent step (encode + plan, or act): ORT at least 2x faster than "
        "torch eager",
    ),
    (
        "cpu-b1-agent-compile",
        "CPU, batch 1, one agent step: ORT no slower than torch.compile (inductor)",
    ),
)
_TARGET_MODELS = ("dreamerv3:size12m", "tdmpc2:size5m")
#: CPU batch-1 step targets: target id -> (peer backend ORT is compared with, its label).
_CPU_STEP_PEERS: Final = {
    "cpu-b1-step": ("torch", "torch eager"),
    "cpu-b1-step-compile": ("torch-compile", "torch.compile"),
}
#: CPU batch-1 agent-step targets: target id -> (peer backend, its label, speedup needed).
_CPU_AGENT_PEERS: Final = {
    "cpu-b1-agent": ("torch", "torch eager", 2.0),
    "cpu-b1-agent-compile": ("torch-compile", "torch.compile", 1.0),
}


def _mode(run: Mapping[str, Any]) -> str:
    return str(run.get("mode") or "transition")


def _find(
    run: Mapping[str, Any], backend: str, batch: int, device: str
) -> Mapping[str, Any] | None:
    for r in run["results"]:
        if r["backend"] == backend and r["batch"] == batch and (r.get("device") or "") == device:
            return r  # type: ignore[no-any-return]
    return None


def _median(result: Mapping[str, Any] | None, what: str) -> float | None:
    if result is None or result.get("status") != "ok" or not result.get(what):
        return None
    return float(result[what]["median"])


def _best(
    run: Mapping[str, Any], backend: str, batch: int, device: str
) -> tuple[float | None, str]:
    """The faster rollout of ``backend`` and its fused variant, with the one that gave it."""
    found = [
        (t, name)
        for name in (backend, backend + _FUSED)
        if (t := _median(_find(run, name, batch, device), "rollout")) is not None
    ]
    return min(found) if found else (None, backend)


def evaluate_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Verdict of every target for every model in ``doc``: met, missed or not measured."""
    verdicts: list[dict[str, Any]] = []
    runs = list(doc["runs"])
    failed = {f["model"]: f["reason"] for f in doc.get("failures", ())}
    for target_id, text in TARGETS:
        models = sorted({r["model"] for r in runs} | set(_TARGET_MODELS) | set(failed))
        for model in models:
            model_runs = [r for r in runs if r["model"] == model]
            if target_id != "parity":
                wanted = "agent" if target_id in _CPU_AGENT_PEERS else "transition"
                model_runs = [r for r in model_runs if _mode(r) == wanted]
            verdict = _verdict(target_id, model_runs)
            if verdict["status"] == "not-measured" and model in failed:
                verdict["detail"] = "not benchmarked: " + _shorten(failed[model], 160)
            verdict.update(target=target_id, text=text, model=model)
            verdict["named_by_issue"] = model in _TARGET_MODELS
            verdicts.append(verdict)
    return verdicts


def _verdict(target_id: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    not_here = {"status": "not-measured", "detail": "no matching measurement in this document"}
    if target_id == "parity":
        results = [r for run in runs for r in run["results"] if r.get("parity") is not None]
        if not results:
            return not_here
        refused = [f"{r['backend']}@{r['batch']}" for r in results if r["status"] == "refused"]
        if refused:
            return {"status": "missed", "detail": "refused (parity failed): " + ", ".join(refused)}
        return {"status": "met", "detail": f"{len(results)} backend/batch settings checked"}
    for run in runs:
        if target_id in _CPU_AGENT_PEERS:
            peer, label, needed = _CPU_AGENT_PEERS[target_id]
            peer_t = _median(_find(run, peer, 1, "cpu"), "step")
            ort_t = _median(_find(run, "ort-cpu", 1, "cpu"), "step")
            if peer_t and ort_t:
                speedup = peer_t / ort_t
                return {
                    "status": "met" if speedup >= needed else "missed",
                    "value": speedup,
                    "detail": f"ORT {speedup:.2f}x faster than {label} "
                    f"({_fmt_time(ort_t)} vs {_fmt_time(peer_t)}), needs >= {needed:g}x",
                }
            continue
        if target_id in _CPU_STEP_PEERS:
            peer, label = _CPU_STEP_PEERS[target_id]
            peer_t = _median(_find(run, peer, 1, "cpu"), "step")
            ort_t = _median(_find(run, "ort-cpu", 1, "cpu"), "step")
            if peer_t and ort_t:
                speedup = peer_t / ort_t
                return {
                    "status": "met" if speedup >= 1.5 else "missed",
                    "value": speedup,
                    "detail": f"ORT {speedup:.2f}x faster than {label} "
                    f"({_fmt_time(ort_t)} vs {_fmt_time(peer_t)}), needs >= 1.5x",
                }
        if run["horizon"] != 16:
            continue
        if target_id == "gpu-b1-cudagraph":
            graph_t = _median(_find(run, "torch-cudagraph", 1, "cuda"), "rollout")
            eager_t = _median(_find(run, "torch", 1, "cuda"), "rollout")
            ort_t, which = _best(run, "ort-cuda-graph", 1, "cuda")
            if graph_t and eager_t and ort_t:
                ratio, speedup = ort_t / graph_t, eager_t / ort_t
                ok = ratio <= 1.2 and speedup >= 4.0
                return {
                    "status": "met" if ok else "missed",
                    "value": {"vs_cudagraph": ratio, "speedup_vs_eager": speedup},
                    "detail": f"{which} {ratio:.2f}x the torch CUDA-graph time (<= 1.2 "
                    f"needed), {speedup:.1f}x faster than eager (>= 4 needed)",
                }
        if target_id == "gpu-b1024":
            eager_t = _median(_find(run, "torch", 1024, "cuda"), "rollout")
            ort_t, which = _best(run, "ort-cuda", 1024, "cuda")
            if eager_t and ort_t:
                ratio = ort_t / eager_t
                return {
                    "status": "met" if ratio <= 1.0 else "missed",
                    "value": ratio,
                    "detail": f"{which} takes {ratio:.2f}x the torch eager time (<= 1 needed)",
                }
    return not_here


# -- rendering --------------------------------------------------------------------------------
def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "-" if not load else f"{load[0]:.1f}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f} MiB"


def to_markdown(doc: Mapping[str, Any]) -> str:
    """Markdown tables of a benchmark document: environment, one table per model, targets."""
    env = doc["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    cuda = env.get("cuda")
    lines = [
        f"Benchmark document `{doc['format']}` v{doc['format_version']}, created {doc['created']}.",
        "",
        f"- Machine: {env['cpu']} ({env.get('cpu_affinity')} usable cores), {env['platform']}",
        "- GPU: " + (f"{cuda['device']} (CUDA {cuda['torch_cuda']})" if cuda else "none"),
        f"- Threads: torch {env['torch_threads']} intra-op (per-run settings below); "
        f"load average at the end: {env.get('loadavg')}",
        f"- Versions: {versions}",
        "- TF32 (process defaults; each run sets its own, below): "
        + ", ".join(f"`{k}`={v}" for k, v in env["tf32"].items()),
        "",
    ]
    for run in doc["runs"]:
        if _mode(run) == "agent":
            lines += _agent_markdown(run)
            continue
        export_t = run["export_time_s"]
        lines += [
            f"### {run['model']}",
            "",
            f"Horizon {run['horizon']}; reference: {run['reference']}; export "
            + (f"took {export_t:.1f} s" if export_t is not None else "given")
            + f"; TF32 {'on' if run['settings'].get('tf32') else 'off'} on both sides; "
            f"fingerprint `{run['fingerprint'][:19]}`. Torch threads "
            f"{run['settings'].get('torch_threads')}, ORT options "
            f"{run['settings'].get('ort_options') or 'default'}; load average before / after "
            f"{_fmt_load(run['settings'].get('loadavg_before'))} / "
            f"{_fmt_load(run['settings'].get('loadavg_after'))}.",
            "",
            "| backend | device | batch | parity | one transition: median (p10-p90) "
            "| rollout: median (p10-p90) [IQR] min | steps x batch / s | peak memory | note |",
            "|---|---|---:|---|---|---|---:|---:|---|",
        ]
        for r in run["results"]:
            parity = r.get("parity") or {}
            parity_cell = "-" if not parity else ("pass" if parity.get("passed") else "FAIL")
            step, roll = r.get("step"), r.get("rollout")
            step_cell = (
                f"{_fmt_time(step['median'])} ({_fmt_time(step['p10'])}-{_fmt_time(step['p90'])})"
                if step
                else "-"
            )
            roll_cell = (
                f"{_fmt_time(roll['median'])} ({_fmt_time(roll['p10'])}-"
                f"{_fmt_time(roll['p90'])}) [{_fmt_time(roll['iqr'])}] min {_fmt_time(roll['min'])}"
                if roll
                else "-"
            )
            mem = r.get("memory") or {}
            mem_cell = f"{_fmt_bytes(mem.get('peak_bytes'))} {mem.get('kind', '')}".strip()
            tput = f"{r['throughput']:,.0f}" if r.get("throughput") else "-"
            note = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r['reason']}"
            lines.append(
                f"| {r['backend']} | {r.get('device') or '-'} | {r['batch']} | {parity_cell} "
                f"| {step_cell} | {roll_cell} | {tput} | {mem_cell} | {note} |"
            )
        lines.append("")
    for failure in doc.get("failures", ()):
        lines += [f"### {failure['model']}", "", f"**Not benchmarked**: {failure['reason']}", ""]
    lines += ["### Targets", "", "| target | model | verdict | detail |", "|---|---|---|---|"]
    for v in doc["targets"]:
        if not v["named_by_issue"] and v["status"] == "not-measured":
            continue
        lines.append(f"| {v['text']} | {v['model']} | **{v['status']}** | {v['detail']} |")
    lines.append("")
    if doc.get("notes"):
        lines += ["### Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def _parity_word(parity: Mapping[str, Any]) -> str:
    """``pass``, ``pass (2 near-ties)`` or ``FAIL`` (``-`` without a check)."""
    if not parity:
        return "-"
    if not parity.get("passed"):
        return "FAIL"
    ties = parity.get("near_ties")
    count = len(ties) if isinstance(ties, list) else int(ties or 0)
    return f"pass ({count} near-tie{'s' if count > 1 else ''})" if count else "pass"


def _agent_markdown(run: Mapping[str, Any]) -> list[str]:
    """The section of one agent benchmark: what a call runs, then one row per result."""
    settings = run["settings"]
    agent = settings.get("agent", {})
    export_t = run["export_time_s"]
    lines = [
        f"### {run['model']}: agent step ({agent.get('graph')})",
        "",
        f"One call per environment step for a batch of environments: `{agent.get('call')}`; "
        f"reference: {run['reference']}; export "
        + (f"took {export_t:.1f} s" if export_t is not None else "given")
        + f"; TF32 {'on' if settings.get('tf32') else 'off'} on both sides; fingerprint "
        f"`{run['fingerprint'][:19]}`. Torch threads {settings.get('torch_threads')}, ORT options "
        f"{settings.get('ort_options') or 'default'}; load average before / after "
        f"{_fmt_load(settings.get('loadavg_before'))} / "
        f"{_fmt_load(settings.get('loadavg_after'))}.",
        "",
        "| backend | device | batch | parity | agent step: median (p10-p90) [IQR] min "
        "| env steps / s | peak memory | note |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for r in run["results"]:
        step = r.get("step")
        step_cell = (
            f"{_fmt_time(step['median'])} ({_fmt_time(step['p10'])}-{_fmt_time(step['p90'])}) "
            f"[{_fmt_time(step['iqr'])}] min {_fmt_time(step['min'])}"
            if step
            else "-"
        )
        mem = r.get("memory") or {}
        mem_cell = f"{_fmt_bytes(mem.get('peak_bytes'))} {mem.get('kind', '')}".strip()
        tput = f"{r['throughput']:,.1f}" if r.get("throughput") else "-"
        note = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r['reason']}"
        lines.append(
            f"| {r['backend']} | {r.get('device') or '-'} | {r['batch']} "
            f"| {_parity_word(r.get('parity') or {})} | {step_cell} | {tput} | {mem_cell} "
            f"| {note} |"
        )
    selections = [
        (r["backend"], r["batch"], c)
        for r in run["results"]
        for c in (r.get("parity") or {}).get("selections", ())
    ]
    if selections:
        lines += ["", "Selections compared by parity (near-ties are accepted):", ""]
        for backend, batch, c in selections:
            lines.append(f"- {backend} at batch {batch}: {_selection_text(c)}")
    lines.append("")
    return lines


def _selection_text(check: Mapping[str, Any]) -> str:
    """``1/1 rows agree at all 6 iterations`` plus near-ties and the first failing iteration."""
    text = f"{check['agreed']}/{check['batch']} rows agree at all {check['iterations']} iterations"
    for tie in check.get("near_ties", ()):
        text += (
            f"; row {tie['row']} near-tie at iteration {tie['iteration']} (scores agree to "
            f"{tie.get('score_diff', 0.0):.2g})"
        )
    failures = check.get("failures") or ()
    if failures:
        text += f"; FAIL from iteration {min(f['iteration'] for f in failures)}"
    return text


def _sig(value: float) -> str:
    """Three significant digits, never in exponent form: 0.512, 5.12, 51.2, 512."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _scale(seconds: float) -> tuple[float, str]:
    if seconds < 1e-3:
        return 1e6, "µs"
    return (1e3, "ms") if seconds < 1.0 else (1.0, "s")


def _time_cell(timing: Mapping[str, Any] | None) -> str:
    """Median over the p10-p90 range, in the median's unit (``14.1 ms`` / ``1.10-32.1``)."""
    if not timing:
        return "-"
    factor, unit = _scale(timing["median"])
    spread = f"{_sig(timing['p10'] * factor)}-{_sig(timing['p90'] * factor)}"
    return f"{_sig(timing['median'] * factor)} {unit}\n[dim]{spread}[/]"


def _rate(value: float | None) -> str:
    """Three significant digits: 54.3, 628, 12,300."""
    if not value:
        return "-"
    return f"{float(f'{value:.3g}'):,.0f}" if value >= 100 else f"{value:.3g}"


def to_rich(doc: Mapping[str, Any], width: int | None = None) -> Group:
    """The document for a terminal: per model a table of its results, then the speed targets
    this document measured (met or missed), fitted to ``width`` columns.

    Times are medians with the p10-p90 range beneath, three significant digits; the full
    statistics, environment and every target are in the JSON and `to_markdown`.
    """
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from .._rich import fit_words

    parts: list[Any] = []
    env = doc["environment"]
    versions = env.get("versions", {})
    machine = f"{env.get('cpu')} ({env.get('cpu_affinity')} cores)"
    cuda = env.get("cuda")
    gpu = f"{cuda['device']}" if cuda else "no GPU"
    stack = ", ".join(f"{k} {versions[k]}" for k in ("torch", "onnxruntime") if versions.get(k))
    parts.append(Text(f"{machine}, {gpu}; {stack}", style="dim"))
    for run in doc["runs"]:
        settings = run.get("settings", {})
        export_t = run.get("export_time_s")
        load = (_fmt_load(settings.get("loadavg_before")), _fmt_load(settings.get("loadavg_after")))
        agent = _mode(run) == "agent"
        facts = [
            f"agent step ({settings.get('agent', {}).get('graph')})"
            if agent
            else f"horizon {run['horizon']}",
            f"export {export_t:.1f} s" if export_t is not None else "export given",
            f"torch threads {settings.get('torch_threads')}",
            f"TF32 {'on' if settings.get('tf32') else 'off'}",
            f"load {load[0]}→{load[1]}",
        ]
        results = run["results"]
        devices = {r.get("device") or "-" for r in results}
        parts.append(Text.from_markup(f"[bold]{escape(run['model'])}[/]: " + ", ".join(facts)))
        if agent:
            caption = (
                "median, and p10-p90 beneath it; one agent step for a batch of environments: "
                f"{settings.get('agent', {}).get('call')}"
            )
        else:
            caption = (
                f"median, and p10-p90 beneath it; rollout: {run['horizon']} x (transition + decode)"
            )
        table = Table(caption=escape(caption), caption_justify="left")
        table.add_column("backend")
        if len(devices) > 1:
            table.add_column("device")
        table.add_column("batch", justify="right")
        table.add_column("parity")
        if agent:
            table.add_column("agent step", justify="right")
            table.add_column("env steps/s", justify="right")
        else:
            table.add_column("transition", justify="right")
            table.add_column("rollout", justify="right")
            table.add_column("steps/s", justify="right")
        table.add_column("memory", justify="right")
        notes: list[str] = []
        for r in results:
            parity = r.get("parity") or {}
            word = _parity_word(parity)
            verdict = (
                "-"
                if not parity
                else f"[green]{word}[/]"
                if parity.get("passed")
                else "[red]FAIL[/]"
            )
            if r["status"] != "ok":
                verdict = {"refused": "[red]refused[/]", "error": "[red]error[/]"}.get(
                    r["status"], f"[yellow]{r['status']}[/]"
                )
                notes.append(f"{r['backend']} at batch {r['batch']}: {r['reason']}")
            mem = r.get("memory") or {}
            peak = mem.get("peak_bytes")
            mem_cell = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
            if peak is not None and mem.get("kind") == "cuda":
                mem_cell += " GPU"
            cells = [r["backend"], *([r.get("device") or "-"] if len(devices) > 1 else [])]
            cells += [str(r["batch"]), verdict, _time_cell(r.get("step"))]
            if not agent:
                cells.append(_time_cell(r.get("rollout")))
            cells += [_rate(r.get("throughput")), mem_cell]
            table.add_row(*cells)
        parts.append(fit_words(table, width))
        for note in notes:
            parts.append(Text(note, style="yellow"))
    for failure in doc.get("failures", ()):
        parts.append(Text(f"{failure['model']} not benchmarked: {failure['reason']}", "red"))
    models = {r["model"] for r in doc["runs"]}
    measured = [
        v for v in doc.get("targets", ()) if v["model"] in models and v["status"] != "not-measured"
    ]
    if measured:
        several = len(models) > 1
        targets = Table(title="Speed targets measured by this run", title_justify="left")
        for column in ("target", *(("model",) if several else ()), "verdict", "measured"):
            targets.add_column(column)
        for v in measured:
            colour = "green" if v["status"] == "met" else "red"
            targets.add_row(
                v["text"],
                *((v["model"],) if several else ()),
                f"[{colour}]{v['status']}[/]",
                escape(v["detail"]),
            )
        parts.append(fit_words(targets, width))
    return Group(*parts)


def _json_text(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def write(doc: Mapping[str, Any], json_path: str | Path | None, md_path: str | Path | None) -> None:
    """Write the JSON document and / or its markdown, each atomically."""
    for path, render in ((json_path, _json_text), (md_path, to_markdown)):
        if path is None:
            continue
        atomic_write(path, render(doc).encode("utf-8"))
