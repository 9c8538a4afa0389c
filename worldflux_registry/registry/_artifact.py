"""Reading the ``manifest.json`` of an export directory (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._files import read_consistent
from .._json import loads as load_json
from ..errors import ResolutionError, WorldFluxRegistryError

__all__ = ["MANIFEST_FILE", "read_artifact_manifest"]

MANIFEST_FILE = "manifest.json"

_REEXPORT = "export the model again with export(model, format, dir)"


def read_artifact_manifest(
    directory: str | os.PathLike[str],
    error: type[WorldFluxRegistryError] = ResolutionError,
) -> dict[str, Any]:
    """The ``manifest.json`` of export ``directory`` as a dict whose ``format`` is a string.

    Only the envelope is checked; what else a manifest must hold is its exporter's business.
    The file is read confined and bounded (a regular file of at most 16 MiB) by the strict JSON
    reader (no duplicate keys, bounded depth and numbers).

    Raises:
        error: (`ResolutionError` unless given) naming the file and the next step when it is
            missing, unreadable or not JSON, not a JSON object, or names no ``format``.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise error(
            f"{directory} is not an export directory (no {MANIFEST_FILE})",
            hint="pass the directory written by export(model, format, dir)",
        )
    raw = read_consistent(
        directory, error, lambda adir: adir.read(MANIFEST_FILE, what="export manifest")
    )
    data = load_json(raw, what=str(path), error=error, hint=_REEXPORT)
    if not isinstance(data, dict):
        raise error(f"{path} holds {type(data).__name__}, not a JSON object", hint=_REEXPORT)
    if not isinstance(data.get("format"), str):
        raise error(
            f"{path} names no artifact format (a string 'format' entry)",
            hint=_REEXPORT + "; a manifest routes to its loader by 'format'",
        )
    return data
