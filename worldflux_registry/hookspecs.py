"""pluggy hook specifications: what a worldflux-registry plugin module may implement."""

from __future__ import annotations

import pluggy

from .contract._family import ExporterSpec, FamilySpec, ImporterSpec

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "worldflux_registry"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate plugin functions with this: ``@hookimpl def worldflux_registry_families(): ...``
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def worldflux_registry_families() -> list[FamilySpec]:  # type: ignore[empty-body]
    """Return the model families this plugin provides."""


@hookspec
def worldflux_registry_exporters() -> list[ExporterSpec]:  # type: ignore[empty-body]
    """Return the export formats this plugin provides."""


@hookspec
def worldflux_registry_importers() -> list[ImporterSpec]:  # type: ignore[empty-body]
    """Return the importers of foreign checkpoints this plugin provides."""
