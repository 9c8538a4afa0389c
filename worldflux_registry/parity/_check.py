"""`check`: run two WorldModels on the same seeded inputs and compare every output."""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._torch_env import tf32
from ..contract._io import Capability, IOContract, TensorSpec
from ..errors import ParityError
from ..protocol._inputs import (
    conditions_payload,
    encode_input,
    make_actions,
    make_conditions,
    make_noise,
    make_observations,
    make_tensor,
)
from ..protocol._payloads import ConditionPayload, ModelOutput
from ..state._state import State
from ._localize import _Site, localize
from ._metrics import Metrics, compare_arrays
from ._report import MODES, OutputCheck, ParityReport, RolloutCurve, SelectionCheck
from ._tolerance import (
    Tolerance,
    TolerancesLike,
    loosest,
    normalize_precision,
    pick_tolerance,
    resolve_tolerances,
)

__all__ = ["check"]

Arrays = dict[str, np.ndarray]


@dataclass
class _Output:
    graph: str
    name: str
    spec: TensorSpec
    tolerance: Tolerance
    source: str

    @property
    def categorical(self) -> bool:
        return self.spec.kind == "categorical"


@dataclass
class _Run:
    contract: IOContract
    outputs: dict[tuple[str, str], _Output]
    reference: Any
    candidate: Any
    ref_device: torch.device
    cand_device: torch.device
    steps: list[OutputCheck] = field(default_factory=list)
    rollouts: list[RolloutCurve] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sites: dict[tuple[str, str, int, int | None], _Site] = field(default_factory=dict)
    selections: list[SelectionCheck] = field(default_factory=list)

    def graph_outputs(self, graph: str) -> list[_Output]:
        return [o for (g, _), o in self.outputs.items() if g == graph]


#: Rollout length of `check` when none is given.
DEFAULT_HORIZON = 16


