"""`ParityReport`: what a parity check found, as data, JSON, a rich table and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._files import atomic_write
from .._rich import fit_words
from ..errors import ParityError
from ._metrics import Metrics
from ._tolerance import Tolerance

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "FORMAT",
    "GRAPHS",
    "MODES",
    "VERSION",
    "Localization",
    "OutputCheck",
    "ParityReport",
    "RolloutCurve",
    "SelectionCheck",
]

#: ``"format"`` of the JSON report.
FORMAT: Final = "worldflux.parity"
#: ``"version"`` of the JSON report.
VERSION: Final = 1
#: The comparison modes, in the order they run and are reported.
MODES: Final = ("step", "teacher_forced", "free_running")
#: Graphs in pipeline order (localisation blames the earliest failing one); the agent steps
#: (`AgentSpec.graph`) come last: they run on an encoded state.
GRAPHS: Final = ("encode", "transition", "update", "decode", "plan", "act")


@dataclass
class OutputCheck:
    """One output of one graph compared once (``step`` mode), at one batch size."""

    graph: str
    output: str
    batch: int
    dtype: str
    categorical: bool
    tolerance: Tolerance
    tolerance_source: str
    metrics: Metrics

    @property
    def key(self) -> str:
        """``"graph/output"``, e.g. ``"transition/state.deter"``."""
        return f"{self.graph}/{self.output}"

    @property
    def passed(self) -> bool:
        """True when every element is within tolerance (and every sample agrees)."""
        return self.metrics.passed

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {
            "graph": self.graph,
            "output": self.output,
            "batch": self.batch,
            "dtype": self.dtype,
            "categorical": self.categorical,
            "tolerance": self.tolerance.to_dict(),
            "tolerance_source": self.tolerance_source,
            "metrics": self.metrics.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputCheck:
        """Rebuild from `to_dict` output."""
        return cls(
            **{
                **data,
                "tolerance": Tolerance.parse(data["tolerance"]),
                "metrics": Metrics.from_dict(data["metrics"]),
            }
        )


@dataclass
class SelectionCheck:
    """An agent step's selections (`AgentSpec.selection`, e.g. MPPI elites) compared per
    iteration, at one batch size.

    Per environment (row), iterations are compared in order: the same indices with scores
    within the scores' tolerance agree; other indices with scores that still agree rank by rank
    are a **near-tie** that float rounding decided (that row's outputs are not compared: from
    there on the two sides follow different, equally valid candidates); scores that disagree
    fail the row at that iteration.
    """

    graph: str
    batch: int
    iterations: int
    #: Rows whose selections agree at every iteration.
    agreed: int
    #: ``{"row", "iteration", "score_diff"}`` of each near-tied row (iterations from 1).
    near_ties: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"row", "iteration"}``: where each failing row first breaks.
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no row fails (near-ties are accepted)."""
        return not self.failures

    @property
    def first_failing_iteration(self) -> int | None:
        """The earliest iteration (from 1) at which a row's selection breaks."""
        return min((f["iteration"] for f in self.failures), default=None)

    def describe(self) -> str:
        """One line for the table's caption."""
        text = (
            f"{self.graph} selection (batch {self.batch}): {self.agreed}/{self.batch} rows agree "
            f"at all {self.iterations} iterations"
        )
        for tie in self.near_ties:
            text += (
                f"; row {tie['row']} near-tie at iteration {tie['iteration']} (swapped "
                f"candidates' scores agree to {_fmt(tie['score_diff'])}; not compared)"
            )
        if self.failures:
            text += f"; FAIL from iteration {self.first_failing_iteration}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {
            "graph": self.graph,
            "batch": self.batch,
            "iterations": self.iterations,
            "agreed": self.agreed,
            "near_ties": self.near_ties,
            "failures": self.failures,
            "first_failing_iteration": self.first_failing_iteration,
            "passed": self.passed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionCheck:
        """Rebuild from `to_dict` output."""
        keys = ("graph", "batch", "iterations", "agreed", "near_ties", "failures")
        return cls(**{k: data[k] for k in keys})


