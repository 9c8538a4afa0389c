"""worldflux-registry plugin module of the DreamerV3 family (torch-free: imports only the spec)."""

from __future__ import annotations

from worldflux_registry._spec import FamilySpec
from worldflux_registry.hookspecs import hookimpl

from . import spec

__all__ = ["worldflux_registry_families"]


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
        )
    ]