def check(
    reference: Any,
    candidate: Any,
    *,
    batch_sizes: Sequence[int] = (1, 7),
    horizon: int = DEFAULT_HORIZON,
    seed: int = 0,
    tolerances: TolerancesLike | None = None,
    modes: Collection[str] = MODES,
    contract: IOContract | None = None,
    precision: str | None = None,
    strict_tf32: bool = False,
    enforce: Collection[str] | None = None,
    localize_failures: bool = True,
) -> ParityReport:
    """Compare two implementations of the WorldModel protocol on seeded contract inputs.

    Both sides get identical observations, actions and sampling noise (``wf.noise.<name>``
    condition extras), so stochastic steps are compared too. ``transition``, ``update`` and
    ``decode`` are fed the reference's state on both sides, so each graph is judged alone.

    Args:
        reference: The model taken as truth (usually the PyTorch model).
        candidate: The model under test (an ONNX Runtime model, another device, fp16...).
        batch_sizes: Batch sizes to run every comparison at.
        horizon: Rollout length of the ``teacher_forced`` and ``free_running`` modes.
        seed: Seed of every generated input; the same seed gives the same inputs.
        tolerances: Per-output overrides: ``{"transition/state.deter": Tolerance(...)}``
            (one output of one graph), ``{"state.deter": ...}`` (that output everywhere) or
            ``{"decode": ...}`` (every output of a graph); values may be ``(rtol, atol)``.
        modes: Any of ``"step"``, ``"teacher_forced"``, ``"free_running"``.
        contract: The contract to check against; default the reference's. Both sides'
            fingerprints must equal it.
        precision: Compute precision the default tolerances follow (``"fp32"``, ``"fp16"``,
            ``"bf16"``). Default: the loosest of the two sides' ``precision`` attributes or
            parameter dtypes, so an fp16 ONNX export with fp32 inputs and outputs is judged
            with fp16 tolerances.
        strict_tf32: Turn torch's TF32 matmul and cuDNN switches off during the check
            (restored after); the report records the settings either way.
        enforce: Modes whose failures fail the report (default: every mode run). Free-running
            errors of chaotic models can grow from rounding alone; enforce
            ``("step", "teacher_forced")`` to report them without failing.
        localize_failures: Find where a failing check goes wrong first, and for ONNX
            candidates run the ONNX reference evaluator to tell exporter from runtime.

    Returns:
        A `ParityReport`; a failing comparison never raises.

    Raises:
        ParityError: The check cannot run: contracts differ, an unknown mode or tolerance
            key, a bad batch size or horizon, or the reference itself raised.
    """
    started = time.perf_counter()
    modes = _check_modes(modes, "modes")
    enforced = modes if enforce is None else _check_modes(enforce, "enforce")
    batch_sizes = _check_sizes(batch_sizes, horizon, modes)
    contract = _common_contract(reference, candidate, contract)
    graphs = _graphs(reference, candidate) + _agent_graph(contract, reference, candidate)
    compute = _precision(reference, candidate, precision)
    outputs_by_graph = {g: [name for name, _ in _graph_specs(contract, g)] for g in graphs}
    overrides = resolve_tolerances(tolerances, graphs, outputs_by_graph)
    outputs: dict[tuple[str, str], _Output] = {}
    for graph in graphs:
        for name, spec in _graph_specs(contract, graph):
            tol, source = pick_tolerance(
                overrides, graph, name, spec.dtype, compute, spec.tolerance
            )
            outputs[(graph, name)] = _Output(graph, name, spec, tol, source)

    notes: list[str] = []
    if contract.action is None and "free_running" in modes:
        # `rollout` takes an action sequence by protocol: without actions there is no rollout.
        modes = tuple(m for m in modes if m != "free_running")
        enforced = tuple(m for m in enforced if m != "free_running")
        notes.append("free_running skipped: the contract declares no action")
    if not {"transition", "decode"} <= set(graphs):
        rollouts = [m for m in modes if m in ("teacher_forced", "free_running")]
        if rollouts:
            modes = tuple(m for m in modes if m not in rollouts)
            enforced = tuple(m for m in enforced if m not in rollouts)
            notes.append(
                f"{' and '.join(rollouts)} skipped: rollouts need transition and decode on "
                f"both sides, and only {', '.join(graphs)} are shared"
            )
    if "free_running" in modes:
        for side, model in (("reference", reference), ("candidate", candidate)):
            fused = getattr(model, "fused_rollout_horizon", None)
            if isinstance(fused, int) and horizon < fused:
                notes.append(
                    f"the {side}'s fused rollout graph ({fused} steps) was not checked: "
                    f"free_running rolls out {horizon} steps; use horizon >= {fused} "
                    f"(--horizon {fused} on the CLI)"
                )
    run = _Run(
        contract,
        outputs,
        reference,
        candidate,
        _device_of(reference),
        _device_of(candidate),
        notes=notes,
    )
    strict = tf32(False) if strict_tf32 else contextlib.nullcontext()
    with strict, _eval_mode(reference, candidate), torch.no_grad():
        ref_info = _side_info(reference)
        cand_info = _side_info(candidate)
        for batch in batch_sizes:
            if "step" in modes:
                _step_mode(run, graphs, batch, seed)
            if "teacher_forced" in modes or "free_running" in modes:
                _rollout_modes(run, modes, batch, seed, horizon)

    passed = not any(not c.passed for c in run.steps if "step" in enforced) and not any(
        not c.passed for c in run.rollouts if c.mode in enforced
    )
    report = ParityReport(
        passed=passed,
        fingerprint=contract.fingerprint(),
        reference=ref_info,
        candidate=cand_info,
        settings={
            "batch_sizes": list(batch_sizes),
            "horizon": horizon,
            "seed": seed,
            "modes": [m for m in MODES if m in modes],
            "enforce": [m for m in MODES if m in enforced],
            "precision": compute,
            "strict_tf32": strict_tf32,
            "graphs": list(graphs),
        },
        tolerances=overrides,
        steps=run.steps,
        rollouts=run.rollouts,
        errors=run.errors,
        notes=run.notes,
        selections=run.selections,
        versions=_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if localize_failures and not report.passed:
        report.localization = localize(report, candidate, run.sites)
    report.elapsed_s = time.perf_counter() - started
    return report


# -- validation of the arguments --------------------------------------------------------------
def _check_modes(modes: Collection[str], what: str) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    from ..errors import did_you_mean

    for mode in modes:
        if mode not in MODES:
            raise ParityError(
                f"unknown {what} entry {mode!r}.{did_you_mean(str(mode), MODES)}",
                hint="modes: " + ", ".join(MODES),
            )
    if not modes and what == "modes":
        raise ParityError("no modes to check", hint="modes: " + ", ".join(MODES))
    return tuple(m for m in MODES if m in modes)


def _check_sizes(batch_sizes: Sequence[int], horizon: int, modes: Collection[str]) -> list[int]:
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes]
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ParityError(f"batch_sizes {batch_sizes!r} must be positive integers")
    rollouts = {"teacher_forced", "free_running"} & set(modes)
    if rollouts and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ParityError(f"horizon {horizon!r} must be a positive integer")
    return list(dict.fromkeys(sizes))


