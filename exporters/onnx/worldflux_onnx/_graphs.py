"""Graph signatures and flat-tensor wrappers derived from a contract (no per-family code)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from worldflux_registry._contract import IOContract, TensorSpec
from worldflux_registry._inputs import noise_conditions
from worldflux_registry._payloads import WorldModelInput
from worldflux_registry._state import State
from worldflux_registry.errors import ExportError

__all__ = ["ALL_GRAPHS", "MODE_SUFFIX", "GraphModule", "GraphSignature", "Port", "signature"]

#: Graphs the exporter knows, in the order they are written.
ALL_GRAPHS = ("encode", "transition", "update", "decode")
#: ``<graph>.mode`` is the deterministic variant of a stochastic graph: the step with
#: ``deterministic=True`` (the distribution's mode), without noise inputs.
MODE_SUFFIX = ".mode"
#: Graphs whose protocol step takes ``deterministic`` (``decode`` does not).
MODE_GRAPHS = ("encode", "transition", "update")


@dataclass(frozen=True)
class Port:
    """One named graph input or output.

    Inputs are ``obs.<name>``, ``state.<key>``, ``action`` and ``noise.<name>``; outputs are
    ``new_state.<key>`` (encode, transition, update) or ``pred.<key>`` (decode).
    """

    name: str
    spec: TensorSpec

    @property
    def key(self) -> str:
        """The name without its group prefix (the contract's name)."""
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    def to_dict(self) -> dict[str, Any]:
        """Manifest form: name, dtype and symbolic shape."""
        return {"name": self.name, "dtype": self.spec.dtype, "shape": list(self.spec.shape)}


@dataclass(frozen=True)
class GraphSignature:
    """Inputs, outputs and noise of one graph."""

    graph: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    noise: tuple[str, ...]

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


def signature(contract: IOContract, graph: str) -> GraphSignature:
    """The flat signature of ``graph`` (or of its ``<graph>.mode`` variant) under ``contract``."""
    mode = graph.endswith(MODE_SUFFIX)
    full = graph
    graph = graph.removesuffix(MODE_SUFFIX)
    if graph not in ALL_GRAPHS or (mode and graph not in MODE_GRAPHS):
        raise ExportError(
            f"unknown graph {full!r}",
            hint="graphs: " + ", ".join([*ALL_GRAPHS, *(g + MODE_SUFFIX for g in MODE_GRAPHS)]),
            graph=full,
        )
    obs = tuple(Port(f"obs.{s.name}", s) for s in contract.observations)
    state = tuple(Port(f"state.{s.name}", s) for s in contract.state)
    action = (Port("action", contract.action),) if contract.action is not None else ()
    noise_specs = () if mode else contract.noise_for(graph)
    noise = tuple(Port(f"noise.{n.name}", n.as_tensor_spec()) for n in noise_specs)
    inputs: tuple[Port, ...]
    if graph == "encode":
        inputs = obs + noise
    elif graph == "transition":
        inputs = state + action + noise
    elif graph == "update":
        inputs = state + action + obs + noise
    else:
        inputs = state + noise
    if graph == "decode":
        outputs = tuple(Port(f"pred.{s.name}", s) for s in contract.predictions)
    else:
        # ONNX names are single-assignment: a state output cannot reuse its input's name.
        outputs = tuple(Port(f"new_state.{s.name}", s) for s in contract.state)
    return GraphSignature(full, inputs, outputs, tuple(n.name for n in noise_specs))


class GraphModule(nn.Module):
    """One protocol step of ``model`` as a function of flat tensors, for tracing.

    Positional inputs follow ``sig.inputs``; the output tuple follows ``sig.outputs``. Stochastic
    steps run with ``deterministic=False`` and the explicit noise inputs, so the traced graph is a
    deterministic function; a ``<graph>.mode`` signature runs the step with
    ``deterministic=True`` and no noise. ``half`` casts floating inputs to float16 and outputs
    back to float32.
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
            if port.key not in out:
                raise ExportError(
                    f"{self.sig.graph}() returned no {port.name!r} (got {sorted(out)})",
                    hint="the model's outputs must match its contract",
                    graph=self.sig.graph,
                    output=port.name,
                )
            value = out[port.key]
            want = getattr(torch, port.spec.dtype)
            if value.dtype != want:
                value = value.to(want)
            results.append(value)
        return tuple(results)

    def _step(self, named: dict[str, Tensor]) -> dict[str, Tensor]:
        group = _groups(named)
        model: Any = self.model
        graph = self.sig.base
        det = self.sig.deterministic
        conditions = noise_conditions(group["noise"]) if group["noise"] else None
        action = named.get("action")
        if graph == "encode":
            return dict(model.encode(WorldModelInput(group["obs"], conditions), det).tensors)
        state = State(group["state"])
        if graph == "transition":
            return dict(model.transition(state, action, conditions, det).tensors)
        if graph == "update":
            return dict(
                model.update(
                    state, action, WorldModelInput(group["obs"], None), conditions, det
                ).tensors
            )
        return dict(model.decode(state, conditions).predictions)


def _groups(named: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {"obs": {}, "state": {}, "noise": {}}
    for name, value in named.items():
        prefix, _, key = name.partition(".")
        if prefix in out:
            out[prefix][key] = value
    return out


def example_inputs(
    sig: GraphSignature, contract: IOContract, batch: int, seed: int = 0
) -> tuple[Tensor, ...]:
    """Seeded example inputs for ``sig`` (batch ``batch``) from the contract."""
    from worldflux_registry._inputs import make_actions, make_noise, make_tensor

    gen = torch.Generator().manual_seed(seed)
    noise = make_noise(contract, sig.base, (batch,), gen) if sig.noise else {}
    values: list[Tensor] = []
    for port in sig.inputs:
        if port.name == "action":
            action = make_actions(contract, (batch,), gen)
            assert action is not None
            values.append(action)
        elif port.name.startswith("noise."):
            values.append(noise[port.key])
        else:
            values.append(make_tensor(port.spec, (batch,), gen))
    return tuple(values)


def check_graphs(graphs: Sequence[str]) -> tuple[str, ...]:
    """Validate and de-duplicate graph names, keeping the canonical order."""
    unknown = [g for g in graphs if g not in ALL_GRAPHS]
    if unknown:
        raise ExportError(
            f"unknown graphs {unknown}",
            hint="choose from " + ", ".join(ALL_GRAPHS),
            graph=unknown[0],
        )
    return tuple(g for g in ALL_GRAPHS if g in graphs)
