"""int8 exports: dynamic quantization of MatMul/Gemm, judged by parity's int8 tolerances."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from worldflux_registry import ParityError, export, registry  # noqa: E402
from worldflux_registry.cli import main  # noqa: E402
from worldflux_registry.parity._tolerance import DEFAULT_TOLERANCES, pick_tolerance  # noqa: E402


def _nondegenerate(ref: str):
    # Official init zeroes the output layers of some heads; int8 of a zero weight is exact.
    torch.manual_seed(0)
    model = registry.load(ref)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(0, 0.05)
    return model


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_int8_tolerances_apply_to_float_outputs_of_an_int8_side():
    tol, source = pick_tolerance({}, "transition", "state.latent", "float32", "int8")
    assert source == "default:int8" and tol == DEFAULT_TOLERANCES["int8"]
    assert tol.max_flip_rate > 0


def test_tdmpc2_int8_export_quantizes_its_matmuls_and_passes_parity(tmp_path):
    model = _nondegenerate("tdmpc2:ci")
    out = export(model, "onnx", tmp_path / "q", precision="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["parity"]["passed"] is True, manifest["parity"]["failures"]
    assert manifest["parity"]["candidate"].endswith("int8")
    ops = _ops(out / "transition.onnx")
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    assert ops["MatMul"] == 0  # every MatMul with a weight was quantized
    deployed = registry.load(out)
    assert deployed.precision == "int8"


def test_keep_in_fp32_layers_are_left_unquantized(tmp_path):
    model = _nondegenerate("dreamerv3:ci")
    assert {"dyn.prior", "dyn.dynin"} <= set(model.keep_in_fp32)
    with pytest.raises(ParityError, match=r"int8 tolerances.*transition/state\.stoch"):
        # A fresh model's categorical prior is near uniform: int8 flips too many samples.
        export(model, "onnx", tmp_path / "q", precision="int8")
    graph = onnx.load(str(tmp_path / "q" / "transition.onnx")).graph
    fp32 = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    assert {"model.dyn.priorlogit.kernel", "model.dyn.dynin1.kernel"} <= fp32
    assert not any(name.startswith("model.dyn.dyngru") for name in fp32)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is False


def test_cli_takes_int8(tmp_path, capsys):
    assert (
        main(
            [
                "export",
                "tdmpc2:ci",
                "--out",
                str(tmp_path / "d"),
                "--precision",
                "int8",
                "--no-check",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert _ops(tmp_path / "d" / "decode.onnx")["MatMulInteger"] > 0
