"""worldflux-onnx: ONNX exporter and ONNX Runtime backend for worldflux-registry.

Use it through the registry: ``worldflux_registry.export(model, "onnx", out_dir)`` and
``registry.load(out_dir)``. Importing this package is cheap; torch and onnxruntime load with
`export_model`, `load_artifact` and `OnnxWorldModel`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import export_model
    from .runtime import OnnxWorldModel, load_artifact

__all__ = ["OnnxWorldModel", "export_model", "load_artifact"]

_LAZY = {
    "export_model": ".export",
    "OnnxWorldModel": ".runtime",
    "load_artifact": ".runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'worldflux_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
