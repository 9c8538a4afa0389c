"""The contract is enforced on real outputs: export runs each traced graph and refuses outputs
that disagree with the contract; `validate_outputs` checks every step of the torch and ONNX
models; discrete labels are checked against their classes; int32 labels are cast for an int64
contract by both backends."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("worldflux_onnx")

from wrong_family import CLASSES, WrongFamilyPlugin  # noqa: E402

from worldflux_registry import (  # noqa: E402
    ContractError,
    ExportError,
    ModelOutput,
    Registry,
    State,
    export,
    parity,
)


@pytest.fixture(scope="module")
def wrong():
    from worldflux_onnx import plugin as onnx_plugin

    return Registry(entry_points=False, plugins=[WrongFamilyPlugin, onnx_plugin])


def built(wrong, preset, **kw):
    torch.manual_seed(0)
    return wrong.load(f"wrongimg:{preset}", **kw)


def test_channels_first_decode_output_is_an_export_error(wrong, tmp_path):
    model = built(wrong, "channels-first", validate=False)
    with pytest.raises(ExportError) as info:
        export(model, "onnx", tmp_path / "out", check=False)
    err = info.value
    assert (err.graph, err.output) == ("decode", "pred.image")
    text = str(err)
    for needle in ("[2, 3, 32, 32]", "[batch, 32, 32, 3]", "decode()", "float32"):
        assert needle in text, text
    assert not (tmp_path / "out").exists()


def test_float64_decode_output_is_an_export_error(wrong, tmp_path):
    model = built(wrong, "float64", validate=False)
    with pytest.raises(ExportError, match=r"dtype float64.*declares .* float32") as info:
        export(model, "onnx", tmp_path / "out", check=False)
    assert info.value.output == "pred.image"


def test_honest_model_exports_loads_and_passes_parity(wrong, tmp_path):
    model = built(wrong, "honest")
    out = export(model, "onnx", tmp_path / "out", check=False)
    candidate = wrong.load(out, validate=True)
    assert candidate.validate_outputs
    report = parity.check(model, candidate, batch_sizes=(2,), horizon=3)
    assert report.passed, report.failures()


def test_validate_outputs_catches_the_torch_model_breaking_its_contract(wrong):
    model = built(wrong, "channels-first", validate=True)
    state = model.encode({"vector": torch.zeros(2, 4)})
    with pytest.raises(ContractError, match=r"decode\(\) breaks its contract.*'image'"):
        model.decode(state)
    model.validate_outputs = False
    assert model.decode(state)["image"].shape == (2, 3, 32, 32)  # unchecked, as asked


def test_validate_outputs_catches_the_onnx_model_breaking_its_contract(wrong, tmp_path):
    out = export(built(wrong, "honest"), "onnx", tmp_path / "out", check=False)
    candidate = wrong.load(out, validate=True)

    class DropsReward(type(candidate)):
        """An ONNX backend that loses an output."""

        def decode(self, state, conditions=None):
            preds = super().decode(state, conditions).predictions
            return ModelOutput({"image": preds["image"]})

    candidate.__class__ = DropsReward
    state = State({"h": torch.zeros(2, 8)})
    with pytest.raises(ContractError, match=r"missing keys \['reward'\]"):
        candidate.decode(state)


def test_discrete_labels_are_checked_against_their_classes(wrong):
    model = built(wrong, "honest")
    good = {
        "vector": torch.zeros(2, 6, 4),
        "action": torch.full((2, 6), CLASSES - 1),
        "reward": torch.zeros(2, 6, 1),
    }
    model.validate_batch_contract(good)
    with pytest.raises(ContractError, match=r"label 7, outside 0\.\.4"):
        model.validate_batch_contract({**good, "action": torch.full((2, 6), 7)})
    with pytest.raises(ContractError, match="label -1"):
        model.validate_batch_contract({**good, "action": torch.full((2, 6), -1)})
    model.validate_outputs = True
    state = model.encode({"vector": torch.zeros(2, 4)})
    with pytest.raises(ContractError, match="label 7"):
        model.transition(state, torch.tensor([0, 7]))


def test_int32_labels_are_cast_for_an_int64_contract_by_both_backends(wrong, tmp_path):
    model = built(wrong, "honest")
    out = export(model, "onnx", tmp_path / "out", check=False)
    candidate = wrong.load(out)
    state = State({"h": torch.zeros(2, 8)})
    labels = torch.tensor([1, 4], dtype=torch.int32)
    with torch.no_grad():
        want = model.transition(state, labels.long())["h"]
        assert torch.equal(model.transition(state, labels)["h"], want)
        torch.testing.assert_close(candidate.transition(state, labels)["h"], want)
    with pytest.raises(ContractError, match=r"dtype torch\.float32, expected torch\.int64"):
        candidate.transition(state, labels.float())
