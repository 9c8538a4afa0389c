"""Payload containers of the protocol: actions, conditions, inputs, outputs, losses, trajectories.

Importing this module does not import torch: tensors are handled by duck typing (``.shape``,
``.dtype``), so the types can be named and constructed in torch-free code.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import ItemsView, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._dims import dim
from ..errors import ContractError, ShapeMismatchError, StateError

if TYPE_CHECKING:
    from torch import Tensor

    from ..contract._io import TensorSpec
    from ..state._state import State

__all__ = [
    "ActionPayload",
    "ConditionPayload",
    "LossOutput",
    "ModelOutput",
    "Trajectory",
    "WorldModelInput",
]

#: ``api_version`` values the payloads accept. ``"v3"`` is WorldFlux's strict mode: what warns
#: (a `DeprecationWarning`) under ``v0.1`` / ``v0.2`` raises `ContractError` under ``v3``.
SUPPORTED_API_VERSIONS = ("v0.1", "v0.2", "v3")
ACTION_KINDS = ("none", "continuous", "discrete", "token", "latent", "text", "hybrid")
#: Fields that may carry each kind's value: WorldFlux's ``tensor`` first, then the kind's own.
_ACCEPTS = {
    "continuous": ("tensor",),
    "discrete": ("tensor", "discrete"),
    "token": ("tokens", "tensor"),
    "latent": ("latent", "tensor"),
    "text": ("text",),
}
_PRIMARY_FIELDS = ("tensor", "tokens", "latent", "text", "discrete")
#: ``wf.<domain>.<name>`` (WorldFlux's pattern: letters, digits, ``_`` and ``-``; the name may
#: hold further dots).
EXTRA_KEY = re.compile(r"^wf\.[a-zA-Z0-9_-]+\.[a-zA-Z0-9_.-]+$")


def _check_api_version(api_version: str) -> None:
    if api_version not in SUPPORTED_API_VERSIONS:
        raise ContractError(
            f"unsupported api_version {api_version!r}",
            hint="supported: " + ", ".join(SUPPORTED_API_VERSIONS),
        )


def _deprecated(message: str, api_version: str, *, strict: bool = False) -> None:
    """Warn (`DeprecationWarning`), or raise `ContractError` when ``strict`` or under ``v3``."""
    if strict or api_version == "v3":
        raise ContractError(message)
    warnings.warn(message, DeprecationWarning, stacklevel=3)


@dataclass
class ActionPayload:
    """Polymorphic action container that supports multiple control modalities.

    The fields and their order are WorldFlux's (``kind``, ``tensor``, ``tokens``, ``latent``,
    ``text``, ``extras``), then this project's ``discrete`` (integer labels ``[batch]``; WorldFlux
    passes those as ``tensor`` with ``kind="discrete"``, which works here too). ``kind`` says
    what the value is: ``continuous`` (``tensor``), ``discrete`` (``tensor`` or ``discrete``),
    ``token`` (``tokens`` or ``tensor``), ``latent`` (``latent`` or ``tensor``), ``text``
    (``text``), ``none``, or the deprecated ``hybrid``. ``extras`` carries
    ``wf.<domain>.<name>`` keyed data.
    """

    kind: str = "none"
    tensor: Tensor | None = None
    tokens: Tensor | None = None
    latent: Tensor | None = None
    text: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    discrete: Tensor | None = None

    def primary(self) -> Any:
        """The first of ``tensor``, ``tokens``, ``latent`` that is set (WorldFlux's order),
        else ``discrete``; None when none is (``text`` is not a primary tensor)."""
        for name in ("tensor", "tokens", "latent", "discrete"):
            value = getattr(self, name)
            if value is not None:
                return value
        return None

    def validate(self, *, api_version: str = "v0.2") -> ActionPayload:
        """Validate payload consistency; return self.

        ``kind="hybrid"`` and extras keys that are not ``wf.<domain>.<name>`` are deprecated:
        a `DeprecationWarning`, an error under ``api_version="v3"``.

        Raises:
            ContractError: an unknown kind, more than one primary field set, a value in a field
                that ``kind`` does not take (any value for ``kind="none"``), an unsupported
                ``api_version``, or (under ``v3``) a deprecated use.
        """
        _check_api_version(api_version)
        if self.kind not in ACTION_KINDS:
            raise ContractError(
                f"unknown action kind {self.kind!r}", hint="use one of " + ", ".join(ACTION_KINDS)
            )
        if self.kind == "hybrid":
            _deprecated(
                "ActionPayload.kind='hybrid' is deprecated in v0.2 and will be removed in v0.3",
                api_version,
            )
        present = [f for f in _PRIMARY_FIELDS if getattr(self, f) is not None]
        if len(present) > 1:
            raise ContractError(
                f"action payload sets several primary fields {present}",
                hint="set exactly one of tensor, tokens, latent, text (or discrete)",
            )
        if self.kind == "none" and present:
            raise ContractError(f"action kind 'none' but field {present[0]!r} is set")
        accepts = _ACCEPTS.get(self.kind)
        if accepts is not None and present and present[0] not in accepts:
            raise ContractError(
                f"action kind {self.kind!r} takes field {' or '.join(accepts)}, got {present[0]!r}"
            )
        bad = [k for k in self.extras if not EXTRA_KEY.match(k)]
        if bad:
            _deprecated(
                f"ActionPayload.extras keys {bad} should follow the namespaced format "
                "'wf.<domain>.<name>'",
                api_version,
            )
        return self


@dataclass
class ConditionPayload:
    """Optional side-conditions for conditional world modeling.

    WorldFlux's named fields ``text_condition``, ``goal``, ``spatial`` and ``camera_pose``
    (carried as given, for the families that read them), and ``extras``, mapping
    ``wf.<domain>.<name>`` keys to tensors or values. Side conditions declared in a contract
    travel in ``extras`` as ``wf.cond.<name>``, noise for stochastic steps as
    ``wf.noise.<name>`` (see `NoiseSpec`).

    A mapping passed as the first positional argument is taken as ``extras``
    (``ConditionPayload({"wf.cond.task": ids})``, this project's earlier form): a mapping is
    never a text condition.
    """

    text_condition: Tensor | list[str] | None = None
    goal: Tensor | None = None
    spatial: Tensor | None = None
    camera_pose: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.text_condition, Mapping):
            if self.extras:
                raise ContractError(
                    "ConditionPayload got a mapping as text_condition and extras too",
                    hint="pass the extras once, as extras={...}",
                )
            self.extras, self.text_condition = dict(self.text_condition), None

    def get(self, key: str, default: Any = None) -> Any:
        """The extra under ``key``, or ``default``."""
        return self.extras.get(key, default)

    def replace_extras(self, extras: Mapping[str, Any]) -> ConditionPayload:
        """A copy with the named fields kept and ``extras`` replaced."""
        return ConditionPayload(
            text_condition=self.text_condition,
            goal=self.goal,
            spatial=self.spatial,
            camera_pose=self.camera_pose,
            extras=dict(extras),
        )

    def validate(
        self,
        *,
        strict: bool = False,
        allowed_extra_keys: set[str] | frozenset[str] | None = None,
        extra_schema: Mapping[str, Mapping[str, Any] | TensorSpec] | None = None,
        api_version: str = "v0.2",
    ) -> list[str]:
        """Validate condition extras naming and optional allow-list contract.

        Problems: a key not ``wf.<domain>.<name>``, a key outside ``allowed_extra_keys``, a
        tensor that disagrees with ``extra_schema``. A schema entry is WorldFlux's plain dict
        (``{"dtype": "float32", "shape": [3]}``: the dtype, and the trailing dims) or a
        `TensorSpec` (dtype, rank and every non-symbolic dim). Values that are not tensors are
        not checked against the schema. Each problem raises `ContractError` when ``strict`` or
        under ``api_version="v3"``, else is reported with a `DeprecationWarning`, as in
        WorldFlux. Returns the list of problems found (WorldFlux returns None).
        """
        _check_api_version(api_version)
        problems: list[str] = []
        for key, value in self.extras.items():
            if not EXTRA_KEY.match(key):
                problems.append(f"condition key {key!r} is not namespaced 'wf.<domain>.<name>'")
                continue
            if allowed_extra_keys is not None and key not in allowed_extra_keys:
                allowed = ", ".join(sorted(allowed_extra_keys)) or "none"
                problems.append(f"condition key {key!r} is not allowed (allowed: {allowed})")
                continue
            spec = (extra_schema or {}).get(key)
            if spec is None or getattr(value, "shape", None) is None:
                continue
            if isinstance(spec, Mapping):
                problems.extend(_schema_problems(f"condition {key!r}", value, spec))
            else:
                problems.extend(tensor_problems(f"condition {key!r}", value, spec))
        if problems:
            if strict or api_version == "v3":
                raise ContractError("; ".join(problems), hint="fix the condition extras")
            for problem in problems:
                warnings.warn(problem, DeprecationWarning, stacklevel=2)
        return problems


def _schema_problems(where: str, value: Any, schema: Mapping[str, Any]) -> list[str]:
    """WorldFlux's dict schema: ``dtype`` must match, ``shape`` gives the trailing dims."""
    problems = []
    dtype = schema.get("dtype")
    if dtype is not None and dtype_name(value) != str(dtype).removeprefix("torch."):
        problems.append(f"{where} has dtype {dtype_name(value)}, expected {dtype}")
    shape = schema.get("shape")
    if shape:
        tail = tuple(int(d) for d in shape)
        got = tuple(dim(d) for d in value.shape)
        if len(got) < len(tail):
            problems.append(f"{where} has rank {len(got)}, expected at least {len(tail)}")
        elif got[len(got) - len(tail) :] != tail:
            problems.append(
                f"{where} has trailing dims {got[len(got) - len(tail) :]}, expected {tail}"
            )
    return problems


@dataclass
class WorldModelInput:
    """Unified model input object: observations and what goes with them.

    WorldFlux's fields, in its order and with its defaults: ``observations`` (name -> tensor),
    ``context`` (name -> tensor, carried for the families that read it), ``action`` (an
    `ActionPayload`, carried likewise) and ``conditions`` (such as ``encode`` noise). A
    `ConditionPayload` given positionally second (this project's earlier
    ``WorldModelInput(obs, conditions)``) is taken as ``conditions``.
    """

    observations: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Tensor] = field(default_factory=dict)
    action: ActionPayload | None = None
    conditions: ConditionPayload | None = field(default_factory=ConditionPayload)

    def __post_init__(self) -> None:
        if isinstance(self.context, ConditionPayload):
            if not _empty_conditions(self.conditions):
                raise ContractError(
                    "WorldModelInput got a ConditionPayload as context and conditions too",
                    hint="pass conditions=... once",
                )
            self.conditions, self.context = self.context, {}


def _empty_conditions(conditions: ConditionPayload | None) -> bool:
    if conditions is None:
        return True
    named = (conditions.text_condition, conditions.goal, conditions.spatial, conditions.camera_pose)
    return all(v is None for v in named) and not conditions.extras


@dataclass(init=False)
class ModelOutput:
    """Standardized model output container: what ``decode`` returns.

    ``predictions`` are keyed as the contract declares (``preds`` is WorldFlux's alias, as an
    attribute and as a keyword); ``state`` the state decoded, ``uncertainty`` an optional
    tensor, ``aux`` anything else. Every field has a default, as in WorldFlux.
    """

    predictions: dict[str, Tensor]
    state: State | None
    uncertainty: Tensor | None
    aux: dict[str, Any]

    def __init__(
        self,
        predictions: Mapping[str, Tensor] | None = None,
        state: State | None = None,
        uncertainty: Tensor | None = None,
        aux: Mapping[str, Any] | None = None,
        *,
        preds: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.predictions = dict(predictions or preds or {})
        self.state = state
        self.uncertainty = uncertainty
        self.aux = dict(aux or {})

    @property
    def preds(self) -> dict[str, Tensor]:
        """WorldFlux's alias of `predictions` (reading and assigning)."""
        return self.predictions

    @preds.setter
    def preds(self, value: dict[str, Tensor]) -> None:
        self.predictions = value

    def __getitem__(self, key: str) -> Tensor:
        return self.predictions[key]

    def items(self) -> ItemsView[str, Tensor]:
        """Compatibility helper for iterating over predictions."""
        return self.predictions.items()

    def validate(self) -> ModelOutput:
        """Validate prediction tensor shapes and batch consistency; return self.

        Every prediction (and the `state`, when it has tensors) must share the leading batch
        dim. An output without predictions passes, as in WorldFlux.

        Raises:
            ShapeMismatchError: naming the prediction whose batch differs.
        """
        batch: tuple[str, int] | None = None
        for name, tensor in self.predictions.items():
            shape = getattr(tensor, "shape", None)
            if shape is None or len(shape) == 0:
                continue
            size = dim(shape[0])
            if batch is None:
                batch = (name, size)
            elif size != batch[1]:
                raise ShapeMismatchError(
                    f"prediction {name!r} batch size mismatch with {batch[0]!r}",
                    expected=(batch[1],),
                    got=(size,),
                )
        if batch is not None and self.state is not None and self.state.tensors:
            size = self.state.batch_size
            if size != batch[1]:
                raise ShapeMismatchError(
                    "ModelOutput state/predictions batch size mismatch",
                    expected=(batch[1],),
                    got=(size,),
                )
        return self


@dataclass
class LossOutput:
    """Standardized loss container: the total ``loss`` and its named ``components``."""

    loss: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def items(self) -> ItemsView[str, Tensor]:
        """Compatibility helper for iterating over losses: ``("loss", total)``, then components."""
        return {"loss": self.loss, **self.components}.items()


def _batch_or_none(state: Any) -> int | None:
    try:
        return state.batch_size  # type: ignore[no-any-return]
    except StateError:
        return None


@dataclass
class Trajectory:
    """Imagination rollout trajectory in latent space.

    Attributes:
        states: List of latent states [T+1] (initial + T steps).
        actions: Action tensor [T, batch, ...].
        rewards: Predicted rewards [T, batch] (optional).
        values: Predicted values [T+1, batch] (optional).
        continues: Continue probabilities [T, batch] (optional).
        predictions: Every decoded prediction stacked over steps, [T, batch, ...] (optional;
            an addition to WorldFlux's fields).

    The invariant ``len(states) == actions.shape[0] + 1`` and consistent batch sizes are
    enforced at construction (`StateError`, a `ContractError`). ``len(trajectory)`` counts the
    states (T + 1), as in WorldFlux; `horizon` counts the actions (T).
    """

    states: list[State]
    actions: Tensor
    rewards: Tensor | None = None
    values: Tensor | None = None
    continues: Tensor | None = None
    predictions: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.states:
            raise StateError("Trajectory must have at least one state")
        steps = int(self.actions.shape[0])
        if len(self.states) != steps + 1:
            raise StateError(
                f"trajectory has {len(self.states)} states for {steps} actions",
                hint="states hold the initial state plus one per action (T + 1)",
            )
        batch = dim(self.actions.shape[1]) if len(self.actions.shape) > 1 else None
        for i, state in enumerate(self.states):
            size = _batch_or_none(state)
            if size is None:
                continue
            if batch is None:
                batch = size
            elif size != batch:
                raise StateError(f"trajectory state {i} has batch {size}, actions have {batch}")
        expected = {"rewards": steps, "continues": steps, "values": steps + 1}
        for name, length in expected.items():
            value = getattr(self, name)
            if value is None:
                continue
            if int(value.shape[0]) != length:
                raise StateError(f"trajectory {name} has {value.shape[0]} steps, expected {length}")
            if batch is not None and len(value.shape) > 1 and dim(value.shape[1]) != batch:
                raise StateError(f"trajectory {name} has batch {value.shape[1]}, not {batch}")

    def __len__(self) -> int:
        """The number of states (T + 1), as in WorldFlux."""
        return len(self.states)

    @property
    def horizon(self) -> int:
        """Prediction horizon (number of actions)."""
        return dim(self.actions.shape[0])

    @property
    def batch_size(self) -> int:
        """The batch size of the states (raises `StateError` when the states hold none)."""
        return self.states[0].batch_size

    def to_tensor(self, key: str) -> Tensor:
        """Stack a specific state tensor key across time [T+1, batch, ...].

        Raises:
            StateError: a state lacks ``key``.
        """
        import torch

        missing = [i for i, s in enumerate(self.states) if key not in s.tensors]
        if missing:
            raise StateError(
                f"trajectory states {missing} have no key {key!r}",
                hint="keys of the first state: " + ", ".join(self.states[0].tensors),
            )
        return torch.stack([s.tensors[key] for s in self.states], dim=0)

    def _map(self, fn: Any) -> Trajectory:
        def opt(value: Any) -> Any:
            return None if value is None else fn(value)

        return Trajectory(
            states=[s.map(fn) for s in self.states],
            actions=fn(self.actions),
            rewards=opt(self.rewards),
            values=opt(self.values),
            continues=opt(self.continues),
            predictions=None
            if self.predictions is None
            else {k: fn(v) for k, v in self.predictions.items()},
        )

    def to(self, device: Any) -> Trajectory:
        """A new Trajectory with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def detach(self) -> Trajectory:
        """A new Trajectory with every tensor detached from the autograd graph."""
        return self._map(lambda t: t.detach())


def squeeze_step_value(value: Tensor | None) -> Tensor | None:
    """A rollout's stacked reward or continue ``[T, batch, 1]`` as ``[T, batch]`` (WorldFlux
    squeezes the last dim); any other layout is returned as it is."""
    if value is not None and len(value.shape) == 3 and dim(value.shape[-1]) == 1:
        return value.squeeze(-1)
    return value


def dtype_name(value: Any) -> str:
    """``"float32"`` for a torch or numpy tensor's dtype."""
    return str(getattr(value, "dtype", type(value).__name__)).removeprefix("torch.")


def tensor_problems(
    where: str, value: Any, spec: TensorSpec, dims: dict[str, int] | None = None
) -> list[str]:
    """Ways ``value`` disagrees with ``spec`` (dtype, rank, dims); binds symbols into ``dims``."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return [f"{where} should be a tensor, got {type(value).__name__}"]
    problems = []
    if dtype_name(value) != spec.dtype:
        problems.append(f"{where} has dtype {dtype_name(value)}, expected {spec.dtype}")
    shape = tuple(dim(d) for d in shape)
    if len(shape) != len(spec.shape):
        problems.append(f"{where} has shape {shape}, expected {spec.shape}")
        return problems
    bound = {} if dims is None else dims
    for actual, declared in zip(shape, spec.shape, strict=True):
        if isinstance(declared, str):
            if bound.setdefault(declared, actual) != actual:
                problems.append(
                    f"{where} has {declared}={actual} but another tensor has "
                    f"{declared}={bound[declared]}"
                )
        elif actual != declared:
            problems.append(f"{where} has shape {shape}, expected {spec.shape}")
            break
    return problems
