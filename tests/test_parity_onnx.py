"""Parity of ONNX exports: honest exports pass, tampered graphs fail at the right graph and
output, and localisation tells an exporter bug from a runtime kernel difference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_EXTRA = "pip install 'worldflux-registry[onnx]'"
onnx = pytest.importorskip("onnx", reason=f"the ONNX checks need onnx ({_EXTRA})")
pytest.importorskip("onnxruntime", reason=f"the ONNX checks need onnxruntime ({_EXTRA})")
pytest.importorskip("worldflux_onnx", reason="needs the worldflux-onnx exporter distribution")

from onnx import numpy_helper  # noqa: E402

from worldflux_registry import export, parity, registry  # noqa: E402
from worldflux_registry.cli._main import main  # noqa: E402
from worldflux_registry.parity import Tolerance  # noqa: E402

FAST = {"batch_sizes": (1, 3), "horizon": 4}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A toyfamily model, its checkpoint and its ONNX export (built once for this file)."""
    torch.manual_seed(0)
    model = registry.load("toyfamily:tiny")
    root = tmp_path_factory.mktemp("parity-onnx")
    ckpt = model.save_pretrained(root / "ckpt")
    out = export(model, "onnx", root / "export", check=False)
    return model, ckpt, out


def tampered(src, dst, graph, initializer, change):
    """Copy an export and change one initializer of one graph (manifest sha256 rewritten)."""
    shutil.copytree(src, dst)
    path = dst / f"{graph}.onnx"
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        if init.name == initializer:
            array = numpy_helper.to_array(init).copy()
            change(array)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, init.name))
            break
    else:
        raise AssertionError(f"no initializer {initializer} in {path}")
    onnx.save(proto, str(path))
    from worldflux_onnx._manifest import sha256_file

    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["graphs"][graph]["sha256"] = sha256_file(path)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def bump(array):
    array.reshape(-1)[0] += 1e-3


def test_honest_export_passes(exported):
    model, _, out = exported
    candidate = registry.load(out)
    report = parity.check(model, candidate, **FAST)
    assert report.passed, report.failures()
    assert report.candidate["backend"] == "onnxruntime"
    assert report.candidate["precision"] == "float32"
    assert report.candidate["tf32"] is False  # CPU provider: no TF32
    assert {c.graph for c in report.steps} >= {"encode", "transition", "decode"}
    assert parity.onnx_graph_file(candidate, "transition").name == "transition.onnx"


@pytest.mark.parametrize(
    ("graph", "initializer", "output"),
    [
        ("transition", "model.cell.weight", "state.deter"),
        ("decode", "model.reward_head.bias", "pred.reward"),
    ],
)
def test_perturbed_initializer_is_an_exporter_bug(exported, tmp_path, graph, initializer, output):
    model, _, out = exported
    bad = tampered(out, tmp_path / "bad", graph, initializer, bump)
    report = parity.check(model, registry.load(bad), **FAST)
    assert not report.passed
    loc = report.localization
    assert (loc.graph, loc.output, loc.mode) == (graph, output, "step")
    assert loc.cause == "exporter", loc.detail
    assert not loc.evaluator.passed  # the reference evaluator reproduces the wrong numbers
    assert loc.evaluator_vs_candidate.passed  # ... the same ones ONNX Runtime computed
    failing = {c.graph for c in report.steps if not c.passed}
    assert failing == {graph}


def test_runtime_kernel_difference_is_told_apart(exported):
    model, _, out = exported
    candidate = registry.load(out)

    class SkewedKernels(type(candidate)):
        """ONNX Runtime whose transition kernels are off by 1e-3 (the graph file is honest)."""

        def transition(self, state, action, conditions=None, deterministic=False):
            next_state = super().transition(state, action, conditions, deterministic)
            next_state.tensors["deter"] = next_state.tensors["deter"] + 1e-3
            return next_state

    candidate.__class__ = SkewedKernels
    report = parity.check(model, candidate, **FAST)
    loc = report.localization
    assert (loc.graph, loc.output, loc.cause) == ("transition", "state.deter", "runtime")
    assert loc.evaluator.passed and not loc.evaluator_vs_candidate.passed


def test_nan_injected_into_a_graph_is_reported(exported, tmp_path):
    model, _, out = exported

    def poison(array):
        array.reshape(-1)[0] = np.nan

    bad = tampered(out, tmp_path / "nan", "decode", "model.decoder.bias", poison)
    report = parity.check(model, registry.load(bad), **FAST)
    assert not report.passed
    for check in report.checks("decode/pred.vector"):
        assert check.metrics.nan_candidate == check.batch and check.metrics.nan_reference == 0
    assert report.localization.key == "decode/pred.vector"


def test_tolerance_override_on_an_export(exported, tmp_path):
    model, _, out = exported

    def nudge(array):
        array.reshape(-1)[0] += 1e-4

    bad = tampered(out, tmp_path / "nudge", "decode", "model.reward_head.bias", nudge)
    bad = registry.load(bad)
    assert not parity.check(model, bad, **FAST).passed
    report = parity.check(model, bad, tolerances={"pred.reward": Tolerance(0, 1e-3)}, **FAST)
    assert report.passed


def test_cli_exit_codes(exported, tmp_path, capsys):
    _, ckpt, out = exported
    report_path = tmp_path / "report.json"
    args = ["--reference", str(ckpt), "--horizon", "3", "--batch", "1", "3"]
    assert main(["parity", str(out), *args, "--json", str(report_path)]) == 0
    data = json.loads(report_path.read_text())
    assert data["format"] == "worldflux.parity" and data["passed"] is True
    assert data["settings"]["batch_sizes"] == [1, 3]

    bad = tampered(out, tmp_path / "bad", "transition", "model.cell.weight", bump)
    assert main(["parity", str(bad), *args]) == 1
    assert "transition/state.deter" in capsys.readouterr().out

    assert main(["parity", str(tmp_path / "missing"), *args]) == 2
    assert main(["parity", str(out), *args, "--tolerance", "transition/state.dter=1,1"]) == 2
    assert main(["parity", str(out), "--horizon", "0"]) == 2
    assert main(["parity"]) == 2


def test_cli_without_reference_rebuilds_from_the_export(exported, capsys):
    _, _, out = exported
    assert main(["parity", str(out), "--horizon", "2", "--batch", "2", "--mode", "step"]) == 0
    # The note qualifying the verdict is printed under the table.
    assert "cannot catch corrupted" in " ".join(capsys.readouterr().out.split())


def test_cli_without_reference_runs_when_the_export_lacks_some_tensors(tmp_path, capsys):
    # Only decode is exported: the encoder's weights are not in the export.
    torch.manual_seed(0)
    model = registry.load("toyfamily:tiny")
    out = export(model, "onnx", tmp_path / "decode-only", graphs=("decode",), check=False)
    report = tmp_path / "report.json"
    code = main(["parity", str(out), "--horizon", "2", "--batch", "2", "--json", str(report)])
    captured = capsys.readouterr()
    assert "keep a seeded init" in " ".join(captured.out.split())
    assert code == 0, captured.out
    # Only the step both sides have is compared; rollouts need transition and decode.
    data = json.loads(report.read_text())
    assert data["settings"]["graphs"] == ["decode"]
    assert {c["graph"] for c in data["steps"]} == {"decode"}
    assert data["rollouts"] == []
    assert any("skipped: rollouts need transition and decode" in n for n in data["notes"])
