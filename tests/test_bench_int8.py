"""The ``ort-cpu-int8`` bench backend: an int8 export beside the fp32 one, flip-budget parity."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from worldflux_registry import bench as _bench  # noqa: E402
from worldflux_registry import registry  # noqa: E402

SMALL = {"warmup": 1, "repeats": 3, "rollout_repeats": 2, "min_repeats": 2, "horizon": 2}


def _nondegenerate(ref: str):
    # Official init zeroes some output layers; int8 of a zero weight is exact, which tests nothing.
    torch.manual_seed(0)
    model = registry.load(ref)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(0, 0.05)
    return model


def test_int8_backend_runs_the_int8_export_after_free_running_parity(tmp_path):
    run = _bench.run(
        "tdmpc2:ci",
        reference=_nondegenerate("tdmpc2:ci"),
        backends=["ort-cpu", "ort-cpu-int8"],
        device="cpu",
        export_dir=tmp_path / "export",
        **SMALL,
    )
    manifest = json.loads((tmp_path / "export-int8" / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert run.settings["int8_export_s"] > 0
    (result,) = [r for r in run.results if r.backend == "ort-cpu-int8"]
    assert result.status == "ok", result.reason
    assert result.parity["passed"] is True
    assert result.parity["horizon"] == SMALL["horizon"]
    (summary,) = result.parity["runs"]
    assert summary["precision"] == "int8"
    assert result.step is not None and result.step.median > 0


def test_int8_backend_on_an_export_directory_is_skipped(tmp_path):
    import worldflux_registry as wf

    model = _nondegenerate("tdmpc2:ci")
    out = wf.export(model, "onnx", tmp_path / "e", check=False)
    run = _bench.run(out, reference=model, backends=["ort-cpu-int8"], device="cpu", **SMALL)
    (result,) = run.results
    assert result.status == "skipped" and "no int8 export" in result.reason
