"""`WorldModel`: the protocol every family implements (an ``nn.Module`` and ABC)."""

from __future__ import annotations

import asyncio
import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..contract._family import FamilySpec
from ..contract._io import Capability, IOContract, NoiseSpec, condition_key
from ..contract._locate import locate_family
from ..errors import CapabilityError, ContractError
from ..state._state import State
from ._payloads import (
    ActionPayload,
    ConditionPayload,
    LossOutput,
    ModelOutput,
    Trajectory,
    WorldModelInput,
    squeeze_step_value,
    tensor_problems,
)

__all__ = ["ENV_VALIDATE", "WorldModel"]

#: ``WORLDFLUX_REGISTRY_VALIDATE=1`` turns `WorldModel.validate_outputs` on by default (the test
#: suite sets it), so every step's outputs are checked against the contract.
ENV_VALIDATE = "WORLDFLUX_REGISTRY_VALIDATE"
#: The steps whose outputs `WorldModel.validate_outputs` checks.
CHECKED_STEPS = ("encode", "transition", "update", "decode", "rollout")

_M = TypeVar("_M", bound="WorldModel")

ObsLike = Tensor | Mapping[str, Tensor] | WorldModelInput
ActionLike = Tensor | ActionPayload | None


class WorldModel(nn.Module, ABC):
    """Base class for all world models.

    A family subclasses it, sets ``family`` and ``capabilities``, stores its JSON-serializable
    config in ``self.config`` and implements ``loss`` (the only abstract method, as in
    WorldFlux) and the steps it supports: ``encode``, ``transition`` (whose defaults raise
    `CapabilityError`, also a ``NotImplementedError``), ``decode`` (default: `CapabilityError`)
    and ``update``. Inputs may be plain tensors or protocol payloads; the helpers
    `observations`, `action_tensor` and `noise` normalise them.

    With `validate_outputs` on (``registry.load(ref, validate=True)``, or
    ``WORLDFLUX_REGISTRY_VALIDATE=1``), every step's outputs are checked against the contract
    and a disagreement raises `ContractError` naming the step, the tensor and both layouts.
    """

    #: Family name as registered (used by ``save_pretrained`` and ``io_contract``).
    family: ClassVar[str | None] = None
    #: Capabilities every instance advertises.
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: The `FamilySpec` this model was built from: set by `Registry.build` (so by
    #: ``registry.load``), None for a model instantiated directly.
    family_spec: FamilySpec | None = None
    #: Parameter-name prefixes (state-dict keys, e.g. ``"rew.head"``) of layers that
    #: reduced-precision exports keep in float32: heads whose outputs float32 noise already
    #: strains, such as categorical logits and raw-space two-hot readouts. An int8 ONNX export
    #: leaves their MatMul/Gemm unquantized (cf. ``_keep_in_fp32_modules`` in transformers).
    keep_in_fp32: ClassVar[tuple[str, ...]] = ()
    #: Check every step's outputs against the contract (`ContractError` on a disagreement).
    #: Default: on when ``WORLDFLUX_REGISTRY_VALIDATE=1``; ``registry.load(..., validate=True)``
    #: sets it per model.
    validate_outputs: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.preset: str | None = None
        self._contract_cache: IOContract | None = None
        self.validate_outputs = os.environ.get(ENV_VALIDATE, "") not in ("", "0")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each step a subclass defines is wrapped once, so validate_outputs sees its results
        # whoever implements it (a family, the ONNX backend).
        for step in CHECKED_STEPS:
            fn = cls.__dict__.get(step)
            if callable(fn) and not getattr(fn, "_wf_checked", False):
                setattr(cls, step, _checked(step, fn))

    @classmethod
    def from_config(cls: type[_M], config: Mapping[str, Any]) -> _M:
        """Build a model from a full config mapping (default: ``cls(**config)``)."""
        return cls(**config)

    # -- capabilities ------------------------------------------------------------------------
    def supports(self, capability: Capability | str) -> bool:
        """Return True if the model advertises a capability."""
        return Capability.parse(capability) in self.capabilities

    def require(self, capability: Capability | str, message: str | None = None) -> None:
        """Raise `CapabilityError` if the model does not support a capability."""
        cap = Capability.parse(capability)
        if cap not in self.capabilities:
            name = type(self).__name__
            raise CapabilityError(
                message or f"{name} does not support {cap.value!r}",
                hint="supported: " + ", ".join(sorted(c.value for c in self.capabilities)),
                family=self.family,
            )

    # -- contract ----------------------------------------------------------------------------
    def io_contract(self) -> IOContract:
        """Return runtime I/O contract.

        The default asks the family spec for the contract of ``self.config``, once: the spec
        is `family_spec` when the registry built the model, else the process-wide registry's
        entry for `family`. Override it only when the contract comes from elsewhere (an ONNX
        backend reads it from its manifest).

        Raises:
            ContractError: the class declares no ``family`` and was not built by a registry.
            ResolutionError: ``family`` is not registered (install the distribution providing
                it, or build the model with ``registry.load``).
        """
        if self._contract_cache is None:
            spec = self.family_spec
            if spec is None:
                if self.family is None:
                    raise ContractError(
                        f"{type(self).__name__} declares no family and does not override "
                        "io_contract()",
                        hint="set the class attribute 'family' or override io_contract()",
                    )
                spec = locate_family(self.family)
            self._contract_cache = spec.contract_for(self.config)
        return self._contract_cache

    def contract_fingerprint(self) -> str:
        """Return a stable fingerprint for this model's declared IO contract."""
        return self.io_contract().fingerprint()

    def validate_state_contract(self, state: State) -> None:
        """Validate state tensor keys/shapes against model I/O contract.

        Raises `ContractError` listing every missing or unexpected key and every tensor whose
        shape or dtype disagrees with the contract.
        """
        contract = self.io_contract()
        problems = _key_problems("state", state.tensors, contract.state_keys)
        dims: dict[str, int] = {}
        for spec in contract.state:
            if spec.name in state.tensors:
                where = f"state {spec.name!r}"
                problems += tensor_problems(where, state.tensors[spec.name], spec, dims)
        if problems:
            raise ContractError("; ".join(problems), hint="compare with io_contract().state")

    def validate_batch_contract(self, batch: Mapping[str, Tensor]) -> None:
        """Validate batch keys/layouts against model I/O contract.

        A training batch maps each observation name, ``"action"`` and each target name to a
        tensor laid out ``[batch, time, ...]`` (the contract's per-step shape with a time axis
        after the batch axis). Integer labels of a ``kind="discrete"`` tensor (such as a
        discrete action) must lie in ``[0, classes)``. Raises `ContractError` listing every
        problem.
        """
        contract = self.io_contract()
        specs = list(contract.observations) + list(contract.targets)
        if contract.action is not None:
            specs.append(contract.action)
        problems = _key_problems("batch", batch, [s.name for s in specs])
        dims: dict[str, int] = {}
        for spec in specs:
            if spec.name in batch:
                timed = type(spec)(**{**spec.__dict__, "shape": ("batch", "time", *spec.shape[1:])})
                found = tensor_problems(f"batch {spec.name!r}", batch[spec.name], timed, dims)
                problems += found or _label_problems(f"batch {spec.name!r}", batch[spec.name], spec)
        if problems:
            raise ContractError("; ".join(problems), hint="lay batches out [batch, time, ...]")

    # -- input normalisation -----------------------------------------------------------------
    def observations(self, obs: ObsLike) -> tuple[dict[str, Tensor], ConditionPayload | None]:
        """Normalise ``obs`` to ``(name -> tensor, conditions)``.

        A bare tensor is taken as the only declared observation; a `WorldModelInput` also
        carries conditions (such as ``encode`` noise).
        """
        conditions = None
        if isinstance(obs, WorldModelInput):
            conditions = obs.conditions
            obs = obs.observations
        if isinstance(obs, Mapping):
            return dict(obs), conditions
        names = self.io_contract().observation_names
        if len(names) != 1:
            raise ContractError(
                f"a bare tensor was given but the contract declares observations {names}",
                hint="pass a dict keyed by observation name",
            )
        return {names[0]: obs}, conditions

    def action_tensor(self, action: ActionLike) -> Tensor | None:
        """The tensor of an action given as a tensor or an `ActionPayload`.

        Where the contract's action is an integer dtype, integer tensors of another width are
        cast to it (int32 labels for an int64 contract). With `validate_outputs` on, labels of
        a ``kind="discrete"`` action are checked against its ``classes``.
        """
        if action is None:
            return None
        if isinstance(action, ActionPayload):
            action.validate(api_version=self.io_contract().api_version)
            value = action.primary()
            if value is None and action.kind != "none":
                raise ContractError(
                    f"action payload of kind {action.kind!r} holds no tensor",
                    hint="this model takes tensor actions",
                )
            if value is None:
                return None
            action = value
        if not isinstance(action, Tensor):
            raise ContractError(
                f"action must be a Tensor or ActionPayload, got {type(action).__name__}"
            )
        spec = self.io_contract().action
        if spec is None:
            return action
        want = getattr(torch, spec.dtype)
        integer = not (want.is_floating_point or want.is_complex or want == torch.bool)
        if integer and action.dtype != want and _is_integer(action.dtype):
            action = action.to(want)
        if self.validate_outputs:
            problems = _label_problems("action", action, spec)
            if problems:
                raise ContractError(problems[0], hint=f"labels of {spec.name!r} are 0..classes-1")
        return action

    def condition(self, name: str, conditions: ConditionPayload | None) -> Tensor | None:
        """The side condition ``name`` from ``conditions`` (extra ``wf.cond.<name>``), checked
        against its contract spec; None when the caller passed none.

        Raises:
            ContractError: ``name`` is not a declared condition, or the value is not a tensor
                of the declared dtype and shape.
        """
        contract = self.io_contract()
        spec = next((c for c in contract.conditions if c.name == name), None)
        if spec is None:
            declared = [c.name for c in contract.conditions]
            raise ContractError(
                f"{name!r} is not a declared side condition (declared: {declared})",
                hint="declare it in the contract's conditions",
            )
        key = condition_key(name)
        given = None if conditions is None else conditions.extras.get(key)
        if given is None:
            return None
        problems = tensor_problems(f"condition {key!r}", given, spec)
        if problems:
            raise ContractError(problems[0], hint=f"pass ConditionPayload({{{key!r}: tensor}})")
        return given  # type: ignore[no-any-return]

    def noise(
        self,
        name: str,
        conditions: ConditionPayload | None,
        batch: int,
        *,
        device: torch.device | None = None,
    ) -> Tensor:
        """The noise tensor ``name``: from ``conditions`` (``wf.noise.<name>``) when given,
        otherwise sampled from torch's generator as the contract declares it."""
        spec = _noise_spec(self.io_contract(), name)
        given = None if conditions is None else conditions.extras.get(spec.condition_key)
        shape = spec.as_tensor_spec().concrete_shape(batch=batch)
        if given is not None:
            if not isinstance(given, Tensor):
                raise ContractError(
                    f"noise {spec.condition_key!r} is a {type(given).__name__}, not a tensor"
                )
            if tuple(given.shape) != shape:
                raise ContractError(
                    f"noise {spec.condition_key!r} has shape {tuple(given.shape)}, expected {shape}"
                )
            return given
        from ._inputs import sample_noise

        return sample_noise(spec, shape, device=device)

    def check_step_output(self, step: str, output: Any) -> None:
        """Check what ``step`` returned against the contract; raise `ContractError` if it
        disagrees (what `validate_outputs` runs after every step).

        ``encode`` / ``transition`` / ``update`` must return a `State` holding exactly the
        contract's state keys, ``decode`` a `ModelOutput` with exactly its predictions, and
        ``rollout`` a `Trajectory` whose stacked predictions are ``[T, batch, ...]``; each
        tensor with the declared dtype and shape (``batch`` the same throughout). Outputs being
        traced by ``torch.export`` (symbolic shapes) are not checked.
        """
        contract = self.io_contract()
        problems: list[str] = []
        if step == "decode":
            if not isinstance(output, ModelOutput):
                problems.append(f"returned {type(output).__name__}, not a ModelOutput")
            else:
                problems = _outputs_problems("prediction", output.predictions, contract.predictions)
        elif step == "rollout":
            if not isinstance(output, Trajectory):
                problems.append(f"returned {type(output).__name__}, not a Trajectory")
            else:
                steps = output.horizon
                timed = [_timed(s, steps) for s in contract.predictions]
                problems = _outputs_problems("prediction", output.predictions or {}, timed)
        elif not isinstance(output, State):
            problems.append(f"returned {type(output).__name__}, not a State")
        else:
            problems = _outputs_problems("state", output.tensors, contract.state)
        if problems:
            raise ContractError(
                f"{type(self).__name__}.{step}() breaks its contract: " + "; ".join(problems),
                hint="the step's outputs must have the declared keys, dtypes and shapes "
                "(validate_outputs is on)",
                family=self.family,
                graph=step,
            )

    # -- the protocol ------------------------------------------------------------------------
    def encode(self, obs: ObsLike, deterministic: bool = False) -> State:
        """Encode observation to latent state.

        Raises:
            CapabilityError: the family does not implement ``encode`` (also a
                ``NotImplementedError``, as WorldFlux raises).
        """
        raise _NotImplementedStep(
            f"{type(self).__name__}.encode(...) is not implemented", family=self.family
        )

    def transition(
        self,
        state: State,
        action: ActionLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Predict next state (prior/imagination).

        Raises:
            CapabilityError: the family does not implement ``transition`` (also a
                ``NotImplementedError``, as WorldFlux raises).
        """
        raise _NotImplementedStep(
            f"{type(self).__name__}.transition(...) is not implemented", family=self.family
        )

    def update(
        self,
        state: State,
        action: ActionLike,
        obs: ObsLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Update state with observation (posterior).

        ``deterministic`` is an addition to the seed signature (last, optional): it asks for the
        mode instead of a sample, as every other step allows.
        """
        raise CapabilityError(
            f"{type(self).__name__} does not implement update()", family=self.family
        )

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Decode latent state to predictions.

        Raises:
            CapabilityError: the family does not implement ``decode`` (as WorldFlux raises
                for a model without a decoder).
        """
        raise CapabilityError(
            f"{type(self).__name__} does not expose a decoder (decode is not implemented)",
            family=self.family,
        )

    async def async_encode(self, obs: ObsLike, deterministic: bool = False) -> State:
        """Asynchronous non-blocking variant of encode."""
        return await asyncio.to_thread(self.encode, obs, deterministic)

    async def async_transition(
        self,
        state: State,
        action: ActionLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Asynchronous non-blocking variant of transition."""
        return await asyncio.to_thread(self.transition, state, action, conditions, deterministic)

    async def async_decode(
        self, state: State, conditions: ConditionPayload | None = None
    ) -> ModelOutput:
        """Asynchronous non-blocking variant of decode."""
        return await asyncio.to_thread(self.decode, state, conditions)

    def plan_step(
        self,
        state: State,
        action: ActionLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Optional planner hook. Default delegates to transition()."""
        return self.transition(state, action, conditions, deterministic)

    def act_step(
        self,
        obs: ObsLike,
        carry: State | None = None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """One agent step from an observation: what a deployer calls once per environment step.

        The contract's `AgentSpec` with ``graph="act"`` declares it (exported as the ``act``
        graph). ``carry`` holds the `AgentSpec.carry` tensors the previous call returned (a
        missing one, or ``carry=None``, is zeros: the first step of an episode; zero the rows of
        environments that start a new episode). Noise comes from ``wf.noise.<name>`` extras of
        ``conditions`` (a missing one is drawn from torch's generator); ``deterministic=True``
        takes the mode, as zeros for the agent's exploration noise (`AgentSpec.explore`) do.
        Returns the new carry and the agent's outputs (`AgentSpec.outputs`, among them the
        action) in one `State`. (Not named ``act``: a base-class method of that name would
        shadow the ``self.act = nn.SiLU()`` submodules that families commonly hold.)

        Raises:
            CapabilityError: the family declares no ``act`` agent step (families that act by
                planning on an encoded state implement `plan_step`).
        """
        raise CapabilityError(
            f"{type(self).__name__} does not implement act_step()",
            hint="a family that plans on an encoded state acts through plan_step()",
            family=self.family,
        )

    def sample_step(
        self,
        state: State,
        action: ActionLike = None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> ModelOutput:
        """Optional sampler hook for generative families.

        If an action is provided, transition first then decode. Otherwise decode state.
        """
        if action is not None:
            state = self.transition(state, action, conditions, deterministic)
        output = self.decode(state, conditions)
        output.state = state
        return output

    def teacher_forcing_step(
        self,
        state: State,
        action: ActionLike,
        obs: ObsLike,
        conditions: ConditionPayload | None = None,
    ) -> State:
        """Optional training hook. Default delegates to update()."""
        return self.update(state, action, obs, conditions)

    def rollout(
        self,
        initial_state: State,
        action_sequence: Tensor | ActionPayload,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        mode: str = "autoregressive",
    ) -> Trajectory:
        """Default rollout implementation using transition + decode.

        ``action_sequence`` is laid out ``[T, batch, ...]``. Noise extras in ``conditions`` may
        carry a leading time axis (``[T, *noise shape]``): step ``t`` then gets slice ``t``.
        Returns a `Trajectory` with every prediction stacked over steps (``[T, batch, ...]``),
        plus ``rewards`` and ``continues`` ``[T, batch]`` when the contract predicts ``reward``
        and ``continue`` (a per-step ``[batch, 1]`` is squeezed, as in WorldFlux).
        """
        if mode != "autoregressive":
            raise CapabilityError(
                f"rollout mode {mode!r} is not supported by {type(self).__name__}",
                hint="use mode='autoregressive'",
            )
        actions = self.action_tensor(action_sequence)
        if actions is None:
            raise ContractError("rollout needs an action sequence [T, batch, ...]")
        contract = self.io_contract()
        states = [initial_state]
        outputs: list[dict[str, Tensor]] = []
        state = initial_state
        for t in range(int(actions.shape[0])):
            step_conditions = step_slice(contract, conditions, t)
            state = self.transition(state, actions[t], step_conditions, deterministic)
            states.append(state)
            outputs.append(self.decode(state, step_conditions).predictions)
        predictions = (
            {k: torch.stack([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
        )
        return Trajectory(
            states=states,
            actions=actions,
            rewards=squeeze_step_value(predictions.get("reward")),
            continues=squeeze_step_value(predictions.get("continue")),
            predictions=predictions,
        )

    async def async_rollout(
        self,
        initial_state: State,
        action_sequence: Tensor | ActionPayload,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        mode: str = "autoregressive",
    ) -> Trajectory:
        """Asynchronous non-blocking variant of rollout."""
        return await asyncio.to_thread(
            self.rollout, initial_state, action_sequence, conditions, deterministic, mode
        )

    @abstractmethod
    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """Compute training loss."""

    def save_pretrained(self, path: str | Path) -> Path:
        """Save model weights and config using a unified directory layout.

        Writes ``config.json`` and ``model.safetensors`` atomically (temporary sibling
        directory, then rename). Returns the directory.
        """
        from ..checkpoint._format import save_pretrained

        saved: Path = save_pretrained(self, path)
        return saved


class _NotImplementedStep(CapabilityError, NotImplementedError):
    """A protocol step the family does not implement: WorldFlux raises NotImplementedError."""


def _checked(step: str, fn: Any) -> Any:
    """``fn`` (a step) followed by `WorldModel.check_step_output` when validation is on."""

    @functools.wraps(fn)
    def step_with_check(self: WorldModel, *args: Any, **kwargs: Any) -> Any:
        output = fn(self, *args, **kwargs)
        if self.validate_outputs and not _traced(output):
            self.check_step_output(step, output)
        return output

    step_with_check._wf_checked = True  # type: ignore[attr-defined]
    return step_with_check


# The base class's own rollout is checked too (subclasses' steps are wrapped as they are defined).
WorldModel.rollout = _checked("rollout", WorldModel.rollout)  # type: ignore[method-assign]


def _traced(output: Any) -> bool:
    """True when ``output`` holds tensors with symbolic shapes (``torch.export`` tracing)."""
    if isinstance(output, State):
        tensors: Any = output.tensors.values()
    elif isinstance(output, ModelOutput):
        tensors = output.predictions.values()
    elif isinstance(output, Trajectory):
        tensors = (output.predictions or {}).values()
    else:
        return False
    return (
        any(not isinstance(d, int) for t in tensors for d in getattr(t, "shape", ()))
        or torch.compiler.is_compiling()
    )


def _timed(spec: Any, steps: int) -> Any:
    return type(spec)(**{**spec.__dict__, "shape": (steps, *spec.shape)})


def _outputs_problems(what: str, given: Mapping[str, Any], specs: Any) -> list[str]:
    specs = list(specs)
    problems = _key_problems(f"{what}s", given, [s.name for s in specs])
    dims: dict[str, int] = {}
    for spec in specs:
        if spec.name in given:
            problems += tensor_problems(f"{what} {spec.name!r}", given[spec.name], spec, dims)
    return problems


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _label_problems(where: str, value: Any, spec: Any) -> list[str]:
    """Labels of a ``kind="discrete"`` tensor outside ``[0, classes)`` (none on meta)."""
    if spec.kind != "discrete" or spec.classes is None or not isinstance(value, Tensor):
        return []
    if value.device.type == "meta" or value.numel() == 0 or not _is_integer(value.dtype):
        return []
    low, high = int(value.min()), int(value.max())
    if low >= 0 and high < spec.classes:
        return []
    bad = high if high >= spec.classes else low
    return [f"{where} holds label {bad}, outside 0..{spec.classes - 1} ({spec.classes} classes)"]


def _key_problems(where: str, given: Mapping[str, Any], declared: Any) -> list[str]:
    declared = list(declared)
    problems = []
    missing = [k for k in declared if k not in given]
    unexpected = [k for k in given if k not in declared]
    if missing:
        problems.append(f"{where} is missing keys {missing}")
    if unexpected:
        problems.append(f"{where} has unexpected keys {unexpected}")
    return problems


def _noise_spec(contract: IOContract, name: str) -> NoiseSpec:
    for spec in contract.noise:
        if spec.name == name:
            return spec
    raise ContractError(
        f"noise {name!r} is not declared in the contract",
        hint="declared noise: " + (", ".join(n.name for n in contract.noise) or "none"),
    )


def step_slice(
    contract: IOContract, conditions: ConditionPayload | None, t: int
) -> ConditionPayload | None:
    """Conditions for rollout step ``t``: noise extras with a leading time axis are sliced."""
    if conditions is None:
        return None
    ranks = {n.condition_key: len(n.shape) for n in contract.noise}
    extras = {}
    for key, value in conditions.extras.items():
        rank = ranks.get(key)
        if rank is not None and isinstance(value, Tensor) and value.dim() == rank + 1:
            if value.shape[0] <= t:
                raise ContractError(
                    f"noise {key!r} has {value.shape[0]} time steps; rollout step {t + 1} "
                    "needs one more",
                    hint="give time-major noise [T, batch, ...] for every step of the rollout",
                )
            value = value[t]
        extras[key] = value
    return conditions.replace_extras(extras)
