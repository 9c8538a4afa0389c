"""`optimize`: try each deployment candidate, check its parity, time it, install the fastest."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._files import temp_sibling
from ..bench._verdict import flip_budget_verdict
from ..errors import BackendError, ConfigError, ParityError

if TYPE_CHECKING:
    from ..parity import ParityReport
    from ..protocol._model import WorldModel

__all__ = ["CANDIDATES", "METRICS", "CandidateResult", "OptimizeResult", "optimize"]

#: Candidate name -> (export precision, fused rollout graph). Tried in this order.
CANDIDATES: Final = {
    "fp32": ("fp32", False),
    "fp32-fused": ("fp32", True),
    "int8": ("int8", False),
    "int8-fused": ("int8", True),
}
#: What "fastest" means: the median latency of one ``transition`` call, or of a whole
#: ``rollout`` of ``horizon`` steps (transition + decode each step).
METRICS: Final = ("rollout", "transition")
#: Format name of the JSON document `OptimizeResult.to_dict` returns.
FORMAT: Final = "worldflux.optimize"
#: Largest batch the parity check runs at (a larger timed batch is checked at this one).
PARITY_MAX_BATCH: Final = 64


@dataclass
class CandidateResult:
    """One candidate: how it was built, whether parity passed, and its latencies here."""

    name: str
    precision: str
    fused: bool
    status: str = "pending"  #: ``chosen``, ``passed``, ``rejected`` or ``error``
    reasons: list[str] = field(default_factory=list)
    export_s: float | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    #: Median seconds per call: ``{"transition": ..., "rollout": ...}`` (passing ones only).
    latency: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {
            "name": self.name,
            "precision": self.precision,
            "fused": self.fused,
            "status": self.status,
            "reasons": list(self.reasons),
            "export_s": self.export_s,
            "parity": dict(self.parity),
            "latency_s": dict(self.latency),
            "samples": dict(self.samples),
        }


@dataclass
class OptimizeResult:
    """What `optimize` tried and chose; ``out`` holds the chosen artifact."""

    model: str
    target: str
    out: Path
    chosen: str
    metric: str
    batch: int
    horizon: int
    max_flip_rate: float
    candidates: list[CandidateResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (also stored as ``optimize`` in the chosen artifact's manifest)."""
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model,
            "target": self.target,
            "out": str(self.out),
            "chosen": self.chosen,
            "metric": self.metric,
            "batch": self.batch,
            "horizon": self.horizon,
            "max_flip_rate": self.max_flip_rate,
            "candidates": [c.to_dict() for c in self.candidates],
            "settings": dict(self.settings),
        }

    def to_markdown(self) -> str:
        """The candidates as a markdown table, the chosen one marked."""
        lines = [
            f"`{self.model}` on {self.target}, batch {self.batch}, rollout of {self.horizon} "
            f"steps, max flip rate {self.max_flip_rate:g}: chose **{self.chosen}** "
            f"(fastest {self.metric} that passed parity).",
            "",
            "| candidate | export | parity | free-running flip rate | transition | rollout "
            "| chosen | reason |",
            "|---|---:|---|---:|---:|---:|---|---|",
        ]
        for c in self.candidates:
            flip = c.parity.get("free_running_flip_rate")
            lines.append(
                "| "
                + " | ".join(
                    [
                        c.name,
                        "-" if c.export_s is None else f"{c.export_s:.1f} s",
                        {"chosen": "pass", "passed": "pass"}.get(c.status, c.status),
                        "-" if flip is None else f"{flip:.4f}",
                        _ms(c.latency.get("transition")),
                        _ms(c.latency.get("rollout")),
                        "**yes**" if c.status == "chosen" else "",
                        "; ".join(c.reasons).replace("|", "/"),
                    ]
                )
                + " |"
            )
        return "\n".join(lines) + "\n"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def optimize(
    model_or_ref: WorldModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target: str = "cpu",
    max_flip_rate: float = 0.02,
    batch: int = 1,
    horizon: int = 16,
    metric: str = "rollout",
    candidates: Sequence[str] | None = None,
    threads: int | None = None,
    seed: int = 0,
    repeats: int = 30,
    max_seconds: float = 3.0,
) -> OptimizeResult:
    """Export ``model_or_ref`` as each candidate, keep the fastest one that passes parity.

    Every candidate (`CANDIDATES`: fp32 and int8, each stepping graph by graph or rolling out
    through the fused rollout graph) is exported, loaded on ``target`` and checked against the
    torch model: each step alone and teacher-forced rollouts within the tolerances of its
    precision (int8's for int8), and a free-running rollout of ``horizon`` steps. Categorical
    outputs are judged by their flip rate (the fraction of samples whose argmax differs), which
    must stay at or below ``max_flip_rate`` at every step; a free-running output that drifts
    out of tolerance before any sample flipped fails, one that diverges after a flip is the
    flip's consequence and is reported. The candidates that pass are timed here, interleaved
    in one process, and the fastest by ``metric`` is installed as ``out_dir``.

    Args:
        model_or_ref: A torch `WorldModel` or a registry ref (``"dreamerv3:size12m"``).
        out_dir: Where the chosen artifact goes: must not exist or be an empty directory. It is
            built beside ``out_dir`` and renamed into place, so a reader never sees half of it.
        target: Where the artifact will run (``worldflux_onnx.targets.TARGETS``: ``"cpu"``,
            ``"cuda"``); measured on this machine.
        max_flip_rate: Largest categorical flip rate accepted, in [0, 1].
        batch: Batch size timed (parity runs at it, capped at `PARITY_MAX_BATCH`).
        horizon: Rollout length timed and checked; the fused graph unrolls this many steps.
        metric: ``"rollout"`` or ``"transition"`` (`METRICS`).
        candidates: Names from `CANDIDATES` to try (default all).
        threads: ONNX Runtime intra-op threads (default: the loader's session defaults).

    Returns:
        An `OptimizeResult`; its table is also stored as ``optimize`` in the manifest of the
        installed artifact.

    Raises:
        ConfigError: an unknown target, candidate or metric, a flip rate outside [0, 1], a
            batch or horizon below 1, or an ``out_dir`` that exists and is not empty.
        BackendError: the target cannot run here (``cuda`` without ONNX Runtime's CUDA provider).
        ParityError: no candidate passed (each one's reasons in the message).
    """
    names = _check_args(target, max_flip_rate, batch, horizon, metric, candidates)
    out = Path(out_dir)
    _check_out(out)
    targets = _targets()
    targets.check_target(target)

    import torch

    from ..exporting import export
    from ..protocol._model import WorldModel
    from ..registry._registry import registry

    if isinstance(model_or_ref, WorldModel):
        model = model_or_ref
    else:
        torch.manual_seed(seed)
        model = registry.load(model_or_ref, device="cpu")
    was_training = model.training
    model.eval()
    label = f"{model.family}:{model.preset}" if model.preset else str(model.family)
    results = [CandidateResult(n, *CANDIDATES[n]) for n in names]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = temp_sibling(out)
    work.mkdir()
    try:
        built: dict[str, Path] = {}
        for precision in dict.fromkeys(r.precision for r in results):
            fused = any(r.fused for r in results if r.precision == precision)
            graphs = ("encode", "transition", "decode") + (("rollout",) if fused else ())
            t0 = time.perf_counter()
            try:
                built[precision] = export(
                    model,
                    "onnx",
                    work / precision,
                    graphs=graphs,
                    precision=precision,
                    rollout_horizon=horizon,
                    check=False,
                )
            except Exception as exc:  # one candidate's failure is a row of the table
                for r in results:
                    if r.precision == precision:
                        r.status, r.reasons = "error", [f"export failed: {_short(exc)}"]
            took = time.perf_counter() - t0
            for r in results:
                if r.precision == precision:
                    r.export_s = took
        loaded: dict[str, Any] = {}
        reports: dict[str, ParityReport] = {}
        for r in results:
            if r.status == "error":
                continue
            try:
                options = targets.load_options(target, fused=r.fused, threads=threads)
                candidate = registry.load(built[r.precision], **options)
                if r.fused and getattr(candidate, "fused_rollout_horizon", None) is None:
                    raise BackendError("the export has no fused rollout graph")
                reports[r.name], r.parity, r.reasons = flip_budget_verdict(
                    model, candidate, min(batch, PARITY_MAX_BATCH), horizon, max_flip_rate, seed
                )
            except Exception as exc:
                r.status, r.reasons = "error", [_short(exc)]
                continue
            r.status = "rejected" if r.reasons else "passed"
            if not r.reasons:
                loaded[r.name] = candidate
        passing = [r for r in results if r.status == "passed"]
        if not passing:
            raise ParityError(
                "no candidate passed parity: "
                + "; ".join(f"{r.name}: {', '.join(r.reasons[:2])}" for r in results),
                hint="raise --max-flip-rate, or export fp32 with `worldflux-registry export`",
            )
        _time(model, loaded, passing, batch, horizon, seed, repeats, max_seconds)
        best = min(passing, key=lambda r: r.latency[metric])
        best.status = "chosen"
        result = OptimizeResult(
            model=label,
            target=target,
            out=out,
            chosen=best.name,
            metric=metric,
            batch=batch,
            horizon=horizon,
            max_flip_rate=max_flip_rate,
            candidates=results,
            settings={
                "threads": threads,
                "seed": seed,
                "repeats": repeats,
                "max_seconds": max_seconds,
                "parity_batch": min(batch, PARITY_MAX_BATCH),
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "cpu_count": os.cpu_count(),
            },
        )
        chosen_dir = built[best.precision]
        if not best.fused:
            with_rollout = any(r.fused for r in results if r.precision == best.precision)
            if with_rollout:  # the loader would run the slower fused graph by default
                targets.drop_graphs(chosen_dir, {"rollout"})
        _record(chosen_dir, reports[best.name], result.to_dict())
        del loaded
        _install(chosen_dir, out)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        model.train(was_training)


