"""Refs: names, aliases, presets, fingerprints and directories; loading presets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from worldflux_registry import (
    AmbiguousReferenceError,
    BackendError,
    ConfigError,
    Registry,
    ResolutionError,
    hookimpl,
)


def test_name_alias_and_preset_refs_resolve(fixture_registry):
    by_name = fixture_registry.resolve("toyfamily")
    assert (by_name.kind, by_name.family, by_name.preset) == ("preset", "toyfamily", "tiny")
    assert fixture_registry.resolve("toy") == dataclasses.replace(by_name, ref="toy")
    small = fixture_registry.resolve("toy:small")
    assert small.preset == "small" and small.config["hidden"] == 32
    assert small.fingerprint != by_name.fingerprint
    assert small.fingerprint.startswith("sha256:") and len(small.fingerprint) == 71


def test_resolved_config_is_a_copy(fixture_registry):
    resolved = fixture_registry.resolve("toyfamily")
    resolved.config["hidden"] = 999
    assert fixture_registry.resolve("toyfamily").config["hidden"] == 16


def test_unknown_names_and_presets_suggest_the_closest(fixture_registry):
    with pytest.raises(ResolutionError, match="Did you mean 'toyfamily'"):
        fixture_registry.resolve("toyfamly")
    with pytest.raises(ResolutionError, match="Did you mean 'small'"):
        fixture_registry.resolve("toyfamily:smal")
    with pytest.raises(ResolutionError, match="no preset after"):
        fixture_registry.resolve("toyfamily:")


def test_fingerprint_prefix_resolves_like_a_short_git_hash(fixture_registry):
    small = fixture_registry.resolve("toyfamily:small")
    for length in (8, 20, 64):
        ref = small.fingerprint[: len("sha256:") + length]
        resolved = fixture_registry.resolve(ref)
        assert (resolved.family, resolved.preset) == ("toyfamily", "small")
        assert resolved.fingerprint == small.fingerprint
    assert fixture_registry.resolve(small.fingerprint.upper().replace("SHA256", "sha256")).preset


@pytest.mark.parametrize(
    ("ref", "message"),
    [("sha256:1234567", "shorter than 8"), ("sha256:xyz12345", "not a contract fingerprint")],
)
def test_bad_fingerprint_refs_say_why(fixture_registry, ref, message):
    with pytest.raises(ResolutionError, match=message):
        fixture_registry.resolve(ref)


def test_unknown_fingerprint_is_a_resolution_error(fixture_registry):
    fp = fixture_registry.resolve("toyfamily").fingerprint
    other = "sha256:" + ("0" if fp[7] != "0" else "1") + fp[8:20]
    with pytest.raises(ResolutionError, match="no installed family preset"):
        fixture_registry.resolve(other)


def test_presets_sharing_a_fingerprint_need_family_preset(fixture_registry):
    # tiny, tiny-tied and tiny-wide-std declare one contract but build different models.
    tiny = fixture_registry.resolve("toyfamily:tiny")
    with pytest.raises(AmbiguousReferenceError) as info:
        fixture_registry.resolve(tiny.fingerprint[:20])
    assert set(info.value.candidates) == {
        "toyfamily:tiny",
        "toyfamily:tiny-tied",
        "toyfamily:tiny-wide-std",
    }
    found = fixture_registry.find(tiny.fingerprint[:20])
    assert {r.preset for r in found} == {"tiny", "tiny-tied", "tiny-wide-std"}
    assert all(r.fingerprint == tiny.fingerprint for r in found)


def _plugin(*specs):
    class Plugin:
        @hookimpl
        def worldflux_registry_families(self):
            return list(specs)

    return Plugin()


def test_presets_with_one_config_under_several_names_resolve_to_the_default():
    from wf_fixture_good.plugin import TOYFAMILY

    spec = dataclasses.replace(
        TOYFAMILY, presets={"a": {}, "b": {}, "c": {"hidden": 4}}, default_preset="b"
    )
    registry = Registry(entry_points=False, plugins=[_plugin(spec)])
    resolved = registry.resolve(registry.resolve("toyfamily:a").fingerprint)
    assert resolved.preset == "b"


def test_one_fingerprint_in_two_families_lists_both():
    from wf_fixture_good.plugin import TOYFAMILY

    other = dataclasses.replace(TOYFAMILY, name="othertoy", aliases=(), presets={"tiny": {}})
    registry = Registry(entry_points=False, plugins=[_plugin(TOYFAMILY, other)])
    fp = registry.resolve("othertoy").fingerprint
    with pytest.raises(AmbiguousReferenceError) as info:
        registry.resolve(fp)
    assert "othertoy:tiny" in info.value.candidates
    assert "toyfamily:tiny" in info.value.candidates


def test_path_refs_are_directories(fixture_registry, tmp_path):
    with pytest.raises(ResolutionError, match="does not exist"):
        fixture_registry.resolve(str(tmp_path / "missing"))
    with pytest.raises(ResolutionError, match="neither a worldflux checkpoint"):
        fixture_registry.resolve(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "some.other.format"}))
    with pytest.raises(ResolutionError, match=r"some\.other\.format"):
        fixture_registry.resolve(str(tmp_path))


def test_export_directory_loads_through_its_exporters_loader(extra_site, tmp_path):
    import torch

    registry = Registry()
    model = registry.load("toyfamily:small")
    exporter = registry.get_exporter("toyexport")
    from worldflux_registry.registry._discovery import resolve_target

    resolve_target(exporter.exporter, what="exporter")(model, tmp_path / "art")
    resolved = registry.resolve(str(tmp_path / "art"))
    assert (resolved.kind, resolved.artifact_format) == ("artifact", "wf-fixture.toy-artifact")
    loaded = registry.load(str(tmp_path / "art"), dtype=torch.float64)
    assert loaded.loaded_from_artifact is True
    assert loaded.encoder.weight.dtype == torch.float64
    assert torch.equal(loaded.encoder.weight.float(), model.encoder.weight)


def test_load_builds_an_eval_model_with_overrides_dtype_and_preset(fixture_registry):
    import torch

    model = fixture_registry.load("toy:small", dtype="float64", latent=5)
    assert type(model).__name__ == "ToyWorldModel"
    assert model.preset == "small" and not model.training
    assert model.config["latent"] == 5 and model.config["hidden"] == 32
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(ConfigError, match="Did you mean 'latent'"):
        fixture_registry.load("toyfamily", latnt=5)
    with pytest.raises(ConfigError, match="unknown dtype"):
        fixture_registry.load("toyfamily", dtype="float99")


def test_cuda_without_cuda_is_a_one_line_backend_error(fixture_registry, monkeypatch):
    import torch

    # What a CPU-only torch build reports, on any machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError) as caught:
        fixture_registry.load("toyfamily", device="cuda")
    assert "'cuda' asked for" in str(caught.value) and "\n" not in str(caught.value)
    assert "device='cpu'" in caught.value.hint and caught.value.device == "cuda"


def test_a_cuda_index_past_the_visible_devices_is_a_backend_error(fixture_registry, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BackendError, match=r"only 1 CUDA device"):
        fixture_registry.load("toyfamily", device="cuda:3")


def test_an_unknown_device_is_a_config_error(fixture_registry):
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        fixture_registry.load("toyfamily", device="gpu")
    assert fixture_registry.load("toyfamily", device="cpu").training is False


@pytest.mark.gpu
def test_load_places_the_model_on_cuda(fixture_registry):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = fixture_registry.load("toyfamily", device="cuda")
    assert next(model.parameters()).is_cuda


def test_listing_resolving_and_fingerprinting_never_import_torch(tmp_path):
    code = textwrap.dedent(
        """
        import json, sys
        from worldflux_registry import registry
        from worldflux_registry.cli._main import main
        names = registry.list()
        resolved = registry.resolve("toy:small")
        registry.resolve(resolved.fingerprint[:15])
        registry.get("toyfamily").contract_for(resolved.config).fingerprint()
        codes = [main(["list"]), main(["info", "toy"]), main(["resolve", "toy"]),
                 main(["plugins", "--json"])]
        print(json.dumps({"names": names, "codes": codes,
                          "torch": "torch" in sys.modules,
                          "model": "wf_fixture_good.model" in sys.modules}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "toyfamily" in result["names"]
    assert result["codes"][:3] == [0, 0, 0]
    assert result["torch"] is False
    assert result["model"] is False


def test_a_model_built_by_an_isolated_registry_knows_its_contract():
    import dataclasses

    from wf_fixture_good.plugin import TOYFAMILY

    # A family unknown to the process-wide registry, whose class relies on the base io_contract().
    spec = dataclasses.replace(
        TOYFAMILY, name="isolatedtoy", aliases=(), model="tests_isolated_toy:Model"
    )
    import sys
    import types

    from wf_fixture_good.model import ToyWorldModel

    module = types.ModuleType("tests_isolated_toy")

    class Model(ToyWorldModel):
        family = "isolatedtoy"
        io_contract = ToyWorldModel.__mro__[1].io_contract

    module.Model = Model
    sys.modules["tests_isolated_toy"] = module
    try:
        registry = Registry(entry_points=False, plugins=[_plugin(spec)])
        model = registry.load("isolatedtoy")
        assert model.contract_fingerprint() == registry.resolve("isolatedtoy").fingerprint
    finally:
        del sys.modules["tests_isolated_toy"]


def test_a_built_model_keeps_its_spec_through_a_deep_copy():
    import copy
    import sys
    import types
    from types import MappingProxyType

    from wf_fixture_good.model import ToyWorldModel
    from wf_fixture_good.plugin import TOYFAMILY

    # Read-only mappings, as a plugin may declare them: deepcopy cannot copy those.
    spec = dataclasses.replace(
        TOYFAMILY,
        name="proxytoy",
        aliases=(),
        model="tests_proxy_toy:Model",
        defaults=MappingProxyType(dict(TOYFAMILY.defaults)),
        presets=MappingProxyType(
            {k: MappingProxyType(dict(v)) for k, v in TOYFAMILY.presets.items()}
        ),
    )
    module = types.ModuleType("tests_proxy_toy")

    class Model(ToyWorldModel):
        family = "proxytoy"
        io_contract = ToyWorldModel.__mro__[1].io_contract

    module.Model = Model
    sys.modules["tests_proxy_toy"] = module
    try:
        registry = Registry(entry_points=False, plugins=[_plugin(spec)])
        model = registry.load("proxytoy")
        assert model.family_spec == registry.get("proxytoy")
        twin = copy.deepcopy(model)
        assert twin.family_spec is model.family_spec
        twin._contract_cache = None  # recomputed from the shared spec, not the global registry
        assert twin.io_contract() == model.io_contract()
    finally:
        del sys.modules["tests_proxy_toy"]


def test_a_directly_built_model_finds_its_contract_in_the_global_registry():
    from wf_fixture_good.model import ToyWorldModel

    from worldflux_registry import WorldModel, registry

    class Direct(ToyWorldModel):
        io_contract = WorldModel.io_contract

    model = Direct()
    assert model.family_spec is None
    assert model.io_contract() == registry.get("toyfamily").contract_for(model.config)
