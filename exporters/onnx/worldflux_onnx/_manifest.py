"""``manifest.json`` of an ONNX export: names, versions, reading and verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from worldflux_registry import ExportError, IOContract
from worldflux_registry.plugin_api import read_artifact_manifest

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "read_manifest",
    "sha256_file",
    "write_json_atomic",
]

#: ``format`` value of the manifest (routes ``registry.load(dir)`` to this package).
FORMAT = "worldflux.onnx"
#: Manifest layout version written by this exporter; newer ones are refused.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Keys of ``metadata_props`` written into every graph.
META_FINGERPRINT = "worldflux.fingerprint"
META_FAMILY = "worldflux.family"
META_PRESET = "worldflux.preset"
META_GRAPH = "worldflux.graph"
META_EXPORTER = "worldflux.exporter_version"


def sha256_file(path: Path) -> str:
    """``"sha256:" + hex`` of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary sibling file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(directory: Path) -> tuple[dict[str, Any], IOContract]:
    """Read and check the manifest of an export directory; return it with its contract.

    Raises:
        ExportError: no manifest, not JSON, another format, a newer format version, or a
            contract document that does not parse.
    """
    path = directory / MANIFEST
    manifest = read_artifact_manifest(directory, ExportError)  # file, JSON, object, format
    if manifest["format"] != FORMAT:
        raise ExportError(
            f"{path} has format {manifest['format']!r}, expected {FORMAT!r}",
            hint="this loader reads ONNX exports of worldflux-onnx only",
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{path} has invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this "
            "worldflux-onnx reads",
            hint="upgrade worldflux-onnx (pip install -U worldflux-onnx)",
        )
    for key in ("contract", "fingerprint", "graphs"):
        if key not in manifest:
            raise ExportError(f"{path} has no {key!r} entry", hint="re-export the model")
    return manifest, IOContract.from_dict(manifest["contract"])
