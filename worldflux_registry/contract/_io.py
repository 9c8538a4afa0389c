"""The I/O contract of a world model: torch-free declared data, validated and fingerprinted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from .._dims import dim as dim_of
from ..errors import ContractError

__all__ = [
    "DTYPES",
    "AgentSpec",
    "Capability",
    "IOContract",
    "NoiseSpec",
    "TensorSpec",
    "contract_fingerprint",
]

#: dtype names a contract may declare (torch / numpy spelling).
DTYPES: Final = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "bfloat16",
)
#: Tensor kinds: how values are interpreted (parity uses it to pick metrics).
KINDS: Final = ("continuous", "categorical", "discrete", "binary")
#: Graphs a noise input can feed: the protocol steps and the agent steps (`AgentSpec.graph`).
GRAPHS: Final = ("encode", "transition", "update", "decode", "plan", "act")
#: Agent steps a contract can declare (`AgentSpec.graph`).
AGENT_GRAPHS: Final = ("plan", "act")
#: Noise distributions: ``uniform`` (0, 1), standard ``normal``, ``exponential`` (rate 1) and
#: ``permutation`` (int64: the last axis holds distinct indices below ``classes``, i.e.
#: ``randperm(classes)[:k]`` per leading position).
DISTRIBUTIONS: Final = ("uniform", "normal", "exponential", "permutation")
BATCH: Final = "batch"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Capability(str, Enum):
    """What a model can do; families declare these, `WorldModel.require` enforces them."""

    ENCODE = "encode"
    """``encode(obs)`` returns a `State` from a first observation."""
    TRANSITION = "transition"
    """``transition(state, action)`` predicts the next `State` (the prior)."""
    UPDATE = "update"
    """``update(state, action, obs)`` folds a new observation into the `State` (the posterior)."""
    DECODE = "decode"
    """``decode(state)`` returns the contract's predictions."""
    ROLLOUT = "rollout"
    """``rollout(state, actions)`` imagines ``T`` steps (``transition`` + ``decode``)."""
    LOSS = "loss"
    """``loss(batch)`` returns a training objective."""
    REWARD = "reward"
    """The predictions include ``'reward'``."""
    CONTINUE = "continue"
    """The predictions include ``'continue'`` (the episode goes on)."""
    VALUE = "value"
    """The predictions include a value estimate (a critic)."""
    POLICY = "policy"
    """The model has a policy (an actor or a policy prior)."""
    STOCHASTIC = "stochastic"
    """A step samples; its noise is declared with a `NoiseSpec`."""
    PLAN = "plan"
    """The model plans an action per environment step (``plan_step``, a ``plan`` graph)."""
    ACT = "act"
    """The model acts per environment step from its actor (``act``, an ``act`` graph)."""
    IMAGE_OBS = "image_obs"
    """It reads an ``'image'`` observation."""
    VECTOR_OBS = "vector_obs"
    """It reads a ``'vector'`` observation."""
    CONTINUOUS_ACTIONS = "continuous_actions"
    """Its action is a float vector."""
    DISCRETE_ACTIONS = "discrete_actions"
    """Its action is an integer index below ``classes``."""

    @classmethod
    def parse(cls, value: str | Capability) -> Capability:
        """Return the capability named ``value``; raise `ContractError` with the known names."""
        if isinstance(value, Capability):
            return value
        try:
            return cls(value)
        except ValueError:
            from ..errors import did_you_mean

            known = [c.value for c in cls]
            raise ContractError(
                f"unknown capability {value!r}.{did_you_mean(str(value), known)}",
                hint="known capabilities: " + ", ".join(known),
            ) from None


