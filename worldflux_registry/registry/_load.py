"""Build a model from a checkpoint directory, checked against the installed family."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._files import ArtifactDir, clean_stale, read_consistent, stale_siblings, writer_lock
from ..checkpoint._format import (
    WEIGHTS_FILE,
    _check_tensors,
    _own_files,
    read_config_in,
    read_weights_in,
)
from ..errors import BackendError, CheckpointError, ConfigError, WorldFluxRegistryError

if TYPE_CHECKING:
    import torch

    from ..contract._family import FamilySpec
    from ..protocol._model import WorldModel

__all__ = ["load_checkpoint", "recover"]


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
    weights' sha256 and safetensors metadata; no missing, unexpected, mis-shaped or re-typed
    tensors. Every file is read through one opened directory (a concurrent save swapping in a
    new checkpoint is seen whole or not at all; a read that raced one is retried), by plain name
    and only when it is a regular file inside the directory.
    """
    root = Path(path)
    recover(root)
    # one opened version of the directory; re-read when a writer swapped it mid-read
    data, spec, config, tensors = read_consistent(
        root, CheckpointError, lambda adir: _read_checkpoint(adir, registry)
    )
    model = registry.build(spec, config, preset=data.get("preset"))
    _check_tensors(root, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    return _place(model, device, dtype).eval()


def recover(root: Path) -> None:
    """A checkpoint lost by a writer killed mid-replacement is put back before reading."""
    if os.path.lexists(root) or not stale_siblings(root):
        return
    try:
        with writer_lock(root, CheckpointError, "checkpoint"):
            clean_stale(root, _own_files)
    except (CheckpointError, OSError):
        pass  # a live writer holds it, or the directory is read-only: read what is there


def _read_checkpoint(
    adir: ArtifactDir, reg: _Builds
) -> tuple[dict[str, Any], FamilySpec, dict[str, Any], dict[str, torch.Tensor]]:
    data = read_config_in(adir)
    spec, config = _check_config(adir.root, data, reg)
    info = data["weights"]
    name = info.get("file", WEIGHTS_FILE)
    if not adir.exists(str(name)) and "/" not in str(name) and str(name) not in (".", ".."):
        raise CheckpointError(
            f"checkpoint {adir.root} has no weights file {str(name)[:80]!r}",
            hint="the checkpoint is incomplete; save it again",
        )
    tensors, metadata = read_weights_in(adir, name, info["sha256"])
    return data, spec, config, _with_aliases(adir.root, data, tensors, metadata)


def _with_aliases(
    root: Path, data: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    weights = root / str(data["weights"].get("file", WEIGHTS_FILE))
    for key in ("family", "fingerprint"):
        if metadata.get(key) != data[key]:
            raise CheckpointError(
                f"{weights} metadata {key} {str(metadata.get(key))[:80]!r} disagrees with "
                f"config.json ({data[key]!r})",
                hint="the files come from different checkpoints; save it again",
            )
    # Aliases (tied weights) come from config.json; the metadata copy must agree with it.
    aliases = data["weights"].get("aliases")
    if aliases is None:
        try:
            aliases = json.loads(metadata.get("aliases") or "{}")
        except (json.JSONDecodeError, RecursionError, TypeError):
            aliases = None
        if not isinstance(aliases, dict):
            raise CheckpointError(
                f"{weights} metadata 'aliases' is not a JSON object",
                hint="the weights are corrupt; save the checkpoint again",
            )
    for alias, kept in aliases.items():
        if alias in tensors or kept not in tensors:
            raise CheckpointError(
                f"{weights} alias {str(alias)[:80]!r} -> {str(kept)[:80]!r} "
                + ("would overwrite a stored tensor" if alias in tensors else "names no tensor"),
                hint="the checkpoint was edited; save it again",
            )
        tensors[alias] = tensors[kept]
    return tensors


def _family_spec(reg: _Builds, family: str, distribution: object) -> FamilySpec:
    """The installed family; when two distributions claim its name, the one that saved it."""
    from ..errors import PluginConflictError

    try:
        return reg.get(family)
    except PluginConflictError:
        if not isinstance(distribution, str) or not distribution:
            raise
        return reg.get(f"{distribution}::{family}")


def _check_config(
    root: Path, data: dict[str, Any], reg: _Builds
) -> tuple[FamilySpec, dict[str, Any]]:
    family = data["family"]
    try:
        spec = _family_spec(reg, family, data.get("distribution"))
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
    return spec, config


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
        model = model.to(device=_usable_device(device))
    return model


def _usable_device(device: Any) -> torch.device:
    """``device`` as a torch device this process can place tensors on, or a typed error.

    torch reports a CUDA device on a CPU-only build as an ``AssertionError`` deep inside
    ``Module.to``; callers get a `BackendError` saying what to do instead.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"unknown device {device!r}", hint="e.g. 'cpu', 'cuda', 'cuda:1'", device=device
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None
            why = "no GPU is visible" if built else "this torch build has no CUDA"
            raise BackendError(
                f"device {str(device)!r} asked for, but {why}",
                hint="load with device='cpu', or install a CUDA build of torch",
                device=str(device),
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise BackendError(
                f"device {str(device)!r} asked for, but only {count} CUDA device(s) are visible",
                hint=f"use an index below {count}, or check CUDA_VISIBLE_DEVICES",
                device=str(device),
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(
            f"device {str(device)!r} asked for, but MPS is not available here",
            hint="load with device='cpu'",
            device=str(device),
        )
    return parsed
