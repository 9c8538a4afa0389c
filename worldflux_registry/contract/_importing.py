"""What an importer of a foreign (official) checkpoint returns: torch-free data plus the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImportedCheckpoint"]


@dataclass(frozen=True)
class ImportedCheckpoint:
    """A foreign checkpoint brought in by a family's importer, ready to be saved.

    An importer (a function ``import_checkpoint(source, config) -> ImportedCheckpoint`` that a
    family plugin registers) builds the model with the imported weights and accounts for every
    tensor of the source: each one is either in ``mapped`` or in ``dropped`` with its reason.
    `Registry.import_checkpoint` saves the model and writes `provenance` into ``config.json``.

    Attributes:
        model: The `WorldModel` holding the imported weights.
        source_format: Name of the foreign format (``"tdmpc2-official-pt"``).
        source_sha256: ``"sha256:<hex>"`` of the file the weights were read from.
        official_commit: Commit of the official code whose computation the model reproduces.
        mapped: Source tensor name -> model parameter name it was copied into.
        dropped: Source tensor name -> why it was not kept (optimizer state, counters, aliases).
        inferred: Config fields read off tensor shapes or the source's own config.
        notes: Anything else a user should know about this import.
    """

    model: Any
    source_format: str
    source_sha256: str
    official_commit: str | None = None
    mapped: Mapping[str, str] = field(default_factory=dict)
    dropped: Mapping[str, str] = field(default_factory=dict)
    inferred: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def provenance(self) -> dict[str, Any]:
        """The JSON record saved as ``provenance`` in the checkpoint's ``config.json``."""
        return {
            "source_format": self.source_format,
            "source_sha256": self.source_sha256,
            "official_commit": self.official_commit,
            "mapped": dict(sorted(self.mapped.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "inferred": dict(sorted(self.inferred.items())),
            "notes": list(self.notes),
        }
