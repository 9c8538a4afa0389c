"""The public surface: pinned names, and an import that stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import worldflux_registry

EXPECTED = {
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
}


def test_all_is_pinned_and_sorted():
    assert set(worldflux_registry.__all__) == EXPECTED
    assert list(worldflux_registry.__all__) == sorted(worldflux_registry.__all__)


def test_every_public_name_resolves():
    for name in worldflux_registry.__all__:
        assert getattr(worldflux_registry, name) is not None, name


def test_errors_share_one_base():
    base = worldflux_registry.WorldFluxRegistryError
    for name in EXPECTED:
        obj = getattr(worldflux_registry, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, base), name


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_and_contract_types_leave_torch_out():
    mods = _modules_after(
        "import worldflux_registry\n"
        "from worldflux_registry import IOContract, TensorSpec, NoiseSpec, FamilySpec, State\n"
        "from worldflux_registry import ActionPayload, ConditionPayload, Trajectory\n"
        "c = IOContract(observations=(TensorSpec('x', 'float32', ('batch', 2)),),\n"
        "               state=(TensorSpec('h', 'float32', ('batch', 2)),), predictions=())\n"
        "c.validate(); c.fingerprint()"
    )
    assert "torch" not in mods
    assert "onnx" not in mods and "onnxruntime" not in mods


def test_world_model_is_lazy_and_pulls_in_torch_only_when_asked():
    mods = _modules_after("from worldflux_registry import WorldModel")
    assert "torch" in mods
