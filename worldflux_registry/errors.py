"""Errors raised by worldflux-registry.

Every error the library raises on bad input derives from :class:`WorldFluxRegistryError`::

    WorldFluxRegistryError
     ├── ContractError           a contract, payload, batch or state disagrees with its declaration
     ├── CapabilityError         the model does not advertise the capability asked for
     ├── PluginError             a plugin failed to import, raised in a hook, or gave a bad spec
     │    └── PluginConflictError    two distributions claim the same family name or alias
     ├── ResolutionError         a ref names no family, preset, fingerprint or directory
     │    └── AmbiguousReferenceError a fingerprint prefix matches several presets
     ├── ConfigError             a config override names an unknown field
     ├── CheckpointError         a checkpoint directory is missing, corrupt or incompatible
     ├── StateFormatError        a State payload is malformed (also a ValueError)
     ├── ExportError             an exporter failed or an export artifact is invalid
     ├── BackendError            a runtime backend (provider, library) is unavailable
     └── ParityError             a parity check could not run

Messages say what was wrong, with the offending value, and what to do next. Structured fields
(``family``, ``distribution``, ``graph``, ``output``, ``hint``) are kept on the instance so that
callers need not parse messages.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AmbiguousReferenceError",
    "BackendError",
    "CapabilityError",
    "CheckpointError",
    "ConfigError",
    "ContractError",
    "ExportError",
    "ParityError",
    "PluginConflictError",
    "PluginError",
    "ResolutionError",
    "StateFormatError",
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


class StateFormatError(WorldFluxRegistryError, ValueError):
    """A serialized State payload is malformed, or a State cannot be serialized."""


class ExportError(WorldFluxRegistryError):
    """An export failed, or an export artifact is missing, tampered with or from the future."""


class BackendError(WorldFluxRegistryError):
    """A runtime backend (execution provider, native library) is unavailable."""


class ParityError(WorldFluxRegistryError):
    """A parity check could not be run (not raised for a failing comparison: see the report)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidates, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
