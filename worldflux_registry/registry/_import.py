"""Run a family's importer of a foreign checkpoint and save what it returns."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint._format import save_pretrained
from ..contract._family import FamilySpec, ImporterSpec
from ..contract._importing import ImportedCheckpoint
from ..contract._locate import FamilyLookup
from ..errors import CheckpointError
from ._discovery import resolve_target

__all__ = ["parse_config_pairs", "run_importer"]


def parse_config_pairs(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``; `CheckpointError` naming a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CheckpointError(
                f"--config {pair!r} is not KEY=VALUE", hint="e.g. --config action_kind=discrete"
            )
        if key.strip() in out:
            raise CheckpointError(f"--config sets {key.strip()!r} twice", hint="give it once")
        out[key.strip()] = value.strip()
    return out


def run_importer(
    spec: FamilySpec,
    importer: ImporterSpec,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: Mapping[str, str],
    *,
    registry: FamilyLookup | None = None,
) -> ImportedCheckpoint:
    """Call ``importer`` on ``source``, check its answer, save the model with its provenance."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist", hint=f"pass the {importer.source_format} file or folder"
        )
    function = resolve_target(
        importer.importer, what=f"importer {importer.name!r}", distribution=importer.distribution
    )
    result = function(path, dict(config))
    if not isinstance(result, ImportedCheckpoint):
        raise CheckpointError(
            f"importer {importer.name!r} returned {type(result).__name__}, "
            "not an ImportedCheckpoint",
            hint=f"report this to {importer.distribution or 'the plugin author'}",
        )
    model = result.model
    if getattr(model, "family", None) != spec.name:
        raise CheckpointError(
            f"importer {importer.name!r} built a model of family "
            f"{getattr(model, 'family', None)!r}, not {spec.name!r}",
            hint=f"report this to {importer.distribution or 'the plugin author'}",
        )
    if getattr(model, "family_spec", None) is None:
        model.family_spec = spec
    save_pretrained(model, Path(out), registry=registry, provenance=result.provenance())
    return result
