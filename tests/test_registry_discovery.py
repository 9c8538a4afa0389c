"""Plugin discovery through real installed distributions: isolation, conflicts, switches."""

from __future__ import annotations

import threading

import pytest

from worldflux_registry import (
    FamilySpec,
    PluginConflictError,
    PluginError,
    Registry,
    ResolutionError,
    hookimpl,
)


def _records(registry):
    return {r.entry_point.split(" = ")[0]: r for r in registry.plugins()}


def test_good_plugin_is_found_through_its_entry_point_with_distribution_and_version():
    registry = Registry()
    spec = registry.get("toyfamily")
    assert spec.distribution == "wf-fixture-good"
    assert spec.distribution_version == "1.2.0"
    record = _records(registry)["toyfamily"]
    assert (record.status, record.distribution, record.version) == (
        "ok",
        "wf-fixture-good",
        "1.2.0",
    )
    assert record.entry_point == "toyfamily = wf_fixture_good.plugin"
    assert record.families == ("toyfamily",)


def test_each_broken_plugin_is_recorded_and_the_rest_keep_working(extra_site):
    registry = Registry()
    records = _records(registry)
    assert records["importfail"].status == "broken"
    assert "wf_fixture_dependency_that_is_not_installed" in records["importfail"].error
    assert records["importfail"].distribution == "wf-fixture-importfail"
    assert records["importfail"].version == "0.1.0"
    assert records["hookraises"].status == "broken"
    assert "exploded on purpose" in records["hookraises"].error
    assert records["invalidfam"].status == "broken"
    assert "not a target" in records["invalidfam"].error
    assert records["badsig"].status == "broken"
    assert "config" in records["badsig"].error  # pluggy names the argument it cannot provide
    assert records["unknownhook"].status == "broken"
    assert "worldflux_registry_familes" in records["unknownhook"].error
    assert records["toyexport"].status == "ok"
    # Everything else is untouched.
    assert "toyfamily" in registry.list()
    assert registry.get("toy").name == "toyfamily"
    assert registry.get_exporter("toyexport").distribution == "wf-fixture-artifact"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("importfail", "import failed"),
        ("hookraises", "exploded on purpose"),
        ("invalidfam", "not a target"),
    ],
)
def test_asking_for_what_a_broken_plugin_provides_raises_its_reason(extra_site, name, reason):
    registry = Registry()
    with pytest.raises(PluginError) as info:
        registry.get(name)
    assert reason in str(info.value)
    assert info.value.distribution.startswith("wf-fixture-")
    assert name not in registry.list()


def test_two_distributions_claiming_one_name_raise_naming_both(extra_site):
    registry = Registry()
    for name in ("dupefamily", "dupealias"):
        with pytest.raises(PluginConflictError) as info:
            registry.get(name)
        assert "wf-fixture-dupe-a" in str(info.value) and "wf-fixture-dupe-b" in str(info.value)
        assert set(info.value.distributions) == {"wf-fixture-dupe-a", "wf-fixture-dupe-b"}
    # Names each claims alone are unaffected.
    assert registry.get("uniquea").distribution == "wf-fixture-dupe-a"
    assert registry.get("uniqueb").distribution == "wf-fixture-dupe-b"
    assert "dupefamily" not in registry.list()
    records = _records(registry)
    assert records["dupea"].status == records["dupeb"].status == "conflict"
    assert "dupefamily" in records["dupea"].error


def test_strict_mode_raises_at_discovery(extra_site, monkeypatch):
    monkeypatch.setenv("WORLDFLUX_REGISTRY_STRICT", "1")
    with pytest.raises(PluginError, match="strict"):
        Registry().list()
    assert Registry(strict=False).get("toyfamily").name == "toyfamily"


def test_strict_mode_passes_when_every_plugin_is_healthy(monkeypatch):
    monkeypatch.setenv("WORLDFLUX_REGISTRY_STRICT", "1")
    monkeypatch.setenv("WORLDFLUX_REGISTRY_PLUGINS", "wf-fixture-good")
    assert Registry().list() == ["toyfamily"]


def test_plugins_env_chooses_distributions_and_empty_means_none(extra_site, monkeypatch):
    monkeypatch.setenv("WORLDFLUX_REGISTRY_PLUGINS", "wf_fixture_good, WF-Fixture-Dupe-A")
    registry = Registry()
    assert registry.list() == ["dupefamily", "toyfamily", "uniquea"]
    records = _records(registry)
    assert records["importfail"].status == "blocked"
    assert "WORLDFLUX_REGISTRY_PLUGINS" in records["importfail"].error
    monkeypatch.setenv("WORLDFLUX_REGISTRY_PLUGINS", "")
    assert Registry().list() == []


def test_block_env_skips_a_distribution_without_importing_it(extra_site, monkeypatch):
    monkeypatch.setenv("WORLDFLUX_REGISTRY_BLOCK", "wf-fixture-dupe-b,wf-fixture-importfail")
    registry = Registry()
    assert registry.get("dupefamily").distribution == "wf-fixture-dupe-a"
    assert registry.get("dupealias").name == "uniquea"
    records = _records(registry)
    assert records["dupeb"].status == records["importfail"].status == "blocked"
    assert records["dupea"].status == "ok"


class _CountingPlugin:
    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.calls = 0

    @hookimpl
    def worldflux_registry_families(self):
        self.calls += 1
        return [self.spec]


def test_discovery_is_lazy_cached_and_runs_once_under_concurrency():
    from wf_fixture_good.plugin import TOYFAMILY

    plugin = _CountingPlugin(TOYFAMILY)
    registry = Registry(entry_points=False, plugins=[plugin])
    assert plugin.calls == 0
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(registry.list())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [["toyfamily"]] * 8
    assert plugin.calls == 1
    registry.refresh()
    registry.list()
    assert plugin.calls == 2


def test_isolated_registry_sees_only_its_plugins(fixture_registry):
    assert fixture_registry.list() == ["toyfamily"]
    with pytest.raises(ResolutionError):
        fixture_registry.get("dreamerv3")
    record = fixture_registry.plugins()[0]
    assert record.distribution is None and record.status == "ok"


def test_returned_lists_are_copies(fixture_registry):
    fixture_registry.list().append("x")
    fixture_registry.plugins().clear()
    fixture_registry.exporters().append("x")
    assert fixture_registry.list() == ["toyfamily"]
    assert len(fixture_registry.plugins()) == 1


def test_list_filters_by_pattern_and_capability_in_natural_order():
    import dataclasses

    from wf_fixture_good.plugin import TOYFAMILY

    specs = [
        dataclasses.replace(TOYFAMILY, name=n, aliases=(), capabilities=caps)
        for n, caps in (("m10", {"encode"}), ("m9", {"encode", "policy"}), ("other", set()))
    ]

    class Plugin:
        @hookimpl
        def worldflux_registry_families(self):
            return specs

    registry = Registry(entry_points=False, plugins=[Plugin()])
    assert registry.list() == ["m9", "m10", "other"]
    assert registry.list("m*") == ["m9", "m10"]
    assert registry.list(capability="policy") == ["m9"]
    assert registry.list("o*", capability="encode") == []
