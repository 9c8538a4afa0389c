"""worldflux-registry: find, load, export and verify PyTorch world models.

``import worldflux_registry`` is cheap: torch, onnx and the families' model code are imported only
when a model is built, exported or checked. Public names are resolved lazily from the
subpackages (see docs/architecture.md for the layers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .contract import (
    AgentSpec,
    Capability,
    ExporterSpec,
    FamilySpec,
    ImportedCheckpoint,
    ImporterSpec,
    IOContract,
    NoiseSpec,
    TensorSpec,
    condition_key,
    contract_fingerprint,
)
from .contract._locate import set_family_locator
from .errors import (
    AmbiguousReferenceError,
    BackendError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    ConfigurationError,
    ContractError,
    ContractValidationError,
    ExportError,
    ModelNotFoundError,
    ParityError,
    PluginConflictError,
    PluginError,
    ResolutionError,
    ShapeMismatchError,
    StateError,
    StateFormatError,
    ValidationError,
    WorldFluxRegistryError,
)
from .protocol import (
    ActionPayload,
    ConditionPayload,
    LossOutput,
    ModelOutput,
    Trajectory,
    WorldModelInput,
)
from .state import State

if TYPE_CHECKING:
    from . import functional, parity
    from .exporting import export
    from .hookspecs import hookimpl
    from .protocol import WorldModel

__all__ = [
    "ActionPayload",
    "AgentSpec",
    "AmbiguousReferenceError",
    "BackendError",
    "Capability",
    "CapabilityError",
    "CheckpointError",
    "ConditionPayload",
    "ConfigError",
    "ConfigurationError",
    "ContractError",
    "ContractValidationError",
    "ExportError",
    "ExporterSpec",
    "FamilySpec",
    "IOContract",
    "ImportedCheckpoint",
    "ImporterSpec",
    "LossOutput",
    "ModelNotFoundError",
    "ModelOutput",
    "NoiseSpec",
    "ParityError",
    "PluginConflictError",
    "PluginError",
    "Registry",
    "ResolutionError",
    "ShapeMismatchError",
    "State",
    "StateError",
    "StateFormatError",
    "TensorSpec",
    "Trajectory",
    "ValidationError",
    "WorldFluxRegistryError",
    "WorldModel",
    "WorldModelInput",
    "__version__",
    "condition_key",
    "contract_fingerprint",
    "export",
    "functional",
    "hookimpl",
    "parity",
    "registry",
]

# name -> module holding it; imported on first access (WorldModel pulls in torch).
_LAZY = {
    "WorldModel": ".protocol",
    "export": ".exporting",
    "hookimpl": ".hookspecs",
    "functional": ".functional",
    "parity": ".parity",
}


def _locate_family(name: str) -> FamilySpec:
    # The facade wires the layers: a model built directly finds its spec in the process-wide
    # registry, which is imported only when a model first asks.
    from .registry import registry

    return registry.get(name)


set_family_locator(_locate_family)

# Imported eagerly (it is torch-free): the subpackage ``registry`` and the process-wide
# ``registry`` share a name, and this binding makes ``worldflux_registry.registry`` the instance.
from .registry import Registry, registry  # noqa: E402


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("worldflux-registry")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'worldflux_registry' has no attribute {name!r}")
    if name in ("functional", "parity"):
        return importlib.import_module(module, __name__)
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
