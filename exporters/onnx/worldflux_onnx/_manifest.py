"""``manifest.json`` of an ONNX export: names, versions, schema, reading, replacing.

The manifest is checked against one schema (`check_manifest`) before anything in it is used;
every file it names is a plain name inside the export directory, opened only as a regular file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worldflux_registry import ExportError, IOContract
from worldflux_registry.plugin_api import (
    ArtifactDir,
    clean_stale,
    default_file_mode,
    load_json,
    read_artifact_manifest,
    read_consistent,
    replace_dir,
    writer_lock,
)

from ._names import KNOWN_GRAPHS, MODE_SUFFIX

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_OPSET",
    "MIN_OPSET",
    "check_manifest",
    "check_opset",
    "check_replaceable",
    "export_files",
    "hash_files",
    "install",
    "read_manifest",
    "read_verified",
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


#: Opsets accepted by ``export(..., opset=)``; the opset written is checked to be the one asked.
MIN_OPSET = 13
MAX_OPSET = 23
PRECISIONS = ("fp32", "fp16", "int8")
_GRAPH_NAME = re.compile(rf"^({'|'.join(KNOWN_GRAPHS)})({re.escape(MODE_SUFFIX)})?$")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_REEXPORT = "the manifest was edited or damaged; re-export the model"


def check_opset(opset: object) -> int:
    """``opset`` as an int when ``MIN_OPSET <= opset <= MAX_OPSET``; else `ExportError`."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset {str(opset)[:40]!r} is not an integer", hint="e.g. opset=18")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}",
            hint="leave it out for the default (18), or pick one in the range",
        )
    return opset


def _fail(path: Path, what: str, graph: str | None = None) -> ExportError:
    return ExportError(f"{path} {what}", hint=_REEXPORT, graph=graph)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_file_entry(path: Path, graph: str, entry: object, where: str) -> None:
    if not isinstance(entry, Mapping):
        raise _fail(path, f"has a {where} of graph {graph!r} that is not an object", graph)
    name = entry.get("file")
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or re.search(r"[/\\\x00]", name)
    ):
        raise _fail(
            path,
            f"names {where} file {str(name)[:80]!r} for graph {graph!r}: not a plain "
            "file name inside the export directory",
            graph,
        )
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise _fail(path, f"has no valid sha256 for {where} {name!r} of graph {graph!r}", graph)


