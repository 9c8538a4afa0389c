"""PNG plot of rollout error against step (matplotlib, an optional extra)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class _Curve(Protocol):
    @property
    def output(self) -> str: ...

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

# Zero error cannot sit on a log axis; it is drawn at this floor instead.
_FLOOR = 1e-12
_STYLES = {"teacher_forced": "-", "free_running": "--"}


def plot_report(report: _Plottable, path: Path, *, metric: str = "max_abs") -> Path:
    """Draw ``metric`` per rollout step for every state key; write a PNG to ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting a parity report needs matplotlib: pip install 'worldflux-registry[plot]'"
        ) from None

    curves = [c for c in report.rollouts if c.output.startswith("state.")]
    if not curves:
        curves = list(report.rollouts)
    keys = list(dict.fromkeys(c.key for c in curves))
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for curve in (c for c in curves if c.key == key):
            values = curve.series(metric)
            steps = list(range(1, len(values) + 1))
            ys = [max(v, _FLOOR) if v is not None else math.nan for v in values]
            label = f"{curve.mode.replace('_', '-')} B={curve.batch}"
            (line,) = ax.plot(steps, ys, _STYLES.get(curve.mode, "-"), marker=".", label=label)
            first = curve.first_failing_step
            if first is not None and first <= len(ys):
                ax.plot([first], [ys[first - 1]], "x", color=line.get_color(), markersize=9)
        ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
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
