"""The I/O contract and the torch-free declarations a plugin makes.

Layer 2 (imports only the base modules). ``_io`` holds `TensorSpec`, `NoiseSpec`, `AgentSpec`,
`Capability`, `IOContract` and the fingerprint; ``_family`` the `FamilySpec`, `ExporterSpec` and
`ImporterSpec` a plugin's hooks return; ``_importing`` what an importer of a foreign checkpoint
returns; ``_locate`` how a model built outside a registry finds its `FamilySpec` (the package
facade installs the lookup).
"""

from __future__ import annotations

from ._family import ExporterSpec, FamilySpec, ImporterSpec
from ._importing import ImportedCheckpoint
from ._io import (
    AgentSpec,
    Capability,
    IOContract,
    NoiseSpec,
    TensorSpec,
    condition_key,
    contract_fingerprint,
)

__all__ = [
    "AgentSpec",
    "Capability",
    "ExporterSpec",
    "FamilySpec",
    "IOContract",
    "ImportedCheckpoint",
    "ImporterSpec",
    "NoiseSpec",
    "TensorSpec",
    "condition_key",
    "contract_fingerprint",
]
