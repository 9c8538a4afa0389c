"""`State`: the latent state container (tensor dictionary + metadata)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ContractError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["State"]


@dataclass
class State:
    """Generic state container (tensor dictionary + metadata).

    ``tensors`` maps state keys (as the contract declares them) to tensors whose first dim is
    the batch; ``meta`` holds JSON-serializable metadata. Indexing a State by key returns the
    tensor.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        """State keys in insertion order."""
        return list(self.tensors)

    @property
    def batch_size(self) -> int | None:
        """The shared leading dim of the tensors (None when every tensor is 0-dim or none)."""
        for tensor in self.tensors.values():
            if tensor.dim() > 0:
                return int(tensor.shape[0])
        return None

    @property
    def device(self) -> torch.device | None:
        """Device of the first tensor (None for an empty State)."""
        for tensor in self.tensors.values():
            return tensor.device
        return None

    def validate(self) -> State:
        """Validate state tensor shapes and batch consistency; return self.

        Raises:
            ContractError: a value that is not a tensor, or tensors whose leading (batch) dims
                differ. 0-dim tensors carry no batch and are allowed.
        """
        batch: tuple[str, int] | None = None
        for key, tensor in self.tensors.items():
            if not hasattr(tensor, "shape") or not hasattr(tensor, "dim"):
                raise ContractError(
                    f"state key {key!r} holds {type(tensor).__name__}, not a tensor"
                )
            if tensor.dim() == 0:
                continue
            size = int(tensor.shape[0])
            if batch is None:
                batch = (key, size)
            elif size != batch[1]:
                raise ContractError(
                    f"state key {key!r} has batch {size} but {batch[0]!r} has batch {batch[1]}",
                    hint="every state tensor shares its leading batch dim",
                )
        return self

    def map(self, fn: Any) -> State:
        """A new State with ``fn`` applied to every tensor (meta copied)."""
        return State({k: fn(v) for k, v in self.tensors.items()}, dict(self.meta))

    def to(self, *args: Any, **kwargs: Any) -> State:
        """A new State with every tensor moved/cast like ``Tensor.to``."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> State:
        """A new State with every tensor detached from the autograd graph."""
        return self.map(lambda t: t.detach())

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> State:
        """Build a State from any mapping of tensors."""
        return cls(dict(tensors), dict(meta or {}))
