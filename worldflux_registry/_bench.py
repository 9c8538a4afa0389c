"""Speed benchmarks of one world model across backends, gated by parity.

`run` measures a model (a registry ref, exported first with the export timed, or an export
directory) on each requested backend and batch size: the latency of one ``transition`` and of a
whole rollout (``horizon`` x transition + decode), as median and spread after warm-up, the rollout
throughput, peak memory, the device, package versions and TF32 settings. A backend's speed is
reported only after `worldflux_registry.parity.check` (or, for a CUDA-graph replay of the torch
model, a direct comparison with eager torch) passed; otherwise the backend is *refused* with the
reason. `document` gathers runs into a versioned JSON document, `to_markdown` renders it with the
speed targets marked met, missed or not measured.

Torch, ONNX Runtime and the model code are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._artifact import MANIFEST_FILE, read_artifact_manifest
from ._files import atomic_write
from ._torch_env import model_from_export, tf32_state
from ._torch_env import tf32 as use_tf32
from .errors import BackendError, ConfigError

if TYPE_CHECKING:
    import torch

    from ._model import WorldModel
    from ._payloads import ConditionPayload
    from ._state import State

__all__ = [
    "BACKENDS",
    "FORMAT",
    "FORMAT_VERSION",
    "BackendResult",
    "BenchRun",
    "Timing",
    "document",
    "environment",
    "evaluate_targets",
    "run",
    "to_markdown",
    "write",
]

#: ``format`` of the JSON document written by `write`.
FORMAT = "worldflux.bench"
#: Layout version of that document; bumped when a field changes meaning.
FORMAT_VERSION = 1
#: Backends in the order they are run. ``*-fused`` ORT backends roll out through the export's
#: fused ``rollout`` graph (one session call per horizon); the others step by step.
BACKENDS = (
    "torch",
    "torch-cudagraph",
    "ort-cpu",
    "ort-cpu-fused",
    "ort-cuda",
    "ort-cuda-fused",
    "ort-cuda-graph",
    "ort-cuda-graph-fused",
)
_FUSED = "-fused"
_ORT = {name: "cpu" if "cpu" in name else "cuda" for name in BACKENDS if name.startswith("ort-")}
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


# -- statistics -------------------------------------------------------------------------------
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
    """Every backend and batch size measured for one model."""

    model: str
    family: str
    preset: str | None
    fingerprint: str
    source: str
    reference: str
    horizon: int
    batches: list[int]
    export_time_s: float | None
    results: list[BackendResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = dataclasses.asdict(self)
        out["results"] = [r.to_dict() for r in self.results]
        return out


# -- environment ------------------------------------------------------------------------------
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
    """The timed series of one backend at one batch size, and where their results go."""

    result: BackendResult
    step: _Series
    rollout: _Series
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
    series = [s for t in timers for s in (t.step, t.rollout)]
    while True:
        active = [s for s in series if not s.done(min_repeats, max_seconds)]
        if not active:
            break
        for s in active:
            s.time_block(-(-s.repeats // _ROUNDS), min_repeats, max_seconds)
    for t in timers:
        t.result.step = t.step.timing()
        t.result.rollout = t.rollout.timing()
        t.result.throughput = t.horizon * t.result.batch / t.result.rollout.median


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Fixed, seeded inputs for one batch size (CPU tensors; moved per backend)."""

    obs: dict[str, torch.Tensor]
    encode_noise: dict[str, torch.Tensor]
    action: torch.Tensor | None
    step_noise: dict[str, torch.Tensor]
    actions: torch.Tensor | None
    rollout_noise: dict[str, torch.Tensor]

    def to(self, device: str) -> _Inputs:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return _Inputs(
            move(self.obs),
            move(self.encode_noise),
            None if self.action is None else self.action.to(device),
            move(self.step_noise),
            None if self.actions is None else self.actions.to(device),
            move(self.rollout_noise),
        )


def _make_inputs(model: WorldModel, batch: int, horizon: int, seed: int) -> _Inputs:
    import torch

    from ._inputs import make_actions, make_noise, make_observations

    contract = model.io_contract()
    gen = torch.Generator().manual_seed(seed)
    step_noise = make_noise(contract, "transition", (batch,), gen)
    step_noise.update(make_noise(contract, "decode", (batch,), gen))
    rollout_noise = make_noise(contract, "transition", (horizon, batch), gen)
    rollout_noise.update(make_noise(contract, "decode", (horizon, batch), gen))
    return _Inputs(
        obs=make_observations(contract, (batch,), gen),
        encode_noise=make_noise(contract, "encode", (batch,), gen),
        action=make_actions(contract, (batch,), gen),
        step_noise=step_noise,
        actions=make_actions(contract, (horizon, batch), gen),
        rollout_noise=rollout_noise,
    )


