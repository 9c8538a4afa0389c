"""worldflux-registry plugin module of the ONNX exporter (torch-free: declares the spec only)."""

from __future__ import annotations

from worldflux_registry import ExporterSpec, hookimpl

__all__ = ["worldflux_registry_exporters"]


@hookimpl
def worldflux_registry_exporters() -> list[ExporterSpec]:
    """Return the ONNX export format."""
    return [
        ExporterSpec(
            name="onnx",
            summary="ONNX graphs (encode/transition/update/decode) run by ONNX Runtime",
            exporter="worldflux_onnx.export:export_model",
            loader="worldflux_onnx.runtime:load_artifact",
            artifact_format="worldflux.onnx",
        )
    ]