def _dim_ok(dim: object) -> bool:
    if isinstance(dim, bool):
        return False
    if isinstance(dim, int):
        return dim >= 0
    return isinstance(dim, str) and bool(_SYMBOL.match(dim))


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dtype and shape, where a dim is an int or a symbol such as ``"batch"``.

    Shapes are per step and start with ``"batch"``. ``kind`` says how to read values:
    ``"categorical"`` tensors hold probabilities or one-hot samples over the last axis
    (``classes`` wide), ``"discrete"`` tensors hold integer labels below ``classes``,
    ``"binary"`` tensors hold 0/1 flags or probabilities. ``low``/``high`` bound the values
    (observations and actions are generated inside them for tests and parity).

    ``tolerance`` is ``(rtol, atol)`` for an output that float32 cannot reproduce as closely as
    the default tolerance asks, whatever the runtime: a raw-space two-hot readout sums terms up
    to ``symexp(20)`` that cancel, so a 1e-7 difference in its logits moves it by ~0.1. Parity
    then compares it with that tolerance (and the dtype default where that is looser, as for
    half precision); every other output keeps the default.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    kind: str = "continuous"
    classes: int | None = None
    low: float | None = None
    high: float | None = None
    description: str = ""
    # How closely parity compares the output, not what the output is: not fingerprinted, so a
    # better-measured tolerance never orphans saved checkpoints.
    tolerance: tuple[float, float] | None = field(default=None, metadata={"fingerprint": False})

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.tolerance is not None:
            object.__setattr__(self, "tolerance", tuple(self.tolerance))

    def validate(self, where: str = "") -> None:
        """Raise `ContractError` naming the bad field of this spec."""
        at = f"{where}{self.name!r}" if where else repr(self.name)
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ContractError(
                f"tensor name {at} is not an identifier",
                hint="use letters, digits and underscores",
            )
        if self.dtype not in DTYPES:
            raise ContractError(
                f"tensor {at} has unknown dtype {self.dtype!r}",
                hint="use one of " + ", ".join(DTYPES),
            )
        if self.kind not in KINDS:
            raise ContractError(
                f"tensor {at} has unknown kind {self.kind!r}", hint="use one of " + ", ".join(KINDS)
            )
        for i, dim in enumerate(self.shape):
            if not _dim_ok(dim):
                raise ContractError(
                    f"tensor {at} has invalid dim {dim!r} at position {i} of shape {self.shape}",
                    hint="dims are non-negative ints or identifiers such as 'batch'",
                )
        if not self.shape or self.shape[0] != BATCH:
            raise ContractError(
                f"tensor {at} shape {self.shape} does not start with 'batch'",
                hint="declare per-step shapes with a leading 'batch' dim",
            )
        if self.kind in ("categorical", "discrete"):
            if not isinstance(self.classes, int) or self.classes < 1:
                raise ContractError(
                    f"{self.kind} tensor {at} needs classes >= 1, got {self.classes!r}"
                )
            if self.kind == "categorical" and self.shape[-1] != self.classes:
                raise ContractError(
                    f"categorical tensor {at} has last dim {self.shape[-1]!r} "
                    f"but classes={self.classes}",
                    hint="the last axis of a categorical tensor holds the classes",
                )
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ContractError(f"tensor {at} has low {self.low} > high {self.high}")
        if self.tolerance is not None:
            tol = self.tolerance
            if (
                len(tol) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in tol)
                or not all(0 <= v < float("inf") for v in tol)
                or not self.is_float
            ):
                raise ContractError(
                    f"tensor {at} has tolerance {tol!r}",
                    hint="give (rtol, atol), two finite numbers >= 0, on a floating tensor",
                )

    @property
    def is_float(self) -> bool:
        """True for floating dtypes."""
        return self.dtype.startswith(("float", "bfloat"))

    def concrete_shape(self, **dims: int) -> tuple[int, ...]:
        """Shape with symbols bound from ``dims`` (e.g. ``batch=3``); raises for unbound ones."""
        out = []
        for dim in self.shape:
            if isinstance(dim, str):
                if dim not in dims:
                    raise ContractError(
                        f"tensor {self.name!r}: symbolic dim {dim!r} is not bound",
                        hint=f"pass {dim}=<int>",
                    )
                value = dims[dim]
                out.append(dim_of(value))
            else:
                out.append(dim)
        return tuple(out)


