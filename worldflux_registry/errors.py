"""Errors raised by worldflux-registry.

Every error the library raises on bad input derives from `WorldFluxRegistryError`:

```text
WorldFluxRegistryError
 ├── ContractError              a payload, batch or state disagrees with the contract
 │    ├── ShapeMismatchError    tensors whose (batch) shapes disagree
 │    └── StateError            an inconsistent State or Trajectory
 │         └── StateFormatError a malformed State payload (also a ValueError)
 ├── CapabilityError            the model does not advertise what was asked
 ├── PluginError                a plugin failed to import, raised or gave a bad spec
 │    └── PluginConflictError   two distributions claim one family name or alias
 ├── ResolutionError            a ref names no family, preset, fingerprint or dir
 │    └── AmbiguousReferenceError  a fingerprint prefix matches several presets
 ├── ConfigError                a config override names an unknown field
 ├── CheckpointError            a checkpoint is missing, corrupt or incompatible
 ├── ExportError                an exporter failed or an artifact is invalid
 ├── BackendError               a runtime backend (provider, library) is missing
 └── ParityError                a parity check could not run
```

Messages say what was wrong, with the offending value, and what to do next. Structured fields
(``family``, ``distribution``, ``graph``, ``output``, ``hint``) are kept on the instance so that
callers need not parse messages.

WorldFlux's exception names are here too, so that ``except`` clauses written for WorldFlux keep
working: `StateError`, `ShapeMismatchError` (classes of this hierarchy), and the aliases
``ValidationError`` and ``ContractValidationError`` (= `ContractError`), ``ModelNotFoundError``
(= `ResolutionError`) and ``ConfigurationError`` (= `ConfigError`). `CapabilityError` has the
same name in both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "AmbiguousReferenceError",
    "BackendError",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "ConfigurationError",
    "ContractError",
    "ContractValidationError",
    "ExportError",
    "ModelNotFoundError",
    "ParityError",
    "PluginConflictError",
    "PluginError",
    "ResolutionError",
    "ShapeMismatchError",
    "StateError",
    "StateFormatError",
    "ValidationError",
    "WorldFluxRegistryError",
    "did_you_mean",
]


class WorldFluxRegistryError(Exception):
    """Base class of every error raised by worldflux-registry.

    Args:
        message: What was wrong, naming the offending value.
        hint: The next step for the caller (appended to the message).
        **fields: Structured context kept as attributes, e.g. ``family=``, ``graph=``.
    """

    family: str | None = None
    distribution: str | None = None
    graph: str | None = None
    output: str | None = None

    def __init__(self, message: str, *, hint: str | None = None, **fields: Any) -> None:
        self.message = message
        self.hint = hint
        for key, value in fields.items():
            setattr(self, key, value)
        super().__init__(f"{message} ({hint})" if hint else message)


class ContractError(WorldFluxRegistryError, ValueError):
    """A contract, payload, batch or state disagrees with its declaration."""


class ShapeMismatchError(ContractError):
    """Tensors whose shapes disagree (WorldFlux's ``ShapeMismatchError``).

    ``expected`` and ``got`` (when given) are kept on the instance and appended to the message,
    as WorldFlux does: ``ShapeMismatchError("batch mismatch", expected=(3,), got=(2,))``.
    """

    def __init__(
        self,
        message: str,
        expected: tuple[Any, ...] | None = None,
        got: tuple[Any, ...] | None = None,
        *,
        hint: str | None = None,
        **fields: Any,
    ) -> None:
        self.expected = expected
        self.got = got
        if expected is not None and got is not None:
            message = f"{message} (expected {expected}, got {got})"
        super().__init__(message, hint=hint, **fields)


class StateError(ContractError):
    """A `State` or `Trajectory` is inconsistent (WorldFlux's ``StateError``).

    Raised for a State with no tensors where a batch size is needed, and for a Trajectory whose
    states, actions and predictions disagree in length or batch. `StateFormatError` (a malformed
    serialized State) derives from it, as WorldFlux raises ``StateError`` for both.
    """


class CapabilityError(WorldFluxRegistryError):
    """The model does not advertise the capability that was asked for."""


class PluginError(WorldFluxRegistryError):
    """A plugin failed to import, raised in its hook, or returned an invalid spec."""


class PluginConflictError(PluginError):
    """Two distributions claim the same family name or alias."""


class ResolutionError(WorldFluxRegistryError, LookupError):
    """A ref names no known family, alias, preset, fingerprint or directory."""


class AmbiguousReferenceError(ResolutionError):
    """A fingerprint prefix (or alias) matches several family presets."""


class ConfigError(WorldFluxRegistryError, ValueError):
    """A config override names an unknown field or has an invalid value."""


class CheckpointError(WorldFluxRegistryError):
    """A checkpoint directory is missing, corrupt, or incompatible with what is installed."""


class StateFormatError(StateError):
    """A serialized State payload is malformed, or a State cannot be serialized."""


class ExportError(WorldFluxRegistryError):
    """An export failed, or an export artifact is missing, tampered with or from the future."""


class BackendError(WorldFluxRegistryError):
    """A runtime backend (execution provider, native library) is unavailable."""


class ParityError(WorldFluxRegistryError):
    """A parity check could not be run (not raised for a failing comparison: see the report)."""


#: WorldFlux's name for a failed runtime or contract validation: `ContractError`.
ValidationError = ContractError
#: WorldFlux's name for an I/O contract violation: `ContractError`.
ContractValidationError = ContractError
#: WorldFlux's name for an unknown model: `ResolutionError`.
ModelNotFoundError = ResolutionError
#: WorldFlux's name for an invalid configuration: `ConfigError`.
ConfigurationError = ConfigError


def did_you_mean(
    name: str, candidates: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidates, or ``""`` when none is close.

    ``aliases`` maps an alias among the candidates to the name it stands for: a close alias
    suggests that name, and each name is suggested once.
    """
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    close = list(dict.fromkeys((aliases or {}).get(m, m) for m in matches))
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
