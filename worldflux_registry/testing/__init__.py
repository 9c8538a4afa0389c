"""The conformance kit: checks every model family must pass, as a pytest plugin.

Layer 9 (imports every layer below it). A family runs the kit in its own CI with its
``conftest.py`` naming the plugin and one test module importing the checks::

    # conftest.py
    pytest_plugins = ["worldflux_registry.testing"]

    # tests/test_conformance.py
    from worldflux_registry.testing.conformance import *  # noqa: F401,F403

The checks run for every preset of every family the registry lists (narrowed with
``--wf-family NAME`` or the ini option ``worldflux_families``): the contract round-trips and its
fingerprint is stable; the model declares what its spec declares; real outputs of ``encode``,
``transition``, ``update``, ``decode`` and ``rollout`` have the declared keys, dtypes and shapes
(presets above ``SMALL_PARAMS`` parameters on the meta device); outputs are finite and
reproducible given their noise; a checkpoint round-trips; small presets export to ONNX and pass
parity; strict plugin loading imports every family's model class.

Nothing here imports torch until a check runs. `Case`, `Steps`, `run_steps`, `check_tensors`
and `assert_outputs_follow_contract` are public for families that write checks of their own.
"""

from __future__ import annotations

from ._kit import (
    EXPORT_PARAMS,
    SMALL_PARAMS,
    Case,
    Steps,
    assert_outputs_follow_contract,
    check_tensors,
    family_presets,
    output_problems,
    run_steps,
    trainable,
)
from ._plugin import pytest_addoption, pytest_configure, pytest_generate_tests, wf_case

__all__ = [
    "EXPORT_PARAMS",
    "SMALL_PARAMS",
    "Case",
    "Steps",
    "assert_outputs_follow_contract",
    "check_tensors",
    "family_presets",
    "output_problems",
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "run_steps",
    "trainable",
    "wf_case",
]
