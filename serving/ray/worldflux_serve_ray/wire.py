"""The serve envelope: how requests and replies travel, in binary and in JSON. No pickle.

Binary (``Content-Type: application/x-worldflux-serve``), version 1::

    offset  size  field
    0       4     magic b"WFSV"
    4       1     version id, 1
    5       4     header length N, unsigned 32-bit big-endian
    9       N     header: UTF-8 JSON object (sorted keys, compact)
    9+N     ...   the parts listed in header["parts"], back to back, each a State v1 payload

``header["parts"]`` is a list of ``{"name": str, "nbytes": int}``; the payload ends exactly
where the last part ends. Every part is a State in the v1 wire format (`State.serialize`):
``"state"`` is the caller's State byte for byte; ``"inputs"`` / ``"predictions"`` are bundles
of named tensors (actions, observations, conditions, noise) carried in the same format, so one
fuzz-tested decoder reads everything. JSON bodies (``application/json``) carry the same fields,
with States as base64 of their v1 bytes and tensors as ``{"dtype", "shape", "data"}``.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from worldflux_registry import State, WorldFluxRegistryError

from .errors import PayloadError, error_from_wire, error_to_wire

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "BINARY",
    "JSON",
    "MAGIC",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "encode_request",
    "reply_from_json",
    "reply_to_json",
    "request_from_json",
    "request_to_json",
]

MAGIC: Final = b"WFSV"
VERSION: Final = 1
BINARY: Final = "application/x-worldflux-serve"
JSON: Final = "application/json"
_HEADER = struct.Struct(">4sBI")
_MAX_HEADER: Final = 1 << 20
_MAX_PARTS: Final = 16


@dataclass
class Request:
    """One call of a protocol step.

    ``inputs`` are keyed by graph input name: ``action`` (``actions`` ``[T, batch, ...]`` for
    ``rollout``), ``obs.<name>``, ``cond.<name>``, ``noise.<name>`` (``[T, batch, ...]`` for
    ``rollout``). ``fingerprint`` is the contract fingerprint the caller built its inputs for.
    ``session`` names a server-side session whose State replaces ``state``.
    """

    op: str
    fingerprint: str
    state: State | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    deterministic: bool = False
    session: str | None = None
    return_state: bool = True


@dataclass
class Reply:
    """What a step returns: a new ``state`` (``states`` stacked ``[T, batch, ...]`` for
    ``rollout``), ``predictions``, and for ``open_session`` the ``session`` id; ``info`` for
    the ``info`` op."""

    state: State | None = None
    states: State | None = None
    predictions: dict[str, Tensor] = field(default_factory=dict)
    session: str | None = None
    info: dict[str, Any] | None = None


# -- binary ------------------------------------------------------------------------------------
def _pack(header: dict[str, Any], parts: list[tuple[str, bytes]]) -> bytes:
    header = {
        **header,
        "format": "worldflux.serve",
        "version": VERSION,
        "parts": [{"name": n, "nbytes": len(b)} for n, b in parts],
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(MAGIC, VERSION, len(head)), head, *(b for _, b in parts)])


def _unpack(payload: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a serve envelope must be bytes, got {type(payload).__name__}")
    data = memoryview(payload)
    if len(data) < _HEADER.size:
        raise PayloadError(f"serve envelope of {len(data)} bytes is shorter than its header")
    magic, version, size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"not a serve envelope: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"serve envelope version {version} is not supported (only 1)")
    if size > _MAX_HEADER or _HEADER.size + size > len(data):
        raise PayloadError(f"serve header length {size} runs past the {len(data)}-byte envelope")
    try:
        header = json.loads(bytes(data[_HEADER.size : _HEADER.size + size]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"serve header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != "worldflux.serve":
        raise PayloadError("serve header is not a worldflux.serve JSON object")
    listed = header.get("parts")
    if not isinstance(listed, list) or len(listed) > _MAX_PARTS:
        raise PayloadError(f"serve header 'parts' must be a list of <= {_MAX_PARTS} entries")
    offset = _HEADER.size + size
    parts: dict[str, bytes] = {}
    for entry in listed:
        name = entry.get("name") if isinstance(entry, dict) else None
        nbytes = entry.get("nbytes") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in parts:
            raise PayloadError(f"serve part {entry!r} has no name, or a duplicate one")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PayloadError(f"serve part {name!r} has length {nbytes!r}")
        if offset + nbytes > len(data):
            raise PayloadError(
                f"serve part {name!r} of {nbytes} bytes runs past the envelope "
                f"({len(data) - offset} bytes left): the payload is truncated",
                hint="send the whole envelope",
            )
        parts[name] = bytes(data[offset : offset + nbytes])
        offset += nbytes
    if offset != len(data):
        raise PayloadError(f"serve envelope has {len(data) - offset} trailing bytes")
    return header, parts


def _bundle(tensors: dict[str, Tensor]) -> bytes:
    return State(dict(tensors)).serialize()


def _unbundle(payload: bytes) -> dict[str, Tensor]:
    return dict(State.deserialize(payload).tensors)


def encode_request(request: Request) -> bytes:
    """The binary envelope of ``request``."""
    parts: list[tuple[str, bytes]] = []
    if request.state is not None:
        parts.append(("state", request.state.serialize()))
    if request.inputs:
        parts.append(("inputs", _bundle(request.inputs)))
    header = {
        "kind": "request",
        "op": request.op,
        "fingerprint": request.fingerprint,
        "deterministic": request.deterministic,
        "session": request.session,
        "return_state": request.return_state,
    }
    return _pack(header, parts)


def _request_fields(doc: dict[str, Any]) -> dict[str, Any]:
    op, fingerprint = doc.get("op"), doc.get("fingerprint")
    if not isinstance(op, str) or not op:
        raise PayloadError(f"request 'op' must be a step name, got {op!r}")
    if not isinstance(fingerprint, str):
        raise PayloadError(
            f"request 'fingerprint' must be the contract fingerprint, got {fingerprint!r}",
            hint="GET /v1/info (or Client.info()) gives it",
        )
    session = doc.get("session")
    if session is not None and not isinstance(session, str):
        raise PayloadError(f"request 'session' must be a string, got {session!r}")
    deterministic = doc.get("deterministic", False)
    return_state = doc.get("return_state", True)
    if not isinstance(deterministic, bool) or not isinstance(return_state, bool):
        raise PayloadError("request 'deterministic' and 'return_state' must be booleans")
    return {
        "op": op,
        "fingerprint": fingerprint,
        "session": session,
        "deterministic": deterministic,
        "return_state": return_state,
    }


def decode_request(payload: bytes) -> Request:
    """The `Request` in a binary envelope.

    Raises:
        PayloadError: a malformed envelope (header, lengths, fields).
        StateFormatError: a part that is not a valid State v1 payload (e.g. truncated).
    """
    header, parts = _unpack(payload)
    if header.get("kind") != "request":
        raise PayloadError(f"expected a request envelope, got kind {header.get('kind')!r}")
    unknown = set(parts) - {"state", "inputs"}
    if unknown:
        raise PayloadError(f"request has unknown parts {sorted(unknown)}")
    state = State.deserialize(parts["state"]) if "state" in parts else None
    inputs = _unbundle(parts["inputs"]) if "inputs" in parts else {}
    return Request(state=state, inputs=inputs, **_request_fields(header))


def encode_reply(reply: Reply) -> bytes:
    """The binary envelope of ``reply``."""
    parts: list[tuple[str, bytes]] = []
    if reply.state is not None:
        parts.append(("state", reply.state.serialize()))
    if reply.states is not None:
        parts.append(("states", reply.states.serialize()))
    if reply.predictions:
        parts.append(("predictions", _bundle(reply.predictions)))
    header: dict[str, Any] = {"kind": "reply", "session": reply.session}
    if reply.info is not None:
        header["info"] = reply.info
    return _pack(header, parts)


def encode_error(error: BaseException) -> bytes:
    """The binary error envelope describing ``error``."""
    return _pack({"kind": "error", "error": error_to_wire(error)}, [])


def decode_reply(payload: bytes) -> Reply:
    """The `Reply` in a binary envelope; an error envelope is raised as its typed error."""
    header, parts = _unpack(payload)
    if header.get("kind") == "error":
        raise error_from_wire(header.get("error"))
    if header.get("kind") != "reply":
        raise PayloadError(f"expected a reply envelope, got kind {header.get('kind')!r}")
    return Reply(
        state=State.deserialize(parts["state"]) if "state" in parts else None,
        states=State.deserialize(parts["states"]) if "states" in parts else None,
        predictions=_unbundle(parts["predictions"]) if "predictions" in parts else {},
        session=header.get("session"),
        info=header.get("info"),
    )


# -- JSON --------------------------------------------------------------------------------------
def tensor_to_json(tensor: Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` (data flat, C order); exact for every State dtype."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.to(torch.float32).tolist() if flat.dtype == torch.bfloat16 else flat.tolist()
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "data": data,
    }


def tensor_from_json(name: str, doc: Any) -> Tensor:
    """The tensor ``{"dtype", "shape", "data"}`` describes, or `PayloadError` naming ``name``."""
    import torch

    if not isinstance(doc, dict):
        raise PayloadError(f"input {name!r} must be an object with dtype, shape and data")
    dtype = getattr(torch, str(doc.get("dtype")), None)
    shape, data = doc.get("shape"), doc.get("data")
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(f"input {name!r} has unknown dtype {doc.get('dtype')!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise PayloadError(f"input {name!r} has shape {shape!r}: a list of ints >= 0")
    count = 1
    for d in shape:
        count *= d
    if not isinstance(data, list) or len(data) != count:
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise PayloadError(f"input {name!r} of shape {shape} needs {count} values, got {got}")
    try:
        return torch.tensor(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PayloadError(f"input {name!r}: {exc}") from None


def _state_from_b64(name: str, text: Any) -> State:
    if not isinstance(text, str):
        raise PayloadError(f"{name!r} must be base64 of State v1 bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise PayloadError(f"{name!r} is not valid base64") from None
    return State.deserialize(raw)


def _b64(state: State) -> str:
    return base64.b64encode(state.serialize()).decode("ascii")


def request_from_json(body: bytes) -> Request:
    """The `Request` in a JSON body: ``{"op", "fingerprint", "state": base64 of State v1,
    "inputs": {name: {"dtype", "shape", "data"}}, "deterministic", "session"}``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("request body must be a JSON object")
    state = _state_from_b64("state", doc["state"]) if doc.get("state") is not None else None
    inputs_doc = doc.get("inputs") or {}
    if not isinstance(inputs_doc, dict):
        raise PayloadError("request 'inputs' must map input names to tensors")
    inputs = {str(k): tensor_from_json(str(k), v) for k, v in inputs_doc.items()}
    return Request(state=state, inputs=inputs, **_request_fields(doc))