def _check_args(
    target: str,
    max_flip_rate: float,
    batch: int,
    horizon: int,
    metric: str,
    candidates: Sequence[str] | None,
) -> list[str]:
    from ..errors import did_you_mean

    if not isinstance(target, str) or not target:
        raise ConfigError(f"target must be a name, got {target!r}", hint="e.g. target='cpu'")
    if isinstance(max_flip_rate, bool) or not isinstance(max_flip_rate, (int, float)):
        raise ConfigError(f"max_flip_rate must be a number in [0, 1], got {max_flip_rate!r}")
    if not 0.0 <= max_flip_rate <= 1.0:
        raise ConfigError(
            f"max_flip_rate must be in [0, 1], got {max_flip_rate}",
            hint="e.g. 0.02: at most 2% of categorical samples may differ from the torch model's",
        )
    for name, value in (("batch", batch), ("horizon", horizon)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if metric not in METRICS:
        raise ConfigError(
            f"unknown metric {metric!r}.{did_you_mean(str(metric), METRICS)}",
            hint="metrics: " + ", ".join(METRICS),
        )
    names = list(CANDIDATES) if candidates is None else list(dict.fromkeys(candidates))
    for name in names:
        if name not in CANDIDATES:
            raise ConfigError(
                f"unknown candidate {name!r}.{did_you_mean(str(name), list(CANDIDATES))}",
                hint="candidates: " + ", ".join(CANDIDATES),
            )
    if not names:
        raise ConfigError("no candidate to try", hint="candidates: " + ", ".join(CANDIDATES))
    return names


def _check_out(out: Path) -> None:
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise ConfigError(f"{out} exists and is not a directory", hint="choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"{out} exists and is not empty: optimize writes only a new or empty directory",
            hint="choose a new directory, or remove that one yourself",
        )


def _targets() -> Any:
    try:
        import worldflux_onnx.targets as targets
    except ImportError as exc:
        raise BackendError(
            f"optimize needs the ONNX exporter ({exc})",
            hint="pip install 'worldflux-registry[onnx]'",
        ) from exc
    return targets


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _time(
    model: WorldModel,
    loaded: dict[str, Any],
    passing: list[CandidateResult],
    batch: int,
    horizon: int,
    seed: int,
    repeats: int,
    max_seconds: float,
) -> None:
    """Median transition and rollout latency of each passing candidate, timed round-robin."""
    import torch

    from ..bench._backends import _actions, _initial_state, _make_inputs
    from ..bench._measure import _Series
    from ..protocol._inputs import conditions_payload

    inputs = _make_inputs(model, batch, horizon, seed)
    step_cond = conditions_payload(inputs.step_noise, inputs.conds)
    roll_cond = conditions_payload(inputs.rollout_noise, inputs.conds)
    action, actions = inputs.action, _actions(inputs)
    series: list[tuple[CandidateResult, str, _Series]] = []
    with torch.inference_mode():
        for r in passing:
            m = loaded[r.name]
            state = _initial_state(m, inputs)
            for what, fn in (
                ("transition", lambda m=m, s=state: m.transition(s, action, step_cond)),
                ("rollout", lambda m=m, s=state: m.rollout(s, actions, roll_cond)),
            ):
                s = _Series(fn, lambda: None, 3, repeats)
                s.warm()
                series.append((r, what, s))
        # Round-robin blocks spread the machine's drifts (other processes) over every candidate.
        block = max(1, -(-repeats // 5))
        while True:
            active = [s for _, _, s in series if not s.done(5, max_seconds)]
            if not active:
                break
            for s in active:
                s.time_block(block, 5, max_seconds)
    for r, what, s in series:
        r.latency[what] = s.timing().median
        r.samples[what] = len(s.samples)


def _record(directory: Path, report: ParityReport, table: dict[str, Any]) -> None:
    """Store the parity summary and the optimize table in the artifact's manifest."""
    import json

    from .._files import atomic_write
    from ..exporting._export import _store_parity
    from ..registry._artifact import MANIFEST_FILE, read_artifact_manifest

    _store_parity(directory, report.summary())
    manifest = read_artifact_manifest(directory, ConfigError)
    manifest["optimize"] = {k: v for k, v in table.items() if k != "out"}
    atomic_write(directory / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def _install(built: Path, out: Path) -> None:
    """Rename the finished artifact ``built`` to ``out`` (absent or an empty directory)."""
    _check_out(out)  # again: something may have appeared there while we worked
    if out.is_dir():
        out.rmdir()  # empty (checked above); rmdir refuses anything else
    os.replace(built, out)
