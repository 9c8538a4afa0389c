"""Shared-memory exchange of States: one POSIX/Windows segment per State, zero-copy attach.

A State's tensors are packed into one ``multiprocessing.shared_memory`` segment, each at a
64-byte aligned offset, and described by a JSON-able descriptor. Attaching maps the segment and
wraps each tensor around it with ``torch.frombuffer``: no copy.

Lifetime is explicit: segments are not registered with Python's resource tracker (which would
unlink a segment when *any* process that touched it exits, and warn about "leaked" segments),
so a segment lives until ``unlink_shared_memory(descriptor)`` (or ``close_shared_memory(
unlink=True)`` on an attached State). An attached mapping lives as long as any tensor viewing
it, so closing never leaves a dangling tensor.
"""

from __future__ import annotations

import re
import secrets
import sys
import weakref
from collections.abc import Mapping
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any, Final

from ..errors import StateFormatError
from ._wire import TensorRecord, check_state_meta, parse_record, tensor_bytes, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["attach", "create", "unlink"]

DESCRIPTOR_FORMAT: Final = "worldflux.state.shm"
DESCRIPTOR_VERSION: Final = "v1"
ALIGN: Final = 64
# Segment names stay within macOS's 31-character limit (with the leading slash).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,30}")
_TRACK_PARAM: Final = sys.version_info >= (3, 13)


def _untrack(segment: shared_memory.SharedMemory) -> None:
    # Before 3.13 every SharedMemory (even an attached one) is registered with the resource
    # tracker, which unlinks it when this process exits; lifetimes here are explicit instead.
    if sys.platform != "win32":
        from multiprocessing import resource_tracker

        resource_tracker.unregister("/" + segment.name, "shared_memory")


def _open(name: str, *, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    if _TRACK_PARAM:
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)  # type: ignore[call-arg,unused-ignore]
    segment = shared_memory.SharedMemory(name=name, create=create, size=size)
    _untrack(segment)
    return segment


def _unlink_open(segment: shared_memory.SharedMemory) -> None:
    if _TRACK_PARAM:
        segment.unlink()
    elif sys.platform != "win32":
        # unlink() also unregisters from the tracker: re-register so the two balance out.
        from multiprocessing import resource_tracker

        resource_tracker.register("/" + segment.name, "shared_memory")
        segment.unlink()


def _segment_name(namespace: str) -> str:
    prefix = "".join(ch for ch in namespace if ch.isalnum()).lower()[:12] or "wfstate"
    return f"{prefix}-{secrets.token_hex(8)}"


def create(
    tensors: Mapping[str, object], meta: object, *, namespace: str, allow_copy_from_cuda: bool
) -> dict[str, Any]:
    """Copy tensors into a new shared-memory segment; return its JSON-able descriptor."""
    if not isinstance(namespace, str):
        raise StateFormatError(f"namespace {namespace!r} is not a string")
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

    segment: shared_memory.SharedMemory | None = None
    for _ in range(8):
        try:
            segment = _open(_segment_name(namespace), create=True, size=max(size, 1))
            break
        except FileExistsError:
            continue
    if segment is None:
        raise StateFormatError("could not find a free shared-memory segment name")
    try:
        if size:
            import numpy as np

            buf = segment.buf
            assert buf is not None
            dst = np.frombuffer(buf, dtype=np.uint8, count=size)
            for start, flat in chunks:
                dst[start : start + flat.nbytes] = flat
            del dst, buf
    except BaseException:
        _unlink_open(segment)
        segment.close()
        raise
    segment.close()
    return {
        "format": DESCRIPTOR_FORMAT,
        "version": DESCRIPTOR_VERSION,
        "segment": segment.name,
        "size": size,
        "meta": dict(checked_meta),
        "tensors": entries,
    }


