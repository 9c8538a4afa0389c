"""Errors of worldflux-serve-ray, and how every typed error travels between replica and client.

A replica never answers a bad request with a traceback: it sends back an error envelope naming
the error class (one of `WIRE_ERRORS`), an HTTP-style status, the message and the hint, and the
client raises the same class again. Everything under `ServeError` is specific to serving::

    WorldFluxRegistryError
     ├── StateFormatError (core)      400  State bytes are malformed
     ├── ContractError (core)         422  wrong shapes, dtypes, names; 409 wrong fingerprint
     ├── CapabilityError (core)       404  the export has no graph for this step
     └── ServeError                   500  anything else that went wrong serving a request
          ├── PayloadError            400  the request envelope or JSON body is malformed
          ├── SessionLostError        410  the session's replica is gone, or it was closed
          └── ReplicaUnavailableError 503  no replica answered after the client's retries
"""

from __future__ import annotations

from typing import Any

from worldflux_registry import (
    BackendError,
    CapabilityError,
    ContractError,
    StateFormatError,
    WorldFluxRegistryError,
)

__all__ = [
    "WIRE_ERRORS",
    "PayloadError",
    "ReplicaUnavailableError",
    "ServeError",
    "SessionLostError",
    "error_from_wire",
    "error_to_wire",
    "status_of",
]


class ServeError(WorldFluxRegistryError):
    """A request could not be served; ``status`` is its HTTP-style code (default 500)."""

    status: int = 500


class PayloadError(ServeError, ValueError):
    """The request envelope (binary or JSON) is malformed: header, lengths, fields, types."""

    status = 400


class SessionLostError(ServeError):
    """The server-side session is gone: its replica died or restarted, or it was closed.

    Its State is not recoverable from the server; open a new session from a State you hold.
    """

    status = 410


class ReplicaUnavailableError(ServeError, BackendError):
    """No replica answered a stateless request within the client's retries."""

    status = 503


#: Error classes a replica may name in an error envelope; any other name arrives as ServeError.
WIRE_ERRORS: dict[str, type[WorldFluxRegistryError]] = {
    cls.__name__: cls
    for cls in (
        StateFormatError,
        ContractError,
        CapabilityError,
        ServeError,
        PayloadError,
        SessionLostError,
        ReplicaUnavailableError,
    )
}
_STATUS = {StateFormatError: 400, ContractError: 422, CapabilityError: 404}


def status_of(error: WorldFluxRegistryError) -> int:
    """The HTTP-style status of ``error`` (an explicit ``status`` attribute wins)."""
    explicit = getattr(error, "status", None)
    if isinstance(explicit, int):
        return explicit
    for cls, status in _STATUS.items():
        if isinstance(error, cls):
            return status
    return 500


def error_to_wire(error: BaseException) -> dict[str, Any]:
    """The JSON-able description of ``error`` sent back to the caller."""
    if isinstance(error, WorldFluxRegistryError):
        # the class itself, or the nearest base class the client knows
        name = next(
            (c.__name__ for c in type(error).__mro__ if c.__name__ in WIRE_ERRORS), "ServeError"
        )
        return {
            "type": name,
            "status": status_of(error),
            "message": error.message,
            "hint": error.hint,
        }
    return {
        "type": "ServeError",
        "status": 500,
        "message": f"the replica failed: {type(error).__name__}: {error}",
        "hint": "this is a bug in the server or the export; the replica keeps serving",
    }


def error_from_wire(doc: Any) -> WorldFluxRegistryError:
    """The typed error an error envelope describes (ServeError for anything unexpected)."""
    if not isinstance(doc, dict):
        return ServeError(f"the server sent an unreadable error {doc!r}")
    cls = WIRE_ERRORS.get(str(doc.get("type")), ServeError)
    message = str(doc.get("message", "the server reported an error"))
    hint = doc.get("hint")
    status = doc.get("status")
    error = cls(message, hint=str(hint) if hint else None)
    if isinstance(status, int):
        error.status = status  # type: ignore[attr-defined]
    return error