def _common_contract(reference: Any, candidate: Any, contract: IOContract | None) -> IOContract:
    ref_contract = reference.io_contract()
    cand_contract = candidate.io_contract()
    wanted = contract if contract is not None else ref_contract
    for side, theirs in (("reference", ref_contract), ("candidate", cand_contract)):
        if theirs.fingerprint() != wanted.fingerprint():
            raise ParityError(
                f"the {side}'s contract {theirs.fingerprint()[:19]} differs from "
                f"{wanted.fingerprint()[:19]}: the two models do not compute the same thing",
                hint="compare a model with its own export (same family, preset and config)",
            )
    return wanted


def _supports(model: Any, capability: Capability) -> bool:
    supports = getattr(model, "supports", None)
    return bool(supports(capability)) if callable(supports) else True


def _graphs(reference: Any, candidate: Any) -> tuple[str, ...]:
    """The protocol steps both sides advertise (an export may hold only some graphs)."""
    graphs = tuple(
        g
        for g in ("encode", "transition", "update", "decode")
        if _supports(reference, Capability(g)) and _supports(candidate, Capability(g))
    )
    if not graphs:
        raise ParityError(
            "the reference and the candidate share no step (encode, transition, update, decode)",
            hint="both must advertise the steps to compare in their class attribute 'capabilities'",
        )
    return graphs


def _agent_graph(contract: IOContract, reference: Any, candidate: Any) -> tuple[str, ...]:
    """The contract's agent step (``plan`` / ``act``) when both sides advertise it."""
    agent = contract.agent
    if agent is None:
        return ()
    cap = Capability(agent.graph)
    return (agent.graph,) if _supports(reference, cap) and _supports(candidate, cap) else ()


def _graph_specs(contract: IOContract, graph: str) -> list[tuple[str, TensorSpec]]:
    """The compared outputs of ``graph``, by report name (``state.*``, ``pred.*``, and for an
    agent step ``new_carry.*`` then ``out.*``)."""
    if graph == "decode":
        return [(f"pred.{s.name}", s) for s in contract.predictions]
    if contract.agent is not None and graph == contract.agent.graph:
        return [(f"new_carry.{s.name}", s) for s in contract.agent.carry] + [
            (f"out.{s.name}", s) for s in contract.agent.outputs
        ]
    return [(f"state.{s.name}", s) for s in contract.state]


# -- the sides ------------------------------------------------------------------------------
def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
        for buffer in model.buffers():
            return buffer.device
    return torch.device("cpu")


def _precision_of(model: Any) -> str | None:
    declared = normalize_precision(getattr(model, "precision", None))
    if declared is not None:
        return declared
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            if tensor.is_floating_point():
                return normalize_precision(tensor.dtype)
    return None


def _precision(reference: Any, candidate: Any, precision: str | None) -> str | None:
    if precision is not None:
        chosen = normalize_precision(precision)
        if chosen is None:
            raise ParityError(
                f"unknown precision {precision!r}", hint="use 'fp32', 'fp16', 'bf16' or 'fp64'"
            )
        return chosen
    return loosest(_precision_of(reference), _precision_of(candidate))


def _backend_of(model: Any) -> str:
    backend = getattr(model, "backend", None)
    if isinstance(backend, str):
        return backend
    if callable(getattr(model, "graph_path", None)) or getattr(model, "artifact_dir", None):
        return "onnxruntime"
    return "torch"


