"""The pytest hooks of the kit: options, and the ``wf_case`` parametrisation over presets."""

from __future__ import annotations

from typing import Any

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests", "wf_case"]


def pytest_addoption(parser: Any) -> None:
    """``--wf-family NAME`` (repeatable) and the ini option ``worldflux_families``."""
    group = parser.getgroup("worldflux", "worldflux-registry conformance kit")
    group.addoption(
        "--wf-family",
        action="append",
        default=[],
        metavar="NAME",
        help="check only this family (repeatable; default: every registered family)",
    )
    parser.addini(
        "worldflux_families",
        type="linelist",
        default=[],
        help="families the conformance kit checks (default: every registered family)",
    )


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "wf_conformance: a check of the worldflux-registry conformance kit"
    )


def selected_families(config: Any) -> list[str]:
    """The families asked for on the command line, else in the ini file, else all."""
    from ..registry._registry import registry

    names = list(config.getoption("wf_family") or config.getini("worldflux_families"))
    return names or registry.list()


def pytest_generate_tests(metafunc: Any) -> None:
    """Parametrise ``wf_case`` over every selected ``family:preset`` (module scope: each model
    is built once per test module)."""
    if "wf_case" not in metafunc.fixturenames:
        return
    from ._kit import family_presets

    cases = family_presets(families=selected_families(metafunc.config))
    ids = [f"{family}:{preset}" for family, preset in cases]
    metafunc.parametrize("wf_case", cases, ids=ids, indirect=True, scope="module")


def _case_fixture() -> Any:
    import pytest

    @pytest.fixture(scope="module")
    def wf_case(request: Any) -> Any:
        """The `Case` of one ``family:preset`` (parametrised by `pytest_generate_tests`)."""
        from ._kit import Case

        family, preset = request.param
        return Case(family, preset)

    return wf_case


wf_case = _case_fixture()