@dataclass
class RolloutCurve:
    """One output compared at every step of a rollout (``teacher_forced`` or ``free_running``).

    ``steps[t]`` holds the metrics after ``t + 1`` transitions. ``first_failing_step`` counts
    from 1 (the first transition) and is None when every step is within tolerance.
    """

    mode: str
    graph: str
    output: str
    batch: int
    dtype: str
    categorical: bool
    tolerance: Tolerance
    tolerance_source: str
    steps: list[Metrics]
    error: str | None = None

    @property
    def key(self) -> str:
        """``"graph/output"``, e.g. ``"transition/state.deter"``."""
        return f"{self.graph}/{self.output}"

    @property
    def first_failing_step(self) -> int | None:
        """The first step (from 1) that breaks tolerance, or None."""
        for t, metrics in enumerate(self.steps):
            if not metrics.passed:
                return t + 1
        return 1 if self.error else None

    @property
    def passed(self) -> bool:
        """True when every step is within tolerance."""
        return self.error is None and all(m.passed for m in self.steps)

    def series(self, metric: str) -> list[float | None]:
        """One metric per step, e.g. ``series("max_abs")`` or ``series("flip_rate")``."""
        return [getattr(m, metric) for m in self.steps]

    def worst(self, metric: str) -> float | None:
        """The largest value of ``metric`` over the steps (None when there is none)."""
        values = [v for v in self.series(metric) if v is not None]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "graph": self.graph,
            "output": self.output,
            "batch": self.batch,
            "dtype": self.dtype,
            "categorical": self.categorical,
            "tolerance": self.tolerance.to_dict(),
            "tolerance_source": self.tolerance_source,
            "first_failing_step": self.first_failing_step,
            "passed": self.passed,
            "steps": [m.to_dict() for m in self.steps],
        }
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutCurve:
        """Rebuild from `to_dict` output."""
        data = {k: v for k, v in data.items() if k not in ("first_failing_step", "passed")}
        data["tolerance"] = Tolerance.parse(data["tolerance"])
        data["steps"] = [Metrics.from_dict(m) for m in data["steps"]]
        return cls(**data)


#: What a localisation concludes.
CAUSES: Final = {
    "exporter": "exporter bug: the ONNX reference evaluator, running the graph file, disagrees "
    "with torch too, so the exported graph computes something else",
    "runtime": "runtime kernel difference: the ONNX reference evaluator, running the same graph "
    "file, agrees with torch, so the runtime's kernels compute differently",
    "rollout": "the candidate's rollout() disagrees from its first step while its single steps "
    "agree: its rollout loop differs from transition + decode",
    "drift": "every single step agrees within tolerance, but errors compound over the free-"
    "running rollout",
    "candidate": "the candidate disagrees with the reference here (not an ONNX candidate, so "
    "exporter and runtime cannot be told apart)",
    "unknown": "could not tell exporter from runtime",
}


@dataclass
class Localization:
    """Where a failing check went wrong first, and (for ONNX candidates) whose fault it is.

    ``cause`` is one of ``"exporter"``, ``"runtime"``, ``"rollout"``, ``"drift"``,
    ``"candidate"`` or ``"unknown"`` (see ``detail``). ``evaluator`` compares the ONNX reference
    evaluator's output with the torch reference; ``evaluator_vs_candidate`` with the candidate.
    """

    graph: str
    output: str
    mode: str
    batch: int
    step: int | None
    cause: str
    detail: str
    evaluator: Metrics | None = None
    evaluator_vs_candidate: Metrics | None = None

    @property
    def key(self) -> str:
        """``"graph/output"`` at fault."""
        return f"{self.graph}/{self.output}"

    def describe(self) -> str:
        """One sentence for people."""
        where = f"{self.key} ({self.mode}, batch {self.batch}"
        where += f", step {self.step})" if self.step is not None else ")"
        return f"first failure at {where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {
            "graph": self.graph,
            "output": self.output,
            "mode": self.mode,
            "batch": self.batch,
            "step": self.step,
            "cause": self.cause,
            "detail": self.detail,
            "evaluator": None if self.evaluator is None else self.evaluator.to_dict(),
            "evaluator_vs_candidate": None
            if self.evaluator_vs_candidate is None
            else self.evaluator_vs_candidate.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Localization:
        """Rebuild from `to_dict` output."""
        data = dict(data)
        for name in ("evaluator", "evaluator_vs_candidate"):
            if data.get(name) is not None:
                data[name] = Metrics.from_dict(data[name])
        return cls(**data)


