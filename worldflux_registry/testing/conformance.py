"""The conformance checks, as pytest tests: import them into a test module to run them.

``from worldflux_registry.testing.conformance import *`` (with ``pytest_plugins =
["worldflux_registry.testing"]`` in the conftest) runs each check for every selected
``family:preset`` through the ``wf_case`` fixture. See `worldflux_registry.testing`.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..contract._io import Capability, IOContract
from ..errors import CapabilityError
from ._kit import BATCH, EXPORT_PARAMS, Steps, output_problems, run_steps, trainable

__all__ = [
    "test_checkpoint_round_trips",
    "test_deterministic_steps_and_given_noise_are_reproducible",
    "test_export_passes_parity",
    "test_fingerprint_is_stable",
    "test_model_declares_what_its_spec_declares",
    "test_outputs_are_finite",
    "test_outputs_have_the_declared_keys_shapes_and_dtypes",
    "test_plugins_load_strictly",
    "test_registry_lists_families",
    "test_rollout_returns_one_state_per_action",
    "test_spec_contract_is_valid_and_round_trips",
    "test_update_is_available_exactly_when_declared",
]


def test_registry_lists_families(request: Any) -> None:
    """At least one family is selected: an empty matrix checks nothing."""
    from ._plugin import selected_families

    assert selected_families(request.config), "no family is registered: nothing to check"


def test_plugins_load_strictly() -> None:
    """Strict discovery passes: every plugin loads and every family's model class imports."""
    from ..registry._registry import Registry

    Registry(strict=True).list()


def test_spec_contract_is_valid_and_round_trips(wf_case: Any) -> None:
    contract = wf_case.contract
    assert IOContract.from_dict(contract.to_dict()) == contract


def test_fingerprint_is_stable(wf_case: Any) -> None:
    """The same config gives the same fingerprint; the model and its JSON form agree."""
    contract = wf_case.contract
    again = wf_case.spec.contract_for(dict(wf_case.config))
    assert again.fingerprint() == contract.fingerprint()
    assert IOContract.from_dict(contract.to_dict()).fingerprint() == contract.fingerprint()
    assert wf_case.model.contract_fingerprint() == contract.fingerprint()


def test_model_declares_what_its_spec_declares(wf_case: Any) -> None:
    spec, model = wf_case.spec, wf_case.model
    assert model.family == spec.name
    assert type(model).capabilities == spec.capabilities
    assert model.io_contract() == wf_case.contract
    if spec.param_count is not None:
        assert spec.param_count(wf_case.config) == trainable(model)


def test_outputs_have_the_declared_keys_shapes_and_dtypes(wf_case: Any) -> None:
    """Real outputs of every step against the contract (on meta for large presets)."""
    model, contract = wf_case.model, wf_case.contract
    device = "meta" if wf_case.on_meta else "cpu"
    try:
        outputs = run_steps(model, contract, device)
    except (NotImplementedError, RuntimeError) as exc:
        if not wf_case.on_meta or isinstance(exc, CapabilityError):
            raise
        pytest.skip(f"{wf_case!r} is checked on meta and a step cannot run there: {exc}")
    problems = output_problems(outputs, contract)
    assert not problems, "\n".join(problems)


def test_outputs_are_finite(wf_case: Any) -> None:
    import torch

    outputs = run_steps(wf_case.small_model(), wf_case.contract, "cpu")
    bad = [
        f"{step}:{key}"
        for step, tensors in outputs.items()
        for key, value in tensors.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    assert not bad, f"non-finite outputs: {bad}"


def test_deterministic_steps_and_given_noise_are_reproducible(wf_case: Any) -> None:
    import torch

    model = wf_case.small_model()
    steps = Steps(model, wf_case.contract, "cpu")
    with torch.no_grad():
        for deterministic in (True, False):
            runs = []
            for seed in (1, 2):
                # The global generator differs between runs: only declared noise may vary output.
                torch.manual_seed(seed)
                enc = steps.encode(deterministic)
                out = {f"encode.{k}": v for k, v in enc.tensors.items()}
                tr = steps.transition(enc, deterministic)
                out |= {f"transition.{k}": v for k, v in tr.tensors.items()}
                if model.supports(Capability.UPDATE):
                    up = steps.update(enc, deterministic)
                    out |= {f"update.{k}": v for k, v in up.tensors.items()}
                out |= {f"decode.{k}": v for k, v in steps.decode(tr).predictions.items()}
                runs.append(out)
            differ = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
            mode = "deterministic=True" if deterministic else "explicit noise inputs"
            assert not differ, f"with {mode}, these outputs changed between calls: {differ}"


def test_update_is_available_exactly_when_declared(wf_case: Any) -> None:
    import torch

    model = wf_case.small_model()
    steps = Steps(model, wf_case.contract, "cpu")
    with torch.no_grad():
        state = steps.encode(deterministic=True)
        if Capability.UPDATE in wf_case.spec.capabilities:
            steps.update(state, deterministic=True)
        else:
            with pytest.raises(CapabilityError):
                steps.update(state, deterministic=True)


def test_rollout_returns_one_state_per_action(wf_case: Any) -> None:
    import torch

    from ..protocol._inputs import make_actions

    model = wf_case.small_model()
    if Capability.ROLLOUT not in wf_case.spec.capabilities:
        pytest.skip(f"{wf_case.family} does not declare rollout")
    gen = torch.Generator().manual_seed(0)
    horizon = 4
    actions = make_actions(wf_case.contract, (horizon, BATCH), gen)
    with torch.no_grad():
        steps = Steps(model, wf_case.contract, "cpu")
        state = steps.encode(deterministic=True)
        traj = model.rollout(state, actions, steps.conditions("transition", True), True)
    assert len(traj.states) == horizon + 1 and traj.horizon == horizon
    for key, value in (traj.predictions or {}).items():
        assert tuple(value.shape[:2]) == (horizon, BATCH), key
    if traj.rewards is not None:
        assert tuple(traj.rewards.shape) == (horizon, BATCH)


def test_checkpoint_round_trips(wf_case: Any, tmp_path: Any) -> None:
    """save_pretrained, then load: same family, fingerprint and outputs."""
    import torch

    model = wf_case.small_model()
    saved = model.save_pretrained(tmp_path / "ckpt")
    loaded = wf_case.source.load(saved)
    assert type(loaded) is type(model)
    assert loaded.contract_fingerprint() == model.contract_fingerprint()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    first = run_steps(model, wf_case.contract, "cpu")
    again = run_steps(loaded, wf_case.contract, "cpu")
    for step, tensors in first.items():
        for key, value in tensors.items():
            assert torch.equal(value, again[step][key]), f"{step}:{key}"


def test_export_passes_parity(wf_case: Any, tmp_path: Any) -> None:
    """Presets up to EXPORT_PARAMS parameters export to ONNX and agree with torch."""
    if wf_case.size > EXPORT_PARAMS:
        pytest.skip(f"{wf_case!r} is above {EXPORT_PARAMS:,} parameters: export not checked")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    from ..exporting._export import export
    from ..parity._check import check

    model = wf_case.small_model()
    out = export(model, "onnx", tmp_path / "export", check=False)
    candidate = wf_case.source.load(out, validate=True)
    report = check(model, candidate, batch_sizes=(1, 3), horizon=3)
    assert report.passed, report.failures()
