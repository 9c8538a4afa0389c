"""worldflux-registry plugin module of the TD-MPC2 family (torch-free: imports only the spec)."""

from __future__ import annotations

from worldflux_registry import FamilySpec, ImporterSpec, hookimpl

from . import spec

__all__ = ["worldflux_registry_families", "worldflux_registry_importers"]


@hookimpl
def worldflux_registry_families() -> list[FamilySpec]:
    """Return the TD-MPC2 family."""
    return [
        FamilySpec(
            name=spec.FAMILY,
            summary="TD-MPC2: SimNorm latent, MLP dynamics, two-hot reward, Q ensemble, policy",
            model="worldflux_tdmpc2.model:TDMPC2WorldModel",
            defaults=spec.DEFAULTS,
            presets=spec.PRESETS,
            default_preset="size5m",
            contract=spec.contract,
            capabilities=spec.CAPABILITIES,
            aliases=("td-mpc2",),
            maturity="beta",
            version="0.1.0",
            param_count=spec.param_count,
            validate_config=spec.check_config,
        )
    ]


@hookimpl
def worldflux_registry_importers() -> list[ImporterSpec]:
    """Return the importer of official TD-MPC2 checkpoints."""
    return [
        ImporterSpec(
            family=spec.FAMILY,
            source_format="tdmpc2-official-pt",
            summary="checkpoint.pt written by the official TD-MPC2 code "
            "(nicklashansen/tdmpc2 @ e9f5932)",
            importer="worldflux_tdmpc2.importer:import_checkpoint",
        )
    ]