@dataclass(frozen=True)
class NoiseSpec:
    """An explicit sampling-noise input of a stochastic step.

    Passed to the model as the condition extra ``wf.noise.<name>`` and to exported graphs as the
    input ``noise.<name>``, so stochastic steps are deterministic functions of their inputs.
    ``graphs`` names the steps that consume it. A ``"permutation"`` noise is int64 and needs
    ``classes``: its last axis (``k <= classes`` wide) holds distinct indices below ``classes``.
    """

    name: str
    shape: tuple[int | str, ...]
    graphs: tuple[str, ...]
    distribution: str = "uniform"
    dtype: str = "float32"
    classes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "graphs", tuple(self.graphs))

    @property
    def condition_key(self) -> str:
        """The `ConditionPayload` extras key carrying this noise."""
        return f"wf.noise.{self.name}"

    def as_tensor_spec(self) -> TensorSpec:
        """This noise as a plain tensor spec (for validation and example inputs)."""
        if self.distribution == "permutation":
            return TensorSpec(
                self.name, self.dtype, self.shape, kind="discrete", classes=self.classes
            )
        low, high = (0.0, 1.0) if self.distribution == "uniform" else (None, None)
        low = 0.0 if self.distribution == "exponential" else low
        return TensorSpec(self.name, self.dtype, self.shape, low=low, high=high)

    def validate(self) -> None:
        """Raise `ContractError` naming the bad field of this noise spec."""
        self.as_tensor_spec().validate("noise ")
        if self.distribution not in DISTRIBUTIONS:
            raise ContractError(
                f"noise {self.name!r} has unknown distribution {self.distribution!r}",
                hint="use one of " + ", ".join(DISTRIBUTIONS),
            )
        if not self.graphs or any(g not in GRAPHS for g in self.graphs):
            raise ContractError(
                f"noise {self.name!r} has graphs {self.graphs}",
                hint="name at least one of " + ", ".join(GRAPHS),
            )
        if self.distribution == "permutation":
            k = self.shape[-1] if len(self.shape) > 1 else None
            if self.dtype != "int64" or not isinstance(k, int) or k > (self.classes or 0):
                raise ContractError(
                    f"permutation noise {self.name!r} must be int64 with a fixed last dim "
                    f"<= classes, got dtype {self.dtype!r}, shape {self.shape}, "
                    f"classes {self.classes!r}",
                    hint="e.g. NoiseSpec(name, ('batch', 2), graphs, 'permutation', 'int64', 5)",
                )
        elif not self.dtype.startswith("float"):
            raise ContractError(f"noise {self.name!r} must be floating, got {self.dtype!r}")
        elif self.classes is not None:
            raise ContractError(f"noise {self.name!r}: classes is for permutation noise")


#: Prefix of the `ConditionPayload` extras key that carries a declared side condition.
CONDITION_PREFIX = "wf.cond."


def condition_key(name: str) -> str:
    """The `ConditionPayload` extras key of side condition ``name``: ``wf.cond.<name>``.

    Exported graphs take it as the input ``cond.<name>``.
    """
    return CONDITION_PREFIX + name


