"""Torch's TF32 switches, shared by parity and benchmarks (base layer: imports no other layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["tf32", "tf32_state"]


def tf32_state() -> dict[str, Any]:
    """Torch's TF32 switches (cuBLAS matmul, cuDNN) as they stand."""
    import torch

    return {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set torch's TF32 switches (cuBLAS matmul and cuDNN), then restore them.

    Only the ``allow_tf32`` flags are touched: torch refuses to read its precision settings once
    they were set through both its legacy and its newer API, so this never mixes the two.
    """
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