def _actions(inputs: _Inputs) -> torch.Tensor:
    if inputs.actions is None:
        raise ConfigError("the model takes no actions: rollouts cannot be benchmarked")
    return inputs.actions


def _conditions(noise: dict[str, torch.Tensor]) -> ConditionPayload | None:
    from ._inputs import noise_conditions

    return noise_conditions(noise) if noise else None


def _initial_state(model: WorldModel, inputs: _Inputs) -> State:
    from ._inputs import encode_input

    return model.encode(encode_input(inputs.obs, inputs.encode_noise))


# -- the public entry point -------------------------------------------------------------------
def run(
    ref: str | Path,
    *,
    backends: Sequence[str] = ("torch", "ort-cpu"),
    batches: Sequence[int] = (1,),
    horizon: int = 16,
    reference: WorldModel | str | Path | None = None,
    export_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    warmup: int = 5,
    repeats: int = 50,
    rollout_repeats: int = 20,
    min_repeats: int = 5,
    max_seconds: float = 10.0,
    parity_batches: Sequence[int] | None = None,
    parity_horizon: int = 4,
    tolerances: Any = None,
    tf32: bool = False,
    ort_options: Mapping[str, Any] | None = None,
    torch_threads: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> BenchRun:
    """Benchmark ``ref`` on ``backends`` at each batch size in ``batches``.

    Args:
        ref: A registry ref (``"dreamerv3:size12m"``; built with seeded random weights, then
            exported to ONNX with the export timed) or an export directory.
        reference: The torch model to compare with and to time as ``"torch"``: a `WorldModel`,
            or a checkpoint directory. For an export directory without one, the family / preset
            of its manifest is built and its weights are read back from the ONNX initializers
            where every parameter is found there (otherwise parity will refuse the ORT backends).
        export_dir: Where to export a ref (a temporary directory, removed afterwards, if None).
        device: Device of the torch backends: ``"auto"`` (CUDA when available), ``"cpu"``,
            ``"cuda"``.
        parity_batches: Batch sizes of the parity check (default: each benchmarked batch
            capped at 64); ``parity_horizon`` its rollout length.
        tf32: Allow TF32 on both sides (off by default: fp32 against fp32).
        ort_options: Extra options passed to the ONNX loader (session options, threads).
        torch_threads: ``torch.set_num_threads`` for the run (restored afterwards).

    Raises:
        ConfigError: an unknown backend, a batch or horizon below 1.
    """
    import torch

    from . import export

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        from .errors import did_you_mean

        raise ConfigError(
            f"unknown backend {unknown[0]!r}.{did_you_mean(unknown[0], BACKENDS)}",
            hint="backends: " + ", ".join(BACKENDS),
        )
    if not batches or min(batches) < 1 or horizon < 1:
        raise ConfigError(f"batches {list(batches)} and horizon {horizon} must be >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    old_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        export_time = None
        path = Path(ref)
        if (path / MANIFEST_FILE).is_file():
            source = "export"
            manifest = read_artifact_manifest(path, ConfigError)
            fused_horizon = (manifest.get("graphs", {}).get("rollout") or {}).get("horizon")
            model, ref_desc = _reference_for_export(path, manifest, reference, seed)
            out_dir = path
            name = _model_name(manifest.get("family", "?"), manifest.get("preset"))
        else:
            source = "ref"
            model, ref_desc = _reference_for_ref(str(ref), reference, seed, config_overrides)
            if export_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="wf-bench-")
                out_dir = Path(tmp.name) / "export"
            else:
                out_dir = Path(export_dir)
            fused_horizon = horizon if any(b.endswith(_FUSED) for b in backends) else None
            graphs = ("encode", "transition", "decode") + (("rollout",) if fused_horizon else ())
            t0 = time.perf_counter()
            export(model, "onnx", out_dir, graphs=graphs, rollout_horizon=horizon)
            export_time = time.perf_counter() - t0
            name = _model_name(model.family or "?", model.preset)
        model = model.to("cpu").eval()
        bench = BenchRun(
            model=name,
            family=model.family or "?",
            preset=model.preset,
            fingerprint=model.contract_fingerprint(),
            source=source,
            reference=ref_desc,
            horizon=horizon,
            batches=list(batches),
            export_time_s=export_time,
            results=[],
            settings={
                "seed": seed,
                "device": device,
                "warmup": warmup,
                "repeats": repeats,
                "rollout_repeats": rollout_repeats,
                "max_seconds": max_seconds,
                "parity_horizon": parity_horizon,
                "fused_rollout_horizon": fused_horizon,
                "tf32": tf32,
                "torch_threads": torch.get_num_threads(),
                "ort_options": dict(ort_options or {}),
                "stochastic": "explicit noise inputs (same tensors on every backend)",
            },
        )
        ctx = _Context(
            model=model,
            export_dir=out_dir,
            device=device,
            horizon=horizon,
            seed=seed,
            timing={
                "warmup": warmup,
                "repeats": repeats,
                "rollout_repeats": rollout_repeats,
                "min_repeats": min_repeats,
                "max_seconds": max_seconds,
            },
            parity={"horizon": parity_horizon, "batches": parity_batches, "tol": tolerances},
            fused_horizon=fused_horizon,
            tf32=tf32,
            ort_options=dict(ort_options or {}),
        )
        bench.settings["loadavg_before"] = _loadavg()
        timers: list[_Timer] = []
        with use_tf32(tf32), torch.inference_mode():
            for backend in backends:
                for batch in batches:
                    result, timer = _prepare_backend(ctx, backend, batch)
                    bench.results.append(result)
                    if timer is not None:
                        timers.append(timer)
            try:
                _time_interleaved(timers, min_repeats=min_repeats, max_seconds=max_seconds)
            except Exception as exc:  # a failure mid-timing voids every timing of this run
                for t in timers:
                    _fail(t.result, exc)
        bench.settings["loadavg_after"] = _loadavg()
        return bench
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _model_name(family: str, preset: str | None) -> str:
    return f"{family}:{preset}" if preset else family


def _reference_for_ref(
    ref: str,
    reference: WorldModel | str | Path | None,
    seed: int,
    overrides: Mapping[str, Any] | None,
) -> tuple[WorldModel, str]:
    import torch

    from ._registry import registry

    if reference is not None:
        return _given_reference(reference)
    torch.manual_seed(seed)
    model = registry.load(ref, device="cpu", **dict(overrides or {}))
    return model, f"random weights (torch.manual_seed({seed}))"


def _given_reference(reference: WorldModel | str | Path) -> tuple[WorldModel, str]:
    from ._model import WorldModel
    from ._registry import registry

    if isinstance(reference, WorldModel):
        return reference, "given model"
    return registry.load(reference, device="cpu"), f"checkpoint {reference}"


def _reference_for_export(
    path: Path,
    manifest: Mapping[str, Any],
    reference: WorldModel | str | Path | None,
    seed: int,
) -> tuple[WorldModel, str]:
    import torch

    if reference is not None:
        return _given_reference(reference)
    torch.manual_seed(seed)
    model, missing = model_from_export(path, manifest)
    total = len(model.state_dict())
    loaded = total - len(missing)
    return model, (
        f"{loaded} of {total} tensors read back from the export's ONNX initializers, the rest "
        f"(unused by the exported graphs, or folded by the exporter) at a seeded init "
        f"(torch.manual_seed({seed})); parity decides whether that reference is sound"
    )


# -- per backend ------------------------------------------------------------------------------
@dataclass
class _Context:
    model: WorldModel
    export_dir: Path
    device: str
    horizon: int
    seed: int
    timing: dict[str, Any]
    parity: dict[str, Any]
    tf32: bool
    ort_options: dict[str, Any]
    #: Horizon of the export's fused rollout graph (None when it has none).
    fused_horizon: int | None = None
    _on_device: dict[str, WorldModel] = field(default_factory=dict)
    _candidates: dict[str, WorldModel] = field(default_factory=dict)

    def torch_model(self, device: str) -> WorldModel:
        """The reference model on ``device`` (copied once per device)."""
        if device == "cpu":
            return self.model
        if device not in self._on_device:
            self._on_device[device] = copy.deepcopy(self.model).to(device).eval()
        return self._on_device[device]


def _prepare_backend(
    ctx: _Context, backend: str, batch: int
) -> tuple[BackendResult, _Timer | None]:
    """Load, parity-check and warm up one backend at one batch size (memory measured here).

    Returns its result and, when it may be timed, its timer (None when skipped, refused or
    failed).
    """
    import torch

    result = BackendResult(backend=backend, batch=batch, status="ok")
    timer = None
    try:
        if backend == "torch":
            timer = _bench_torch(ctx, result, ctx.device)
        elif backend == "torch-cudagraph":
            if not torch.cuda.is_available():
                _skip(result, "CUDA is not available here (torch.cuda.is_available() False)")
            else:
                timer = _bench_torch_cudagraph(ctx, result)
        else:
            timer = _bench_ort(ctx, result, backend)
    except _Skip as skip:
        _skip(result, str(skip))
    except Exception as exc:  # one backend's failure is a result, not a crash
        _fail(result, exc)
        timer = None
    return result, timer


def _fail(result: BackendResult, exc: BaseException) -> None:
    result.status = "error"
    result.reason = _shorten(f"{type(exc).__name__}: {exc}", 600)
    result.step = result.rollout = None
    result.throughput = None


class _Skip(Exception):
    """A backend that cannot run on this machine."""


def _skip(result: BackendResult, reason: str) -> BackendResult:
    result.status = "skipped"
    result.reason = reason
    return result


def _sync_for(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _time_model(
    ctx: _Context,
    result: BackendResult,
    model: WorldModel,
    device: str,
    batch: int,
    memory: _Memory | None = None,
) -> _Timer:
    """Warm up one transition and a whole rollout of ``model`` (any protocol implementation)
    and return their timer; peak memory covers the warm-up calls."""
    inputs = _make_inputs(ctx.model, batch, ctx.horizon, ctx.seed).to(device)
    if memory is None:
        memory = _Memory("cuda" if device.startswith("cuda") else "cpu", "the warm-up calls")
        memory.start()
    state = _initial_state(model, inputs)
    step_cond = _conditions(inputs.step_noise)
    roll_cond = _conditions(inputs.rollout_noise)
    action, actions = inputs.action, _actions(inputs)
    return _warm_timer(
        ctx,
        result,
        lambda: model.transition(state, action, step_cond),
        lambda: model.rollout(state, actions, roll_cond),
        _sync_for(device),
        memory,
    )


def _warm_timer(
    ctx: _Context,
    result: BackendResult,
    step: Callable[[], Any],
    rollout: Callable[[], Any],
    sync: Callable[[], None],
    memory: _Memory,
) -> _Timer:
    t = ctx.timing
    timer = _Timer(
        result,
        _Series(step, sync, t["warmup"], t["repeats"]),
        _Series(rollout, sync, t["warmup"], t["rollout_repeats"]),
        ctx.horizon,
    )
    timer.step.warm()
    timer.rollout.warm()
    result.memory = memory.stop()
    return timer


def _bench_torch(ctx: _Context, result: BackendResult, device: str) -> _Timer:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _Skip("CUDA is not available here")
    result.device = device
    result.parity = {"passed": True, "note": "torch eager is the reference"}
    result.settings = {
        "mode": "eager, torch.inference_mode()",
        "threads": torch.get_num_threads(),
        "tf32": tf32_state(),
    }
    return _time_model(ctx, result, ctx.torch_model(device), device, result.batch)


def _bench_torch_cudagraph(ctx: _Context, result: BackendResult) -> _Timer | None:
    """Capture one transition and a whole rollout in CUDA graphs and time their replay."""
    import torch

    device = "cuda"
    result.device = device
    model = ctx.torch_model(device)
    batch = result.batch
    # Started before capture: the graphs' private memory pools are allocated while capturing.
    memory = _Memory("cuda", "graph capture and the warm-up replays")
    memory.start()
    inputs = _make_inputs(ctx.model, batch, ctx.horizon, ctx.seed).to(device)
    state = _initial_state(model, inputs)
    step_cond = _conditions(inputs.step_noise)
    roll_cond = _conditions(inputs.rollout_noise)

    def step() -> Any:
        return model.transition(state, inputs.action, step_cond)

    def rollout() -> Any:
        return model.rollout(state, _actions(inputs), roll_cond)

    eager = rollout()
    expected = {k: v.clone() for k, v in eager.predictions.items()}
    step_graph, _ = _capture(step)
    roll_graph, captured = _capture(rollout)
    roll_graph.replay()
    torch.cuda.synchronize()
    # Same kernels on the same inputs: anything beyond rounding noise is a capture bug.
    atol = rtol = 1e-5
    worst = 0.0
    passed = True
    for k, v in expected.items():
        if not v.numel():
            continue
        got = captured.predictions[k].float()
        err = (got - v.float()).abs()
        worst = max(worst, float(err.max()))
        passed = passed and bool((err <= atol + rtol * v.float().abs()).all())
    result.parity = {
        "passed": passed,
        "check": "CUDA-graph replay against eager torch on the same inputs (same kernels)",
        "max_abs_error": worst,
        "tolerance": {"atol": atol, "rtol": rtol},
    }
    result.settings = {"mode": "torch.cuda.CUDAGraph replay", "tf32": tf32_state()}
    if not result.parity["passed"]:
        result.status = "refused"
        result.reason = f"replay differs from eager by up to {worst:.3g} (atol = rtol = 1e-5)"
        return None
    return _warm_timer(
        ctx, result, step_graph.replay, roll_graph.replay, torch.cuda.synchronize, memory
    )


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on a side stream, then capture it; returns the graph and its outputs."""
    import torch

    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


#: Keys of ``ort_options`` that go into ``onnxruntime.SessionOptions``.
_SESSION_KEYS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "graph_optimization_level",
    "execution_mode",
    "enable_mem_pattern",
    "enable_cpu_mem_arena",
)


def _ort_loader_options(ctx: _Context, backend: str) -> dict[str, Any]:
    """Loader keyword arguments: providers, CUDA graphs, session options built from
    ``ort_options`` (names of `onnxruntime.SessionOptions` attributes; enum values by name)."""
    import inspect

    import onnxruntime as ort

    options = {k: v for k, v in ctx.ort_options.items() if k not in _SESSION_KEYS}
    options["providers"] = ["cpu"] if _ORT[backend] == "cpu" else ["cuda", "cpu"]
    if backend.startswith("ort-cuda-graph"):
        options["cuda_graph"] = True
    session = {k: v for k, v in ctx.ort_options.items() if k in _SESSION_KEYS}
    if session:
        opts = ort.SessionOptions()
        for key, value in session.items():
            if key == "graph_optimization_level" and isinstance(value, str):
                value = getattr(ort.GraphOptimizationLevel, value)
            elif key == "execution_mode" and isinstance(value, str):
                value = getattr(ort.ExecutionMode, value)
            setattr(opts, key, value)
        options["session_options"] = opts
    loader = _ort_loader()
    accepts = inspect.signature(loader).parameters if loader is not None else {}
    if backend != "ort-cpu" and "use_tf32" in accepts:
        options["use_tf32"] = ctx.tf32
    if "fused_rollout" in accepts:
        options["fused_rollout"] = backend.endswith(_FUSED)
    return options


def _ort_loader() -> Callable[..., Any] | None:
    try:
        from worldflux_onnx.runtime import load_artifact
    except ImportError:
        return None
    return load_artifact  # type: ignore[no-any-return]


def _printable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (str, int, float, bool, list)) else repr(v)
        for k, v in options.items()
    }


def _bench_ort(ctx: _Context, result: BackendResult, backend: str) -> _Timer | None:
    import torch

    from ._registry import registry

    device = _ORT[backend]
    result.device = device
    fused = backend.endswith(_FUSED)
    if fused and ctx.fused_horizon is None:
        raise _Skip(
            "the export has no fused rollout graph (export with graphs including 'rollout')"
        )
    try:
        import onnxruntime
    except ImportError as exc:
        raise _Skip(f"onnxruntime is not installed ({exc})") from exc
    if device == "cuda":
        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise _Skip(f"onnxruntime has no CUDAExecutionProvider here (providers: {providers})")
        if not torch.cuda.is_available():
            raise _Skip("CUDA is not available to torch here")
    options = _ort_loader_options(ctx, backend)
    memory = _Memory(
        device,
        "loading the ORT model (first batch size only), the parity check (its torch reference "
        "included) and the warm-up calls",
    )
    memory.start()
    # One model per backend, reused across batch sizes (ORT sessions are costly to build).
    candidate = ctx._candidates.get(backend)
    if candidate is None:
        candidate = registry.load(ctx.export_dir, device=device, **options)
        ctx._candidates[backend] = candidate
    result.settings = {"loader_options": _printable(options), **_ort_session_facts(candidate)}
    result.settings["tf32"] = tf32_state()
    if device == "cuda":
        result.settings["ort_cuda_tf32"] = (
            options["use_tf32"]
            if "use_tf32" in options
            else "not set: the loader does not expose the CUDA provider option use_tf32, so "
            "the provider's default applies (ONNX Runtime enables TF32 unless told otherwise)"
        )
    reference = ctx.torch_model(device)
    result.parity = _parity(ctx, reference, candidate, result.batch, fused=fused)
    if not result.parity["passed"]:
        result.status = "refused"
        result.reason = "parity failed: " + str(result.parity.get("summary") or "see parity")
        return None
    return _time_model(ctx, result, candidate, device, result.batch, memory)


def _ort_session_facts(candidate: Any) -> dict[str, Any]:
    """Providers and session options of an ORT-backed model, where it exposes them."""
    facts: dict[str, Any] = {}
    describe = getattr(candidate, "describe", None)
    if callable(describe):
        with contextlib.suppress(Exception):
            facts["runtime"] = describe()
    sessions = getattr(candidate, "sessions", None)
    if isinstance(sessions, Mapping) and sessions:
        session = next(iter(sessions.values()))
        with contextlib.suppress(Exception):
            facts["providers"] = list(session.get_providers())
            opts = session.get_session_options()
            facts["session_options"] = {
                "graph_optimization_level": str(opts.graph_optimization_level),
                "intra_op_num_threads": opts.intra_op_num_threads,
                "inter_op_num_threads": opts.inter_op_num_threads,
                "execution_mode": str(opts.execution_mode),
            }
    return facts


def _parity(
    ctx: _Context, reference: WorldModel, candidate: WorldModel, batch: int, *, fused: bool
) -> dict[str, Any]:
    """Run the parity checker at small sizes; summarise whether it passed and why not.

    For a fused backend the rollouts span at least one fused horizon, so the fused graph is
    what the free-running check compares.
    """
    from . import parity

    batches = ctx.parity["batches"] or [min(batch, 64)]
    horizon = min(ctx.parity["horizon"], ctx.horizon)
    if fused and ctx.fused_horizon:
        horizon = max(horizon, ctx.fused_horizon)
    kwargs: dict[str, Any] = {
        "batch_sizes": tuple(batches),
        "horizon": horizon,
        "seed": ctx.seed,
        "strict_tf32": not ctx.tf32,
    }
    if ctx.parity["tol"] is not None:
        kwargs["tolerances"] = ctx.parity["tol"]
    t0 = time.perf_counter()
    report = parity.check(reference, candidate, **kwargs)
    out: dict[str, Any] = {
        "passed": bool(report.passed),
        "batch_sizes": list(batches),
        "horizon": kwargs["horizon"],
        "seconds": time.perf_counter() - t0,
    }
    if not report.passed:
        out["summary"] = _parity_failure(report)
    return out


def _parity_failure(report: Any) -> str:
    failures = [str(f) for f in report.failures()]
    text = "; ".join(failures[:3])
    if len(failures) > 3:
        text += f"; and {len(failures) - 3} more"
    localization = getattr(report, "localization", None)
    if localization is not None:
        text += f" (first failure: {_shorten(localization.describe(), 300)})"
    return _shorten(text, 600) or "see the parity report"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    ("parity", "Parity holds at every benchmarked setting"),
)
_TARGET_MODELS = ("dreamerv3:size12m", "tdmpc2:size5m")


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
        if target_id == "cpu-b1-step":
            torch_t = _median(_find(run, "torch", 1, "cpu"), "step")
            ort_t = _median(_find(run, "ort-cpu", 1, "cpu"), "step")
            if torch_t and ort_t:
                speedup = torch_t / ort_t
                return {
                    "status": "met" if speedup >= 1.5 else "missed",
                    "value": speedup,
                    "detail": f"ORT {speedup:.2f}x faster than torch eager "
                    f"({ort_t * 1e6:.0f} us vs {torch_t * 1e6:.0f} us), needs >= 1.5x",
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


def _json_text(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def write(doc: Mapping[str, Any], json_path: str | Path | None, md_path: str | Path | None) -> None:
    """Write the JSON document and / or its markdown, each atomically."""
    for path, render in ((json_path, _json_text), (md_path, to_markdown)):
        if path is None:
            continue
        atomic_write(path, render(doc).encode("utf-8"))


def check_backend_names(names: Sequence[str]) -> list[str]:
    """Validate backend names given by a user; raise `BackendError` naming the closest one."""
    from .errors import did_you_mean

    for name in names:
        if name not in BACKENDS:
            raise BackendError(
                f"unknown backend {name!r}.{did_you_mean(name, BACKENDS)}",
                hint="backends: " + ", ".join(BACKENDS),
            )
    return list(names)
