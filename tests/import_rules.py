"""Import rules of the code base, checked by parsing imports with `ast` (no import runs).

`module_imports` reads every import of a package tree, at any depth (module level, inside
functions, under ``if TYPE_CHECKING:``): a type-only import still ties two modules together.
`layer_violations` and `import_cycles` check the core against `LAYERS`; `private_imports`
checks that code outside the core uses only its public names. Each takes plain paths, so the
tests run them on the real tree and on small synthetic trees that break each rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Layer of each top-level module or subpackage of ``worldflux_registry``, lowest first. A module
#: may import its own layer and lower ones, never a higher one. ``__init__`` (the facade that
#: re-exports the public API) and ``__main__`` sit above every layer.
LAYERS: Mapping[str, int] = {
    "errors": 0,
    "_dims": 0,
    "_files": 0,
    "_json": 0,
    "_torch_env": 0,
    "_rich": 0,
    "functional": 0,
    "state": 1,
    "contract": 2,
    "hookspecs": 2,
    "checkpoint": 3,
    "protocol": 4,
    "registry": 5,
    "parity": 6,
    "exporting": 7,
    "bench": 8,
    "testing": 9,
    "optimizing": 9,
    "cli": 10,
    "plugin_api": 11,
}
TOP = ("__init__", "__main__")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def module_imports(root: Path) -> dict[str, set[str]]:
    """Module -> modules of the same tree it imports (``root`` is the package directory)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = (
                    _resolve(name, is_package, node.level, node.module)
                    if node.level
                    else node.module or ""
                )
                # ``from pkg import sub`` imports the submodule, not only the package.
                found = [
                    f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin
                    for a in node.names
                ]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(root_name: str, module: str, layers: Mapping[str, int]) -> int | None:
    parts = module.split(".")
    if parts == [root_name]:
        return None  # the facade
    head = parts[1]
    if head in TOP:
        return None
    if head not in layers:
        raise KeyError(f"{module} belongs to no layer: add {head!r} to LAYERS")
    return layers[head]


def layer_violations(root: Path, layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Every import of a module from a higher layer (or of the facade from inside a layer)."""
    problems = []
    for module, targets in sorted(module_imports(root).items()):
        own = _layer(root.name, module, layers)
        if own is None:
            continue
        for target in sorted(targets):
            theirs = _layer(root.name, target, layers)
            if theirs is None:
                problems.append(f"{module} imports the package facade {target}")
            elif theirs > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of the import graph below the facade, each as the list of modules on it."""
    graph = module_imports(root)
    facade = {root.name, f"{root.name}.__main__"}
    graph = {m: {t for t in ts if t not in facade} for m, ts in graph.items() if m not in facade}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def private_imports(files: Iterable[Path], package: str = "worldflux_registry") -> list[str]:
    """Imports of a private name of ``package`` (a ``_``-prefixed part) in ``files``."""
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == package and any(p.startswith("_") for p in parts[1:]):
                    problems.append(f"{path}:{node.lineno} imports {name}")
    return problems