def _torch_tf32() -> dict[str, bool]:
    return {
        "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


def _side_info(model: Any) -> dict[str, Any]:
    cls = type(model)
    info: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "backend": _backend_of(model),
        "device": str(_device_of(model)),
        "precision": _precision_of(model),
    }
    for attr in ("family", "preset"):
        value = getattr(model, attr, None)
        if isinstance(value, str):
            info[attr] = value
    extra = getattr(model, "parity_info", None)
    if callable(extra):
        info.update(dict(extra()))
    if "tf32" not in info:
        if info["backend"] == "torch":
            info["tf32"] = _torch_tf32()
        else:
            tf32 = getattr(model, "tf32", None)
            info["tf32"] = tf32 if isinstance(tf32, (bool, dict)) else _ort_tf32(model)
    providers = getattr(model, "providers", None)
    if "providers" not in info and isinstance(providers, (list, tuple)):
        info["providers"] = [str(p) for p in providers]
    return info


def _ort_tf32(model: Any) -> bool | None:
    """TF32 use of an ONNX Runtime model, from its sessions' provider options."""
    sessions = getattr(model, "sessions", None)
    if not isinstance(sessions, Mapping) or not sessions:
        return None
    try:
        options = next(iter(sessions.values())).get_provider_options()
    except Exception:
        return None
    cuda = options.get("CUDAExecutionProvider")
    if cuda is None:
        return False if "TensorrtExecutionProvider" not in options else None
    value = cuda.get("use_tf32")
    return None if value is None else value not in ("0", "false", "False")


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    # Dropout and batch statistics would make two runs of one model disagree.
    modules = [m for m in models if isinstance(m, torch.nn.Module)]
    saved = [[(sub, sub.training) for sub in m.modules()] for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for pairs in saved:
            for sub, training in pairs:
                sub.train(training)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("worldflux-registry", "torch", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


# -- moving data -------------------------------------------------------------------------------
def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, State):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, ConditionPayload):
        return ConditionPayload(
            text_condition=_to(value.text_condition, device),
            goal=_to(value.goal, device),
            spatial=_to(value.spatial, device),
            camera_pose=_to(value.camera_pose, device),
            extras=_to(value.extras, device),
        )
    return value


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        array: np.ndarray = value.cpu().numpy()
        return array
    return np.asarray(value)


def _state_arrays(state: Any) -> Arrays:
    tensors = state.tensors if isinstance(state, State) else state
    return {f"state.{k}": _numpy(v) for k, v in tensors.items()}


def _pred_arrays(output: Any) -> Arrays:
    predictions = output.predictions if isinstance(output, ModelOutput) else output
    return {f"pred.{k}": _numpy(v) for k, v in predictions.items()}


def _feeds(
    state: State | None = None,
    action: Tensor | None = None,
    obs: Mapping[str, Tensor] | None = None,
    noise: Mapping[str, Tensor] | None = None,
    conds: Mapping[str, Tensor] | None = None,
) -> Arrays:
    feeds: Arrays = {}
    if conds:
        feeds.update({f"cond.{k}": _numpy(v) for k, v in conds.items()})
    if obs is not None:
        feeds.update({f"obs.{k}": _numpy(v) for k, v in obs.items()})
    if state is not None:
        feeds.update(_state_arrays(state))
    if action is not None:
        feeds["action"] = _numpy(action)
    if noise is not None:
        feeds.update({f"noise.{k}": _numpy(v) for k, v in noise.items()})
    return feeds


