"""Configs are checked before a model is built: types against the defaults, the family's own
rules, and a parameter ceiling, each a ConfigError naming the field."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wf_fixture_good import plugin as good

from worldflux_registry import ConfigError, Registry
from worldflux_registry.contract._family import MAX_PARAMETERS
from worldflux_registry.hookspecs import hookimpl


def _registry(**changes) -> Registry:
    spec = dataclasses.replace(good.worldflux_registry_families()[0], **changes)

    class Plugin:
        @hookimpl
        def worldflux_registry_families(self):
            return [spec]

    return Registry(entry_points=False, plugins=[Plugin()])


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hidden", "16", "an int"),
        ("hidden", 16.0, "an int"),
        ("hidden", True, "an int"),
        ("min_std", "x", "a number"),
        ("min_std", float("nan"), "a finite number"),
        ("tie_heads", 1, "a bool"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field(fixture_registry, field, value, expected):
    with pytest.raises(ConfigError, match=f"'{field}' is .*expected {expected}") as info:
        fixture_registry.load("toyfamily", **{field: value})
    assert info.value.field == field


def test_an_int_is_a_valid_float():
    _registry().load("toyfamily", min_std=1)


def test_the_family_rules_run_before_building(monkeypatch):
    from wf_fixture_good.model import ToyWorldModel

    def never(config):
        raise AssertionError("built despite an invalid config")

    monkeypatch.setattr(ToyWorldModel, "from_config", classmethod(lambda cls, c: never(c)))

    def validate(config):
        if config["hidden"] < 1:
            raise ConfigError("hidden must be >= 1", field="hidden")

    reg = _registry(validate_config=validate)
    with pytest.raises(ConfigError, match="hidden must be >= 1"):
        reg.load("toyfamily", hidden=-1)


def test_a_plain_exception_from_the_rules_becomes_a_config_error():
    def validate(config):
        raise ValueError("latent must be even")

    with pytest.raises(ConfigError, match="rejects its config: latent must be even"):
        _registry(validate_config=validate).load("toyfamily")


def test_the_parameter_ceiling_is_checked_before_allocating():
    reg = _registry(max_parameters=10_000)
    reg.load("toyfamily")
    with pytest.raises(ConfigError, match=r"over the ceiling of 10,000 \(fields set: hidden=4096"):
        reg.load("toyfamily", hidden=4096)
    # the default ceiling: a size that would need terabytes never reaches torch
    with pytest.raises(ConfigError, match="over the ceiling"):
        _registry().load("toyfamily", hidden=10**6)
    assert MAX_PARAMETERS == 2_000_000_000


def test_a_constructor_failing_on_a_value_is_a_config_error():
    with pytest.raises(ConfigError, match="could not be built"):
        _registry().load("toyfamily", hidden=-3)


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(sorted(good.DEFAULTS)),
    value=st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=4)
    | st.lists(st.integers(), max_size=2),
)
def test_any_override_builds_or_raises_config_error(field, value):
    reg = _REG
    try:
        reg.load("toyfamily", **{field: value})
    except ConfigError as exc:
        assert len(str(exc)) < 1000


_REG = _registry(max_parameters=200_000)
