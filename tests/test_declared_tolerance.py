"""An output's contract may declare its parity tolerance; parity uses it and still catches bugs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402
from worldflux_onnx._manifest import sha256_file  # noqa: E402

from worldflux_registry import ContractError, IOContract, TensorSpec, export, parity, registry  # noqa: E402
from worldflux_registry.parity._tolerance import DEFAULT_TOLERANCES, pick_tolerance  # noqa: E402


def _contract(reward: TensorSpec) -> IOContract:
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", 3)),),
        state=(TensorSpec("h", "float32", ("batch", 4)),),
        predictions=(reward,),
    )


def test_a_declared_tolerance_travels_with_the_contract_but_not_in_its_fingerprint():
    plain = TensorSpec("reward", "float32", ("batch",))
    loose = dataclasses.replace(plain, tolerance=(1e-4, 1.0))
    a, b = _contract(plain), _contract(loose)
    assert b.to_dict()["predictions"][0]["tolerance"] == [1e-4, 1]
    assert IOContract.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    assert a.fingerprint() == b.fingerprint()
    # A field that says what the output is does change it.
    described = dataclasses.replace(plain, description="reward of the step")
    assert _contract(described).fingerprint() != a.fingerprint()


@pytest.mark.parametrize(
    "tolerance, dtype",
    [
        ((-1.0, 0.0), "float32"),
        ((1e-3,), "float32"),
        ((math.nan, 0.0), "float32"),
        ((0.0, math.inf), "float32"),
        ((True, 0.0), "float32"),
        ((1e-3, 1e-3), "int64"),
    ],
)
def test_a_bad_declared_tolerance_is_a_contract_error(tolerance, dtype):
    with pytest.raises(ContractError, match="tolerance"):
        TensorSpec("reward", dtype, ("batch",), tolerance=tolerance).validate()


def test_parity_takes_the_declared_tolerance_widened_to_the_dtype_default():
    tol, source = pick_tolerance({}, "decode", "pred.reward", "float32", None, (1e-4, 1.0))
    assert source == "contract" and (tol.rtol, tol.atol) == (1e-4, 1.0)
    half = DEFAULT_TOLERANCES["float16"]
    tol, _ = pick_tolerance({}, "decode", "pred.reward", "float32", "float16", (1e-4, 1e-4))
    assert (tol.rtol, tol.atol, tol.max_flip_rate) == (half.rtol, half.atol, half.max_flip_rate)
    # An explicit override still wins over the contract.
    override = {"pred.reward": parity.Tolerance(0.0, 2.0)}
    assert pick_tolerance(override, "decode", "pred.reward", "float32", None, (1e-4, 1.0))[1] == (
        "pred.reward"
    )


def test_dreamerv3_reward_is_checked_at_its_tolerance_and_a_tampered_head_fails(tmp_path):
    torch.manual_seed(0)
    model = registry.load("dreamerv3:ci")
    out = export(model, "onnx", tmp_path / "x", check=False)
    report = parity.check(model, registry.load(out), batch_sizes=(3,), horizon=3)
    assert report.passed, report.summary()
    rewards = [c for c in report.steps if c.output == "pred.reward"]
    assert rewards and all(c.tolerance_source == "contract" for c in rewards)
    others = [c for c in report.steps if c.output != "pred.reward" and c.dtype == "float32"]
    assert others and all(c.tolerance_source == "default:float32" for c in others)

    path = out / "decode.onnx"
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        if init.name.endswith("rew.head.logits.kernel"):
            # One reward bin's weights off by 0.01 (the official head starts at zero): a small
            # bug, but far beyond what float32 noise on a flat head moves the readout by.
            array = numpy_helper.to_array(init).copy()
            array[:, -1] += 0.01
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, init.name))
            break
    else:
        pytest.fail("no reward head kernel in decode.onnx")
    onnx.save(proto, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["decode"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    bad = parity.check(model, registry.load(out), batch_sizes=(3,), horizon=3)
    assert not bad.passed
    failing = {c.output for c in bad.steps if not c.passed}
    assert failing == {"pred.reward"}, failing
    assert np.isfinite([c.metrics.max_abs for c in bad.steps]).all()
