"""How a model built outside a registry finds its `FamilySpec`.

The protocol and checkpoint layers need a family's spec (for ``io_contract`` and the versions a
checkpoint records) but sit below the registry. The registry layer installs the lookup with
`set_family_locator`; lower layers call `locate_family`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..errors import ResolutionError
from ._family import FamilySpec

__all__ = ["FamilyLookup", "locate_family", "set_family_locator"]


class FamilyLookup(Protocol):
    """Anything that looks a family up by name (a `Registry`)."""

    def get(self, name: str) -> FamilySpec: ...


_locator: Callable[[str], FamilySpec] | None = None


def set_family_locator(locator: Callable[[str], FamilySpec]) -> None:
    """Install the function `locate_family` calls (the package does this on import)."""
    global _locator
    _locator = locator


def locate_family(name: str) -> FamilySpec:
    """Return the installed spec of family ``name``.

    Raises:
        ResolutionError: the family is not installed, or no lookup was installed.
    """
    if _locator is None:
        raise ResolutionError(
            f"cannot look up family {name!r}: no registry is installed",
            hint="import worldflux_registry, or build the model with registry.load",
        )
    return _locator(name)
