"""Rebuild a torch model from an export directory, with the weights embedded in its graphs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import MAX_ARTIFACT_FILE_BYTES, ArtifactDir
from ..errors import ConfigError, ExportError

if TYPE_CHECKING:
    from ..protocol._model import WorldModel

__all__ = ["model_from_export", "weights_from_onnx"]


def weights_from_onnx(model: WorldModel, export_dir: Path) -> list[str]:
    """Copy into ``model`` every tensor found as a same-shaped initializer of the export's graphs.

    The exporter names initializers after the wrapped model's module path (``model.<key>``).
    Returns the state-dict keys not found (unused by the exported graphs, or folded away);
    those keep their current values.
    """
    import torch

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return list(model.state_dict())
    found: dict[str, Any] = {}
    root = Path(export_dir)
    with ArtifactDir(root, ExportError) as adir:
        for file in sorted(root.glob("*.onnx")):
            # Confined, regular files only; external data is never followed from here.
            blob = adir.read(file.name, what="graph file", max_bytes=MAX_ARTIFACT_FILE_BYTES)
            for init in onnx.load_from_string(blob).graph.initializer:
                found.setdefault(init.name, init)
    missing = []
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            hit = found.get("model." + key) or found.get(key)
            try:
                array = None if hit is None else numpy_helper.to_array(hit)
            except Exception:  # external data (not read here) or a damaged tensor
                array = None
            if array is None or tuple(array.shape) != tuple(tensor.shape):
                missing.append(key)
                continue
            tensor.copy_(torch.from_numpy(array.copy()))
    return missing


def model_from_export(
    export_dir: Path, manifest: Mapping[str, Any]
) -> tuple[WorldModel, list[str]]:
    """Rebuild on CPU the family model an export was made from, with weights read back from it.

    The family, preset and config come from the export's ``manifest``; weights go through
    `weights_from_onnx`, whose list of state-dict keys not found is returned beside the model
    (callers decide whether those may keep their fresh init). Raises `ConfigError` when the
    manifest names no family.
    """
    from ._registry import registry

    family = manifest.get("family")
    if not family:
        raise ConfigError(
            f"{export_dir} records no family in its manifest", hint="pass --reference"
        )
    preset = manifest.get("preset")
    spec = registry.get(family)
    config = manifest.get("config") or spec.config(preset)
    model = registry.build(spec, config, preset=preset, device="cpu")
    return model, weights_from_onnx(model, export_dir)
