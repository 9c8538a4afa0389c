"""Shared-memory exchange of States: one POSIX segment per State, zero-copy attach.

A State's tensors are packed into one shared-memory segment after a 64-byte header, each at a
64-byte aligned offset, and described by a JSON-able descriptor. Attaching maps the segment and
wraps each tensor around it with ``torch.frombuffer``: no copy.

The header proves a segment was written by this format: magic ``WFSHMv1``, the size of the
State data (which must equal the descriptor's), the creator's pid and a random token the
descriptor repeats. Only such segments are attached or unlinked; anything else named by a
descriptor (another program's segment, a directory, a symlink, a FIFO) is refused with a
`StateFormatError`. WorldFlux's own descriptors (magic ``WFST-SHM``, one segment per tensor,
no header) are attached too, with the weaker checks their format allows (see `attach`).

Lifetime is explicit: segments are not registered with Python's resource tracker, so a segment
lives until ``unlink_shared_memory(descriptor)`` (or ``close_shared_memory(unlink=True)`` on an
attached State). An attached mapping lives as long as any tensor viewing it. Segments whose
creator died are listed and removed by ``worldflux-registry shm list|clean`` (`segments`,
`clean`).

What ``copy=False`` cannot protect against: a process that can open the segment may write it
under your tensors at any time, or truncate it, and touching a truncated page of a mapping
kills the process with SIGBUS. Attach with ``copy=True`` when the peer is not trusted; the
copy is made right after the size checks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._json import short
from ..errors import StateFormatError
from ._wire import (
    TensorRecord,
    check_bool_bytes,
    check_state_meta,
    parse_record,
    tensor_bytes,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

__all__ = ["attach", "clean", "create", "segments", "unlink", "unlink_attached"]

DESCRIPTOR_FORMAT: Final = "worldflux.state.shm"
DESCRIPTOR_VERSION: Final = "v1"
#: ``magic`` of WorldFlux's own descriptors (one segment per tensor, no header).
WORLDFLUX_MAGIC: Final = "WFST-SHM"
ALIGN: Final = 64
#: Segment header: magic, data size, creator pid, creation time (ns), token; padded to 64.
HEADER: Final = struct.Struct("<8sQQQ16s")
HEADER_SIZE: Final = 64
MAGIC: Final = b"WFSHMv1\x00"
SHM_DIR: Final = Path("/dev/shm")
# Segment names stay within macOS's 31-character limit (with the leading slash).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,30}")
_WF_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,250}")
_FOREIGN: Final = "wfst-shm:"
_POSIX: Final = sys.platform != "win32"


def _segment_name(namespace: str) -> str:
    prefix = "".join(ch for ch in namespace if ch.isascii() and ch.isalnum()).lower()[:12]
    return f"{prefix or 'wfstate'}-{secrets.token_hex(8)}"


def _shm_open(name: str, flags: int, mode: int = 0o600) -> int:
    import _posixshmem  # type: ignore[import-not-found,unused-ignore]

    return int(_posixshmem.shm_open("/" + name, flags, mode=mode))


def _shm_unlink(name: str) -> None:
    import _posixshmem  # type: ignore[import-not-found,unused-ignore]

    _posixshmem.shm_unlink("/" + name)


def _open_existing(name: str, *, write: bool) -> tuple[int, int]:
    """(fd, size) of the existing regular-file segment ``name``; every refusal is typed."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = _shm_open(name, flags)
    except FileNotFoundError:
        raise StateFormatError(
            f"no shared-memory segment named {name!r}",
            hint="it was unlinked, or the descriptor comes from another machine",
        ) from None
    except OSError as exc:
        raise StateFormatError(
            f"cannot open shared-memory segment {name!r}: {exc.strerror}",
            hint="the name is taken by something that is not a State segment",
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StateFormatError(
            f"shared-memory name {name!r} is not a segment (not a regular file)",
            hint="the name is taken by something that is not a State segment",
        )
    return fd, info.st_size


def _read_header(fd: int, size: int) -> tuple[int, int, int, bytes] | None:
    """(data size, pid, created ns, token) from a segment's header; None when it has none."""
    if size < HEADER_SIZE:
        return None
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size:
        return None
    magic, data_size, pid, created, token = HEADER.unpack(raw)
    if magic != MAGIC or data_size > size - HEADER_SIZE:
        return None
    return data_size, pid, created, token


def create(
    tensors: Mapping[str, object], meta: object, *, namespace: str, allow_copy_from_cuda: bool
) -> dict[str, Any]:
    """Copy tensors into a new shared-memory segment; return its JSON-able descriptor.

    Everything is checked before the segment exists, and the segment's memory is reserved
    (``posix_fallocate``) before a byte is written, so a full ``/dev/shm`` (Docker's default
    is 64 MB) is a `StateFormatError`, never a SIGBUS, and leaves no segment behind.
    """
    if not isinstance(namespace, str):
        raise StateFormatError(f"namespace {short(namespace, 60)} is not a string")
    if not _POSIX:
        raise StateFormatError(
            "State shared memory needs POSIX shared memory (Linux or macOS)",
            hint="send State.serialize() bytes instead",
        )
    checked_meta = check_state_meta(meta)
    entries: list[dict[str, Any]] = []
    chunks = []
    offset = 0
    for name, tensor in tensors.items():
        record, flat = tensor_bytes(name, tensor, allow_copy_from_device=allow_copy_from_cuda)
        offset = -(-offset // ALIGN) * ALIGN
        entries.append({**record.to_json(), "offset": offset})
        chunks.append((offset, flat))
        offset += record.nbytes
    size = offset
    total = HEADER_SIZE + size

    fd = -1
    name = ""
    for _ in range(8):
        name = _segment_name(namespace)
        try:
            fd = _shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise StateFormatError(
                f"cannot create a shared-memory segment: {exc.strerror}",
                hint="check that /dev/shm exists and is writable",
            ) from None
    if fd < 0:
        raise StateFormatError("could not find a free shared-memory segment name")
    token = secrets.token_bytes(16)
    try:
        _reserve(fd, total, name)
        with mmap.mmap(fd, total) as mapped:
            mapped[: HEADER.size] = HEADER.pack(MAGIC, size, os.getpid(), time.time_ns(), token)
            if size:
                import numpy as np

                dst = np.frombuffer(mapped, dtype=np.uint8, count=size, offset=HEADER_SIZE)
                for start, flat in chunks:
                    dst[start : start + flat.nbytes] = flat
                del dst
    except BaseException:
        with contextlib.suppress(OSError):
            _shm_unlink(name)
        raise
    finally:
        os.close(fd)
    return {
        "format": DESCRIPTOR_FORMAT,
        "version": DESCRIPTOR_VERSION,
        "segment": name,
        "size": size,
        "token": token.hex(),
        "meta": dict(checked_meta),
        "tensors": entries,
    }


def _reserve(fd: int, total: int, name: str) -> None:
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, total)
        else:  # macOS: no fallocate; ftruncate alone (a full tmpfs then fails on write)
            os.ftruncate(fd, total)
    except OSError as exc:
        free = ""
        with contextlib.suppress(OSError):
            st = os.statvfs(SHM_DIR)
            free = f" ({st.f_bavail * st.f_frsize} bytes free in {SHM_DIR})"
        raise StateFormatError(
            f"not enough shared memory for a {total}-byte State segment{free}: {exc.strerror}",
            hint="enlarge /dev/shm (docker run --shm-size=1g), free segments with "
            "`worldflux-registry shm clean`, or send State.serialize() bytes instead",
        ) from None


def _check_descriptor(descriptor: object) -> Mapping[str, Any]:
    if not isinstance(descriptor, Mapping):
        raise StateFormatError(
            f"shared-memory descriptor is a {type(descriptor).__name__}, not a dict",
            hint="pass the dict returned by State.to_shared_memory()",
        )
    return descriptor


def _segment_of(descriptor: Mapping[str, Any]) -> str:
    if descriptor.get("format") != DESCRIPTOR_FORMAT:
        raise StateFormatError(
            f"shared-memory descriptor format is {short(descriptor.get('format'), 60)}, "
            f"not {DESCRIPTOR_FORMAT!r} (nor a WorldFlux {WORLDFLUX_MAGIC!r} descriptor)"
        )
    if descriptor.get("version") != DESCRIPTOR_VERSION:
        raise StateFormatError(
            f"shared-memory descriptor version {short(descriptor.get('version'), 40)} is unknown",
            hint=f"this library reads {DESCRIPTOR_VERSION!r}",
        )
    name = descriptor.get("segment")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StateFormatError(
            f"shared-memory descriptor has invalid segment name {short(name, 60)}"
        )
    return name


def _records(
    raw_records: object, where: str, size: int | None
) -> list[tuple[TensorRecord, dict[str, Any]]]:
    if not isinstance(raw_records, list):
        raise StateFormatError(f"{where} has no 'tensors' list")
    out: list[tuple[TensorRecord, dict[str, Any]]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_records):
        record = parse_record(raw, index, where=where)
        if record.name in seen:
            raise StateFormatError(f"{where} names tensor {short(record.name, 80)} twice")
        seen.add(record.name)
        assert isinstance(raw, dict)
        if size is not None:
            offset = raw.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise StateFormatError(
                    f"{where}: tensor {record.name!r} has invalid offset {short(offset, 40)}"
                )
            if offset % ALIGN:
                raise StateFormatError(
                    f"{where}: tensor {record.name!r} offset {offset} is not {ALIGN}-byte aligned"
                )
            if offset + record.nbytes > size:
                raise StateFormatError(
                    f"{where}: tensor {record.name!r} bytes [{offset}, {offset + record.nbytes}) "
                    f"run past the segment size {size}"
                )
        out.append((record, raw))
    return out


def _parse(
    descriptor: Mapping[str, Any],
) -> tuple[str, int, list[tuple[TensorRecord, dict[str, Any]]], dict[str, Any]]:
    name = _segment_of(descriptor)
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StateFormatError(f"shared-memory descriptor has invalid size {short(size, 40)}")
    meta = descriptor.get("meta", {})
    if not isinstance(meta, dict):
        raise StateFormatError(f"shared-memory descriptor meta is a {type(meta).__name__}")
    where = f"shared-memory descriptor {name!r}"
    return name, size, _records(descriptor.get("tensors"), where, size), meta


def attach(
    descriptor: object, *, copy: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Map a descriptor's segment; return (tensors, meta, a handle for `unlink_attached`).

    With ``copy=False`` the tensors view the segment (writes are shared both ways); the mapping
    is released when the last of them is freed. With ``copy=True`` they are private copies.
    A segment is attached only when its header proves it is a State segment of the size the
    descriptor gives (and, when the descriptor carries one, the same token).

    A WorldFlux descriptor (``magic`` ``WFST-SHM``) names one header-less segment per tensor:
    each must be a regular file holding at least the tensor's bytes, and names are plain.
    """
    desc = _check_descriptor(descriptor)
    if desc.get("magic") == WORLDFLUX_MAGIC:
        return _attach_worldflux(desc, copy=copy)
    name, size, records, meta = _parse(desc)
    if not _POSIX:
        raise StateFormatError("State shared memory needs POSIX shared memory (Linux or macOS)")
    fd, file_size = _open_existing(name, write=not copy)
    try:
        header = _read_header(fd, file_size)
        if header is None:
            raise StateFormatError(
                f"shared-memory segment {name!r} is not a worldflux State segment (no header)",
                hint="attach only descriptors returned by State.to_shared_memory()",
            )
        data_size, _, _, token = header
        if data_size != size:
            raise StateFormatError(
                f"shared-memory segment {name!r} holds {data_size} bytes of State data, "
                f"the descriptor says {size}",
                hint="the descriptor was edited or belongs to another segment",
            )
        want = desc.get("token")
        if want is not None and want != token.hex():
            raise StateFormatError(
                f"shared-memory segment {name!r} was not written for this descriptor (token)",
                hint="the segment name was reused; the descriptor is stale",
            )
        total = HEADER_SIZE + size
        access = mmap.ACCESS_READ if copy else mmap.ACCESS_WRITE
        mapped = mmap.mmap(fd, total, access=access)
    finally:
        os.close(fd)
    tensors = _views(mapped, HEADER_SIZE, [(r, raw["offset"]) for r, raw in records], copy)
    del mapped
    return tensors, dict(meta), name


def _views(
    mapped: mmap.mmap, base: int, records: list[tuple[TensorRecord, int]], copy: bool
) -> dict[str, torch.Tensor]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for record, offset in records:
        dtype = torch_dtype(record.dtype)
        if record.nbytes == 0:
            tensor = torch.empty(record.shape, dtype=dtype)
        else:
            count = record.nbytes // dtype.itemsize
            if copy:
                raw = bytearray(mapped[base + offset : base + offset + record.nbytes])
                tensor = torch.frombuffer(raw, dtype=dtype, count=count).view(record.shape)
            else:
                with _quiet_readonly():
                    tensor = torch.frombuffer(
                        mapped, dtype=dtype, count=count, offset=base + offset
                    )
                tensor = tensor.view(record.shape)
        if record.dtype == "bool":
            check_bool_bytes(record.name, tensor)
        if record.requires_grad:
            tensor.requires_grad_(True)
        tensors[record.name] = tensor
    return tensors


@contextlib.contextmanager
def _quiet_readonly() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-writable.*")
        yield


def _attach_worldflux(
    desc: Mapping[str, Any], *, copy: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    version = desc.get("version", "v1")
    if version != "v1":
        raise StateFormatError(f"WorldFlux shared-memory descriptor version {short(version, 40)}")
    meta = desc.get("meta", {})
    if not isinstance(meta, dict):
        raise StateFormatError(
            f"WorldFlux shared-memory descriptor meta is a {type(meta).__name__}"
        )
    check_state_meta(meta)
    records = _records(desc.get("tensors"), "WorldFlux shared-memory descriptor", None)
    names = [_worldflux_name(raw) for _, raw in records]
    tensors: dict[str, torch.Tensor] = {}
    for (record, _), name in zip(records, names, strict=True):
        fd, file_size = _open_existing(name, write=not copy)
        try:
            if file_size < max(1, record.nbytes):
                raise StateFormatError(
                    f"shared-memory segment {name!r} holds {file_size} bytes, tensor "
                    f"{record.name!r} needs {record.nbytes}"
                )
            access = mmap.ACCESS_READ if copy else mmap.ACCESS_WRITE
            mapped = mmap.mmap(fd, max(1, record.nbytes), access=access)
        finally:
            os.close(fd)
        tensors.update(_views(mapped, 0, [(record, 0)], copy))
        del mapped
    return tensors, dict(meta), _FOREIGN + ",".join(names)


def _worldflux_name(raw: Mapping[str, Any]) -> str:
    name = raw.get("shm_name")
    if not isinstance(name, str) or not _WF_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise StateFormatError(
            f"WorldFlux shared-memory descriptor has invalid shm_name {short(name, 60)}"
        )
    return name


def unlink(descriptor: object) -> None:
    """Remove the descriptor's segment name (a no-op when it is already gone).

    Only a segment whose header proves it is a State segment is removed (or an empty one,
    left by a creator killed before it wrote the header); anything else raises. For a
    WorldFlux descriptor, each tensor's segment is removed when it holds exactly that tensor's
    bytes (WorldFlux segments carry no header to prove more).
    """
    desc = _check_descriptor(descriptor)
    if desc.get("magic") == WORLDFLUX_MAGIC:
        records = _records(desc.get("tensors"), "WorldFlux shared-memory descriptor", None)
        for record, raw in records:
            _unlink_worldflux(_worldflux_name(raw), record.nbytes)
        return
    _unlink_ours(_segment_of(desc))


def unlink_attached(handle: str) -> None:
    """Unlink what `attach` returned ``handle`` for (our segment, or WorldFlux's segments)."""
    if handle.startswith(_FOREIGN):
        for name in handle[len(_FOREIGN) :].split(","):
            if name:
                _unlink_worldflux(name, None)
        return
    _unlink_ours(handle)


def _unlink_ours(name: str) -> None:
    if not _POSIX:
        return
    try:
        fd, size = _open_existing(name, write=False)
    except StateFormatError as exc:
        if "no shared-memory segment" in exc.message:
            return  # already gone: idempotent
        raise
    try:
        if size and _read_header(fd, size) is None:
            raise StateFormatError(
                f"shared-memory segment {name!r} is not a worldflux State segment; not unlinked",
                hint="unlink only descriptors returned by State.to_shared_memory()",
            )
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        _shm_unlink(name)


def _unlink_worldflux(name: str, nbytes: int | None) -> None:
    try:
        fd, size = _open_existing(name, write=False)
    except StateFormatError as exc:
        if "no shared-memory segment" in exc.message:
            return
        raise
    try:
        header = _read_header(fd, size)
    finally:
        os.close(fd)
    if header is not None or (
        nbytes is not None and sys.platform.startswith("linux") and size != max(1, nbytes)
    ):
        raise StateFormatError(
            f"shared-memory segment {name!r} does not hold exactly the WorldFlux tensor the "
            "descriptor names; not unlinked",
            hint="unlink only descriptors returned by WorldFlux's State.to_shared_memory()",
        )
    with contextlib.suppress(FileNotFoundError):
        _shm_unlink(name)


# -- housekeeping: `worldflux-registry shm list|clean` -------------------------------------------
def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def segments(directory: Path = SHM_DIR) -> list[dict[str, Any]]:
    """Every State segment in ``directory`` (Linux's ``/dev/shm``): name, size, creator pid,
    whether that pid is alive here, and when it was created. Other files are not touched."""
    out: list[dict[str, Any]] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if not _NAME_RE.fullmatch(name):
            continue
        try:
            fd, size = _open_existing(name, write=False)
        except StateFormatError:
            continue
        try:
            header = _read_header(fd, size)
        finally:
            os.close(fd)
        if header is None:
            continue
        data_size, pid, created, _ = header
        out.append(
            {
                "segment": name,
                "bytes": HEADER_SIZE + data_size,
                "pid": pid,
                "alive": _alive(pid),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(created / 1e9)),
            }
        )
    return out


def clean(directory: Path = SHM_DIR) -> list[str]:
    """Unlink the State segments whose creator process is gone; return their names.

    A segment outlives its creator on purpose (a consumer may not have attached yet): run this
    when no consumer still needs segments of processes that died.
    """
    removed = []
    for info in segments(directory):
        if not info["alive"]:
            with contextlib.suppress(FileNotFoundError):
                _shm_unlink(info["segment"])
            removed.append(info["segment"])
    return removed
