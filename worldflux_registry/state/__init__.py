"""State: the tensors a world model carries between steps, its wire format v1 and shared memory.

Layer 1 (above the base modules ``errors``, ``_dims`` and ``_files``; imports nothing else of the
core). Torch is imported only when tensors are made. ``_state`` holds `State`, ``_wire`` the
byte format ``State.serialize`` writes, ``_shm`` the shared-memory segments.
"""

from __future__ import annotations

from ._state import State

__all__ = ["State"]