_MODE_LABELS: Final = {"step": "step", "teacher_forced": "teacher", "free_running": "free"}


#: Below this cosine a passing output is one whose reference is about zero (see `table`).
_COSINE_FLOOR: Final = 0.9


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"  # 4.1e-8, not 4.1e-08: the table fits 80 columns


def _worst(values: Iterator[float | None], *, lowest: bool = False) -> float | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return min(known) if lowest else max(known)


@dataclass
class ParityReport:
    """The result of `check`: every comparison made, the verdict and where a failure starts.

    Attributes:
        passed: True when every comparison of the enforced modes is within tolerance.
        fingerprint: The contract fingerprint both sides share.
        reference: What the reference is: class, backend, device, precision, TF32 settings.
        candidate: The same for the candidate.
        settings: batch_sizes, horizon, seed, modes, enforced modes, precision, strict_tf32.
        tolerances: The per-output overrides given (defaults follow the dtype/precision).
        steps: ``step`` mode comparisons, one per graph, output and batch size.
        rollouts: Per-step curves of the ``teacher_forced`` and ``free_running`` modes.
        localization: Where the first failure is, and its cause; None when passed.
        errors: Exceptions the candidate raised (each also fails the outputs it concerns).
        notes: Remarks that do not change the verdict (e.g. an output dtype that differs).
        versions: Versions of the packages involved.
        selections: The agent step's selections per batch size (`SelectionCheck`), when its
            contract declares them.
    """

    passed: bool
    fingerprint: str
    reference: dict[str, Any]
    candidate: dict[str, Any]
    settings: dict[str, Any]
    tolerances: dict[str, Tolerance]
    steps: list[OutputCheck]
    rollouts: list[RolloutCurve]
    localization: Localization | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    elapsed_s: float = 0.0
    selections: list[SelectionCheck] = field(default_factory=list)

    # -- queries -------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return self.passed

    @property
    def enforced_modes(self) -> tuple[str, ...]:
        """Modes whose failures fail the report."""
        return tuple(self.settings.get("enforce", self.settings.get("modes", MODES)))

    def failures(self, mode: str | None = None) -> list[str]:
        """Failing ``"mode:graph/output"`` entries (each once), in pipeline order."""
        seen: dict[str, None] = {}
        for check in self.steps:
            if not check.passed and mode in (None, "step"):
                seen.setdefault(f"step:{check.key}")
        for curve in self.rollouts:
            if not curve.passed and mode in (None, curve.mode):
                seen.setdefault(f"{curve.mode}:{curve.key}")
        return list(seen)

    def failing_outputs(self) -> list[str]:
        """Failing ``"graph/output"`` keys in any mode (each once)."""
        return list(dict.fromkeys(entry.split(":", 1)[1] for entry in self.failures()))

    def first_failing_step(self, mode: str = "free_running") -> int | None:
        """The earliest step (from 1) at which any output of a rollout mode breaks tolerance."""
        steps = [c.first_failing_step for c in self.rollouts if c.mode == mode]
        known = [s for s in steps if s is not None]
        return min(known) if known else None

    def curves(self, mode: str | None = None, key: str | None = None) -> list[RolloutCurve]:
        """Rollout curves, optionally of one mode and one ``"graph/output"`` key."""
        return [c for c in self.rollouts if mode in (None, c.mode) and key in (None, c.key)]

    def checks(self, key: str | None = None) -> list[OutputCheck]:
        """Step-mode comparisons, optionally of one ``"graph/output"`` key."""
        return [c for c in self.steps if key in (None, c.key)]

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document (``"format": "worldflux.parity"``, ``"version": 1``)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "passed": self.passed,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "elapsed_s": round(self.elapsed_s, 3),
            "reference": self.reference,
            "candidate": self.candidate,
            "settings": self.settings,
            "tolerances": {k: v.to_dict() for k, v in self.tolerances.items()},
            "failures": self.failures(),
            "localization": None if self.localization is None else self.localization.to_dict(),
            "errors": self.errors,
            "notes": self.notes,
            "versions": self.versions,
            "steps": [c.to_dict() for c in self.steps],
            "rollouts": [c.to_dict() for c in self.rollouts],
            "selections": [c.to_dict() for c in self.selections],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """The report as JSON text; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"
        if path is not None:
            atomic_write(path, text.encode("utf-8"))
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        """Rebuild a report from `to_dict` output; raise `ParityError` for another format."""
        if data.get("format") != FORMAT:
            raise ParityError(f"not a parity report: format {data.get('format')!r}")
        if not isinstance(data.get("version"), int) or data["version"] > VERSION:
            raise ParityError(
                f"parity report version {data.get('version')!r} is newer than {VERSION}",
                hint="upgrade worldflux-registry to read it",
            )
        loc = data.get("localization")
        return cls(
            passed=bool(data["passed"]),
            fingerprint=data["fingerprint"],
            reference=data["reference"],
            candidate=data["candidate"],
            settings=data["settings"],
            tolerances={k: Tolerance.parse(v) for k, v in data.get("tolerances", {}).items()},
            steps=[OutputCheck.from_dict(c) for c in data["steps"]],
            rollouts=[RolloutCurve.from_dict(c) for c in data["rollouts"]],
            localization=None if loc is None else Localization.from_dict(loc),
            errors=list(data.get("errors", [])),
            notes=list(data.get("notes", [])),
            versions=dict(data.get("versions", {})),
            created=data.get("created", ""),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
            selections=[SelectionCheck.from_dict(c) for c in data.get("selections", [])],
        )

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> ParityReport:
        """Read a report from JSON text or a file written by `to_json`."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def summary(self) -> dict[str, Any]:
        """A short JSON summary (what an export manifest stores as its last parity check)."""
        worst: dict[str, float | None] = {}
        for mode in self.settings.get("modes", MODES):
            values: list[float | None] = []
            if mode == "step":
                values = [c.metrics.max_abs for c in self.steps]
            else:
                values = [c.worst("max_abs") for c in self.rollouts if c.mode == mode]
            worst[mode] = _worst(iter(values))
        loc = self.localization
        return {
            "format": FORMAT,
            "version": VERSION,
            "passed": self.passed,
            "created": self.created,
            "fingerprint": self.fingerprint,
            "reference": _side_label(self.reference),
            "candidate": _side_label(self.candidate),
            "batch_sizes": list(self.settings.get("batch_sizes", [])),
            "horizon": self.settings.get("horizon"),
            "seed": self.settings.get("seed"),
            "modes": list(self.settings.get("modes", [])),
            "max_abs": worst,
            "failures": self.failures(),
            "first_failing_step": self.first_failing_step("free_running"),
            "localization": None if loc is None else {"key": loc.key, "cause": loc.cause},
        }

    # -- presentation --------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per mode and output, worst case over batch sizes and steps."""
        rows: list[dict[str, Any]] = []
        keyed: dict[tuple[str, str], list[Any]] = {}
        for check in self.steps:
            keyed.setdefault(("step", check.key), []).append(check)
        for curve in self.rollouts:
            keyed.setdefault((curve.mode, curve.key), []).append(curve)
        for (mode, key), items in keyed.items():
            if mode == "step":
                metrics = [c.metrics for c in items]
            else:
                metrics = [m for c in items for m in c.steps]
            first = None
            if mode != "step":
                firsts = [c.first_failing_step for c in items if c.first_failing_step]
                first = min(firsts) if firsts else None
            agreement = _worst((m.argmax_agreement for m in metrics), lowest=True)
            rows.append(
                {
                    "mode": mode,
                    "key": key,
                    "max_abs": _worst(m.max_abs for m in metrics),
                    "max_rel": _worst(m.max_rel for m in metrics),
                    "p99_abs": _worst(m.p99_abs for m in metrics),
                    "cosine": _worst((m.cosine for m in metrics), lowest=True),
                    "nan": sum(m.nan_candidate for m in metrics),
                    "inf": sum(m.inf_candidate for m in metrics),
                    "nan_reference": sum(m.nan_reference for m in metrics),
                    "argmax_agreement": agreement,
                    "first_failing_step": first,
                    "tolerance": items[0].tolerance,
                    "passed": all(i.passed for i in items),
                    "note": next((m.note for m in metrics if m.note), None),
                }
            )
        return rows

    def table(self) -> Table:
        """A rich table: one row per mode and output (worst over batch sizes and steps)."""
        from rich.table import Table

        verdict = "[bold green]PASS[/]" if self.passed else "[bold red]FAIL[/]"
        title = (
            f"Parity {verdict}: {_side_label(self.candidate)} vs "
            f"{_side_label(self.reference)} ({self.fingerprint[:15]})"
        )
        from rich import box

        table = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            # One space between columns: with the argmax column and a "FAIL @12" verdict the
            # widest table still fits 80 columns (rich would drop a last column that does not).
            padding=(0, 0),
            show_edge=False,
        )
        rows = self.rows()
        # Columns that would only hold zeros or dashes are left out, so the table fits 80 columns.
        show_nan = any(r["nan"] or r["inf"] for r in rows)
        show_argmax = any(r["argmax_agreement"] is not None for r in rows)
        table.add_column("mode", no_wrap=True)
        table.add_column("graph/output", overflow="fold", min_width=12)
        names = ["max abs", "max rel", "cos", *(["NaN/Inf"] if show_nan else [])]
        names += [*(["argmax"] if show_argmax else []), "rtol/atol"]
        for name in names:
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("", justify="left", no_wrap=True)
        near_zero = False
        for row in rows:
            tol = row["tolerance"]
            cosine = row["cosine"]
            max_rel = row["max_rel"]
            agreement = row["argmax_agreement"]
            first = row["first_failing_step"]
            # A passing output can only show an error as large as the value itself (max rel
            # >= 1), or a direction unlike the reference's, where the reference is about zero
            # and atol decides: there relative error and cosine say nothing.
            vague_rel = row["passed"] and max_rel is not None and max_rel >= 1.0
            vague_cos = row["passed"] and cosine is not None and cosine < _COSINE_FLOOR
            near_zero = near_zero or vague_rel or vague_cos
            cells = [
                _MODE_LABELS.get(row["mode"], row["mode"]),
                row["key"],
                _fmt(row["max_abs"]),
                "-*" if vague_rel else _fmt(max_rel),
                "-*" if vague_cos else "-" if cosine is None else f"{cosine:.3f}",
            ]
            if show_nan:
                cells.append(f"{row['nan']}/{row['inf']}" if row["nan"] or row["inf"] else "0")
            if show_argmax:
                cells.append("-" if agreement is None else f"{agreement:.0%}")
            cells.append(f"{_fmt(tol.rtol)}/{_fmt(tol.atol)}".replace(".0e", "e"))
            if row["passed"]:
                cells.append("[green]ok[/]")
            else:
                cells.append("[red]FAIL[/]" + ("" if first is None else f" @{first}"))
            table.add_row(*cells)
        fit_words(table)
        lines = [c.describe() for c in self.selections if c.near_ties or c.failures]
        if self.localization is not None:
            lines.append(self.localization.describe())
        lines.extend(self.errors)
        if near_zero:
            lines.append(
                "-* the reference is about 0 there: the error is within atol, and relative "
                "error and cosine say nothing"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        if lines:
            from rich.markup import escape

            table.caption = "\n".join(escape(line) for line in lines)
            table.caption_justify = "left"
        return table

    def print(self, console: Console | None = None) -> None:
        """Print `table` to ``console`` (stdout by default); it fits 80 columns."""
        from rich.console import Console

        (console or Console(highlight=False)).print(self.table())

    def __rich__(self) -> Table:
        return self.table()

    def plot(self, path: str | os.PathLike[str], *, metric: str = "max_abs") -> Path:
        """Write a PNG of ``metric`` against rollout step, one panel per state key.

        Needs matplotlib (``pip install 'worldflux-registry[plot]'``).
        """
        from ._plot import plot_report

        return plot_report(self, Path(path), metric=metric)


def _side_label(side: dict[str, Any]) -> str:
    parts = [str(side.get("backend", "?"))]
    if side.get("device"):
        parts.append(str(side["device"]))
    if side.get("precision"):
        parts.append(str(side["precision"]))
    return " ".join(parts)
