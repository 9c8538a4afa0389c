"""State wire format v1: encode a State to bytes and decode it back, checking every field.

Layout (all of it byte-compatible with the WorldFlux reference implementation)::

    offset 0   4 bytes   magic b"WFST"
    offset 4   1 byte    version id (v1 = 1)
    offset 5   4 bytes   big-endian u32: length N of the metadata
    offset 9   N bytes   metadata: UTF-8 JSON, sort_keys, separators (",", ":"), ASCII-escaped
    offset 9+N           each tensor's raw bytes in metadata order, C-contiguous, little-endian

torch and numpy are imported inside the functions that need them, so that importing the
package (and this module) stays cheap.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._json import MAX_JSON_BYTES, short
from .._json import loads as load_json
from ..errors import StateFormatError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DTYPE_ITEMSIZE",
    "HEADER",
    "MAGIC",
    "TensorRecord",
    "check_bool_bytes",
    "check_meta",
    "check_state_meta",
    "decode",
    "encode",
    "parse_record",
    "tensor_bytes",
    "torch_dtype",
]

MAGIC: Final = b"WFST"
HEADER: Final = struct.Struct(">4sBI")
FORMAT_NAME: Final = "worldflux.state"
# Version name <-> header version id.
VERSIONS: Final = {"v1": 1}
VERSION_IDS: Final = {1: "v1"}

# Wire dtype name -> bytes per element.
DTYPE_ITEMSIZE: Final = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "bfloat16": 2,
}
FLOAT_DTYPES: Final = frozenset({"float16", "float32", "float64", "bfloat16"})
_INT64_MAX: Final = 2**63 - 1
#: Most dimensions a tensor of a State payload or descriptor may have.
MAX_DIMS: Final = 32
#: Largest State metadata (the JSON between header and tensor bytes): 16 MiB.
MAX_META_BYTES: Final = MAX_JSON_BYTES
_BIG_ENDIAN: Final = sys.byteorder == "big"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire dtype name (which must be a key of DTYPE_ITEMSIZE)."""
    import torch

    return getattr(torch, name)  # type: ignore[no-any-return]


def _wire_dtype(dtype: torch.dtype) -> str | None:
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_ITEMSIZE else None


