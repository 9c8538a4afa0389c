"""The core's layers hold (docs/architecture.md), and other distributions use only public names."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_rules import LAYERS, import_cycles, layer_violations, private_imports

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "worldflux_registry"
#: Code that is not the core: the other distributions, the examples and the benchmarks.
OUTSIDE = ("plugins", "exporters", "serving", "examples", "benchmarks")


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_every_core_module_belongs_to_a_layer():
    heads = {p.relative_to(CORE).parts[0].removesuffix(".py") for p in CORE.rglob("*.py")}
    assert heads - set(LAYERS) - {"__init__", "__main__"} == set()


def test_no_core_module_imports_a_higher_layer():
    assert layer_violations(CORE) == []


def test_the_core_has_no_import_cycle():
    assert import_cycles(CORE) == []


def test_other_distributions_import_only_public_names():
    files = [p for d in OUTSIDE if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    assert len(files) > 10  # the families, the exporter and the examples are all seen
    assert private_imports(files) == []


def test_the_checks_catch_violations_in_a_synthetic_tree(tmp_path):
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from .low import x\n",
            "low/__init__.py": "",
            # a type-only import of a higher layer still counts
            "low/_a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from ..high._b import y\n",
            "high/__init__.py": "",
            "high/_b.py": "def f():\n    from ._c import z\n",
            "high/_c.py": "from . import _b\n",
            "mid.py": "import pkg\n",
        },
    )
    layers = {"low": 0, "mid": 1, "high": 2}
    assert layer_violations(root, layers) == [
        "pkg.low._a (layer 0) imports pkg.high._b (layer 2)",
        "pkg.mid imports the package facade pkg",
    ]
    assert import_cycles(root) == [["pkg.high._b", "pkg.high._c", "pkg.high._b"]]
    with pytest.raises(KeyError, match="add 'other'"):
        layer_violations(_write(root, {"other.py": "x = 1\n"}), layers)


def test_private_imports_are_found_in_a_synthetic_plugin(tmp_path):
    plugin = _write(
        tmp_path,
        {
            "ok.py": "from worldflux_registry import State\n"
            "from worldflux_registry.plugin_api import ObsLike\n",
            "bad.py": "from worldflux_registry.protocol._model import WorldModel\n"
            "import worldflux_registry._files\n"
            "from worldflux_registry.state import _wire\n",
        },
    )
    found = private_imports(sorted(plugin.glob("*.py")))
    assert [f.split(" imports ")[1] for f in found] == [
        "worldflux_registry.protocol._model.WorldModel",
        "worldflux_registry._files",
        "worldflux_registry.state._wire",
    ]
