"""The one JSON reader for what worldflux reads from outside: State meta, config.json, manifests.

`loads` rejects duplicate keys (never last-wins), bounds nesting depth, the size of the text and
the digits of every number, and (unless asked) refuses ``NaN`` / ``Infinity``; every failure is
the caller's error type with a short message, never a ``RecursionError`` or a bare
``ValueError``. Layer 0: imports only the standard library and `errors`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from .errors import WorldFluxRegistryError

__all__ = ["MAX_DEPTH", "MAX_JSON_BYTES", "MAX_NUMBER_CHARS", "JsonLimitError", "loads", "short"]

#: Largest JSON document read (config.json, manifest.json, State metadata): 16 MiB.
MAX_JSON_BYTES: Final = 16 * 1024 * 1024
#: Deepest nesting of objects and arrays accepted.
MAX_DEPTH: Final = 64
#: Most characters in one number literal (a float64 needs at most 24).
MAX_NUMBER_CHARS: Final = 64
#: Longest rendering of an offending value inside an error message.
MAX_SHOWN: Final = 200


class JsonLimitError(ValueError):
    """A document broke one of the reader's rules (duplicate key, depth, number, constant)."""


def short(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile value cannot flood a message.

    Containers are rendered lazily enough that a huge list costs no more than ``limit``.
    """
    if isinstance(value, (list, tuple)) and len(value) > 16:
        head = ", ".join(short(v, 32) for v in value[:8])
        text = f"[{head}, ... ({len(value)} items)]"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        text = f"<int of {value.bit_length()} bits>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonLimitError(f"duplicate key {short(key, 60)}")
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise JsonLimitError(f"a number has {len(text)} digits (limit {MAX_NUMBER_CHARS})")
    return int(text)


def _float_parser(allow_nan: bool) -> Any:
    def parse(text: str) -> float:
        if len(text) > MAX_NUMBER_CHARS:
            raise JsonLimitError(f"a number has {len(text)} characters (limit {MAX_NUMBER_CHARS})")
        value = float(text)
        if not allow_nan and not math.isfinite(value):
            raise JsonLimitError(f"number {text[:40]} overflows a float64")
        return value

    return parse


def _constant(allow_nan: bool) -> Any:
    def parse(name: str) -> float:
        if not allow_nan:
            raise JsonLimitError(f"{name} is not JSON")
        return float(name)

    return parse


def _check_depth(value: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise JsonLimitError(f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def loads(
    data: str | bytes,
    *,
    what: str,
    error: type[WorldFluxRegistryError],
    hint: str | None = None,
    allow_nan: bool = False,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
    unreadable: str = "is not readable JSON",
) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) strictly; raise ``error`` naming ``what``.

    Args:
        what: The document, for messages (``"/ckpt/config.json"``).
        error: Raised on any problem, with ``hint`` as its next step.
        allow_nan: Accept ``NaN`` / ``Infinity`` (State meta, which the reference writes).
        max_bytes: Longest document accepted.
        max_depth: Deepest nesting accepted.
        unreadable: How messages say the text does not parse.
    """
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes; the limit is {max_bytes}", hint=hint)
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} {unreadable} (not UTF-8: {exc})", hint=hint) from None
    else:
        text = data
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_int=_int,
            parse_float=_float_parser(allow_nan),
            parse_constant=_constant(allow_nan),
        )
        _check_depth(value, max_depth)
    except RecursionError:
        raise error(f"{what} {unreadable}: nested too deeply", hint=hint) from None
    except JsonLimitError as exc:
        raise error(f"{what} is refused: {exc}", hint=hint) from None
    except ValueError as exc:
        raise error(f"{what} {unreadable}: {str(exc)[:160]}", hint=hint) from None
    return value