# -- comparing ---------------------------------------------------------------------------------
def _compare_graph(
    run: _Run, graph: str, ref_out: Arrays, cand_out: Arrays | str
) -> dict[str, Metrics]:
    """Metrics of every output of ``graph``; ``cand_out`` is an error message if it raised."""
    results: dict[str, Metrics] = {}
    for out in run.graph_outputs(graph):
        if isinstance(cand_out, str):
            results[out.name] = Metrics.failure(cand_out)
            continue
        if out.name not in ref_out:
            raise ParityError(
                f"the reference's {graph} returned no {out.name!r}",
                hint="the reference breaks its own contract: run the conformance tests",
                graph=graph,
                output=out.name,
            )
        if out.name not in cand_out:
            results[out.name] = Metrics.failure(f"the candidate's {graph} returned no {out.name}")
            continue
        metrics = compare_arrays(
            ref_out[out.name], cand_out[out.name], out.tolerance, categorical=out.categorical
        )
        if metrics.note is None and cand_out[out.name].dtype != ref_out[out.name].dtype:
            note = (
                f"{graph}/{out.name}: candidate dtype {cand_out[out.name].dtype} "
                f"differs from the reference's {ref_out[out.name].dtype}"
            )
            if note not in run.notes:
                run.notes.append(note)
        results[out.name] = metrics
    return results


