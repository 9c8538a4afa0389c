"""The families' own config rules run before a model is built (FamilySpec.validate_config)."""

from __future__ import annotations

import pytest

from worldflux_registry import ConfigError, registry


@pytest.mark.parametrize("family", ["dreamerv3", "tdmpc2"])
def test_every_preset_passes_its_family_rules(family):
    spec = registry.get(family)
    assert spec.validate_config is not None
    for preset in spec.presets:
        spec.check_config(spec.config(preset))


@pytest.mark.parametrize(
    "ref, overrides, field",
    [
        ("dreamerv3:ci", {"units": -1}, "units"),
        ("dreamerv3:ci", {"blocks": 0}, "blocks"),
        ("dreamerv3:ci", {"unimix": 1.0}, "unimix"),
        ("dreamerv3:ci", {"minstd": 2.0}, "minstd"),
        ("dreamerv3:ci", {"deter": 65}, "deter"),
        ("tdmpc2:ci", {"dropout": 1.5}, "dropout"),
        ("tdmpc2:ci", {"latent_dim": 13}, "latent_dim"),
        ("tdmpc2:ci", {"num_q": 1}, "num_q"),
        ("tdmpc2:ci", {"mlp_dim": 0}, "mlp_dim"),
    ],
)
def test_a_config_the_family_cannot_build_is_a_config_error_naming_the_field(ref, overrides, field):
    with pytest.raises(ConfigError, match=field):
        registry.load(ref, **overrides)