def check_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Check ``manifest`` (read from ``path``) against the schema; raise `ExportError` naming
    the first bad field.

    The schema: ``format_version`` an int >= 1 (not a bool), ``fingerprint`` a string,
    ``contract`` an object, ``precision`` ``"fp32"`` or ``"fp16"``, ``opset`` an int in the
    supported range, ``graphs`` a non-empty object whose keys are graph names and whose
    entries have a plain ``file`` name, a ``sha256:<64 hex>``, ``inputs`` / ``outputs`` lists,
    optional ``external_data`` (a list of ``{file, sha256}``), ``horizon`` (int >= 1) and
    ``mode_of`` (a graph name).
    """
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"has invalid format_version {str(version)[:40]!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this "
            "worldflux-onnx reads",
            hint="upgrade worldflux-onnx (pip install -U worldflux-onnx)",
        )
    for key, kind in (("contract", dict), ("fingerprint", str), ("graphs", dict)):
        if key not in manifest:
            raise ExportError(f"{path} has no {key!r} entry", hint="re-export the model")
        if not isinstance(manifest[key], kind):
            raise _fail(path, f"has a {key!r} entry that is not a {kind.__name__}")
    precision = manifest.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise _fail(path, f"has precision {str(precision)[:40]!r}; expected fp32, fp16 or int8")
    opset = manifest.get("opset", MIN_OPSET)
    if not _is_int(opset) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise _fail(path, f"has opset {str(opset)[:40]!r}; expected {MIN_OPSET}..{MAX_OPSET}")
    graphs = manifest["graphs"]
    if not graphs:
        raise _fail(path, "lists no graphs")
    for graph, entry in graphs.items():
        if not _GRAPH_NAME.match(graph):
            raise _fail(path, f"lists unknown graph {graph[:40]!r}", graph)
        _check_file_entry(path, graph, entry, "graph")
        for key in ("inputs", "outputs"):
            if not isinstance(entry.get(key, []), list):
                raise _fail(path, f"has {key!r} of graph {graph!r} that is not a list", graph)
        extra = entry.get("external_data", [])
        if not isinstance(extra, list):
            raise _fail(path, f"has external_data of graph {graph!r} that is not a list", graph)
        for item in extra:
            _check_file_entry(path, graph, item, "external data")
        if "horizon" in entry and (not _is_int(entry["horizon"]) or entry["horizon"] < 1):
            raise _fail(
                path, f"records horizon {str(entry['horizon'])[:40]!r} for {graph!r}", graph
            )
        mode_of = entry.get("mode_of")
        if "mode_of" in entry and (not isinstance(mode_of, str) or mode_of not in graphs):
            raise _fail(path, f"says {graph!r} is the mode of an unlisted graph", graph)


def export_files(directory: Path) -> set[str]:
    """The entries of an export directory that belong to the export (the rest is kept).

    The manifest and every file it lists, and the TensorRT cache the runtime writes; a
    directory without a readable manifest (a build in progress) is all the export's own.
    """
    try:
        with ArtifactDir(directory, ExportError) as adir:
            manifest = load_json(
                adir.read(MANIFEST, what="manifest"), what=MANIFEST, error=ExportError
            )
    except ExportError:
        return {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    own = {MANIFEST, "trt_cache"}
    graphs = manifest.get("graphs") if isinstance(manifest, dict) else None
    for entry in graphs.values() if isinstance(graphs, dict) else ():
        if isinstance(entry, dict):
            own.add(str(entry.get("file")))
            for item in entry.get("external_data") or ():
                if isinstance(item, dict):
                    own.add(str(item.get("file")))
    return own


def check_replaceable(out: Path, *, overwrite: bool = True) -> None:
    """Raise `ExportError` unless ``out`` is absent, empty, or a valid ONNX export to replace.

    A directory that merely holds a file named ``manifest.json`` (a web app) is never
    replaced: its manifest must be this format's and pass `check_manifest`.
    """
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory", hint="choose another path")
    if not any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists", hint="pass overwrite=True or another directory")
        return
    try:
        manifest = read_artifact_manifest(out, ExportError)
        if manifest["format"] != FORMAT:
            raise ExportError(f"format {str(manifest['format'])[:40]!r}")
        check_manifest(out / MANIFEST, manifest)
    except ExportError as exc:
        raise ExportError(
            f"{out} exists and is not an export directory of {FORMAT!r}; refusing to replace "
            f"it ({exc.message})",
            hint="choose an empty or new directory",
        ) from None
    if not overwrite:
        raise ExportError(f"{out} exists", hint="pass overwrite=True or another directory")


def install(tmp: Path, out: Path, *, overwrite: bool = True) -> list[str]:
    """Swap the finished export ``tmp`` into ``out`` atomically (one writer at a time).

    Holds the writer's lock of ``out``, recovers what a killed writer left, checks again that
    ``out`` may be replaced, then `replace_dir` (entries of the old directory that are not the
    export's own are kept). Returns the names kept.
    """
    mode = default_file_mode()
    for entry in tmp.iterdir():  # writers that use mkstemp leave 0600: honour the umask
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, mode)
    with writer_lock(out, ExportError, "export"):
        clean_stale(out, export_files, keep=tmp)
        check_replaceable(out, overwrite=overwrite)
        return replace_dir(tmp, out, export_files, error=ExportError)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary sibling file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_verified(directory: Path) -> tuple[dict[str, Any], IOContract]:
    """`read_manifest` and `hash_files` through one opened directory, so both see one version.

    An export swapped in by a concurrent writer while this reads is seen whole or not at all:
    a read that raced a replacement (the directory at ``directory`` is no longer the one
    opened) is retried on the new one.
    """

    def read(adir: ArtifactDir) -> tuple[dict[str, Any], IOContract]:
        manifest, contract = read_manifest(directory, adir)
        hash_files(directory, manifest["graphs"], adir)
        return manifest, contract

    return read_consistent(directory, ExportError, read)


def hash_files(
    directory: Path, graphs: Mapping[str, Any], opened: ArtifactDir | None = None
) -> None:
    """Check every file the manifest lists against its sha256, confined and bounded.

    Each is opened by plain name inside ``directory`` as a regular file (a symlink only when
    it stays inside); nothing is opened or hashed before that check.
    """
    with contextlib.nullcontext(opened) if opened else ArtifactDir(directory, ExportError) as adir:
        for graph, entry in graphs.items():
            for item in [entry, *entry.get("external_data", ())]:
                name = item["file"]
                if not adir.exists(name):
                    raise ExportError(
                        f"graph {graph!r} file {name} is missing from {directory}",
                        hint="copy the whole export directory, or re-export",
                        graph=graph,
                    )
                digest = "sha256:" + adir.sha256(name, what=f"graph {graph!r} file")
                if digest != item["sha256"]:
                    raise ExportError(
                        f"graph {graph!r} file {directory / name} has sha256 {digest}, but the "
                        f"manifest records {item['sha256']}: the file was modified",
                        hint="re-export the model; never edit export files in place",
                        graph=graph,
                    )


def read_manifest(
    directory: Path, opened: ArtifactDir | None = None
) -> tuple[dict[str, Any], IOContract]:
    """Read and check the manifest of an export directory; return it with its contract.

    Raises:
        ExportError: no manifest, not JSON, another format, a newer format version, or a
            contract document that does not parse.
    """
    path = directory / MANIFEST
    if opened is None or not opened.exists(MANIFEST):
        manifest = read_artifact_manifest(directory, ExportError)  # file, JSON, object, format
    else:
        manifest = load_json(
            opened.read(MANIFEST, what="export manifest"), what=str(path), error=ExportError
        )
        if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
            raise _fail(path, "is not a JSON object naming its format")
    if manifest["format"] != FORMAT:
        raise ExportError(
            f"{path} has format {str(manifest['format'])[:80]!r}, expected {FORMAT!r}",
            hint="this loader reads ONNX exports of worldflux-onnx only",
        )
    check_manifest(path, manifest)
    try:
        contract = IOContract.from_dict(manifest["contract"])
    except ExportError:
        raise
    except Exception as exc:
        raise _fail(path, f"has a contract that does not parse: {str(exc)[:200]}") from None
    return manifest, contract
