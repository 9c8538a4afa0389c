"""The benchmarked backends: loading, parity-checking and warming up each one for timing.

`_prepare_backend` dispatches on the backend name to the torch eager, torch CUDA-graph or ONNX
Runtime runner; each returns the warmed-up timer that `_time_interleaved` then runs. Torch, ONNX
Runtime and the model code are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._torch_env import tf32_state
from ..errors import ConfigError
from ._measure import _Memory, _Series, _Timer
from ._results import BackendResult

if TYPE_CHECKING:
    import torch

    from ..protocol._model import WorldModel
    from ..state._state import State

__all__ = ["BACKENDS"]

#: Backends in the order they are run. ``*-fused`` ORT backends roll out through the export's
#: fused ``rollout`` graph (one session call per horizon); the others step by step.
BACKENDS = (
    "torch",
    "torch-compile",
    "torch-cudagraph",
    "ort-cpu",
    "ort-cpu-fused",
    "ort-cpu-int8",
    "ort-cuda",
    "ort-cuda-fused",
    "ort-cuda-graph",
    "ort-cuda-graph-fused",
)
_FUSED = "-fused"
#: Backends that run the int8 export (`_Context.int8_dir`), judged by `flip_budget_verdict`.
_INT8 = "-int8"
_ORT = {name: "cpu" if "cpu" in name else "cuda" for name in BACKENDS if name.startswith("ort-")}


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
    #: Side conditions (``wf.cond.<name>``), the same for every step.
    conds: dict[str, torch.Tensor]

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
            move(self.conds),
        )


def _make_inputs(model: WorldModel, batch: int, horizon: int, seed: int) -> _Inputs:
    import torch

    from ..protocol._inputs import make_actions, make_conditions, make_noise, make_observations

    contract = model.io_contract()
    gen = torch.Generator().manual_seed(seed)
    step_noise = make_noise(contract, "transition", (batch,), gen)
    step_noise.update(make_noise(contract, "decode", (batch,), gen))
    rollout_noise = make_noise(contract, "transition", (horizon, batch), gen)
    rollout_noise.update(make_noise(contract, "decode", (horizon, batch), gen))
    inputs = _Inputs(
        obs=make_observations(contract, (batch,), gen),
        encode_noise=make_noise(contract, "encode", (batch,), gen),
        action=make_actions(contract, (batch,), gen),
        step_noise=step_noise,
        actions=make_actions(contract, (horizon, batch), gen),
        rollout_noise=rollout_noise,
        conds={},
    )
    inputs.conds.update(make_conditions(contract, (batch,), gen))  # last: keeps earlier draws
    return inputs


def _actions(inputs: _Inputs) -> torch.Tensor:
    if inputs.actions is None:
        raise ConfigError("the model takes no actions: rollouts cannot be benchmarked")
    return inputs.actions


def _initial_state(model: WorldModel, inputs: _Inputs) -> State:
    from ..protocol._inputs import encode_input

    return model.encode(encode_input(inputs.obs, inputs.encode_noise, inputs.conds))


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
    #: The int8 export the ``*-int8`` backends run (None when there is none).
    int8_dir: Path | None = None
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
        elif backend == "torch-compile":
            timer = _bench_torch_compile(ctx, result, ctx.device)
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
    from ..protocol._inputs import conditions_payload

    inputs = _make_inputs(ctx.model, batch, ctx.horizon, ctx.seed).to(device)
    if memory is None:
        memory = _Memory("cuda" if device.startswith("cuda") else "cpu", "the warm-up calls")
        memory.start()
    state = _initial_state(model, inputs)
    step_cond = conditions_payload(inputs.step_noise, inputs.conds)
    roll_cond = conditions_payload(inputs.rollout_noise, inputs.conds)
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
    roll = _Series(rollout, sync, t["warmup"], t["rollout_repeats"])
    timer = _Timer(result, _Series(step, sync, t["warmup"], t["repeats"]), roll, ctx.horizon)
    timer.step.warm()
    roll.warm()
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


#: ``torch.compile`` mode of the ``torch-compile`` backend: on this project's CPU benchmark
#: machine "max-autotune-no-cudagraphs" was no faster than the default and compiled far longer.
COMPILE_MODE = "default"
#: Compiled and eager torch run the same math in another order (fused kernels): a tolerance
#: for float32 reassociation, not for a different computation.
_COMPILE_TOL = 1e-4


def _bench_torch_compile(ctx: _Context, result: BackendResult, device: str) -> _Timer | None:
    """``torch.compile`` (inductor) of ``transition`` and ``rollout``, checked against eager.

    The first call of each compiled function compiles it; that time is reported in
    ``settings.compile_s``, apart from the timings. Shapes are static (``dynamic=False``), as a
    deployment at one batch size would compile them.
    """
    import torch

    from ..protocol._inputs import conditions_payload

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _Skip("CUDA is not available here")
    result.device = device
    model = ctx.torch_model(device)
    memory = _Memory("cuda" if device.startswith("cuda") else "cpu", "compilation and warm-up")
    memory.start()
    inputs = _make_inputs(ctx.model, result.batch, ctx.horizon, ctx.seed).to(device)
    state = _initial_state(model, inputs)
    step_cond = conditions_payload(inputs.step_noise, inputs.conds)
    roll_cond = conditions_payload(inputs.rollout_noise, inputs.conds)
    action, actions = inputs.action, _actions(inputs)
    step_fn = torch.compile(model.transition, mode=COMPILE_MODE, dynamic=False)
    roll_fn = torch.compile(model.rollout, mode=COMPILE_MODE, dynamic=False)
    sync = _sync_for(device)
    t0 = time.perf_counter()
    got_step = step_fn(state, action, step_cond)
    sync()
    t1 = time.perf_counter()
    got = roll_fn(state, actions, roll_cond)
    sync()
    compile_s = {"transition": t1 - t0, "rollout": time.perf_counter() - t1}
    want = model.rollout(state, actions, roll_cond)
    want_step = model.transition(state, action, step_cond)
    got_preds, want_preds = got.predictions or {}, want.predictions or {}
    pairs = [(f"pred.{k}", got_preds[k], v) for k, v in want_preds.items()]
    pairs += [(f"state.{k}", got_step.tensors[k], v) for k, v in want_step.tensors.items()]
    worst, failing = 0.0, []
    for name, a, b in pairs:
        if not b.numel():
            continue
        err = (a.float() - b.float()).abs()
        worst = max(worst, float(err.max()))
        if not bool((err <= _COMPILE_TOL + _COMPILE_TOL * b.float().abs()).all()):
            failing.append(name)
    result.parity = {
        "passed": not failing,
        "check": "compiled transition and rollout against eager torch on the same inputs",
        "max_abs_error": worst,
        "tolerance": {"atol": _COMPILE_TOL, "rtol": _COMPILE_TOL},
    }
    result.settings = {
        "mode": f"torch.compile(mode={COMPILE_MODE!r}, dynamic=False), torch.inference_mode()",
        "threads": torch.get_num_threads(),
        "compile_s": compile_s,
        "tf32": tf32_state(),
    }
    if failing:
        result.status = "refused"
        result.reason = f"compiled outputs {failing} differ from eager by up to {worst:.3g}"
        return None
    return _warm_timer(
        ctx,
        result,
        lambda: step_fn(state, action, step_cond),
        lambda: roll_fn(state, actions, roll_cond),
        sync,
        memory,
    )


def _bench_torch_cudagraph(ctx: _Context, result: BackendResult) -> _Timer | None:
    """Capture one transition and a whole rollout in CUDA graphs and time their replay."""
    import torch

    from ..protocol._inputs import conditions_payload

    device = "cuda"
    result.device = device
    model = ctx.torch_model(device)
    batch = result.batch
    # Started before capture: the graphs' private memory pools are allocated while capturing.
    memory = _Memory("cuda", "graph capture and the warm-up replays")
    memory.start()
    inputs = _make_inputs(ctx.model, batch, ctx.horizon, ctx.seed).to(device)
    state = _initial_state(model, inputs)
    step_cond = conditions_payload(inputs.step_noise, inputs.conds)
    roll_cond = conditions_payload(inputs.rollout_noise, inputs.conds)

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

    from ..registry._registry import registry

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
    export_dir = ctx.export_dir
    if backend.endswith(_INT8):
        if ctx.int8_dir is None:
            raise _Skip("no int8 export: benchmark a registry ref to have one made")
        export_dir = ctx.int8_dir
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
        candidate = registry.load(export_dir, device=device, **options)
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
    if backend.endswith(_INT8):
        result.parity = _int8_parity(ctx, reference, candidate, result.batch)
    else:
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
    from .. import parity

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


def _int8_parity(
    ctx: _Context, reference: WorldModel, candidate: WorldModel, batch: int
) -> dict[str, Any]:
    """Free-running parity of an int8 export over the benchmark's horizon, within the int8
    tolerances (categorical outputs by their flip rate, at most ``INT8_MAX_FLIP_RATE``)."""
    from ..parity._tolerance import INT8_MAX_FLIP_RATE
    from ._verdict import flip_budget_verdict

    batches = ctx.parity["batches"] or [min(batch, 64)]
    t0 = time.perf_counter()
    out: dict[str, Any] = {"check": "flip_budget_verdict (int8 tolerances)", "runs": []}
    reasons: list[str] = []
    for size in batches:
        _, summary, why = flip_budget_verdict(
            reference, candidate, size, ctx.horizon, INT8_MAX_FLIP_RATE, ctx.seed
        )
        out["runs"].append(summary)
        reasons += why
    out.update(
        passed=not reasons,
        batch_sizes=list(batches),
        horizon=ctx.horizon,
        max_flip_rate=INT8_MAX_FLIP_RATE,
        seconds=time.perf_counter() - t0,
    )
    if reasons:
        out["summary"] = _shorten("; ".join(dict.fromkeys(reasons)), 600)
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
