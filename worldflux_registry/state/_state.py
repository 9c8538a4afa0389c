"""`State`: the latent state container (tensor dictionary + metadata).

Serialization (the v1 wire format) lives in `_state_wire`, shared memory in `_shm`; both import
torch only when called.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._dims import dim
from ..errors import ContractError, ShapeMismatchError, StateError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["State"]


@dataclass
class State:
    """Generic state container (tensor dictionary + metadata).

    Indexing a State by key returns the tensor: ``state["latent"]`` is
    ``state.tensors["latent"]``.

    Args:
        tensors: State key (as the contract declares it) -> tensor whose first dim is the batch.
        meta: JSON-serializable metadata that travels with the State (wire format included).
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    """State key (as the contract declares it) -> tensor whose first dim is the batch."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serializable metadata that travels with the State (wire format included)."""
    # Name of the shared-memory segment this State's tensors view (set by from_shared_memory).
    _shm_segment: str | None = field(default=None, init=False, repr=False, compare=False)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        """State keys in insertion order."""
        return list(self.tensors)

    def get(self, key: str, default: Tensor | None = None) -> Tensor | None:
        """The tensor under ``key``, or ``default`` when the State has none."""
        return self.tensors.get(key, default)

    @property
    def batch_size(self) -> int:
        """The shared leading dim of the tensors (0-dim tensors carry no batch and are skipped).

        Raises:
            StateError: the State has no tensor with a batch dim (an empty State), as in
                WorldFlux. Also a ``ValueError``.
        """
        for tensor in self.tensors.values():
            if tensor.dim() > 0:
                return dim(tensor.shape[0])
        raise StateError(
            "State has no tensors to infer batch size",
            hint="an empty State (or one of 0-dim tensors only) has no batch",
        )

    @property
    def device(self) -> torch.device | None:
        """Device of the first tensor (None for an empty State)."""
        for tensor in self.tensors.values():
            return tensor.device
        return None

    def validate(self) -> State:
        """Validate state tensor shapes and batch consistency; return self.

        Raises:
            StateError: the State has no tensors (as in WorldFlux).
            ShapeMismatchError: tensors whose leading (batch) dims differ (0-dim tensors carry
                no batch and are allowed).
            ContractError: a value that is not a tensor.
        """
        if not self.tensors:
            raise StateError("State has no tensors", hint="a State needs at least one tensor")
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
                raise ShapeMismatchError(
                    f"state key {key!r} has batch {size} but {batch[0]!r} has batch {batch[1]}",
                    expected=(batch[1],),
                    got=(size,),
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

    def clone(self) -> State:
        """A new State with every tensor cloned and ``meta`` copied (nothing shared)."""
        return self.map(lambda t: t.clone())

    @classmethod
    def from_mapping(
        cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None
    ) -> State:
        """Build a State from any mapping of tensors."""
        return cls(dict(tensors), dict(meta or {}))

    def serialize(self, version: str = "v1", format: str = "binary") -> bytes:
        """Serialize state with a versioned binary envelope.

        Binary envelope layout: magic ``b"WFST"`` (4 bytes), version id (1 byte), big-endian
        metadata length (4 bytes), metadata JSON bytes, then each tensor's raw little-endian
        bytes in order. Tensors on other devices are copied to the host; ``requires_grad`` and
        the source device are recorded. See the State page of the docs for the full layout.

        Raises:
            StateFormatError: an unknown ``version`` or ``format``, a dtype the format cannot
                carry (e.g. complex), a value that is not a tensor, or ``meta`` that is not
                plain JSON (string keys; str, int, finite float, bool, None, list, dict).
        """
        from ._wire import encode

        return encode(self.tensors, self.meta, version=version, format=format)

    @classmethod
    def deserialize(cls, payload: bytes | bytearray | memoryview) -> State:
        """Deserialize state from ``State.serialize(...)`` payload.

        Tensors are fresh CPU tensors (copies, never views of ``payload``), with the dtype,
        shape and ``requires_grad`` recorded in the payload.

        Raises:
            StateFormatError: the payload is malformed, naming the problem (short header, bad
                magic, unknown version, metadata length past the end, invalid or non-object
                JSON, unknown dtype, bad dims, nbytes inconsistent with the shape, truncated
                data, trailing bytes). Nothing larger than the payload is ever allocated.
        """
        from ._wire import decode

        tensors, meta = decode(payload)
        return cls(tensors, meta)

    def to_shared_memory(
        self, *, namespace: str = "worldflux-state", allow_copy_from_cuda: bool = False
    ) -> dict[str, Any]:
        """Create shared-memory descriptor for zero-copy CPU state exchange.

        Copies the tensors once into one new shared-memory segment and returns a JSON-able
        descriptor naming it; pass that (e.g. through a queue or a pipe) to
        `from_shared_memory` in any process on this machine. The segment lives until
        `unlink_shared_memory` is called with the descriptor: the caller owns it.

        Notes:
            - CPU contiguous tensors retain zero-copy semantics when re-attached.
            - CUDA tensors require ``allow_copy_from_cuda=True`` and are copied to CPU.

        Raises:
            StateFormatError: a CUDA tensor without ``allow_copy_from_cuda=True``, an
                unsupported dtype, or ``meta`` that is not plain JSON.
        """
        from ._shm import create

        return create(
            self.tensors,
            self.meta,
            namespace=namespace,
            allow_copy_from_cuda=allow_copy_from_cuda,
        )

    @classmethod
    def from_shared_memory(cls, descriptor: Mapping[str, Any], *, copy: bool = False) -> State:
        """Attach a state from shared-memory descriptor created by ``to_shared_memory``.

        With ``copy=False`` the tensors are views of the segment: a write through them is seen
        by every process attached to it. The mapping stays valid as long as any of those
        tensors lives (even after `close_shared_memory` or an unlink). With ``copy=True``
        the tensors are private copies and nothing stays attached.

        Raises:
            StateFormatError: a malformed descriptor, or no segment of that name (unlinked).
        """
        from ._shm import attach

        tensors, meta, segment = attach(descriptor, copy=copy)
        state = cls(tensors, meta)
        if not copy:
            state._shm_segment = segment
        return state

    def close_shared_memory(self, *, unlink: bool = False) -> None:
        """Close attached shared-memory handles, optionally unlinking segments.

        The State drops its tensors (it is empty afterwards); the mapping is released once no
        other reference to those tensors remains, so closing never invalidates a tensor still
        in use. ``unlink=True`` also removes the segment's name, so that nothing can attach to
        it any more and its memory is freed when the last mapping goes. A no-op on a State that
        is not attached to shared memory.
        """
        segment, self._shm_segment = self._shm_segment, None
        if segment is None:
            return
        self.tensors = {}
        if unlink:
            from ._shm import unlink_attached

            unlink_attached(segment)

    @staticmethod
    def unlink_shared_memory(descriptor: Mapping[str, Any]) -> None:
        """Unlink shared-memory segments created by ``to_shared_memory``.

        Idempotent: unlinking a segment that is already gone does nothing. Processes still
        attached keep their mappings until they free their tensors.

        Raises:
            StateFormatError: ``descriptor`` is not a shared-memory descriptor.
        """
        from ._shm import unlink

        unlink(descriptor)
