"""Without --reference, graph files holding different copies of one weight are named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from worldflux_onnx._manifest import sha256_file  # noqa: E402

from worldflux_registry import export, registry  # noqa: E402
from worldflux_registry.cli import main  # noqa: E402
from worldflux_registry.registry._from_export import weight_conflicts  # noqa: E402


def _graph_file(path, weights: dict[str, np.ndarray]) -> None:
    """A one-node graph holding ``weights`` as initializers."""
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    node = helper.make_node("Identity", ["x"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], inits))
    onnx.save(model, str(path))


def test_the_copy_most_files_hold_wins_and_the_odd_file_is_named(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    for name in ("decode", "rollout", "transition"):
        bad = name == "decode"
        _graph_file(tmp_path / f"{name}.onnx", {"model.w": w * 1.5 if bad else w, "c": w * 2})
    # Unnamed exporter constants may differ between files: they are not weights.
    _graph_file(tmp_path / "encode.onnx", {"c": w * 3})
    assert weight_conflicts(tmp_path) == {"model.w": ["decode.onnx"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = registry.load("tdmpc2:ci")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().sum():
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("blame") / "base"
    graphs = ["encode", "transition", "decode", "rollout"]
    return export(model, "onnx", out, graphs=graphs, rollout_horizon=2, check=False)


def test_an_intact_export_has_no_conflicting_weights(base):
    assert weight_conflicts(base) == {}


def test_parity_without_reference_names_the_files_that_disagree(base, tmp_path):
    out = shutil.copytree(base, tmp_path / "t")
    path = out / "rollout.onnx"
    proto = onnx.load(str(path))
    names = {init.name for init in onnx.load(str(out / "transition.onnx")).graph.initializer}
    (i,) = [
        i
        for i, init in enumerate(proto.graph.initializer)
        if init.name in names and init.name.startswith("model.reward_head.0.weight")
    ]
    init = proto.graph.initializer[i]
    proto.graph.initializer[i].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name)
    )
    onnx.save(proto, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["rollout"]["sha256"] = sha256_file(path)  # re-hashed: the files decide
    (out / "manifest.json").write_text(json.dumps(manifest))

    assert weight_conflicts(out) == {
        "model.reward_head.0.weight": ["rollout.onnx", "transition.onnx"]
    }
    code = main(["parity", str(out), "--horizon", "2", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and not report["passed"]
    assert "rollout.onnx, transition.onnx differ" in report["notes"][0]
