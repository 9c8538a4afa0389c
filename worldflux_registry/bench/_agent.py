"""The agent-step backends: one call per environment step, timed on torch and ONNX Runtime.

The agent step is the contract's `AgentSpec` graph: ``plan`` (``encode`` of the observation,
then ``plan_step`` on the encoded state, e.g. TD-MPC2's MPPI planner) or ``act`` (``act_step`` on
the observation, e.g. DreamerV3's posterior update and actor). Every call gets the same seeded
observation, the carry of one earlier step (a warm start) and every noise input, and runs with
``deterministic=False``: the step parity checks (a deterministic step runs the same exported
graph with zeros for the exploration noise). Torch, ONNX Runtime and the model code are
imported inside the functions that need them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._torch_env import tf32_state
from ..errors import CapabilityError
from ._backends import (
    _ORT,
    _Context,
    _fail,
    _ort_loader_options,
    _ort_session_facts,
    _printable,
    _shorten,
    _Skip,
    _skip,
    _sync_for,
)
from ._measure import _Memory, _Series, _Timer
from ._results import BackendResult

if TYPE_CHECKING:
    import torch

    from ..contract._io import AgentSpec, IOContract
    from ..protocol._model import WorldModel

__all__ = ["AGENT_BACKENDS"]

#: Backends of an agent benchmark (``bench.run(..., agent=True)``), in the order they are run.
AGENT_BACKENDS = ("torch", "torch-compile", "ort-cpu", "ort-cuda")

#: Compiled and eager torch run the same math in another order: float32 reassociation only.
_COMPILE_TOL = 1e-4


def agent_spec(contract: IOContract, what: str) -> AgentSpec:
    """The contract's agent step, or a `CapabilityError` saying there is none to benchmark."""
    agent = contract.agent
    if agent is None:
        raise CapabilityError(
            f"{what} declares no agent step (no plan or act graph in its contract): there is "
            "nothing to benchmark in agent mode",
            hint="benchmark its transitions and rollouts without --agent (agent=False)",
            capability="agent",
        )
    return agent


