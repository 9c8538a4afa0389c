"""Triton model repositories written from an export: every config.pbtxt parses with Triton's own
``ModelConfig`` protobuf (tritonclient), so a field Triton does not know fails here. Triton itself
does not run on these machines; nothing here claims it ran."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError as exc:  # pragma: no cover - make installs tritonclient[grpc]
    pytest.fail(f"tritonclient[grpc] is not importable ({exc}): make installs it", pytrace=False)

from test_onnx_export import THIRD_PARTY, exported
from worldflux_serve_ray.triton import validate_config, write_triton_repository

from worldflux_registry import ExportError
from worldflux_registry.cli import main


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return exported(tmp_path_factory, THIRD_PARTY, "random")


def test_every_graph_gets_a_valid_onnxruntime_model_with_the_manifest_layout(toy, tmp_path):
    repo = write_triton_repository(toy.directory, tmp_path / "repo", max_batch_size=16)
    graphs = toy.onnx.manifest["graphs"]
    assert set(repo.models) == {f"toyfamily_tiny_{g}" for g in graphs} | {"toyfamily_tiny_step"}
    for graph, entry in graphs.items():
        name = f"toyfamily_tiny_{graph}"
        text = (repo.root / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert (repo.root / name / "1" / "model.onnx").read_bytes() == (
            toy.directory / entry["file"]
        ).read_bytes()
        assert config.backend == "onnxruntime" and config.max_batch_size == 16
        assert [i.name for i in config.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in config.output] == [o["name"] for o in entry["outputs"]]
        for port, spec in zip(config.input, entry["inputs"], strict=True):
            rest = [d if isinstance(d, int) else -1 for d in spec["shape"][1:]]
            assert list(port.dims) == (rest or [1])
            assert model_config_pb2.DataType.Name(port.data_type) == "TYPE_FP32"
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_the_step_ensemble_feeds_the_new_state_to_decode(toy, tmp_path):
    repo = write_triton_repository(toy.directory, tmp_path / "repo", kind="cpu")
    text = (repo.root / "toyfamily_tiny_step" / "config.pbtxt").read_text()
    config = validate_config(text)
    assert config.platform == "ensemble"
    _, decode = config.ensemble_scheduling.step
    assert decode.model_name == "toyfamily_tiny_decode"
    assert dict(decode.input_map) == {
        "state.deter": "new_state.deter",
        "state.latent": "new_state.latent",
    }
    assert "state.deter" in [i.name for i in config.input]


def test_an_unknown_field_fails_the_schema_check():
    with pytest.raises(text_format.ParseError):
        validate_config('name: "x"\nbackend: "onnxruntime"\nmax_batch_sise: 4\n')


def test_triton_command_writes_the_repository_and_refuses_a_non_empty_out(toy, tmp_path):
    out = tmp_path / "repo"
    assert main(["triton", str(toy.directory), "--out", str(out), "--kind", "cpu"]) == 0
    assert (out / "toyfamily_tiny_transition" / "config.pbtxt").is_file()
    with pytest.raises(ExportError, match="not an empty directory"):
        write_triton_repository(toy.directory, out)
    assert main(["triton", str(toy.directory), "--out", str(out)]) == 1


def test_serve_command_is_listed_with_its_options(capsys):
    assert main(["serve", "--help"]) == 0
    usage = capsys.readouterr().out
    for option in ("--replicas", "--max-batch-size", "--port", "--address"):
        assert option in usage


def test_an_extension_whose_package_is_not_installed_is_skipped(monkeypatch):
    from worldflux_registry.cli import _main

    extensions = (*_main._CLI_EXTENSIONS, "worldflux_not_installed_pkg.cli")
    monkeypatch.setattr(_main, "_CLI_EXTENSIONS", extensions)
    sub = next(a for a in _main.build_parser()._actions if a.dest == "command")
    assert {"serve", "triton", "list"} <= set(sub.choices)
