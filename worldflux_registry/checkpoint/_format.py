"""Checkpoint directories: ``config.json`` + ``model.safetensors``, written atomically.

No pickle: weights are safetensors, everything else JSON. A checkpoint never chooses which code
runs: its family is looked up by name among the installed plugins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..contract._family import FamilySpec
from ..contract._io import IOContract
from ..contract._locate import FamilyLookup, locate_family
from ..errors import CheckpointError, WorldFluxRegistryError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "read_config",
    "save_pretrained",
]

FORMAT: Final = "worldflux.checkpoint"
FORMAT_VERSION: Final = 1
CONFIG_FILE: Final = "config.json"
WEIGHTS_FILE: Final = "model.safetensors"


class _Saveable(Protocol):
    """What saving needs of a model (a `WorldModel` has all of it)."""

    @property
    def family(self) -> str | None: ...

    @property
    def family_spec(self) -> FamilySpec | None: ...

    @property
    def preset(self) -> str | None: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    def io_contract(self) -> IOContract: ...

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors safetensors accepts, and ``alias -> kept name`` for tied entries.

    safetensors refuses tensors that share storage. Entries that are the very same tensor (tied
    weights) are written once and recorded as aliases; other views into a shared storage are
    written as independent copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    same: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() == 0:
            tensors[name] = tensor.to("cpu").clone()
            continue
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        key = (
            *storage,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in same:
            aliases[name] = same[key]
            continue
        same[key] = name
        out = tensor.to("cpu").contiguous()
        if storage in storages:
            out = out.clone()  # a different view into a storage already written
        storages.add(storage)
        tensors[name] = out
    return tensors, aliases


def _family_record(
    model: _Saveable, registry: FamilyLookup | None
) -> tuple[str | None, str | None, str | None]:
    """(family version, distribution, distribution version) of the model's installed family."""
    try:
        if registry is not None:
            spec = registry.get(model.family or "")
        else:
            spec = model.family_spec or locate_family(model.family or "")
    except WorldFluxRegistryError:
        return None, None, None
    return spec.version, spec.distribution, spec.distribution_version


def save_pretrained(
    model: _Saveable,
    path: str | Path,
    *,
    registry: FamilyLookup | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to the directory ``path`` atomically; return the path.

    The directory gets ``config.json`` (format, family, versions, config, contract,
    fingerprint, weights sha256) and ``model.safetensors`` (fingerprint and family also in
    its metadata). It is built in a temporary sibling directory and renamed into place; an
    existing checkpoint at ``path`` is replaced only once the new one is complete. An imported
    checkpoint also records ``provenance`` (`ImportedCheckpoint.provenance`).

    Raises:
        CheckpointError: the model has no family, its config is not JSON, or ``path`` exists
            and is not a checkpoint directory (it is never overwritten).
    """
    import torch
    from safetensors.torch import save_file

    target = Path(path)
    if model.family is None:
        raise CheckpointError(
            f"{type(model).__name__} declares no family",
            hint="set the class attribute 'family' so the checkpoint can be loaded back",
        )
    _check_replaceable(target)
    contract = model.io_contract()
    fingerprint = contract.fingerprint()
    family_version, distribution, distribution_version = _family_record(model, registry)
    try:
        config = json.loads(json.dumps(dict(model.config), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"config of {model.family!r} is not JSON-serializable: {exc}",
            hint="keep only JSON values in model.config",
            family=model.family,
        ) from None
    versions = {"worldflux-registry": _version("worldflux-registry"), "torch": torch.__version__}
    if distribution:
        versions[distribution] = distribution_version

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        tensors, aliases = _dedupe(model.state_dict())
        weights = tmp / WEIGHTS_FILE
        metadata = {
            "format": "pt",
            "family": model.family,
            "fingerprint": fingerprint,
            "aliases": json.dumps(aliases, sort_keys=True),
        }
        save_file(tensors, str(weights), metadata=metadata)
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": model.family,
            "family_version": family_version,
            "distribution": distribution,
            "preset": model.preset,
            "config": config,
            "contract": contract.to_dict(),
            "fingerprint": fingerprint,
            "versions": versions,
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights), "aliases": aliases},
        }
        if provenance is not None:
            document["provenance"] = json.loads(json.dumps(dict(provenance), allow_nan=False))
        with (tmp / CONFIG_FILE).open("w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory", hint="choose another path")
    if not any(target.iterdir()):
        return
    config = target / CONFIG_FILE
    try:
        is_checkpoint = json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_checkpoint = False
    if not is_checkpoint:
        raise CheckpointError(
            f"{target} exists and is not a worldflux checkpoint; refusing to replace it",
            hint="choose an empty or new directory",
        )


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    # Move the old directory aside first: a failure before the new one is in place puts it back.
    backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def read_config(path: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of the checkpoint directory ``path`` (torch-free)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint directory {root} does not exist",
            hint="check the path, or save one with model.save_pretrained(dir)",
        )
    file = root / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{root} has no {CONFIG_FILE}", hint="save checkpoints with model.save_pretrained(dir)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{file} is not readable JSON: {exc}", hint="the checkpoint is corrupt; save it again"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{file} is not a worldflux checkpoint (format {found!r}, expected {FORMAT!r})",
            hint="save checkpoints with model.save_pretrained(dir)",
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{file} has invalid format_version {version!r}",
            hint="the checkpoint is corrupt; save it again",
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format_version {version}; this worldflux-registry reads up to "
            f"{FORMAT_VERSION}",
            hint="upgrade worldflux-registry: pip install -U worldflux-registry",
        )
    for key, kind in (("family", str), ("config", dict), ("fingerprint", str), ("weights", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(
                f"{file} has no valid {key!r} (found {data.get(key)!r})",
                hint="the checkpoint is corrupt; save it again",
            )
    return data


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {exc}",
            hint="the weights are corrupt; save the checkpoint again",
        ) from None


def _check_tensors(
    root: Path, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]
) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [
        f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in got and got[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors [{', '.join(misshaped)}]")
    if problems:
        raise CheckpointError(
            f"checkpoint {root} does not fit the model: " + "; ".join(problems),
            hint="the weights come from another config or family version",
        )
