"""Payload containers of the protocol: actions, conditions, inputs, outputs, losses, trajectories.

Importing this module does not import torch: tensors are handled by duck typing (``.shape``,
``.dtype``), so the types can be named and constructed in torch-free code.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._dims import dim
from ..errors import ContractError

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

SUPPORTED_API_VERSIONS = ("v0.1", "v0.2")
ACTION_KINDS = ("none", "continuous", "discrete", "token", "latent", "text")
_PRIMARY = {
    "continuous": "tensor",
    "discrete": "discrete",
    "token": "tokens",
    "latent": "latent",
    "text": "text",
}
#: ``wf.<domain>.<name>``: lowercase segments, the name may hold further dots.
EXTRA_KEY = re.compile(r"^wf\.[a-z][a-z0-9_]*\.[a-z0-9_][a-z0-9_.]*$")


def _check_api_version(api_version: str) -> None:
    if api_version not in SUPPORTED_API_VERSIONS:
        raise ContractError(
            f"unsupported api_version {api_version!r}",
            hint="supported: " + ", ".join(SUPPORTED_API_VERSIONS),
        )


@dataclass
class ActionPayload:
    """Polymorphic action container that supports multiple control modalities.

    Exactly one primary field matches ``kind`` (none for ``kind="none"``): ``tensor`` for
    continuous actions ``[batch, dim]``, ``discrete`` for integer labels ``[batch]``,
    ``tokens``, ``latent`` or ``text``. ``extras`` carries ``wf.<domain>.<name>`` keyed data.
    """

    kind: str = "none"
    tensor: Tensor | None = None
    discrete: Tensor | None = None
    tokens: Tensor | None = None
    latent: Tensor | None = None
    text: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def primary(self) -> Any:
        """The value of the primary field (None for ``kind="none"``)."""
        return None if self.kind == "none" else getattr(self, _PRIMARY[self.kind])

    def validate(self, *, api_version: str = "v0.2") -> ActionPayload:
        """Validate payload consistency.

        Raises:
            ContractError: unknown kind, more than one primary field set, a primary field that
                does not match ``kind``, badly named extras, or an unsupported ``api_version``.
        """
        _check_api_version(api_version)
        if self.kind not in ACTION_KINDS:
            raise ContractError(
                f"unknown action kind {self.kind!r}", hint="use one of " + ", ".join(ACTION_KINDS)
            )
        present = [f for f in _PRIMARY.values() if getattr(self, f) is not None]
        if len(present) > 1:
            raise ContractError(
                f"action payload sets several primary fields {present}",
                hint="set exactly the field matching kind",
            )
        expected = _PRIMARY.get(self.kind)
        if expected is None and present:
            raise ContractError(f"action kind 'none' but field {present[0]!r} is set")
        if expected is not None and present != [expected]:
            raise ContractError(
                f"action kind {self.kind!r} needs field {expected!r}, got {present or 'none'}"
            )
        bad = [k for k in self.extras if not EXTRA_KEY.match(k)]
        if bad:
            raise ContractError(
                f"action extras keys {bad} are not namespaced",
                hint="name extras 'wf.<domain>.<name>'",
            )
        return self


@dataclass
class ConditionPayload:
    """Optional side-conditions for conditional world modeling.

    ``extras`` maps ``wf.<domain>.<name>`` keys to tensors or values. Noise for stochastic steps
    travels here as ``wf.noise.<name>`` (see `NoiseSpec`).
    """

    extras: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The extra under ``key``, or ``default``."""
        return self.extras.get(key, default)

    def validate(
        self,
        *,
        strict: bool = False,
        allowed_extra_keys: set[str] | frozenset[str] | None = None,
        extra_schema: Mapping[str, TensorSpec] | None = None,
        api_version: str = "v0.2",
    ) -> list[str]:
        """Validate condition extras naming and optional allow-list contract.

        Problems (a key not ``wf.<domain>.<name>``, a key outside ``allowed_extra_keys``, a
        tensor whose dtype or non-symbolic dims disagree with ``extra_schema``) raise
        `ContractError` when ``strict``, else each is reported with a `UserWarning`.
        Returns the list of problems found.
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
            if spec is not None:
                problems.extend(tensor_problems(f"condition {key!r}", value, spec))
        if problems:
            if strict:
                raise ContractError("; ".join(problems), hint="fix the condition extras")
            for problem in problems:
                warnings.warn(problem, UserWarning, stacklevel=2)
        return problems


@dataclass
class WorldModelInput:
    """Observations plus the conditions that go with them (e.g. ``encode`` noise)."""

    observations: dict[str, Tensor]
    conditions: ConditionPayload | None = None


@dataclass
class ModelOutput:
    """What ``decode`` returns: predictions keyed as the contract declares."""

    predictions: dict[str, Tensor]
    state: State | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.predictions[key]


@dataclass
class LossOutput:
    """Standardized loss container: the total ``loss`` and its named ``components``."""

    loss: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """Compatibility helper for iterating over losses: ``("loss", total)``, then components."""
        yield "loss", self.loss
        yield from self.components.items()


@dataclass
class Trajectory:
    """Imagination rollout trajectory in latent space.

    Attributes:
        states: List of latent states [T+1] (initial + T steps).
        actions: Action tensor [T, batch, ...].
        rewards: Predicted rewards [T, batch] (optional).
        values: Predicted values [T+1, batch] (optional).
        continues: Continue probabilities [T, batch] (optional).
        predictions: Every decoded prediction stacked over steps, [T, batch, ...] (optional).

    The invariant ``len(states) == actions.shape[0] + 1`` and consistent batch sizes are
    enforced at construction (`ContractError`).
    """

    states: list[State]
    actions: Tensor
    rewards: Tensor | None = None
    values: Tensor | None = None
    continues: Tensor | None = None
    predictions: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        steps = int(self.actions.shape[0])
        if len(self.states) != steps + 1:
            raise ContractError(
                f"trajectory has {len(self.states)} states for {steps} actions",
                hint="states hold the initial state plus one per action (T + 1)",
            )
        batch = dim(self.actions.shape[1]) if len(self.actions.shape) > 1 else None
        for i, state in enumerate(self.states):
            size = state.batch_size
            if batch is not None and size is not None and size != batch:
                raise ContractError(f"trajectory state {i} has batch {size}, actions have {batch}")
        expected = {"rewards": steps, "continues": steps, "values": steps + 1}
        for name, length in expected.items():
            value = getattr(self, name)
            if value is None:
                continue
            if int(value.shape[0]) != length:
                raise ContractError(
                    f"trajectory {name} has {value.shape[0]} steps, expected {length}"
                )
            if batch is not None and len(value.shape) > 1 and dim(value.shape[1]) != batch:
                raise ContractError(f"trajectory {name} has batch {value.shape[1]}, not {batch}")

    def __len__(self) -> int:
        return int(self.actions.shape[0])


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
