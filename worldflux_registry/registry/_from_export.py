"""Rebuild a torch model from an export directory, with the weights embedded in its graphs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import MAX_ARTIFACT_FILE_BYTES, ArtifactDir
from ..errors import ConfigError, ExportError

if TYPE_CHECKING:
    from ..protocol._model import WorldModel

__all__ = ["model_from_export", "weight_conflicts", "weights_from_onnx"]


def _initializers(export_dir: Path) -> dict[str, list[tuple[str, Any]]]:
    """Every initializer of the export's graph files: name -> [(file, array)]."""
    import onnx
    from onnx import numpy_helper

    copies: dict[str, list[tuple[str, Any]]] = {}
    root = Path(export_dir)
    with ArtifactDir(root, ExportError) as adir:
        for file in sorted(root.glob("*.onnx")):
            # Confined, regular files only; external data is never followed from here.
            blob = adir.read(file.name, what="graph file", max_bytes=MAX_ARTIFACT_FILE_BYTES)
            for init in onnx.load_from_string(blob).graph.initializer:
                try:
                    array = numpy_helper.to_array(init)
                except Exception:  # external data (not read here) or a damaged tensor
                    continue
                copies.setdefault(init.name, []).append((file.name, array))
    return copies


def _majority(copies: list[tuple[str, Any]]) -> tuple[Any, list[str]]:
    """The value most graph files agree on, and the files holding another one."""
    import numpy as np

    groups: list[tuple[Any, list[str]]] = []
    for file, array in copies:
        for value, files in groups:
            if value.shape == array.shape and np.array_equal(value, array):
                files.append(file)
                break
        else:
            groups.append((array, [file]))
    # Most files first; a tie keeps the first file in name order.
    groups.sort(key=lambda g: -len(g[1]))
    return groups[0][0], [f for _, files in groups[1:] for f in files]


def weight_conflicts(export_dir: Path) -> dict[str, list[str]]:
    """Weights whose copies differ between graph files: name -> the files outvoted.

    Every graph of an export embeds its own copy of the weights it reads; they are equal when
    the export is intact. A file whose copy differs from the others' is the likely damaged
    one (with two differing copies, both are named).
    """
    out = {}
    for name, copies in _initializers(export_dir).items():
        if not name.startswith("model."):
            continue  # the exporter's own constants: the same name may mean another value
        _, odd = _majority(copies)
        if odd:
            out[name] = odd if len(copies) > 2 else sorted(f for f, _ in copies)
    return out


def weights_from_onnx(model: WorldModel, export_dir: Path) -> list[str]:
    """Copy into ``model`` every tensor found as a same-shaped initializer of the export's graphs.

    The exporter names initializers after the wrapped model's module path (``model.<key>``).
    Where graph files hold different copies of one weight, the value most of them agree on is
    taken (see `weight_conflicts`). Returns the state-dict keys not found (unused by the
    exported graphs, or folded away); those keep their current values.
    """
    import torch

    try:
        import onnx  # noqa: F401
    except ImportError:
        return list(model.state_dict())
    copies = _initializers(export_dir)
    missing = []
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            found = copies.get("model." + key) or copies.get(key)
            array = None if not found else _majority(found)[0]
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
