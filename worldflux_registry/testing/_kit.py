"""What the conformance checks are built from: one family preset (`Case`), seeded inputs and the
steps run on them (`Steps`), and the comparison of real outputs with the contract."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from ..contract._io import Capability, IOContract, TensorSpec
from ..protocol._payloads import tensor_problems
from ..registry._registry import Registry, registry
from ..state._state import State

__all__ = [
    "EXPORT_PARAMS",
    "SMALL_PARAMS",
    "Case",
    "Steps",
    "assert_outputs_follow_contract",
    "check_tensors",
    "family_presets",
    "output_problems",
    "run_steps",
    "trainable",
]

#: Presets with at most this many parameters are built with real weights and run on CPU; larger
#: ones are built on the meta device, where shapes and dtypes are still checked.
SMALL_PARAMS = 5_000_000
#: Presets with at most this many parameters are also exported to ONNX and checked for parity.
EXPORT_PARAMS = 200_000
BATCH = 3


def family_presets(
    source: Registry = registry, families: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """``(family, preset)`` for every preset of every family ``source`` lists (or of
    ``families`` only)."""
    names = list(families) if families else source.list()
    return [(name, preset) for name in names for preset in source.get(name).presets]


def trainable(model: Any) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Case:
    """One family preset; the model is built on first use (real if small, else on meta)."""

    def __init__(self, family: str, preset: str, source: Registry = registry) -> None:
        self.family, self.preset, self.source = family, preset, source
        self.spec = source.get(family)
        self.config = self.spec.config(preset)
        self.contract = self.spec.contract_for(self.config)

    @functools.cached_property
    def size(self) -> int:
        """Trainable parameters (from the spec's ``param_count``, else counted on meta)."""
        import torch

        if self.spec.param_count is not None:
            return int(self.spec.param_count(self.config))
        with torch.device("meta"):
            return trainable(self.source.build(self.spec, self.config, preset=self.preset))

    @functools.cached_property
    def _built(self) -> tuple[Any, bool]:
        import torch

        torch.manual_seed(0)
        if self.size <= SMALL_PARAMS:
            model = self.source.build(self.spec, self.config, preset=self.preset)
            on_meta = False
        else:
            with torch.device("meta"):
                model = self.source.build(self.spec, self.config, preset=self.preset)
            on_meta = True
        model.validate_outputs = True
        return model, on_meta

    @property
    def model(self) -> Any:
        """The model (outputs validated against the contract on every step)."""
        return self._built[0]

    @property
    def on_meta(self) -> bool:
        """True when the preset is too large to build with real weights here."""
        return self._built[1]

    def small_model(self) -> Any:
        """The real model, or skip the calling test when the preset is checked on meta only."""
        if self.on_meta:
            import pytest

            pytest.skip(
                f"{self.family}:{self.preset} is above {SMALL_PARAMS:,} parameters: "
                "checked on meta only"
            )
        return self.model

    def __repr__(self) -> str:
        return f"Case({self.family}:{self.preset})"


def check_tensors(
    where: str, given: Mapping[str, Any], specs: Iterable[TensorSpec], batch: int = BATCH
) -> list[str]:
    """Problems of ``given`` against ``specs``: key set, dtypes, shapes with ``batch`` bound."""
    specs = list(specs)
    declared = [s.name for s in specs]
    problems = []
    missing = [k for k in declared if k not in given]
    extra = [k for k in given if k not in declared]
    if missing:
        problems.append(f"{where} lacks declared keys {missing}")
    if extra:
        problems.append(f"{where} has undeclared keys {extra}")
    for spec in specs:
        if spec.name in given:
            dims = {"batch": batch}
            problems += tensor_problems(f"{where} {spec.name!r}", given[spec.name], spec, dims)
    return problems


class Steps:
    """Seeded example inputs for one contract and the steps run on them."""

    def __init__(self, model: Any, contract: IOContract, device: Any, seed: int = 0) -> None:
        import torch

        from ..protocol._inputs import make_actions, make_conditions, make_noise, make_observations

        self.model, self.contract, self.device = model, contract, device
        gen = torch.Generator().manual_seed(seed)
        self.obs = make_observations(contract, (BATCH,), gen, device)
        self.next_obs = make_observations(contract, (BATCH,), gen, device)
        self.action = make_actions(contract, (BATCH,), gen, device)
        self.noise = {
            g: make_noise(contract, g, (BATCH,), gen, device)
            for g in ("encode", "transition", "update", "decode")
        }
        # Side conditions (a multi-task model's task ids) go with every call, noise or not.
        self.conds = make_conditions(contract, (BATCH,), gen, device)

    def conditions(self, graph: str, deterministic: bool = False) -> Any:
        """The ``ConditionPayload`` for ``graph`` (its noise unless deterministic), or None."""
        from ..protocol._inputs import noise_conditions

        noise = {} if deterministic else self.noise[graph]
        return noise_conditions(noise, self.conds) if noise or self.conds else None

    def encode(self, deterministic: bool = False) -> State:
        from ..protocol._inputs import encode_input

        noise = {} if deterministic else self.noise["encode"]
        state: State = self.model.encode(encode_input(self.obs, noise, self.conds), deterministic)
        return state

    def transition(self, state: State, deterministic: bool = False) -> State:
        cond = self.conditions("transition", deterministic)
        out: State = self.model.transition(state, self.action, cond, deterministic)
        return out

    def update(self, state: State, deterministic: bool = False) -> State:
        cond = self.conditions("update", deterministic)
        out: State = self.model.update(state, self.action, self.next_obs, cond, deterministic)
        return out

    def decode(self, state: State) -> Any:
        return self.model.decode(state, self.conditions("decode"))


def run_steps(model: Any, contract: IOContract, device: Any) -> dict[str, dict[str, Any]]:
    """Outputs of encode, transition, (update,) decode on seeded inputs, keyed by step."""
    import torch

    steps = Steps(model, contract, device)
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        out["encode"] = steps.encode().tensors
        state = State(dict(out["encode"]))
        out["transition"] = steps.transition(state).tensors
        if model.supports(Capability.UPDATE):
            out["update"] = steps.update(state).tensors
        out["decode"] = steps.decode(State(dict(out["transition"]))).predictions
    return out


def output_problems(outputs: Mapping[str, Mapping[str, Any]], contract: IOContract) -> list[str]:
    """Every way `run_steps` outputs disagree with ``contract``."""
    problems = []
    for step in ("encode", "transition", "update"):
        if step in outputs:
            problems += check_tensors(f"{step}() state", outputs[step], contract.state)
    problems += check_tensors("decode() predictions", outputs["decode"], contract.predictions)
    return problems


def assert_outputs_follow_contract(model: Any, contract: IOContract, device: Any) -> None:
    """Run every step on seeded inputs; fail listing each output that breaks ``contract``."""
    problems = output_problems(run_steps(model, contract, device), contract)
    assert not problems, "\n".join(problems)