def _call_reference(graph: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ParityError:
        raise
    except Exception as exc:
        raise ParityError(
            f"the reference raised in {graph}: {type(exc).__name__}: {exc}",
            hint="the check needs a working reference model",
            graph=graph,
        ) from exc


def _call_candidate(run: _Run, where: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        message = f"the candidate raised in {where}: {type(exc).__name__}: {exc}"
        if message not in run.errors:
            run.errors.append(message)
        return message


def _generator(seed: int, batch: int, stream: int) -> torch.Generator:
    # Distinct, reproducible streams per batch size and purpose; independent of the modes run.
    return torch.Generator().manual_seed((seed * 1_000_003 + batch) * 4 + stream)


def _step_mode(run: _Run, graphs: Sequence[str], batch: int, seed: int) -> None:
    contract, ref, cand = run.contract, run.reference, run.candidate
    rd, cd = run.ref_device, run.cand_device
    gen = _generator(seed, batch, 0)
    obs = make_observations(contract, (batch,), gen)
    enc_noise = make_noise(contract, "encode", (batch,), gen)
    action = make_actions(contract, (batch,), gen)
    tr_noise = make_noise(contract, "transition", (batch,), gen)
    obs2 = make_observations(contract, (batch,), gen)
    up_noise = make_noise(contract, "update", (batch,), gen)
    dec_noise = make_noise(contract, "decode", (batch,), gen)
    conds = make_conditions(contract, (batch,), gen)  # last: draws nothing without conditions
    agent = contract.agent
    # Drawn after everything else, so contracts without an agent step keep their inputs.
    carry = {} if agent is None else {s.name: make_tensor(s, (batch,), gen) for s in agent.carry}
    plan_noise = {} if agent is None else make_noise(contract, agent.graph, (batch,), gen)

    def record(graph: str, feeds: Arrays, ref_out: Arrays, cand: Arrays | str) -> None:
        results = _compare_graph(run, graph, ref_out, cand)
        for name, metrics in results.items():
            out = run.outputs[(graph, name)]
            run.steps.append(
                OutputCheck(
                    graph,
                    name,
                    batch,
                    out.spec.dtype,
                    out.categorical,
                    out.tolerance,
                    out.source,
                    metrics,
                )
            )
        if not all(m.passed for m in results.values()):
            cand_arrays = cand if isinstance(cand, dict) else {}
            run.sites[("step", graph, batch, None)] = _Site(feeds, ref_out, cand_arrays)

    enc_in = encode_input(obs, enc_noise, conds)
    s0 = _call_reference("encode", lambda: ref.encode(_to(enc_in, rd)))
    if "encode" in graphs:
        c0 = _call_candidate(run, "encode", lambda: cand.encode(_to(enc_in, cd)))
        record(
            "encode",
            _feeds(obs=obs, noise=enc_noise, conds=conds),
            _state_arrays(s0),
            c0 if isinstance(c0, str) else _state_arrays(c0),
        )

    s0_cpu = s0.to("cpu")
    if agent is not None and agent.graph in graphs:
        _agent_step(run, agent.graph, s0_cpu, obs, carry, plan_noise, conds, record)

    cond = conditions_payload(tr_noise, conds)
    s1 = _call_reference("transition", lambda: ref.transition(s0, _to(action, rd), _to(cond, rd)))
    if "transition" in graphs:
        c1 = _call_candidate(
            run,
            "transition",
            lambda: cand.transition(_to(s0_cpu, cd), _to(action, cd), _to(cond, cd)),
        )
        record(
            "transition",
            _feeds(state=s0_cpu, action=action, noise=tr_noise, conds=conds),
            _state_arrays(s1),
            c1 if isinstance(c1, str) else _state_arrays(c1),
        )

    if "update" in graphs:
        cond = conditions_payload(up_noise, conds)
        u1 = _call_reference(
            "update", lambda: ref.update(s0, _to(action, rd), _to(obs2, rd), _to(cond, rd))
        )
        cu = _call_candidate(
            run,
            "update",
            lambda: cand.update(_to(s0_cpu, cd), _to(action, cd), _to(obs2, cd), _to(cond, cd)),
        )
        record(
            "update",
            _feeds(state=s0_cpu, action=action, obs=obs2, noise=up_noise, conds=conds),
            _state_arrays(u1),
            cu if isinstance(cu, str) else _state_arrays(cu),
        )

    s1_cpu = s1.to("cpu")
    cond = conditions_payload(dec_noise, conds)
    if "decode" in graphs:
        p = _call_reference("decode", lambda: ref.decode(s1, _to(cond, rd)))
        cp = _call_candidate(run, "decode", lambda: cand.decode(_to(s1_cpu, cd), _to(cond, cd)))
        record(
            "decode",
            _feeds(state=s1_cpu, noise=dec_noise, conds=conds),
            _pred_arrays(p),
            cp if isinstance(cp, str) else _pred_arrays(cp),
        )


def _agent_step(
    run: _Run,
    graph: str,
    state: State,
    obs: Mapping[str, Tensor],
    carry: Mapping[str, Tensor],
    noise: Mapping[str, Tensor],
    conds: Mapping[str, Tensor],
    record: Callable[[str, Arrays, Arrays, Arrays | str], None],
) -> None:
    """The agent step with every noise input given (``deterministic=False``): ``plan_step`` on
    the reference's encoded state plus ``carry``, or ``act`` on the observation and ``carry``."""
    ref, cand, rd, cd = run.reference, run.candidate, run.ref_device, run.cand_device
    cond = conditions_payload(noise, conds)
    names = _graph_specs(run.contract, graph)

    def arrays(out: State) -> Arrays:
        tensors = out.tensors
        return {name: _numpy(tensors[name.split(".", 1)[1]]) for name, _ in names}

    if graph == "act":

        def call(model: Any, device: torch.device) -> Arrays:
            given = _to(State(dict(carry)), device)
            out = model.act_step(_to(dict(obs), device), given, _to(cond, device))
            return arrays(out)

        feeds = _feeds(obs=obs, noise=noise, conds=conds)
    else:
        full = State({**state.tensors, **carry})

        def call(model: Any, device: torch.device) -> Arrays:
            return arrays(model.plan_step(_to(full, device), None, _to(cond, device)))

        feeds = _feeds(state=state, noise=noise, conds=conds)
    ref_out = _call_reference(graph, lambda: call(ref, rd))
    got = _call_candidate(run, graph, lambda: call(cand, cd))
    agent = run.contract.agent
    if agent is not None and agent.selection and isinstance(got, dict):
        got = _judge_selection(run, graph, agent.selection, ref_out, got)
    feeds.update({f"carry.{k}": _numpy(v) for k, v in carry.items()})
    record(graph, feeds, ref_out, got)


def _judge_selection(
    run: _Run, graph: str, selection: Sequence[str], ref: Arrays, cand: Arrays
) -> Arrays:
    """Compare the agent step's selections per row and iteration (`SelectionCheck`); return
    ``cand`` with each near-tied row replaced by the reference's (those rows are not compared).

    The scores are judged with their output's tolerance, rank by rank: a near-tie swaps
    candidates whose scores agree, a wrong graph moves the scores themselves.
    """
    idx_key, score_key = (f"out.{name}" for name in selection)
    tol = run.outputs[(graph, score_key)].tolerance
    ref_idx, cand_idx = ref[idx_key], cand[idx_key]
    ref_s, cand_s = ref[score_key], cand[score_key]
    rows, iterations = int(ref_idx.shape[0]), int(ref_idx.shape[1])
    check = SelectionCheck(graph, rows, iterations, agreed=0)
    patched = {k: v.copy() for k, v in cand.items()}
    if cand_idx.shape != ref_idx.shape or cand_s.shape != ref_s.shape:
        check.failures = [{"row": r, "iteration": 1} for r in range(rows)]
        run.selections.append(check)
        return cand
    for row in range(rows):
        for i in range(iterations):
            a, b = ref_s[row, i].astype(np.float64), cand_s[row, i].astype(np.float64)
            close = bool(np.all(np.abs(b - a) <= tol.atol + tol.rtol * np.abs(a)))
            same = bool(np.array_equal(ref_idx[row, i], cand_idx[row, i]))
            if not close:
                check.failures.append({"row": row, "iteration": i + 1})
                break
            if not same:
                swapped = ref_idx[row, i] != cand_idx[row, i]
                diff = float(np.max(np.abs(b - a)[swapped]))
                check.near_ties.append({"row": row, "iteration": i + 1, "score_diff": diff})
                for key, value in patched.items():
                    if key in ref and value.shape == ref[key].shape and value.ndim:
                        value[row] = ref[key][row]
                break
        else:
            check.agreed += 1
    run.selections.append(check)
    return patched


def _rollout_modes(run: _Run, modes: Collection[str], batch: int, seed: int, horizon: int) -> None:
    contract, ref, cand = run.contract, run.reference, run.candidate
    rd, cd = run.ref_device, run.cand_device
    gen = _generator(seed, batch, 1)
    obs = make_observations(contract, (batch,), gen)
    enc_noise = make_noise(contract, "encode", (batch,), gen)
    actions = make_actions(contract, (horizon, batch), gen)
    # One noise draw per step shared by transition and decode, as `WorldModel.rollout` passes it.
    noise = make_noise(contract, "transition", (horizon, batch), gen)
    for name, value in make_noise(contract, "decode", (horizon, batch), gen).items():
        noise.setdefault(name, value)
    # Side conditions hold for the whole rollout (no time axis), as `WorldModel.rollout` passes
    # them to every step; drawn last, so contracts without any keep their inputs.
    conds = make_conditions(contract, (batch,), gen)
    s0 = _call_reference("encode", lambda: ref.encode(_to(encode_input(obs, enc_noise, conds), rd)))
    s0_cpu = s0.to("cpu")
    tr_names = {n.name for n in contract.noise_for("transition")}
    dec_names = {n.name for n in contract.noise_for("decode")}

    def step_noise(t: int, names: set[str]) -> dict[str, Tensor]:
        return {k: v[t] for k, v in noise.items() if k in names}

    def action_at(t: int) -> Tensor | None:
        return None if actions is None else actions[t]

    if "teacher_forced" in modes:
        curves = _new_curves(run, "teacher_forced", batch)
        state, state_cpu = s0, s0_cpu
        for t in range(horizon):
            cond = conditions_payload({k: v[t] for k, v in noise.items()}, conds)
            a = action_at(t)
            nxt = _call_reference("transition", ref.transition, state, _to(a, rd), _to(cond, rd))
            got = _call_candidate(
                run,
                f"transition (teacher-forced step {t + 1})",
                cand.transition,
                _to(state_cpu, cd),
                _to(a, cd),
                _to(cond, cd),
            )
            ref_states = _state_arrays(nxt)
            cand_states = got if isinstance(got, str) else _state_arrays(got)
            _append(run, curves, "transition", ref_states, cand_states)
            if _newly_failing(curves, "transition", t):
                run.sites.setdefault(
                    ("teacher_forced", "transition", batch, t + 1),
                    _Site(
                        _feeds(
                            state=state_cpu, action=a, noise=step_noise(t, tr_names), conds=conds
                        ),
                        ref_states,
                        cand_states if isinstance(cand_states, dict) else {},
                    ),
                )
            nxt_cpu = nxt.to("cpu")
            pred = _call_reference("decode", ref.decode, nxt, _to(cond, rd))
            got_pred = _call_candidate(
                run,
                f"decode (teacher-forced step {t + 1})",
                cand.decode,
                _to(nxt_cpu, cd),
                _to(cond, cd),
            )
            ref_preds = _pred_arrays(pred)
            cand_preds = got_pred if isinstance(got_pred, str) else _pred_arrays(got_pred)
            _append(run, curves, "decode", ref_preds, cand_preds)
            if _newly_failing(curves, "decode", t):
                run.sites.setdefault(
                    ("teacher_forced", "decode", batch, t + 1),
                    _Site(
                        _feeds(state=nxt_cpu, noise=step_noise(t, dec_names), conds=conds),
                        ref_preds,
                        cand_preds if isinstance(cand_preds, dict) else {},
                    ),
                )
            state, state_cpu = nxt, nxt_cpu
        run.rollouts.extend(curves.values())

    if "free_running" in modes:
        curves = _new_curves(run, "free_running", batch)
        ref_traj = _call_reference(
            "rollout", lambda: _rollout(ref, s0, actions, noise, conds, horizon, rd)
        )
        cand_traj = _call_candidate(
            run, "rollout", lambda: _rollout(cand, s0_cpu, actions, noise, conds, horizon, cd)
        )
        if isinstance(cand_traj, str):
            for curve in curves.values():
                curve.error = cand_traj
        for t in range(horizon):
            ref_states, ref_preds = _state_arrays(ref_traj[0][t]), ref_traj[1][t]
            if isinstance(cand_traj, str):
                _append(run, curves, "transition", ref_states, cand_traj)
                _append(run, curves, "decode", ref_preds, cand_traj)
            else:
                _append(run, curves, "transition", ref_states, _state_arrays(cand_traj[0][t]))
                _append(run, curves, "decode", ref_preds, cand_traj[1][t])
        run.rollouts.extend(curves.values())


def _rollout(
    model: Any,
    state: State,
    actions: Tensor | None,
    noise: Mapping[str, Tensor],
    conds: Mapping[str, Tensor],
    horizon: int,
    device: torch.device,
) -> tuple[list[State], list[Arrays]]:
    """States after each step and predictions of each step, through ``model.rollout``."""
    if actions is None:
        raise ParityError("free-running rollouts need an action in the contract")
    cond = conditions_payload(noise, conds)
    traj = model.rollout(
        _to(state, device), _to(actions, device), _to(cond, device), deterministic=False
    )
    states = list(traj.states[1:])
    if len(states) != horizon:
        raise ParityError(f"rollout returned {len(states)} states for {horizon} actions")
    preds: list[Arrays] = []
    if traj.predictions:
        stacked = {k: _numpy(v) for k, v in traj.predictions.items()}
        preds = [{f"pred.{k}": v[t] for k, v in stacked.items()} for t in range(horizon)]
    else:
        contract = model.io_contract()
        from ..protocol._model import step_slice

        preds = [
            _pred_arrays(model.decode(states[t], step_slice(contract, _to(cond, device), t)))
            for t in range(horizon)
        ]
    return states, preds


def _new_curves(run: _Run, mode: str, batch: int) -> dict[tuple[str, str], RolloutCurve]:
    curves = {}
    for (graph, name), out in run.outputs.items():
        if graph in ("transition", "decode"):
            curves[(graph, name)] = RolloutCurve(
                mode,
                graph,
                name,
                batch,
                out.spec.dtype,
                out.categorical,
                out.tolerance,
                out.source,
                [],
            )
    return curves


def _append(
    run: _Run,
    curves: dict[tuple[str, str], RolloutCurve],
    graph: str,
    ref_out: Arrays,
    cand_out: Arrays | str,
) -> None:
    for name, metrics in _compare_graph(run, graph, ref_out, cand_out).items():
        curves[(graph, name)].steps.append(metrics)


def _newly_failing(curves: dict[tuple[str, str], RolloutCurve], graph: str, t: int) -> bool:
    """True when some output of ``graph`` fails at step ``t`` and none of them failed before."""
    mine = [c for (g, _), c in curves.items() if g == graph]
    failing_now = any(not c.steps[t].passed for c in mine)
    return failing_now and all(m.passed for c in mine for m in c.steps[:t])
