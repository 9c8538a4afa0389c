"""The world-model protocol: `WorldModel`, its payloads, `Trajectory` and example inputs.

Layer 4 (imports checkpoint, contract, state and the base). The payloads are torch-free to import;
`WorldModel` (``_model``) and the example-input builders (``_inputs``) import torch, so they are
loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._payloads import (
    ActionPayload,
    ConditionPayload,
    LossOutput,
    ModelOutput,
    Trajectory,
    WorldModelInput,
)

if TYPE_CHECKING:
    from ._model import ActionLike, ObsLike, WorldModel, step_slice

__all__ = [
    "ActionLike",
    "ActionPayload",
    "ConditionPayload",
    "LossOutput",
    "ModelOutput",
    "ObsLike",
    "Trajectory",
    "WorldModel",
    "WorldModelInput",
    "step_slice",
]

_LAZY = {"ActionLike", "ObsLike", "WorldModel", "step_slice"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("._model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
