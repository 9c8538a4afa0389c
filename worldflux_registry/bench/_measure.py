"""How a benchmark measures: the machine's environment, peak memory, interleaved timers.

Torch and ONNX Runtime are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._torch_env import tf32_state
from ._results import Timing

if TYPE_CHECKING:
    from ._results import BackendResult

__all__ = ["environment"]


# -- environment ------------------------------------------------------------------------------
#: Distributions whose versions `environment` records.
_DISTRIBUTIONS = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "numpy",
    "worldflux-registry",
    "worldflux-onnx",
    "worldflux-dreamerv3",
    "worldflux-tdmpc2",
)


def environment() -> dict[str, Any]:
    """The machine, the package versions and the threading / TF32 settings in force now."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions: dict[str, str | None] = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": versions,
        "cuda": None,
        "tf32": tf32_state(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["cuda"] = {
            "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        }
    try:
        import onnxruntime

        env["ort_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        env["ort_providers"] = None
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# -- memory -----------------------------------------------------------------------------------
class _Memory:
    """Peak memory while one backend runs: CUDA allocator peak on GPU, process RSS peak on CPU."""

    def __init__(self, device: str, window: str) -> None:
        self.device = device
        self.window = window
        self.reset_ok = False
        self.before = 0
        self.free_before = 0

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = int(torch.cuda.memory_allocated())
            self.free_before = int(torch.cuda.mem_get_info()[0])
            return
        # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) for this process.
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.before = _proc_status_bytes("VmRSS") or 0

    def stop(self) -> dict[str, Any]:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            free_after = int(torch.cuda.mem_get_info()[0])
            return {
                "kind": "cuda",
                "window": self.window,
                "peak_bytes": int(torch.cuda.max_memory_allocated()),
                "allocated_before_bytes": self.before,
                "device_used_growth_bytes": self.free_before - free_after,
                "how": "peak_bytes: torch.cuda.max_memory_allocated() after "
                "reset_peak_memory_stats() (torch's caching allocator only; ONNX Runtime's own "
                "CUDA arena is not in it); device_used_growth_bytes: drop in free device memory "
                "(torch.cuda.mem_get_info) over the backend's run, which does include it",
            }
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None and self.reset_ok:
            how = (
                "process peak RSS (VmHWM of /proc/self/status, reset through /proc/self/clear_refs "
                "before this backend); whole process: Python, torch, ORT and earlier models"
            )
            peak = hwm
        else:
            how = "process peak RSS since start (resource.getrusage ru_maxrss): not per backend"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "kind": "cpu-rss",
            "window": self.window,
            "peak_bytes": peak,
            "rss_before_bytes": self.before,
            "how": how,
        }


def _proc_status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


# -- timing -----------------------------------------------------------------------------------
@dataclass
class _Series:
    """One function to time: warmed up first, then timed in blocks interleaved with others."""

    fn: Callable[[], Any]
    sync: Callable[[], None]
    warmup: int
    repeats: int
    samples: list[float] = field(default_factory=list)
    calls: int = 0
    rounds: int = 0
    spent: float = 0.0

    def warm(self) -> None:
        for _ in range(self.warmup):
            self.fn()
            self.calls += 1
        self.sync()

    def time_block(self, size: int, min_repeats: int, max_seconds: float) -> None:
        """One untimed call (caches back to this backend's weights), then up to ``size``
        timed calls, each bracketed by ``sync`` (``torch.cuda.synchronize`` on GPU) so that
        a time covers the work, not its launch."""
        self.fn()
        self.calls += 1
        self.rounds += 1
        for _ in range(size):
            if self.done(min_repeats, max_seconds):
                break
            self.sync()
            t0 = time.perf_counter()
            self.fn()
            self.sync()
            dt = time.perf_counter() - t0
            self.calls += 1
            self.samples.append(dt)
            self.spent += dt

    def done(self, min_repeats: int, max_seconds: float) -> bool:
        if len(self.samples) >= self.repeats:
            return True
        return self.spent > max_seconds and len(self.samples) >= min(min_repeats, self.repeats)

    def timing(self) -> Timing:
        return Timing.from_samples(
            self.samples, warmup=self.warmup, calls=self.calls, rounds=self.rounds
        )


@dataclass
class _Timer:
    """The timed series of one backend at one batch size, and where their results go.

    An agent benchmark times one series (the agent step, ``rollout`` None): its throughput is
    environment steps (``batch``) per second.
    """

    result: BackendResult
    step: _Series
    rollout: _Series | None
    horizon: int


#: Samples of a series are taken in about this many interleaved blocks.
_ROUNDS = 5


def _time_interleaved(timers: Sequence[_Timer], *, min_repeats: int, max_seconds: float) -> None:
    """Time every series in round-robin blocks (`_ROUNDS` blocks of consecutive calls each).

    Interleaving spreads slow drifts of the machine (other processes, clock changes) over every
    backend alike, so their ratios stay meaningful on a shared machine; consecutive calls within
    a block keep the caches as a steady loop on one backend would. Each series stops at
    ``repeats`` samples, or after ``max_seconds`` of timed calls once ``min_repeats`` are done.
    """
    series = [s for t in timers for s in (t.step, t.rollout) if s is not None]
    while True:
        active = [s for s in series if not s.done(min_repeats, max_seconds)]
        if not active:
            break
        for s in active:
            s.time_block(-(-s.repeats // _ROUNDS), min_repeats, max_seconds)
    for t in timers:
        t.result.step = t.step.timing()
        if t.rollout is None:
            t.result.throughput = t.result.batch / t.result.step.median
            continue
        t.result.rollout = t.rollout.timing()
        t.result.throughput = t.horizon * t.result.batch / t.result.rollout.median