@dataclass(frozen=True)
class TensorRecord:
    """One tensor's entry in the metadata (or a shared-memory descriptor)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    requires_grad: bool
    source_device: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "requires_grad": self.requires_grad,
            "source_device": self.source_device,
        }


def _is_int(value: object) -> bool:
    # JSON true/false decode to bool, which is an int subclass: never a valid size.
    return isinstance(value, int) and not isinstance(value, bool)


def parse_record(raw: object, index: int, *, where: str = "State payload") -> TensorRecord:
    """Validate one tensor entry of decoded metadata; raise StateFormatError naming the problem."""
    if not isinstance(raw, dict):
        raise StateFormatError(
            f"{where}: tensor entry {index} is {type(raw).__name__}, not a JSON object"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise StateFormatError(f"{where}: tensor entry {index} has no non-empty string 'name'")
    shown = short(name, 80)
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise StateFormatError(
            f"{where}: tensor {shown} has unknown dtype {short(dtype, 40)}",
            hint=f"known dtypes: {', '.join(DTYPE_ITEMSIZE)}",
        )
    shape_raw = raw.get("shape")
    if not isinstance(shape_raw, list):
        raise StateFormatError(f"{where}: tensor {shown} has shape {short(shape_raw)}, not a list")
    if len(shape_raw) > MAX_DIMS:
        raise StateFormatError(
            f"{where}: tensor {shown} has {len(shape_raw)} dims; the limit is {MAX_DIMS}"
        )
    size = 1
    for dim in shape_raw:
        if not _is_int(dim):
            raise StateFormatError(
                f"{where}: tensor {shown} has non-integer dim {short(dim, 40)} in shape "
                f"{short(shape_raw)}"
            )
        if dim < 0:
            raise StateFormatError(
                f"{where}: tensor {shown} has negative dim {short(dim, 40)} in shape "
                f"{short(shape_raw)}"
            )
        # torch sizes (and contiguous strides) are int64: a zero dim must not smuggle in huge
        # others. Checked dim by dim, so the product never grows past int64.
        size *= max(dim, 1)
        if size > _INT64_MAX:
            raise StateFormatError(
                f"{where}: tensor {shown} has shape {short(shape_raw)} too large"
            )
    shape = tuple(shape_raw)
    nbytes = raw.get("nbytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise StateFormatError(f"{where}: tensor {shown} has invalid nbytes {short(nbytes, 40)}")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if nbytes != expected:
        raise StateFormatError(
            f"{where}: tensor {shown} declares nbytes={short(nbytes, 40)} but shape "
            f"{short(list(shape))} of {dtype} holds {expected} bytes"
        )
    requires_grad = raw.get("requires_grad", False)
    if not isinstance(requires_grad, bool):
        raise StateFormatError(
            f"{where}: tensor {name!r} has requires_grad {requires_grad!r}, not a boolean"
        )
    if requires_grad and dtype not in FLOAT_DTYPES:
        raise StateFormatError(
            f"{where}: tensor {name!r} of dtype {dtype} cannot require grad (only float dtypes)"
        )
    source_device = raw.get("source_device", "cpu")
    if not isinstance(source_device, str):
        raise StateFormatError(
            f"{where}: tensor {name!r} has source_device {source_device!r}, not a string"
        )
    return TensorRecord(name, dtype, shape, nbytes, requires_grad, source_device)


_JSON_SCALARS: Final = (str, int, float, bool, type(None))


def check_meta(meta: object, path: str = "meta") -> None:
    """Raise StateFormatError unless ``meta`` is plain JSON data with string keys.

    Non-finite floats pass: like the reference (and Python's json), they are written as the
    literals ``NaN`` / ``Infinity`` and read back.
    """
    if isinstance(meta, Mapping):
        for key, value in meta.items():
            if not isinstance(key, str):
                raise StateFormatError(
                    f"State {path} has key {key!r} of type {type(key).__name__}; "
                    "JSON object keys must be strings"
                )
            check_meta(value, f"{path}[{key!r}]")
    elif isinstance(meta, (list, tuple)):
        for i, value in enumerate(meta):
            check_meta(value, f"{path}[{i}]")
    elif not isinstance(meta, _JSON_SCALARS):
        raise StateFormatError(
            f"State {path} is a {type(meta).__name__}, not JSON",
            hint="meta holds only dict (string keys), list, str, int, float, bool and None",
        )


def check_state_meta(meta: object) -> Mapping[str, Any]:
    """Return ``meta``; raise `StateFormatError` unless it is a dict of plain JSON values."""
    if not isinstance(meta, Mapping):
        raise StateFormatError(f"State meta is a {type(meta).__name__}, not a dict")
    try:
        check_meta(meta)
    except RecursionError as exc:
        raise StateFormatError("State meta is nested too deeply (or refers to itself)") from exc
    return meta


def _swap_bytes(flat: np.ndarray, itemsize: int) -> np.ndarray:
    """A copy of the uint8 array ``flat`` with each ``itemsize`` group reversed (endian swap)."""
    return flat.reshape(-1, itemsize)[:, ::-1].reshape(-1).copy()


def tensor_bytes(
    name: str, tensor: object, *, allow_copy_from_device: bool = True
) -> tuple[TensorRecord, np.ndarray]:
    """A record for ``tensor`` and a flat uint8 numpy view of its native-endian bytes.

    The view shares memory with a CPU contiguous tensor; other tensors are copied once (to the
    host, to contiguous). A non-CPU tensor raises unless ``allow_copy_from_device``.
    """
    import torch

    if not isinstance(name, str) or not name:
        raise StateFormatError(f"State key {name!r} is not a non-empty string")
    if not isinstance(tensor, torch.Tensor):
        raise StateFormatError(f"State key {name!r} holds {type(tensor).__name__}, not a tensor")
    dtype = _wire_dtype(tensor.dtype)
    if dtype is None:
        raise StateFormatError(
            f"State key {name!r} has dtype {tensor.dtype}, which the wire format cannot carry",
            hint=f"cast it to one of {', '.join(DTYPE_ITEMSIZE)}",
        )
    if tensor.layout != torch.strided:
        raise StateFormatError(
            f"State key {name!r} is a {tensor.layout} tensor",
            hint="call .to_dense() on it first",
        )
    src = tensor.detach()
    source_device = str(src.device)
    if src.device.type == "meta":
        raise StateFormatError(f"State key {name!r} is on the meta device and holds no data")
    if src.device.type != "cpu":
        if not allow_copy_from_device:
            raise StateFormatError(
                f"State key {name!r} is on {source_device}; shared memory holds CPU tensors",
                hint="pass allow_copy_from_cuda=True to copy it to the host explicitly",
            )
        src = src.to("cpu")
    src = src.resolve_conj().resolve_neg().contiguous()
    flat = src.reshape(-1).view(torch.uint8).numpy()
    record = TensorRecord(
        name=name,
        dtype=dtype,
        shape=tuple(int(d) for d in src.shape),
        nbytes=int(flat.nbytes),
        requires_grad=bool(tensor.requires_grad),
        source_device=source_device,
    )
    return record, flat


def encode(
    tensors: Mapping[str, object], meta: object, *, version: str = "v1", format: str = "binary"
) -> bytes:
    """Serialize tensors and meta to a wire-format payload (one copy of the tensor bytes)."""
    if format != "binary":
        raise StateFormatError(f"unsupported State format {format!r}", hint="use format='binary'")
    if version not in VERSIONS:
        raise StateFormatError(
            f"unsupported State version {version!r}", hint=f"known: {', '.join(VERSIONS)}"
        )
    check_state_meta(meta)
    records: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for name, tensor in tensors.items():
        record, flat = tensor_bytes(name, tensor)
        itemsize = DTYPE_ITEMSIZE[record.dtype]
        if _BIG_ENDIAN and itemsize > 1:
            flat = _swap_bytes(flat, itemsize)
        records.append(record.to_json())
        chunks.append(flat)
    document = {"format": FORMAT_NAME, "version": version, "meta": meta, "tensors": records}
    try:
        # ensure_ascii (the json default) is what the reference writes: non-ASCII as \uXXXX.
        blob = json.dumps(document, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateFormatError(f"State meta is not JSON-serializable: {exc}") from exc
    meta_bytes = blob.encode("utf-8")
    if len(meta_bytes) > 0xFFFFFFFF:
        raise StateFormatError(f"State metadata is {len(meta_bytes)} bytes; the limit is 4 GiB")
    header = HEADER.pack(MAGIC, VERSIONS[version], len(meta_bytes))
    # bytes.join copies each buffer once into the result: the only copy of the tensor data.
    return b"".join([header, meta_bytes, *chunks])


def _as_byte_view(payload: object) -> memoryview:
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
    except (TypeError, BufferError):
        raise StateFormatError(
            f"State payload is a {type(payload).__name__}, not bytes",
            hint="pass the bytes returned by State.serialize()",
        ) from None
    if not view.c_contiguous:
        # A strided buffer (a sliced array): read its bytes in logical order, once.
        view = memoryview(view.tobytes())
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        try:
            view = view.cast("B")
        except TypeError:
            raise StateFormatError("State payload buffer is not C-contiguous bytes") from None
    return view


def decode(payload: object) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse and check a wire-format payload; return (tensors, meta). Tensors are fresh copies."""
    view = _as_byte_view(payload)
    size = view.nbytes
    if size < HEADER.size:
        raise StateFormatError(
            f"State payload is {size} bytes, shorter than the {HEADER.size}-byte header"
        )
    magic, version_id, meta_len = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise StateFormatError(
            f"State payload starts with {bytes(magic)!r}, not the magic {MAGIC!r}",
            hint="this is not a State.serialize() payload",
        )
    version = VERSION_IDS.get(version_id)
    if version is None:
        raise StateFormatError(
            f"State payload has unknown version id {version_id}",
            hint=f"this library reads version ids {sorted(VERSION_IDS)}; upgrade it",
        )
    data_start = HEADER.size + meta_len
    if data_start > size:
        raise StateFormatError(
            f"State metadata length {meta_len} runs past the end of the {size}-byte payload"
        )
    if meta_len > MAX_META_BYTES:
        raise StateFormatError(
            f"State metadata is {meta_len} bytes; the limit is {MAX_META_BYTES}",
            hint="keep State.meta small; put data in tensors",
        )
    # NaN / Infinity pass: the reference writes them as JSON literals.
    document = load_json(
        bytes(view[HEADER.size : data_start]),
        what="State metadata",
        error=StateFormatError,
        allow_nan=True,
        unreadable="is not valid JSON",
    )
    if not isinstance(document, dict):
        raise StateFormatError(f"State metadata is a JSON {type(document).__name__}, not an object")
    if document.get("format") != FORMAT_NAME:
        raise StateFormatError(
            f"State metadata format is {document.get('format')!r}, not {FORMAT_NAME!r}"
        )
    if document.get("version") != version:
        raise StateFormatError(
            f"State metadata version {document.get('version')!r} disagrees with the header "
            f"version {version!r}"
        )
    meta = document.get("meta", {})
    if not isinstance(meta, dict):
        raise StateFormatError(f"State metadata 'meta' is a {type(meta).__name__}, not an object")
    raw_records = document.get("tensors")
    if not isinstance(raw_records, list):
        raise StateFormatError("State metadata has no 'tensors' list")

    records: list[tuple[TensorRecord, int]] = []
    seen: set[str] = set()
    offset = data_start
    # Check every record against the payload before allocating anything: a forged shape or
    # nbytes can never make us allocate more than the payload itself holds.
    for index, raw in enumerate(raw_records):
        record = parse_record(raw, index)
        if record.name in seen:
            raise StateFormatError(f"State payload names tensor {record.name!r} twice")
        seen.add(record.name)
        end = offset + record.nbytes
        if end > size:
            raise StateFormatError(
                f"State payload is truncated: tensor {record.name!r} needs bytes "
                f"[{offset}, {end}) but the payload has {size}"
            )
        records.append((record, offset))
        offset = end
    if offset != size:
        raise StateFormatError(
            f"State payload has {size - offset} trailing bytes after the last tensor",
            hint="the payload is corrupt or was written by a different version",
        )

    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for record, start in records:
        tensor = torch.empty(record.shape, dtype=torch_dtype(record.dtype))
        if record.nbytes:
            dst = tensor.reshape(-1).view(torch.uint8).numpy()
            dst[:] = np.frombuffer(view, dtype=np.uint8, count=record.nbytes, offset=start)
            itemsize = DTYPE_ITEMSIZE[record.dtype]
            if _BIG_ENDIAN and itemsize > 1:
                dst[:] = _swap_bytes(dst, itemsize)
        if record.dtype == "bool":
            check_bool_bytes(record.name, tensor)
        if record.requires_grad:
            tensor.requires_grad_(True)
        tensors[record.name] = tensor
    return tensors, meta


def check_bool_bytes(name: str, tensor: torch.Tensor) -> None:
    """Raise `StateFormatError` when a bool tensor holds a byte other than 0 or 1.

    torch keeps such bytes as they are (``x == True`` is then false for a "true" value).
    """
    import torch

    if tensor.numel() and int(tensor.reshape(-1).view(torch.uint8).max()) > 1:
        raise StateFormatError(
            f"State tensor {short(name, 80)} is bool but holds bytes other than 0 and 1",
            hint="the payload is corrupt or was not written by State.serialize()",
        )