@dataclass(frozen=True)
class AgentSpec:
    """The agent step of a contract: one call per environment step, exported as one graph.

    ``graph`` is ``"plan"`` (the model's `WorldModel.plan_step` on an encoded state, e.g. an
    MPPI planner: it reads the contract's ``state`` tensors) or ``"act"`` (the model's
    `WorldModel.act_step` on an observation, e.g. a posterior update and an actor: it reads the
    contract's ``observations``). Either also reads the ``carry`` tensors (fed back from the
    previous step's outputs of the same name; absent or zeros = the first step of an episode),
    the side conditions and the noise declared for ``graph``; it returns the ``carry`` tensors
    for the next step and ``outputs``, one of which, ``action``, is the action to take.
    Exported graphs take ``state.<key>`` (plan) or ``obs.<name>`` (act) and ``carry.<name>``
    and give ``new_carry.<name>`` and ``out.<name>``.

    ``explore`` names the noise inputs only the stochastic step reads (exploration noise) whose
    zeros give exactly the ``deterministic=True`` step, so one exported graph serves both.

    ``selection`` names two outputs, ``(indices, scores)``, each ``[batch, iterations, k]``,
    of a step that selects by score (MPPI elites): per iteration, the ``k`` candidates it
    selected, best first, and their scores. Parity uses them to tell a near-tie that float
    rounding decides from a wrong graph: see ``parity.check``.
    """

    graph: str
    action: str
    outputs: tuple[TensorSpec, ...]
    carry: tuple[TensorSpec, ...] = ()
    explore: tuple[str, ...] = ()
    selection: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("outputs", "carry", "explore", "selection"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def action_spec(self) -> TensorSpec:
        """The output holding the action."""
        return next(s for s in self.outputs if s.name == self.action)

    def validate(self, noise: Sequence[NoiseSpec] = ()) -> None:
        """Raise `ContractError` naming the bad field; ``noise`` is the contract's noise."""
        if self.graph not in AGENT_GRAPHS:
            raise ContractError(
                f"agent graph {self.graph!r} is unknown",
                hint="use one of " + ", ".join(AGENT_GRAPHS),
            )
        seen: set[str] = set()  # carry and outputs share one namespace
        for where, specs in (("agent carry ", self.carry), ("agent output ", self.outputs)):
            _validate_specs(where, specs, seen)
        if self.action not in {s.name for s in self.outputs}:
            raise ContractError(
                f"agent action {self.action!r} is not one of its outputs "
                f"{[s.name for s in self.outputs]}"
            )
        if self.selection:
            by_name = {s.name: s for s in self.outputs}
            pair = [by_name.get(n) for n in self.selection]
            if len(pair) != 2 or None in pair or any(len(s.shape) != 3 for s in pair if s):
                raise ContractError(
                    f"agent selection {self.selection} must name two outputs (indices, scores) "
                    "laid out [batch, iterations, k]",
                    hint=f"outputs: {[s.name for s in self.outputs]}",
                )
        mine = {n.name for n in noise if self.graph in n.graphs}
        unknown = [n for n in self.explore if n not in mine]
        if unknown:
            raise ContractError(
                f"agent explore noise {unknown} is not declared for graph {self.graph!r}",
                hint=f"declare NoiseSpec(..., graphs=({self.graph!r},))",
            )


@dataclass(frozen=True)
class IOContract:
    """Everything a world model reads and writes, declared once.

    Validation, the fingerprint, example inputs, ONNX input/output names and the export manifest
    are all derived from it.

    Attributes:
        observations: Observation tensors, keyed by name (``encode``/``update`` inputs).
        action: The action tensor (``kind="continuous"`` float or ``"discrete"`` int labels),
            or None for models that take no action.
        state: Latent state tensors (the keys of a `State`).
        predictions: What ``decode`` returns (``ModelOutput.predictions`` keys).
        conditions: Optional side-condition tensors (a goal, a task embedding), passed as the
            `ConditionPayload` extra ``wf.cond.<name>`` (`condition_key`) and read with
            `WorldModel.condition`; every step may read them, and rollouts pass them unchanged
            to every step.
        noise: Explicit noise inputs of stochastic steps.
        targets: Extra per-step training targets ``loss`` reads from a batch (e.g. reward).
        api_version: Payload API version the model speaks.
        agent: The agent step (`AgentSpec`: planner or actor), or None.
    """

    observations: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...]
    predictions: tuple[TensorSpec, ...]
    action: TensorSpec | None = None
    conditions: tuple[TensorSpec, ...] = ()
    noise: tuple[NoiseSpec, ...] = ()
    targets: tuple[TensorSpec, ...] = ()
    api_version: str = "v0.2"
    agent: AgentSpec | None = None

    def __post_init__(self) -> None:
        for name in ("observations", "state", "predictions", "conditions", "noise", "targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    # -- lookups -------------------------------------------------------------------------
    @property
    def observation_names(self) -> tuple[str, ...]:
        """Observation names in declaration order."""
        return tuple(s.name for s in self.observations)

    @property
    def state_keys(self) -> tuple[str, ...]:
        """State keys in declaration order."""
        return tuple(s.name for s in self.state)

    @property
    def prediction_keys(self) -> tuple[str, ...]:
        """Prediction keys in declaration order."""
        return tuple(s.name for s in self.predictions)

    def noise_for(self, graph: str) -> tuple[NoiseSpec, ...]:
        """Noise inputs consumed by ``graph``."""
        return tuple(n for n in self.noise if graph in n.graphs)

    def validate(self) -> IOContract:
        """Raise `ContractError` naming the first bad field; return self when valid."""
        if not self.observations:
            raise ContractError("contract declares no observations", hint="declare at least one")
        if not self.state:
            raise ContractError("contract declares no state tensors", hint="declare at least one")
        groups: list[tuple[str, Sequence[TensorSpec]]] = [
            ("observation ", self.observations),
            ("state ", self.state),
            ("prediction ", self.predictions),
            ("condition ", self.conditions),
            ("target ", self.targets),
        ]
        for where, specs in groups:
            _validate_specs(where, specs, set())
        if self.action is not None:
            self.action.validate("action ")
            if self.action.kind not in ("continuous", "discrete"):
                raise ContractError(
                    f"action kind {self.action.kind!r} is not supported",
                    hint="use 'continuous' (float) or 'discrete' (integer labels)",
                )
        names: set[str] = set()
        for noise in self.noise:
            noise.validate()
            if noise.name in names:
                raise ContractError(f"noise name {noise.name!r} is declared twice")
            names.add(noise.name)
        if self.agent is not None:
            if not isinstance(self.agent, AgentSpec):
                raise ContractError(f"agent {self.agent!r} is not an AgentSpec")
            self.agent.validate(self.noise)
        if not isinstance(self.api_version, str) or not self.api_version.startswith("v"):
            raise ContractError(f"api_version {self.api_version!r} should look like 'v0.2'")
        return self

    # -- canonical form ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical plain-JSON form: fields equal to their defaults left out, tuples as lists."""
        return _to_plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IOContract:
        """Rebuild a contract from `to_dict` output; raise `ContractError` on a bad document."""
        try:
            contract = cls(
                observations=tuple(_tensor_spec(d) for d in data["observations"]),
                state=tuple(_tensor_spec(d) for d in data["state"]),
                predictions=tuple(_tensor_spec(d) for d in data.get("predictions", ())),
                action=_tensor_spec(data["action"]) if data.get("action") else None,
                conditions=tuple(_tensor_spec(d) for d in data.get("conditions", ())),
                noise=tuple(NoiseSpec(**_shape_tuple(d)) for d in data.get("noise", ())),
                targets=tuple(_tensor_spec(d) for d in data.get("targets", ())),
                api_version=data.get("api_version", "v0.2"),
                agent=_agent_spec(data["agent"]) if data.get("agent") else None,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ContractError(
                f"invalid contract document: {exc!r}",
                hint="a contract document comes from IOContract.to_dict()",
            ) from None
        return contract.validate()

    def canonical_json(self) -> str:
        """Canonical JSON: sorted keys, compact separators, defaults omitted.

        Fields that say how an output is verified rather than what it is (`TensorSpec.tolerance`)
        are left out, so the fingerprint identifies the I/O alone.
        """
        plain = _to_plain(self, fingerprint=True)
        return json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def fingerprint(self) -> str:
        """``"sha256:" + hex`` of `canonical_json`."""
        return "sha256:" + hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


def contract_fingerprint(contract: IOContract) -> str:
    """Return the stable fingerprint of a contract (``"sha256:"`` + 64 hex digits)."""
    return contract.fingerprint()


def _validate_specs(where: str, specs: Iterable[Any], seen: set[str]) -> None:
    """Validate each spec of one group; a name already in ``seen`` is declared twice."""
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise ContractError(f"{where}entry {spec!r} is not a TensorSpec")
        spec.validate(where)
        if spec.name in seen:
            raise ContractError(f"{where}name {spec.name!r} is declared twice")
        seen.add(spec.name)


def _shape_tuple(d: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("shape", "graphs"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def _tensor_spec(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(**_shape_tuple(d))


def _agent_spec(d: Mapping[str, Any]) -> AgentSpec:
    return AgentSpec(
        graph=d["graph"],
        action=d["action"],
        outputs=tuple(_tensor_spec(x) for x in d["outputs"]),
        carry=tuple(_tensor_spec(x) for x in d.get("carry", ())),
        explore=tuple(d.get("explore", ())),
        selection=tuple(d.get("selection", ())),
    )


def _to_plain(obj: Any, *, fingerprint: bool = False) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if _is_default(f, value) or (fingerprint and not f.metadata.get("fingerprint", True)):
                continue
            out[f.name] = _to_plain(value, fingerprint=fingerprint)
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, fingerprint=fingerprint) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v, fingerprint=fingerprint) for k, v in obj.items()}
    if isinstance(obj, float) and obj.is_integer():
        # 1.0 and 1 must fingerprint alike: JSON readers disagree on which they give back.
        return int(obj)
    return obj


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def iter_specs(contract: IOContract) -> Iterable[tuple[str, TensorSpec]]:
    """Every tensor spec of ``contract`` with its group name."""
    for group in ("observations", "state", "predictions", "conditions", "targets"):
        for spec in getattr(contract, group):
            yield group, spec
    if contract.action is not None:
        yield "action", contract.action
    for noise in contract.noise:
        yield "noise", noise.as_tensor_spec()
    if contract.agent is not None:
        for spec in contract.agent.carry:
            yield "agent carry", spec
        for spec in contract.agent.outputs:
            yield "agent output", spec
