"""Tensor sizes that stay symbolic while ``torch.export`` traces them."""

from __future__ import annotations

from typing import Any

__all__ = ["dim"]


def dim(value: Any) -> int:
    """``int(value)``, except that a traced ``SymInt`` is returned as is.

    ``int()`` on a traced batch size makes ``torch.export`` specialise the batch axis to the
    example's size; comparing ``SymInt``s instead only adds guards that hold for every batch.
    """
    return value if type(value).__name__ == "SymInt" else int(value)  # type: ignore[no-any-return]