def describe_call(agent: AgentSpec) -> str:
    """What one timed agent call runs, for the report."""
    if agent.graph == "plan":
        return "encode(obs) + plan_step(state + carry, noise given, deterministic=False)"
    return "act_step(obs, carry, noise given, deterministic=False)"


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class _AgentInputs:
    """Seeded inputs of one agent call at one batch size (CPU tensors; moved per backend)."""

    obs: dict[str, torch.Tensor]
    encode_noise: dict[str, torch.Tensor]
    noise: dict[str, torch.Tensor]
    conds: dict[str, torch.Tensor]
    #: The carry one earlier step returned (the warm start of a running episode).
    carry: dict[str, torch.Tensor]

    def to(self, device: str) -> _AgentInputs:
        def move(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return _AgentInputs(
            move(self.obs),
            move(self.encode_noise),
            move(self.noise),
            move(self.conds),
            move(self.carry),
        )


def _agent_call(
    model: WorldModel, agent: AgentSpec, inputs: _AgentInputs
) -> Callable[[], dict[str, torch.Tensor]]:
    """One environment step of ``model``: the agent's new carry and outputs by name."""
    from ..protocol._inputs import conditions_payload, encode_input
    from ..state._state import State

    names = [s.name for s in agent.carry] + [s.name for s in agent.outputs]
    cond = conditions_payload(inputs.noise, inputs.conds)
    if agent.graph == "plan":
        obs_in = encode_input(inputs.obs, inputs.encode_noise, inputs.conds)

        def call() -> dict[str, torch.Tensor]:
            state = model.encode(obs_in)
            out = model.plan_step(State({**state.tensors, **inputs.carry}), None, cond)
            return {k: out[k] for k in names}

        return call
    obs_in = encode_input(inputs.obs, {}, inputs.conds)

    def act() -> dict[str, torch.Tensor]:
        out = model.act_step(obs_in, State(dict(inputs.carry)), cond)
        return {k: out[k] for k in names}

    return act


def _make_agent_inputs(model: WorldModel, agent: AgentSpec, batch: int, seed: int) -> _AgentInputs:
    """Seeded inputs, and the carry of one earlier step of the torch model on them."""
    import torch

    from ..protocol._inputs import make_conditions, make_noise, make_observations

    contract = model.io_contract()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    inputs = _AgentInputs(
        obs=make_observations(contract, (batch,), gen),
        encode_noise=make_noise(contract, "encode", (batch,), gen),
        noise=make_noise(contract, agent.graph, (batch,), gen),
        conds=make_conditions(contract, (batch,), gen),
        carry={},
    )
    first = _agent_call(model, agent, inputs)()
    inputs.carry = {s.name: first[s.name].detach().clone() for s in agent.carry}
    return inputs


# -- per backend ------------------------------------------------------------------------------
def _prepare_agent_backend(
    ctx: _Context, agent: AgentSpec, backend: str, batch: int
) -> tuple[BackendResult, _Timer | None]:
    """Load, gate and warm up one backend's agent step at one batch size."""
    result = BackendResult(backend=backend, batch=batch, status="ok")
    timer = None
    try:
        if backend == "torch":
            timer = _agent_torch(ctx, agent, result)
        elif backend == "torch-compile":
            timer = _agent_torch_compile(ctx, agent, result)
        elif backend in _ORT:
            timer = _agent_ort(ctx, agent, result, backend)
        else:
            _skip(result, f"{backend} has no agent-step variant (use {', '.join(AGENT_BACKENDS)})")
    except _Skip as skip:
        _skip(result, str(skip))
    except Exception as exc:  # one backend's failure is a result, not a crash
        _fail(result, exc)
        timer = None
    return result, timer


def _agent_timer(
    ctx: _Context, result: BackendResult, call: Callable[[], Any], device: str, memory: _Memory
) -> _Timer:
    t = ctx.timing
    timer = _Timer(result, _Series(call, _sync_for(device), t["warmup"], t["repeats"]), None, 1)
    timer.step.warm()
    result.memory = memory.stop()
    return timer


def _torch_device(ctx: _Context) -> str:
    import torch

    if ctx.device.startswith("cuda") and not torch.cuda.is_available():
        raise _Skip("CUDA is not available here")
    return ctx.device


def _agent_torch(ctx: _Context, agent: AgentSpec, result: BackendResult) -> _Timer:
    import torch

    device = result.device = _torch_device(ctx)
    memory = _Memory("cuda" if device.startswith("cuda") else "cpu", "the warm-up calls")
    memory.start()
    model = ctx.torch_model(device)
    inputs = _make_agent_inputs(ctx.model, agent, result.batch, ctx.seed).to(device)
    result.parity = {"passed": True, "note": "torch eager is the reference"}
    result.settings = {
        "mode": "eager, torch.inference_mode()",
        "threads": torch.get_num_threads(),
        "tf32": tf32_state(),
    }
    return _agent_timer(ctx, result, _agent_call(model, agent, inputs), device, memory)


def _agent_torch_compile(ctx: _Context, agent: AgentSpec, result: BackendResult) -> _Timer | None:
    """``torch.compile`` of the whole agent call, checked against eager on the same inputs.

    Outputs must agree within float32 reassociation; a row whose selection (`AgentSpec.selection`)
    swapped candidates whose scores agree is a near-tie and not compared, as parity does.
    """
    import torch

    from ._backends import COMPILE_MODE

    device = result.device = _torch_device(ctx)
    memory = _Memory("cuda" if device.startswith("cuda") else "cpu", "compilation and warm-up")
    memory.start()
    model = ctx.torch_model(device)
    inputs = _make_agent_inputs(ctx.model, agent, result.batch, ctx.seed).to(device)
    eager = _agent_call(model, agent, inputs)

    def step(
        obs: dict[str, torch.Tensor],
        noise: dict[str, torch.Tensor],
        carry: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        given = _AgentInputs(obs, inputs.encode_noise, noise, inputs.conds, carry)
        return _agent_call(model, agent, given)()

    compiled = torch.compile(step, mode=COMPILE_MODE, dynamic=False)

    def call() -> dict[str, torch.Tensor]:
        return compiled(inputs.obs, inputs.noise, inputs.carry)  # type: ignore[no-any-return]

    sync = _sync_for(device)
    t0 = time.perf_counter()
    got = call()
    sync()
    compile_s = time.perf_counter() - t0
    result.parity = compare_agent_outputs(agent, eager(), got, _COMPILE_TOL)
    result.parity["check"] = "compiled agent step against eager torch on the same inputs"
    result.settings = {
        "mode": f"torch.compile(mode={COMPILE_MODE!r}, dynamic=False), torch.inference_mode()",
        "threads": torch.get_num_threads(),
        "compile_s": compile_s,
        "tf32": tf32_state(),
    }
    if not result.parity["passed"]:
        result.status = "refused"
        result.reason = "compiled agent step differs from eager: " + result.parity["summary"]
        return None
    return _agent_timer(ctx, result, call, device, memory)


def compare_agent_outputs(
    agent: AgentSpec,
    want: Mapping[str, torch.Tensor],
    got: Mapping[str, torch.Tensor],
    tol: float,
) -> dict[str, Any]:
    """Compare two agent steps' outputs (``atol = rtol = tol``; integers exactly), per row.

    With a selection (``(indices, scores)``, ``[batch, iterations, k]``), each row's
    iterations are read in order as parity reads them: scores that disagree fail the row; other
    indices with agreeing scores are a near-tie, and that row's outputs are not compared.
    """
    arrays = {k: v.detach().cpu().numpy() for k, v in want.items()}
    cand = {k: v.detach().cpu().numpy() for k, v in got.items()}
    rows = next(iter(arrays.values())).shape[0]
    near_ties: list[dict[str, Any]] = []
    failing: list[str] = []
    skip: set[int] = set()
    if agent.selection:
        idx_key, score_key = agent.selection
        for row in range(rows):
            for i in range(arrays[idx_key].shape[1]):
                a = arrays[score_key][row, i].astype(np.float64)
                b = cand[score_key][row, i].astype(np.float64)
                if not bool(np.all(np.abs(b - a) <= tol + tol * np.abs(a))):
                    failing.append(f"{score_key} (row {row}, iteration {i + 1})")
                    break
                if not np.array_equal(arrays[idx_key][row, i], cand[idx_key][row, i]):
                    near_ties.append({"row": row, "iteration": i + 1})
                    skip.add(row)
                    break
    keep = [r for r in range(rows) if r not in skip]
    worst = 0.0
    for name, a in arrays.items():
        b = cand[name]
        if b.shape != a.shape:
            failing.append(f"{name} (shape {b.shape}, expected {a.shape})")
            continue
        a, b = a[keep], b[keep]
        if not a.size:
            continue
        if a.dtype.kind in "iub":
            if not np.array_equal(a, b):
                failing.append(name)
            continue
        err = np.abs(b.astype(np.float64) - a.astype(np.float64))
        worst = max(worst, float(err.max()))
        if not bool(np.all(err <= tol + tol * np.abs(a.astype(np.float64)))):
            failing.append(name)
    out: dict[str, Any] = {
        "passed": not failing,
        "max_abs_error": worst,
        "tolerance": {"atol": tol, "rtol": tol},
        "rows_compared": len(keep),
        "near_ties": near_ties,
    }
    if failing:
        out["summary"] = _shorten("; ".join(dict.fromkeys(failing)), 400)
    return out


def _agent_ort(
    ctx: _Context, agent: AgentSpec, result: BackendResult, backend: str
) -> _Timer | None:
    """The export's agent graph on ONNX Runtime, gated by `parity.check` of the agent step."""
    import torch

    from .. import parity
    from ..registry._registry import registry

    device = result.device = _ORT[backend]
    if backend not in AGENT_BACKENDS:
        raise _Skip(f"{backend} has no agent-step variant (use {', '.join(AGENT_BACKENDS)})")
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
    candidate = ctx._candidates.get(backend)
    if candidate is None:
        candidate = registry.load(ctx.export_dir, device=device, **options)
        ctx._candidates[backend] = candidate
    result.settings = {"loader_options": _printable(options), **_ort_session_facts(candidate)}
    result.settings["tf32"] = tf32_state()
    reference = ctx.torch_model(device)
    batches = ctx.parity["batches"] or [min(result.batch, 64)]
    kwargs: dict[str, Any] = {
        "batch_sizes": tuple(batches),
        "modes": ("step",),
        "seed": ctx.seed,
        "strict_tf32": not ctx.tf32,
    }
    if ctx.parity["tol"] is not None:
        kwargs["tolerances"] = ctx.parity["tol"]
    t0 = time.perf_counter()
    report = parity.check(reference, candidate, **kwargs)
    checked = {c.graph for c in report.checks()}
    result.parity = {
        "passed": bool(report.passed) and agent.graph in checked,
        "check": f"parity.check step mode: encode and the {agent.graph} graph",
        "batch_sizes": list(batches),
        "seconds": time.perf_counter() - t0,
        "selections": [c.to_dict() for c in report.selections],
        "near_ties": sum(len(c.near_ties) for c in report.selections),
    }
    if agent.graph not in checked:
        result.parity["summary"] = f"the {agent.graph} graph was not compared"
    elif not report.passed:
        from ._backends import _parity_failure

        result.parity["summary"] = _parity_failure(report)
        if report.selections:
            result.parity["summary"] += "; " + "; ".join(c.describe() for c in report.selections)
    if not result.parity["passed"]:
        result.status = "refused"
        result.reason = "parity failed: " + _shorten(str(result.parity["summary"]), 600)
        return None
    inputs = _make_agent_inputs(ctx.model, agent, result.batch, ctx.seed).to(device)
    return _agent_timer(ctx, result, _agent_call(candidate, agent, inputs), device, memory)