def request_to_json(request: Request) -> bytes:
    """The JSON body of ``request`` (see `request_from_json`)."""
    doc: dict[str, Any] = {
        "op": request.op,
        "fingerprint": request.fingerprint,
        "deterministic": request.deterministic,
        "session": request.session,
        "return_state": request.return_state,
        "inputs": {k: tensor_to_json(v) for k, v in request.inputs.items()},
    }
    if request.state is not None:
        doc["state"] = _b64(request.state)
    return json.dumps(doc).encode()


def reply_to_json(reply: Reply | WorldFluxRegistryError) -> bytes:
    """The JSON body of a reply (``state`` / ``states`` as base64 of State v1, ``predictions``
    as tensors) or of an error (``{"error": {"type", "status", "message", "hint"}}``)."""
    if isinstance(reply, BaseException):
        return json.dumps({"error": error_to_wire(reply)}).encode()
    doc: dict[str, Any] = {"session": reply.session}
    if reply.state is not None:
        doc["state"] = _b64(reply.state)
    if reply.states is not None:
        doc["states"] = _b64(reply.states)
    if reply.predictions:
        doc["predictions"] = {k: tensor_to_json(v) for k, v in reply.predictions.items()}
    if reply.info is not None:
        doc["info"] = reply.info
    return json.dumps(doc).encode()


def reply_from_json(body: bytes) -> Reply:
    """The `Reply` in a JSON body; an error body is raised as its typed error."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"reply body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("reply body must be a JSON object")
    if "error" in doc:
        raise error_from_wire(doc["error"])
    preds = doc.get("predictions") or {}
    return Reply(
        state=_state_from_b64("state", doc["state"]) if doc.get("state") else None,
        states=_state_from_b64("states", doc["states"]) if doc.get("states") else None,
        predictions={k: tensor_from_json(k, v) for k, v in preds.items()},
        session=doc.get("session"),
        info=doc.get("info"),
    )
