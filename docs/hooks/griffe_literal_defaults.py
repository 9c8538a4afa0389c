"""Griffe extension: show a parameter default given by a module constant as the constant's value.

``horizon: int = DEFAULT_HORIZON`` renders as ``horizon: int = 16`` in the API reference, so a
reader sees the default without looking the constant up. Defaults that are not simple constants
of the package (calls, attributes of other libraries) are left as written.
"""

from __future__ import annotations

from typing import Any

import griffe


def _constant_value(scope: griffe.Object, name: str) -> Any | None:
    """The literal value of the module-level constant ``name`` as seen from ``scope``."""
    obj: griffe.Object | griffe.Alias | None = scope
    while obj is not None and not isinstance(obj, griffe.Module):
        obj = obj.parent
    if obj is None or name not in obj.members:
        return None
    member = obj.members[name]
    try:
        target = member.final_target if isinstance(member, griffe.Alias) else member
    except griffe.AliasResolutionError:
        return None
    if not isinstance(target, griffe.Attribute) or target.value is None:
        return None
    value = target.value
    # Only literals: a constant built from another name would just move the question.
    if isinstance(value, griffe.Expr) and any(
        isinstance(part, griffe.ExprName) for part in value.iterate(flat=False)
    ):
        return None
    return value


def _functions(obj: griffe.Object) -> Any:
    for member in obj.members.values():
        if isinstance(member, griffe.Alias):
            continue
        if isinstance(member, griffe.Function):
            yield member
        elif isinstance(member, (griffe.Class, griffe.Module)):
            yield from _functions(member)


class LiteralDefaults(griffe.Extension):
    """Replace constant-name defaults by their literal values."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for func in _functions(pkg):
            for param in func.parameters:
                default = param.default
                if isinstance(default, griffe.ExprName):
                    value = _constant_value(func, default.name)
                    if value is not None:
                        param.default = value