def _segment_of(descriptor: object) -> str:
    if not isinstance(descriptor, Mapping):
        raise StateFormatError(
            f"shared-memory descriptor is a {type(descriptor).__name__}, not a dict",
            hint="pass the dict returned by State.to_shared_memory()",
        )
    if descriptor.get("format") != DESCRIPTOR_FORMAT:
        raise StateFormatError(
            f"shared-memory descriptor format is {descriptor.get('format')!r}, "
            f"not {DESCRIPTOR_FORMAT!r}"
        )
    if descriptor.get("version") != DESCRIPTOR_VERSION:
        raise StateFormatError(
            f"shared-memory descriptor version {descriptor.get('version')!r} is unknown",
            hint=f"this library reads {DESCRIPTOR_VERSION!r}",
        )
    name = descriptor.get("segment")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StateFormatError(f"shared-memory descriptor has invalid segment name {name!r}")
    return name


def _parse(descriptor: object) -> tuple[str, int, list[tuple[TensorRecord, int]], dict[str, Any]]:
    name = _segment_of(descriptor)
    assert isinstance(descriptor, Mapping)
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StateFormatError(f"shared-memory descriptor has invalid size {size!r}")
    meta = descriptor.get("meta", {})
    if not isinstance(meta, dict):
        raise StateFormatError(f"shared-memory descriptor meta is a {type(meta).__name__}")
    raw_records = descriptor.get("tensors")
    if not isinstance(raw_records, list):
        raise StateFormatError("shared-memory descriptor has no 'tensors' list")
    where = f"shared-memory descriptor {name!r}"
    records: list[tuple[TensorRecord, int]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_records):
        record = parse_record(raw, index, where=where)
        if record.name in seen:
            raise StateFormatError(f"{where} names tensor {record.name!r} twice")
        seen.add(record.name)
        assert isinstance(raw, dict)
        offset = raw.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise StateFormatError(f"{where}: tensor {record.name!r} has invalid offset {offset!r}")
        if offset % ALIGN:
            raise StateFormatError(
                f"{where}: tensor {record.name!r} offset {offset} is not {ALIGN}-byte aligned"
            )
        if offset + record.nbytes > size:
            raise StateFormatError(
                f"{where}: tensor {record.name!r} bytes [{offset}, {offset + record.nbytes}) "
                f"run past the segment size {size}"
            )
        records.append((record, offset))
    return name, size, records, meta


def attach(
    descriptor: object, *, copy: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Map a descriptor's segment; return (tensors, meta, segment name).

    With ``copy=False`` the tensors view the segment (writes are shared both ways); the mapping
    is released when the last of them is freed. With ``copy=True`` they are private copies and
    the segment is closed before returning.
    """
    import torch

    name, size, records, meta = _parse(descriptor)
    try:
        segment = _open(name)
    except FileNotFoundError:
        raise StateFormatError(
            f"no shared-memory segment named {name!r}",
            hint="it was unlinked, or the descriptor comes from another machine",
        ) from None
    if segment.size < size:
        segment.close()
        raise StateFormatError(
            f"shared-memory segment {name!r} holds {segment.size} bytes, "
            f"the descriptor needs {size}"
        )
    # Tensors view a slice of the segment's buffer; the segment is closed only once that slice
    # is freed, i.e. once torch has dropped the last tensor viewing it.
    buf = segment.buf
    assert buf is not None
    view = buf[:size]
    del buf
    finalizer = weakref.finalize(view, segment.close)
    finalizer.atexit = False
    tensors: dict[str, torch.Tensor] = {}
    for record, offset in records:
        dtype = torch_dtype(record.dtype)
        if record.nbytes == 0:
            tensor = torch.empty(record.shape, dtype=dtype)
        else:
            count = record.nbytes // dtype.itemsize
            tensor = torch.frombuffer(view, dtype=dtype, count=count, offset=offset)
            tensor = tensor.view(record.shape)
            if copy:
                tensor = tensor.clone()
        if record.requires_grad:
            tensor.requires_grad_(True)
        tensors[record.name] = tensor
    del view
    return tensors, dict(meta), name


def unlink(descriptor: object) -> None:
    """Remove the descriptor's segment name (a no-op when it is already gone)."""
    name = _segment_of(descriptor)
    try:
        segment = _open(name)
    except FileNotFoundError:
        return
    try:
        _unlink_open(segment)
    except FileNotFoundError:
        pass
    finally:
        segment.close()
