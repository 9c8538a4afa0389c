"""Graph signatures and flat-tensor wrappers derived from a contract (no per-family code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worldflux_registry import (
    ExportError,
    IOContract,
    NoiseSpec,
    State,
    TensorSpec,
    WorldModelInput,
)
from worldflux_registry.plugin_api import conditions_payload

__all__ = [
    "ALL_GRAPHS",
    "MODE_SUFFIX",
    "ROLLOUT",
    "GraphModule",
    "GraphSignature",
    "Port",
    "signature",
]

from ._names import (
    AGENT_GRAPHS,
    ALL_GRAPHS,
    COND,
    KNOWN_GRAPHS,
    MODE_GRAPHS,
    MODE_SUFFIX,
    ROLLOUT,
)


@dataclass(frozen=True)
class Port:
    """One named graph input or output.

    Inputs are ``obs.<name>``, ``state.<key>``, ``action`` and ``noise.<name>``; outputs are
    ``new_state.<key>`` (encode, transition, update) or ``pred.<key>`` (decode). Side conditions
    are ``cond.<name>`` inputs of every step that reads them. The fused ``rollout`` graph takes
    ``actions`` and ``noise.<name>`` and gives ``states.<key>`` and ``pred.<key>`` with a fixed
    leading time axis (``lead``) before the batch axis. An agent step takes ``state.<key>``
    (``plan``) or ``obs.<name>`` (``act``), ``carry.<name>``, side conditions and noise and
    gives ``new_carry.<name>`` and ``out.<name>`` (`AgentSpec`).
    """

    name: str
    spec: TensorSpec
    #: Fixed leading dims before the batch axis (``(horizon,)`` for time-major rollout ports).
    lead: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """The name without its group prefix (the contract's name)."""
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    @property
    def batch_axis(self) -> int:
        """Index of the symbolic batch axis."""
        return len(self.lead)

    def to_dict(self) -> dict[str, Any]:
        """Manifest form: name, dtype and symbolic shape."""
        shape = [*self.lead, *self.spec.shape]
        return {"name": self.name, "dtype": self.spec.dtype, "shape": shape}


@dataclass(frozen=True)
class GraphSignature:
    """Inputs, outputs and noise of one graph."""

    graph: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    noise: tuple[str, ...]
    #: Steps unrolled in the fused ``rollout`` graph (None for the protocol steps).
    horizon: int | None = None

    @property
    def base(self) -> str:
        """The protocol step: ``transition`` for both ``transition`` and ``transition.mode``."""
        return self.graph.removesuffix(MODE_SUFFIX)

    @property
    def deterministic(self) -> bool:
        """True for a ``<graph>.mode`` variant (run with ``deterministic=True``)."""
        return self.graph.endswith(MODE_SUFFIX)

    @property
    def input_names(self) -> list[str]:
        """Input names in graph order."""
        return [p.name for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in graph order."""
        return [p.name for p in self.outputs]


def signature(contract: IOContract, graph: str, *, horizon: int | None = None) -> GraphSignature:
    """The flat signature of ``graph`` (or of its ``<graph>.mode`` variant) under ``contract``.

    ``horizon`` is required for the fused ``rollout`` graph and refused for the others.
    """
    if graph.removesuffix(MODE_SUFFIX) == ROLLOUT:
        return _rollout_signature(contract, horizon, mode=graph.endswith(MODE_SUFFIX))
    if graph in AGENT_GRAPHS and horizon is None:
        return _agent_signature(contract, graph)
    if horizon is not None:
        raise ExportError(f"graph {graph!r} takes no horizon", graph=graph)
    mode = graph.endswith(MODE_SUFFIX)
    full = graph
    graph = graph.removesuffix(MODE_SUFFIX)
    if graph not in ALL_GRAPHS or (mode and graph not in MODE_GRAPHS):
        raise ExportError(
            f"unknown graph {full!r}",
            hint="graphs: " + ", ".join([*KNOWN_GRAPHS, *(g + MODE_SUFFIX for g in MODE_GRAPHS)]),
            graph=full,
        )
    obs = tuple(Port(f"obs.{s.name}", s) for s in contract.observations)
    state = tuple(Port(f"state.{s.name}", s) for s in contract.state)
    action = (Port("action", contract.action),) if contract.action is not None else ()
    cond = _condition_ports(contract)
    noise_specs = () if mode else contract.noise_for(graph)
    noise = tuple(Port(f"noise.{n.name}", n.as_tensor_spec()) for n in noise_specs)
    inputs: tuple[Port, ...]
    if graph == "encode":
        inputs = obs + cond + noise
    elif graph == "transition":
        inputs = state + action + cond + noise
    elif graph == "update":
        inputs = state + action + obs + cond + noise
    else:
        inputs = state + cond + noise
    if graph == "decode":
        outputs = tuple(Port(f"pred.{s.name}", s) for s in contract.predictions)
    else:
        # ONNX names are single-assignment: a state output cannot reuse its input's name.
        outputs = tuple(Port(f"new_state.{s.name}", s) for s in contract.state)
    return GraphSignature(full, inputs, outputs, tuple(n.name for n in noise_specs))


def _condition_ports(contract: IOContract) -> tuple[Port, ...]:
    # Every step may read any side condition; the exporter drops those a step leaves unused.
    return tuple(Port(f"{COND}{s.name}", s) for s in contract.conditions)


def without_unused_conditions(sig: GraphSignature, names: Sequence[str]) -> GraphSignature:
    """``sig`` without the ``cond.*`` inputs missing from ``names`` (the graph's real inputs).

    Raises:
        ExportError: ``names`` lacks an input that is not a side condition, or holds one
            ``sig`` does not declare.
    """
    kept = tuple(p for p in sig.inputs if p.name in names or not p.name.startswith(COND))
    if [p.name for p in kept] != list(names):
        raise ExportError(
            f"graph {sig.graph!r} has inputs {list(names)}, expected {sig.input_names}",
            hint="every declared input but a side condition must be used by the step "
            "(unused ones are dropped)",
            graph=sig.graph,
        )
    return dataclasses.replace(sig, inputs=kept)


def rollout_noise(contract: IOContract) -> tuple[NoiseSpec, ...]:
    """Noise consumed by one rollout step: that of ``transition``, then ``decode``'s own."""
    specs = list(contract.noise_for("transition"))
    specs += [n for n in contract.noise_for("decode") if n not in specs]
    return tuple(specs)


def _agent_signature(contract: IOContract, graph: str) -> GraphSignature:
    agent = contract.agent
    if agent is None or agent.graph != graph:
        raise ExportError(
            f"this contract declares no {graph!r} agent step",
            hint="a family declares its agent step as IOContract(agent=AgentSpec(...))",
            graph=graph,
        )
    # The planner starts from an encoded state, the actor from an observation.
    if graph == "act":
        first = tuple(Port(f"obs.{s.name}", s) for s in contract.observations)
    else:
        first = tuple(Port(f"state.{s.name}", s) for s in contract.state)
    carry = tuple(Port(f"carry.{s.name}", s) for s in agent.carry)
    specs = contract.noise_for(graph)
    noise = tuple(Port(f"noise.{n.name}", n.as_tensor_spec()) for n in specs)
    outputs = tuple(Port(f"new_carry.{s.name}", s) for s in agent.carry) + tuple(
        Port(f"out.{s.name}", s) for s in agent.outputs
    )
    inputs = first + carry + _condition_ports(contract) + noise
    return GraphSignature(graph, inputs, outputs, tuple(n.name for n in specs))


def _rollout_signature(
    contract: IOContract, horizon: int | None, *, mode: bool = False
) -> GraphSignature:
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ExportError(
            f"the fused rollout graph needs a horizon >= 1, got {horizon!r}",
            hint="export(..., graphs=(..., 'rollout'), rollout_horizon=16)",
            graph=ROLLOUT,
        )
    if contract.action is None:
        raise ExportError(
            "the fused rollout graph needs an action; this contract declares none",
            graph=ROLLOUT,
        )
    lead = (horizon,)
    state = tuple(Port(f"state.{s.name}", s) for s in contract.state)
    actions = (Port("actions", contract.action, lead),)
    # Side conditions hold for the whole rollout: no time axis, as the torch rollout passes
    # them unchanged to every step.
    cond = _condition_ports(contract)
    specs = () if mode else rollout_noise(contract)
    noise = tuple(Port(f"noise.{n.name}", n.as_tensor_spec(), lead) for n in specs)
    outputs = tuple(Port(f"states.{s.name}", s, lead) for s in contract.state) + tuple(
        Port(f"pred.{s.name}", s, lead) for s in contract.predictions
    )
    name = ROLLOUT + MODE_SUFFIX if mode else ROLLOUT
    return GraphSignature(
        name, state + actions + cond + noise, outputs, tuple(n.name for n in specs), horizon
    )


class GraphModule(nn.Module):
    """One protocol step of ``model`` as a function of flat tensors, for tracing.

    Positional inputs follow ``sig.inputs``; the output tuple follows ``sig.outputs``. Stochastic
    steps run with ``deterministic=False`` and the explicit noise inputs, so the traced graph is a
    deterministic function; a ``<graph>.mode`` signature runs the step with
    ``deterministic=True`` and no noise. The ``rollout`` signature runs the model's own
    ``rollout`` over its ``horizon`` (time-major noise extras, sliced per step by the model).
    ``half`` casts floating inputs to float16 and outputs back to float32.
    """

    def __init__(self, model: nn.Module, sig: GraphSignature, *, half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.sig = sig
        self.cast_half = half

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        named = {}
        for port, value in zip(self.sig.inputs, args, strict=True):
            if self.cast_half and value.is_floating_point():
                value = value.to(torch.float16)
            named[port.name] = value
        out = self._step(named)
        results = []
        for port in self.sig.outputs:
            if port.name not in out:
                raise ExportError(
                    f"{self.sig.graph}() returned no {port.name!r} (got {sorted(out)})",
                    hint="the model's outputs must match its contract",
                    graph=self.sig.graph,
                    output=port.name,
                )
            value = out[port.name]
            want = getattr(torch, port.spec.dtype)
            # Only the half export's float16 results go back to the contract's float dtype:
            # any other disagreement is the model's, and `check_traced_outputs` reports it.
            if self.cast_half and value.dtype == torch.float16 and want.is_floating_point:
                value = value.to(want)
            results.append(value)
        return tuple(results)

    def _step(self, named: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run the step; its outputs keyed by port name."""
        group = _groups(named)
        model: Any = self.model
        graph = self.sig.base
        det = self.sig.deterministic
        conditions = conditions_payload(group["noise"], group["cond"])
        action = named.get("action")
        if graph == "act":
            obs = WorldModelInput(group["obs"], conditions=None)
            result = model.act_step(obs, State(group["carry"]), conditions, det).tensors
            return {**_prefixed("new_carry", result), **_prefixed("out", result)}
        if graph in AGENT_GRAPHS:
            state = State({**group["state"], **group["carry"]})
            result = model.plan_step(state, None, conditions, det).tensors
            return {**_prefixed("new_carry", result), **_prefixed("out", result)}
        if graph == ROLLOUT:
            traj = model.rollout(State(group["state"]), named["actions"], conditions, det)
            states = traj.states[1:]
            out = {
                f"states.{k}": torch.stack([s.tensors[k] for s in states]) for k in group["state"]
            }
            out.update(_prefixed("pred", traj.predictions or {}))
            return out
        if graph == "encode":
            result = model.encode(WorldModelInput(group["obs"], conditions=conditions), det).tensors
        elif graph == "decode":
            return _prefixed("pred", model.decode(State(group["state"]), conditions).predictions)
        elif graph == "transition":
            result = model.transition(State(group["state"]), action, conditions, det).tensors
        else:
            obs = WorldModelInput(group["obs"], conditions=None)
            result = model.update(State(group["state"]), action, obs, conditions, det).tensors
        return _prefixed("new_state", result)


def check_traced_outputs(exported: Any, args: Sequence[Tensor], sig: GraphSignature) -> None:
    """Run the traced graph on its example inputs; raise `ExportError` for the first output
    whose shape or dtype disagrees with the contract.

    The message names the graph (the step), the output, what it produced and what the contract
    declares, with the example batch bound (e.g. a decode output ``[batch, 3, 32, 32]`` where
    the contract says ``[batch, 32, 32, 3]``, or float64 where it says float32).
    """
    batch = int(args[0].shape[sig.inputs[0].batch_axis])
    with torch.no_grad():
        values = exported.module()(*args)
    if isinstance(values, Tensor):
        values = (values,)
    for port, value in zip(sig.outputs, values, strict=True):
        declared = (*port.lead, *port.spec.shape)
        got = tuple(int(d) for d in value.shape)
        dtype = str(value.dtype).removeprefix("torch.")
        bound = {"batch": batch}
        shape_ok = len(got) == len(declared) and all(
            bound.setdefault(d, g) == g if isinstance(d, str) else d == g
            for d, g in zip(declared, got, strict=True)
        )
        if shape_ok and dtype == port.spec.dtype:
            continue
        expected = "[" + ", ".join(str(d) for d in declared) + "]"
        raise ExportError(
            f"graph {sig.graph!r}: the model's {sig.base}() gives output {port.name!r} with shape "
            f"{list(got)} and dtype {dtype}, but the contract declares {expected} {port.spec.dtype}"
            f" (batch={batch})",
            hint="make the step return what its contract declares (layout and dtype), or fix "
            "the contract; the conformance kit (worldflux_registry.testing) checks this",
            graph=sig.graph,
            output=port.name,
        )


def _prefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _groups(named: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {
        "obs": {},
        "state": {},
        "noise": {},
        "cond": {},
        "carry": {},
    }
    for name, value in named.items():
        prefix, _, key = name.partition(".")
        if prefix in out:
            out[prefix][key] = value
    return out


def example_inputs(
    sig: GraphSignature, contract: IOContract, batch: int, seed: int = 0
) -> tuple[Tensor, ...]:
    """Seeded example inputs for ``sig`` (batch ``batch``) from the contract."""
    from worldflux_registry.plugin_api import make_actions, make_noise_tensor, make_tensor

    gen = torch.Generator().manual_seed(seed)
    values: list[Tensor] = []
    for port in sig.inputs:
        lead = (*port.lead, batch)
        if port.name in ("action", "actions"):
            action = make_actions(contract, lead, gen)
            assert action is not None
            values.append(action)
        elif port.name.startswith("noise."):
            values.append(make_noise_tensor(_noise_spec(contract, port.key), lead, gen))
        else:
            values.append(make_tensor(port.spec, lead, gen))
    return tuple(values)


def _noise_spec(contract: IOContract, name: str) -> NoiseSpec:
    return next(n for n in contract.noise if n.name == name)


def check_graphs(graphs: Sequence[str]) -> tuple[str, ...]:
    """Validate and de-duplicate graph names, keeping the canonical order."""
    unknown = [g for g in graphs if g not in KNOWN_GRAPHS]
    if unknown:
        raise ExportError(
            f"unknown graphs {unknown}",
            hint="choose from " + ", ".join(KNOWN_GRAPHS),
            graph=unknown[0],
        )
    return tuple(g for g in KNOWN_GRAPHS if g in graphs)
