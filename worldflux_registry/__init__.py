"""worldflux-registry: find, load, export and verify PyTorch world models.

``import worldflux_registry`` is cheap: torch, onnx and the families' model code are imported only
when a model is built, exported or checked. Public names are resolved lazily from private modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._contract import (
    Capability,
    IOContract,
    NoiseSpec,
    TensorSpec,
    condition_key,
    contract_fingerprint,
)
from ._payloads import (
    ActionPayload,
    ConditionPayload,
    LossOutput,
    ModelOutput,
    Trajectory,
    WorldModelInput,
)
from ._importing import ImportedCheckpoint
from ._spec import ExporterSpec, FamilySpec
from ._state import State
from .errors import (
    AmbiguousReferenceError,
    BackendError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    ContractError,
    ExportError,
    ParityError,
    PluginConflictError,
    PluginError,
    ResolutionError,
    StateFormatError,
    WorldFluxRegistryError,
)

if TYPE_CHECKING:
    from . import functional, parity
    from ._export import export
    from ._model import WorldModel
    from ._registry import Registry, registry
    from .hookspecs import hookimpl

__all__ = [
    "ActionPayload",
    "AmbiguousReferenceError",
    "BackendError",
    "Capability",
    "CapabilityError",
    "CheckpointError",
    "ConditionPayload",
    "ConfigError",
    "ContractError",
    "ExportError",
    "ExporterSpec",
    "FamilySpec",
    "IOContract",
    "ImportedCheckpoint",
    "LossOutput",
    "ModelOutput",
    "NoiseSpec",
    "ParityError",
    "PluginConflictError",
    "PluginError",
    "Registry",
    "ResolutionError",
    "State",
    "StateFormatError",
    "TensorSpec",
    "Trajectory",
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
    "WorldModel": "._model",
    "Registry": "._registry",
    "registry": "._registry",
    "export": "._export",
    "hookimpl": ".hookspecs",
    "functional": ".functional",
    "parity": ".parity",
}


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
