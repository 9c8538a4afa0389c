"""What a benchmark run records: timing statistics, one result per backend and batch, the run.

Each record has a JSON form (``to_dict``) that `worldflux_registry.bench._run.document` gathers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackendResult", "BenchRun", "Timing"]


@dataclass(frozen=True)
class Timing:
    """Order statistics of repeated wall-clock measurements, in seconds.

    Samples are taken in ``rounds`` blocks, each opened by one untimed call that re-warms the
    caches after the other backends ran. ``calls`` counts every call of the measured function,
    so ``calls == warmup + rounds + n`` shows that the warm-up happened and was not timed.
    """

    n: int
    warmup: int
    calls: int
    rounds: int
    median: float
    p10: float
    p90: float
    q25: float
    q75: float
    mean: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        """Interquartile range (``q75 - q25``)."""
        return self.q75 - self.q25

    @classmethod
    def from_samples(
        cls, samples: Sequence[float], *, warmup: int, calls: int, rounds: int = 0
    ) -> Timing:
        """Summarise ``samples`` (at least one)."""
        if not samples:
            raise ValueError("no samples to summarise")
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            warmup=warmup,
            calls=calls,
            rounds=rounds,
            median=_quantile(ordered, 0.5),
            p10=_quantile(ordered, 0.1),
            p90=_quantile(ordered, 0.9),
            q25=_quantile(ordered, 0.25),
            q75=_quantile(ordered, 0.75),
            mean=math.fsum(ordered) / len(ordered),
            min=ordered[0],
            max=ordered[-1],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (seconds), with ``iqr`` added."""
        return {**dataclasses.asdict(self), "iqr": self.iqr}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timing:
        """Inverse of `to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted data (numpy's default method)."""
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class BackendResult:
    """One backend at one batch size: its status and, when it passed parity, its speed.

    ``status`` is ``"ok"`` (measured), ``"refused"`` (parity failed: no speed is reported),
    ``"skipped"`` (not runnable here, e.g. no CUDA) or ``"error"`` (it raised); ``reason`` says
    why for the last three.
    """

    backend: str
    batch: int
    status: str
    reason: str | None = None
    device: str | None = None
    parity: dict[str, Any] | None = None
    step: Timing | None = None
    rollout: Timing | None = None
    throughput: float | None = None
    memory: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; timings in seconds, throughput in steps x batch per second."""
        out = dataclasses.asdict(self)
        out["step"] = None if self.step is None else self.step.to_dict()
        out["rollout"] = None if self.rollout is None else self.rollout.to_dict()
        return out


@dataclass
class BenchRun:
    """Every backend and batch size measured for one model.

    ``mode`` is ``"transition"`` (each result's ``step`` is one transition, ``rollout`` a whole
    rollout of ``horizon`` steps, ``throughput`` steps x batch per second) or ``"agent"`` (each
    result's ``step`` is one agent step for a batch of environments, ``rollout`` is None,
    ``throughput`` environment steps per second; ``horizon`` is None and ``settings["agent"]``
    says what one call runs).
    """

    model: str
    family: str
    preset: str | None
    fingerprint: str
    source: str
    reference: str
    horizon: int | None
    batches: list[int]
    export_time_s: float | None
    results: list[BackendResult]
    settings: dict[str, Any] = field(default_factory=dict)
    mode: str = "transition"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = dataclasses.asdict(self)
        out["results"] = [r.to_dict() for r in self.results]
        return out
