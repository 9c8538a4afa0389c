"""Deployment targets of ONNX exports: what ``worldflux-registry optimize --target`` may name.

Torch-free and cheap to import until a function runs: `check_target` imports onnxruntime to ask
for its execution providers. Used by `worldflux_registry.optimize`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from worldflux_registry import BackendError, ConfigError, ExportError

from ._manifest import MANIFEST, write_json_atomic
from ._names import MODE_SUFFIX

__all__ = ["TARGETS", "check_target", "drop_graphs", "load_options"]

#: Target name -> ONNX Runtime execution providers the loaded artifact runs on.
TARGETS: Final = {"cpu": ("cpu",), "cuda": ("cuda", "cpu")}
_PROVIDER: Final = {"cuda": "CUDAExecutionProvider"}


def check_target(target: str) -> None:
    """Raise unless ``target`` is known and ONNX Runtime can run it on this machine.

    Raises:
        ConfigError: an unknown target (naming the known ones).
        BackendError: the target's execution provider is missing from this onnxruntime build
            (``cuda`` needs onnxruntime-gpu and a GPU), or onnxruntime is not installed.
    """
    if target not in TARGETS:
        from worldflux_registry.errors import did_you_mean

        raise ConfigError(
            f"unknown target {target!r}.{did_you_mean(target, list(TARGETS))}",
            hint="targets: " + ", ".join(TARGETS),
        )
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError(
            f"target {target!r} needs onnxruntime ({exc})",
            hint="pip install 'worldflux-registry[onnx]'",
        ) from exc
    provider = _PROVIDER.get(target)
    available = list(ort.get_available_providers())
    if provider is not None and provider not in available:
        raise BackendError(
            f"target {target!r}: this onnxruntime build has no {provider} "
            f"(providers: {', '.join(available)})",
            hint="pip install onnxruntime-gpu on a machine with a CUDA GPU, or use --target cpu",
        )


def load_options(target: str, *, fused: bool, threads: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `load_artifact` that run an export on ``target``.

    ``fused`` loads the fused ``rollout`` graph (False: roll out step by step); ``threads``
    overrides the session's intra-op threads.
    """
    options: dict[str, Any] = {"providers": list(TARGETS[target]), "fused_rollout": fused}
    if threads is not None:
        options["threads"] = threads
    return options


def drop_graphs(export_dir: str | os.PathLike[str], graphs: set[str]) -> list[str]:
    """Remove ``graphs`` (and their ``.mode`` variants) from an export that is being built.

    For a directory this process wrote and nobody reads yet (a candidate before it is
    installed): deletes the graphs' files and rewrites the manifest without them. Returns the
    graphs removed.

    Raises:
        ExportError: the manifest is missing, or removing would leave no graph.
    """
    root = Path(export_dir)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}", hint="export the model again") from exc
    entries = manifest.get("graphs") or {}
    gone = [g for g in entries if g.removesuffix(MODE_SUFFIX) in graphs]
    if len(gone) == len(entries):
        raise ExportError(f"dropping {sorted(graphs)} would leave {root} without graphs")
    for graph in gone:
        entry = entries.pop(graph)
        for item in [entry, *(entry.get("external_data") or ())]:
            (root / Path(str(item["file"])).name).unlink(missing_ok=True)
    write_json_atomic(path, manifest)
    return gone
