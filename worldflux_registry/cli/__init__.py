"""The ``worldflux-registry`` command line.

Layer 9, the top (may import every layer). ``_main`` builds the parser and runs the listing,
resolution and plugin commands; ``_export``, ``_parity`` and ``_bench`` hold the commands of those
names. Heavy modules are imported inside the command that needs them.
"""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
