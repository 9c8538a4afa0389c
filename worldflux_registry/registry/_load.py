"""Build a model from a checkpoint directory, checked against the installed family."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..checkpoint._format import WEIGHTS_FILE, _check_tensors, _read_weights, _sha256, read_config
from ..errors import CheckpointError, ConfigError, WorldFluxRegistryError

if TYPE_CHECKING:
    import torch

    from ..contract._family import FamilySpec
    from ..protocol._model import WorldModel

__all__ = ["load_checkpoint"]


class _Builds(Protocol):
    """What loading needs of a registry: look a family up and build a model of it."""

    def get(self, name: str) -> FamilySpec: ...

    def build(
        self, spec: FamilySpec, config: Mapping[str, Any], *, preset: str | None = None
    ) -> WorldModel: ...


def _major(version: str | None) -> int | None:
    if not version:
        return None
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def load_checkpoint(
    path: str | Path,
    *,
    registry: _Builds,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> WorldModel:
    """Load a `save_pretrained` directory as a model in eval mode.

    Checks, each raising `CheckpointError` that names the problem and the next step: the
    format and its version; the family is installed (it is looked up by name, never imported
    from the file); its major version is not older than the one that saved; every saved config
    field exists; the installed contract for the saved config has the saved fingerprint; the
    weights' sha256 and safetensors metadata; no missing, unexpected or mis-shaped tensors.
    """
    reg = registry
    root = Path(path)
    data = read_config(root)
    family = data["family"]
    try:
        spec = reg.get(family)
    except WorldFluxRegistryError as exc:
        dist = data.get("distribution")
        installed = "is not installed" if type(exc).__name__ == "ResolutionError" else "failed"
        raise CheckpointError(
            f"checkpoint {root} needs family {family!r}, which {installed}: {exc.message}",
            hint=f"pip install {dist}" if dist else "install the plugin providing it",
            family=family,
        ) from exc

    saved_major, installed_major = _major(data.get("family_version")), _major(spec.version)
    if saved_major is not None and installed_major is not None and saved_major > installed_major:
        raise CheckpointError(
            f"checkpoint {root} was saved by {family!r} {data['family_version']}, newer than "
            f"the installed {spec.version}",
            hint=f"upgrade {spec.distribution or 'the family plugin'}",
            family=family,
        )

    unknown = sorted(k for k in data["config"] if k not in spec.defaults)
    if unknown:
        raise CheckpointError(
            f"checkpoint {root} sets config fields {unknown} that family {family!r} "
            f"{spec.version} does not have",
            hint="install the family version that saved it",
            family=family,
        )
    config = {**spec.defaults, **data["config"]}
    fingerprint = spec.contract_for(config).fingerprint()
    if fingerprint != data["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {root} was saved with contract {data['fingerprint']} but the installed "
            f"{family!r} {spec.version} gives {fingerprint} for its config",
            hint="the family's I/O contract changed; install the version that saved it",
            family=family,
        )

    weights_info = data["weights"]
    weights = root / str(weights_info.get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {root} has no weights file {weights.name!r}",
            hint="the checkpoint is incomplete; save it again",
        )
    digest = _sha256(weights)
    if digest != weights_info.get("sha256"):
        raise CheckpointError(
            f"{weights} has sha256 {digest}, but config.json records {weights_info.get('sha256')}",
            hint="the weights are corrupt or were modified; save the checkpoint again",
            family=family,
        )
    tensors, metadata = _read_weights(weights)
    for key in ("family", "fingerprint"):
        if metadata.get(key) != data[key]:
            raise CheckpointError(
                f"{weights} metadata {key} {metadata.get(key)!r} disagrees with config.json "
                f"({data[key]!r})",
                hint="the files come from different checkpoints; save it again",
            )
    try:
        aliases = json.loads(metadata.get("aliases") or "{}")
    except json.JSONDecodeError:
        raise CheckpointError(
            f"{weights} metadata 'aliases' is not JSON",
            hint="the weights are corrupt; save the checkpoint again",
        ) from None
    for alias, kept in aliases.items():
        if kept in tensors:
            tensors[alias] = tensors[kept]

    model = reg.build(spec, config, preset=data.get("preset"))
    _check_tensors(root, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    return _place(model, device, dtype).eval()


def _place(model: WorldModel, device: Any, dtype: Any) -> WorldModel:
    if dtype is not None:
        import torch

        if isinstance(dtype, str):
            parsed = getattr(torch, dtype, None)
            if not isinstance(parsed, torch.dtype):
                raise ConfigError(f"unknown dtype {dtype!r}", hint="e.g. 'float32', 'float16'")
            dtype = parsed
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    return model
