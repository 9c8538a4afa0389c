"""Every registered family and preset keeps its declared contract: the conformance kit.

The checks live in `worldflux_registry.testing` (the public kit third-party families run in their
own CI with one import); here they run over the live registry: the first-party families, the
toyfamily fixture and any installed third-party family, without naming any. A deliberately
broken family shows the kit's checks fail when they should.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from worldflux_registry.testing import check_tensors  # noqa: E402
from worldflux_registry.testing.conformance import *  # noqa: E402, F403


def test_the_checker_reports_wrong_keys_shapes_and_dtypes():
    from worldflux_registry.contract._io import TensorSpec

    specs = (
        TensorSpec("latent", "float32", ("batch", 4)),
        TensorSpec("reward", "float32", ("batch",)),
    )
    good = {"latent": torch.zeros(3, 4), "reward": torch.zeros(3)}
    assert check_tensors("state", good, specs) == []
    bad = {"latent": torch.zeros(3, 5, dtype=torch.float64), "extra": torch.zeros(3)}
    problems = " | ".join(check_tensors("state", bad, specs))
    for needle in ("lacks declared keys ['reward']", "undeclared keys ['extra']", "float64", "5"):
        assert needle in problems, problems
    assert check_tensors("state", {**good, "reward": torch.zeros(4)}, specs)


def test_the_kit_fails_a_family_whose_outputs_break_its_contract():
    from wrong_family import WrongFamilyPlugin

    from worldflux_registry import ContractError, Registry
    from worldflux_registry.testing import Case, run_steps

    wrong = Registry(entry_points=False, plugins=[WrongFamilyPlugin])
    honest = Case("wrongimg", "honest", source=wrong)
    run_steps(honest.model, honest.contract, "cpu")
    broken = Case("wrongimg", "channels-first", source=wrong)
    assert broken.model.validate_outputs  # the kit checks every step of the models it builds
    with pytest.raises(ContractError, match=r"decode\(\) breaks its contract"):
        run_steps(broken.model, broken.contract, "cpu")


def _broken_model_plugin():
    from worldflux_registry import FamilySpec, IOContract, TensorSpec
    from worldflux_registry.hookspecs import hookimpl

    def contract(config):
        return IOContract(state=(TensorSpec("h", "float32", ("batch", 1)),))

    class BrokenModelModule:
        @staticmethod
        @hookimpl
        def worldflux_registry_families():
            return [
                FamilySpec(
                    name="brokenmodel",
                    summary="its model module does not import",
                    model="wf_no_such_model_module:Model",
                    defaults={},
                    presets={"only": {}},
                    default_preset="only",
                    contract=contract,
                )
            ]

    return BrokenModelModule


def test_strict_loading_imports_each_family_model_class():
    from worldflux_registry import PluginError, Registry

    BrokenModelModule = _broken_model_plugin()
    lax = Registry(entry_points=False, plugins=[BrokenModelModule], strict=False)
    assert lax.list() == ["brokenmodel"]  # the plugin module itself loads
    strict = Registry(entry_points=False, plugins=[BrokenModelModule], strict=True)
    with pytest.raises(PluginError, match="wf_no_such_model_module"):
        strict.list()


def test_plugins_strict_command_reports_a_model_module_that_does_not_import(monkeypatch, capsys):
    import sys

    from worldflux_registry import Registry
    from worldflux_registry.cli._main import main

    lax = Registry(entry_points=False, plugins=[_broken_model_plugin()], strict=False)
    monkeypatch.setattr(sys.modules["worldflux_registry.cli._main"], "_registry", lambda: lax)
    assert main(["plugins"]) == 0  # the plugin module loads: without --strict all looks fine
    assert main(["plugins", "--strict"]) == 1
    assert "wf_no_such_model_module" in capsys.readouterr().err
