"""PNG plot of rollout error against step (matplotlib, an optional extra)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class _Tolerance(Protocol):
    @property
    def atol(self) -> float: ...


class _Curve(Protocol):
    @property
    def output(self) -> str: ...

    @property
    def tolerance(self) -> _Tolerance: ...

    @property
    def mode(self) -> str: ...

    @property
    def batch(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def first_failing_step(self) -> int | None: ...

    def series(self, metric: str) -> list[float | None]: ...


class _Plottable(Protocol):
    """What a plot reads of a `ParityReport` (this module sits below the report)."""

    @property
    def passed(self) -> bool: ...

    @property
    def rollouts(self) -> Sequence[_Curve]: ...


__all__ = ["plot_report"]

_MARKERS = (".", "o", "s", "^")
_STYLES = {"teacher_forced": "-", "free_running": "--"}


def plot_report(report: _Plottable, path: Path, *, metric: str = "max_abs") -> Path:
    """Draw ``metric`` per rollout step for every state key; write a PNG to ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting a parity report needs matplotlib: pip install 'worldflux-registry[plot]'"
        ) from None

    from matplotlib.ticker import MaxNLocator

    curves = list(report.rollouts)
    keys = list(dict.fromkeys(c.key for c in curves))
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        exact: list[str] = []
        tolerances = set()
        horizon = 1
        for i, curve in enumerate(c for c in curves if c.key == key):
            values = curve.series(metric)
            horizon = max(horizon, len(values))
            label = f"{curve.mode.replace('_', '-')} B={curve.batch}"
            if all(v == 0 for v in values if v is not None):
                exact.append(label)  # nothing to draw on a log axis: listed instead
                continue
            steps = list(range(1, len(values) + 1))
            # A zero error has no place on a log axis: it is a gap in the line, not a fake floor.
            ys = [v if v else math.nan for v in values]
            (line,) = ax.plot(
                steps,
                ys,
                _STYLES.get(curve.mode, "-"),
                marker=_MARKERS[i % len(_MARKERS)],
                markersize=4,
                alpha=0.85,
                label=label,
            )
            if metric == "max_abs":
                tolerances.add(curve.tolerance.atol)
            first = curve.first_failing_step
            if first is not None and first <= len(ys) and not math.isnan(ys[first - 1]):
                ax.plot([first], [ys[first - 1]], "x", color=line.get_color(), markersize=9)
        for atol in sorted(tolerances):
            ax.axhline(atol, color="black", linewidth=0.8, linestyle=":", label=f"atol {atol:g}")
        if exact:
            ax.text(
                0.5,
                0.5 if not ax.lines else 0.06,
                "zero error at every step:\n" + "\n".join(exact),
                transform=ax.transAxes,
                fontsize=7,
                ha="center",
                va="center" if not ax.lines else "bottom",
            )
        ax.set_xlim(0.5, horizon + 0.5)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="best", framealpha=0.8)
        else:
            ax.set_yticks([])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    verdict = "PASS" if report.passed else "FAIL"
    fig.suptitle(f"parity {verdict}: {metric.replace('_', ' ')} per step (x: first failing step)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
