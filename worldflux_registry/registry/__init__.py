"""Discovery, resolution and loading: from a reference to a model.

Layer 5 (imports protocol, checkpoint, contract, state and the base). ``_discovery`` finds plugins
through entry points (pluggy) and isolates broken ones; ``_registry`` holds `Registry`, which
indexes what they declare, resolves references and builds models; ``_load`` builds a model from a
checkpoint directory; ``_artifact`` reads export manifests; ``_from_export`` rebuilds a torch
model from an export's embedded weights. Listing and resolving never import torch.
"""

from __future__ import annotations

from ._artifact import MANIFEST_FILE, read_artifact_manifest
from ._registry import Registry, Resolved, registry

__all__ = ["MANIFEST_FILE", "Registry", "Resolved", "read_artifact_manifest", "registry"]
