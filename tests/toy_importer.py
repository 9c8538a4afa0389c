"""A third-party importer for the toyfamily fixture, registered by the tests as a plugin object.

The "foreign" format is an ``.npz`` written by some other training code: every parameter under
``params/<state-dict key>``, plus a ``step`` counter and ``opt/*`` optimizer moments that an
import drops. ``--config hidden=N`` must be given (the format does not record it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from worldflux_registry import CheckpointError, ImportedCheckpoint, ImporterSpec, hookimpl

FORMAT = "toy-npz"


def import_toy(source: Path, config: Mapping[str, str]) -> ImportedCheckpoint:
    """Read ``source`` (see the module docstring) into a ``toyfamily`` model."""
    import hashlib

    import torch
    from wf_fixture_good.model import ToyWorldModel
    from wf_fixture_good.plugin import DEFAULTS

    if "hidden" not in config:
        raise CheckpointError(f"{source} does not record 'hidden'", hint="pass --config hidden=N")
    with np.load(source, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    cfg = {**DEFAULTS, "hidden": int(config["hidden"])}
    model = ToyWorldModel.from_config(cfg)
    model.config = cfg
    own = model.state_dict()
    mapped, dropped, tensors = {}, {}, {}
    for key, array in arrays.items():
        if key.startswith("params/") and key[7:] in own:
            tensors[key[7:]] = torch.from_numpy(array)
            mapped[key] = key[7:]
        elif key == "step" or key.startswith("opt/"):
            dropped[key] = "training state (counter / optimizer moments)"
        else:
            raise CheckpointError(f"{source} holds an unknown tensor {key!r}", hint="not a toy-npz")
    model.load_state_dict(tensors, strict=True)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return ImportedCheckpoint(
        model=model,
        source_format=FORMAT,
        source_sha256=f"sha256:{digest}",
        official_commit="toy@1",
        mapped=mapped,
        dropped=dropped,
        inferred={"obs_dim": cfg["obs_dim"]},
    )


def not_a_checkpoint(source: Path, config: Mapping[str, str]) -> object:
    """A broken importer: returns the wrong type."""
    return {"model": None}


class ToyImporterPlugin:
    """Plugin object declaring the toy importer."""

    def __init__(self, target: str = "toy_importer:import_toy", fmt: str = FORMAT) -> None:
        self.target, self.fmt = target, fmt

    @hookimpl
    def worldflux_registry_importers(self) -> list[ImporterSpec]:
        return [ImporterSpec("toyfamily", self.fmt, "toy npz from elsewhere", self.target)]
