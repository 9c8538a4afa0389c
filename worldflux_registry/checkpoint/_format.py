"""Checkpoint directories: ``config.json`` + ``model.safetensors``, written atomically.

No pickle: weights are safetensors, everything else JSON. A checkpoint never chooses which code
runs: its family is looked up by name among the installed plugins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from .._files import (
    MAX_ARTIFACT_FILE_BYTES,
    ArtifactDir,
    clean_stale,
    default_file_mode,
    read_consistent,
    replace_dir,
    temp_sibling,
    writer_lock,
)
from .._json import loads as json_loads
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
    its metadata). It is built in a temporary sibling directory and swapped into place in one
    atomic step (Linux ``renameat2``): a concurrent reader sees the old checkpoint or the new
    one. Files in an existing checkpoint directory that are not the checkpoint's own
    (``README.md``, ``runs/``...) are kept. One writer at a time (a lock file beside it);
    temporaries a killed writer left are recovered or removed first. An imported checkpoint
    also records ``provenance`` (`ImportedCheckpoint.provenance`).

    Raises:
        CheckpointError: the model has no family, its config is not JSON, ``path`` exists and
            is not a checkpoint directory (it is never overwritten), or another process is
            saving to ``path`` now.
    """
    import torch
    from safetensors.torch import save_file

    target = Path(path)
    if model.family is None:
        raise CheckpointError(
            f"{type(model).__name__} declares no family",
            hint="set the class attribute 'family' so the checkpoint can be loaded back",
        )
    contract = model.io_contract()
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
    with writer_lock(target, CheckpointError, "checkpoint"):
        clean_stale(target, _own_files)
        _check_replaceable(target)
        _write_new(
            model,
            target,
            contract,
            config,
            versions,
            family_version,
            distribution,
            provenance,
            save_file,
        )
    return target


def _own_files(directory: Path) -> set[str]:
    """The entries of a checkpoint directory that are the checkpoint's (the rest is kept)."""
    return {CONFIG_FILE, WEIGHTS_FILE}


def _write_new(
    model: _Saveable,
    target: Path,
    contract: IOContract,
    config: dict[str, Any],
    versions: dict[str, Any],
    family_version: str | None,
    distribution: str | None,
    provenance: Mapping[str, Any] | None,
    save_file: Any,
) -> None:
    fingerprint = contract.fingerprint()
    tmp = temp_sibling(target)
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
        os.chmod(weights, default_file_mode())  # safetensors writes 0600: honour the umask
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
        _fsync_dir(tmp)
        replace_dir(tmp, target, _own_files, error=CheckpointError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_replaceable(target: Path) -> None:
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(
            f"{target} exists and is not a directory; refusing to replace it",
            hint="choose another path",
        )
    if not any(target.iterdir()):
        return
    try:
        read_config(target)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{target} exists and is not a worldflux checkpoint; refusing to replace it "
            f"({exc.message})",
            hint="choose an empty or new directory",
        ) from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of the checkpoint directory ``path`` (torch-free).

    The file is read confined and bounded (a regular file of at most 16 MiB, see
    docs/threat-model.md) by the strict JSON reader (no duplicate keys, bounded depth and
    numbers). Raises `CheckpointError` naming the problem and the next step.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint directory {root} does not exist",
            hint="check the path, or save one with model.save_pretrained(dir)",
        )
    return read_consistent(root, CheckpointError, read_config_in)


_CORRUPT = "the checkpoint is corrupt; save it again"


def read_config_in(adir: ArtifactDir) -> dict[str, Any]:
    """`read_config` of an already opened checkpoint directory."""
    root = adir.root
    file = root / CONFIG_FILE
    if not adir.exists(CONFIG_FILE):
        raise CheckpointError(
            f"{root} has no {CONFIG_FILE}", hint="save checkpoints with model.save_pretrained(dir)"
        )
    raw = adir.read(CONFIG_FILE, what="checkpoint config")
    data = json_loads(raw, what=str(file), error=CheckpointError, hint=_CORRUPT)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{file} is not a worldflux checkpoint (format {str(found)[:80]!r}, "
            f"expected {FORMAT!r})",
            hint="save checkpoints with model.save_pretrained(dir)",
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{file} has invalid format_version {str(version)[:40]!r}", hint=_CORRUPT
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
                f"{file} has no valid {key!r} (found {str(data.get(key))[:80]!r})", hint=_CORRUPT
            )
    weights = data["weights"]
    if not isinstance(weights.get("file", WEIGHTS_FILE), str) or not isinstance(
        weights.get("sha256"), str
    ):
        raise CheckpointError(f"{file} has no valid weights file and sha256", hint=_CORRUPT)
    aliases = weights.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(f"{file} has invalid weights aliases", hint=_CORRUPT)
    return data


#: Largest safetensors header read (names, dtypes, shapes, metadata): 64 MiB.
MAX_SAFETENSORS_HEADER: int = 64 * 1024 * 1024


def read_weights_in(
    adir: ArtifactDir, name: str, sha256: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of the weights file ``name``, checked against ``sha256`` first.

    The name must be plain (no directory part) and the file regular; its bytes are read once
    (at most `MAX_ARTIFACT_FILE_BYTES`), hashed, and only then parsed, so what is loaded is
    what was hashed. Nothing outside the directory is opened or hashed.
    """
    blob = adir.read(name, what="weights file", max_bytes=MAX_ARTIFACT_FILE_BYTES)
    digest = hashlib.sha256(blob).hexdigest()
    path = adir.root / name
    if digest != sha256:
        raise CheckpointError(
            f"{path} has sha256 {digest}, but config.json records {sha256[:80]}",
            hint="the weights are corrupt or were modified; save the checkpoint again",
        )
    metadata = _safetensors_metadata(blob, path)
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {str(exc)[:200]}",
            hint="the weights are corrupt; save the checkpoint again",
        ) from None
    return tensors, metadata


def _safetensors_metadata(blob: bytes, path: Path) -> dict[str, Any]:
    hint = "the weights are corrupt; save the checkpoint again"
    if len(blob) < 8:
        raise CheckpointError(f"{path} is not a readable safetensors file (too short)", hint=hint)
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(MAX_SAFETENSORS_HEADER, len(blob) - 8):
        raise CheckpointError(
            f"{path} is not a readable safetensors file (header of {size} bytes)", hint=hint
        )
    header = json_loads(blob[8 : 8 + size], what=f"{path} header", error=CheckpointError, hint=hint)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file", hint=hint)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has metadata that is not an object", hint=hint)
    return meta


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
    retyped = [
        f"{k} {got[k].dtype} != {expected[k].dtype}"
        for k in expected
        if k in got and got[k].shape == expected[k].shape and got[k].dtype != expected[k].dtype
    ]
    if retyped:
        # load_state_dict would cast them back silently: a cast checkpoint is another model.
        problems.append(f"tensors of another dtype [{', '.join(retyped)}]")
    if problems:
        raise CheckpointError(
            f"checkpoint {root} does not fit the model: " + "; ".join(problems),
            hint="the weights come from another config or family version",
        )
