"""What family and exporter plugins build on, beyond the top-level API.

The top level (`worldflux_registry`) holds what users call: the registry, `WorldModel`, the
payloads, `State`, the contract and the errors. This module adds what a plugin author needs to
implement the protocol or an exporter: the input type aliases the protocol's methods accept,
the per-step slice of side conditions, the example-input builders the exporter and parity use,
the export-manifest reader and the export's parity check, and the artifact file primitives every
writer and reader of an artifact directory uses (`ArtifactDir` confined bounded reads,
`replace_dir` / `writer_lock` / `clean_stale` atomic replacement, `load_json` the strict JSON
reader; see docs/threat-model.md). Plugins import only from here, the top
level, `worldflux_registry.functional` and `worldflux_registry.hookspecs`; the private modules
behind these names may move between releases.

Names that need torch are loaded on first access, so importing this module stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._files import (
    MAX_ARTIFACT_FILE_BYTES,
    MAX_JSON_FILE_BYTES,
    ArtifactDir,
    atomic_write,
    check_plain_name,
    clean_stale,
    default_file_mode,
    read_consistent,
    replace_dir,
    temp_sibling,
    writer_lock,
)
from ._json import loads as load_json
from .registry._artifact import MANIFEST_FILE, read_artifact_manifest

if TYPE_CHECKING:
    from .exporting._export import check_export
    from .protocol._inputs import (
        conditions_payload,
        encode_input,
        make_actions,
        make_conditions,
        make_noise,
        make_noise_tensor,
        make_observations,
        make_tensor,
        noise_conditions,
        sample_noise,
    )
    from .protocol._model import ActionLike, ObsLike, step_slice

__all__ = [
    "MANIFEST_FILE",
    "MAX_ARTIFACT_FILE_BYTES",
    "MAX_JSON_FILE_BYTES",
    "ActionLike",
    "ArtifactDir",
    "ObsLike",
    "atomic_write",
    "check_plain_name",
    "clean_stale",
    "default_file_mode",
    "load_json",
    "read_consistent",
    "replace_dir",
    "temp_sibling",
    "writer_lock",
    "check_export",
    "conditions_payload",
    "encode_input",
    "make_actions",
    "make_conditions",
    "make_noise",
    "make_noise_tensor",
    "make_observations",
    "make_tensor",
    "noise_conditions",
    "read_artifact_manifest",
    "sample_noise",
    "step_slice",
]

_LAZY = {
    "ActionLike": ".protocol._model",
    "ObsLike": ".protocol._model",
    "step_slice": ".protocol._model",
    "check_export": ".exporting._export",
    "conditions_payload": ".protocol._inputs",
    "encode_input": ".protocol._inputs",
    "make_actions": ".protocol._inputs",
    "make_conditions": ".protocol._inputs",
    "make_noise": ".protocol._inputs",
    "make_noise_tensor": ".protocol._inputs",
    "make_observations": ".protocol._inputs",
    "make_tensor": ".protocol._inputs",
    "noise_conditions": ".protocol._inputs",
    "sample_noise": ".protocol._inputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, "worldflux_registry"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
