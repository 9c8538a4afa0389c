"""worldflux-registry plugin module of the DreamerV3 family (torch-free: imports only the spec)."""

from __future__ import annotations

from worldflux_registry import FamilySpec, ImporterSpec, hookimpl

from . import spec

__all__ = ["worldflux_registry_families", "worldflux_registry_importers"]


@hookimpl
def worldflux_registry_families() -> list[FamilySpec]:
    """Return the DreamerV3 family."""
    return [
        FamilySpec(
            name=spec.FAMILY,
            summary="DreamerV3 agent: block-GRU RSSM, raw-space two-hot heads, actor and critic",
            model="worldflux_dreamerv3.model:DreamerV3WorldModel",
            defaults=spec.DEFAULTS,
            presets=spec.PRESETS,
            default_preset="size12m",
            contract=spec.contract,
            capabilities=spec.CAPABILITIES,
            aliases=("dreamer-v3", "dreamer"),
            maturity="beta",
            version="0.1.0",
            param_count=spec.param_count,
            validate_config=spec.check_config,
        )
    ]


@hookimpl
def worldflux_registry_importers() -> list[ImporterSpec]:
    """Return the importer of official DreamerV3 checkpoints."""
    return [
        ImporterSpec(
            family=spec.FAMILY,
            source_format="dreamerv3-elements",
            summary="elements checkpoint folder written by the official DreamerV3 code "
            "(danijar/dreamerv3 @ e3f0224)",
            importer="worldflux_dreamerv3.importer:import_checkpoint",
        )
    ]
