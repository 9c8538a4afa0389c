"""The benchmark harness: JSON layout, warm-up and repeats, parity gate, CLI (CPU smoke test)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from worldflux_registry import ConfigError, registry  # noqa: E402
from worldflux_registry import bench as _bench  # noqa: E402
from worldflux_registry.cli._main import main  # noqa: E402

SMALL = {"warmup": 2, "repeats": 3, "rollout_repeats": 2, "min_repeats": 2, "horizon": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tdmpc2:ci with seeded weights and its ONNX export."""
    import worldflux_registry as wf

    torch.manual_seed(11)
    model = registry.load("tdmpc2:ci", device="cpu")
    out = tmp_path_factory.mktemp("bench") / "export"
    wf.export(model, "onnx", out)
    return model, out


def _by_backend(run, backend):
    return [r for r in run.results if r.backend == backend]


def test_bench_times_torch_and_ort_after_warmup_and_records_the_environment(exported):
    model, export_dir = exported
    run = _bench.run(
        export_dir,
        reference=model,
        backends=["torch", "ort-cpu", "torch-cudagraph", "ort-cuda-graph"],
        batches=[1, 3],
        device="cpu",
        **SMALL,
    )
    doc = json.loads(json.dumps(_bench.document([run])))
    assert doc["format"] == _bench.FORMAT and doc["format_version"] == _bench.FORMAT_VERSION
    env = doc["environment"]
    assert env["versions"]["torch"] and env["versions"]["onnxruntime"]
    assert set(env["tf32"]) >= {"torch.backends.cuda.matmul.allow_tf32"}
    (entry,) = doc["runs"]
    assert entry["model"] == "tdmpc2:ci" and entry["source"] == "export"
    assert entry["settings"]["tf32"] is False
    measured = [r for r in entry["results"] if r["backend"] in ("torch", "ort-cpu")]
    assert [(r["backend"], r["batch"]) for r in measured] == [
        ("torch", 1),
        ("torch", 3),
        ("ort-cpu", 1),
        ("ort-cpu", 3),
    ]
    for r in measured:
        assert r["status"] == "ok", r["reason"]
        assert r["parity"]["passed"] is True
        step, roll = r["step"], r["rollout"]
        # Warm-up calls happened and were not timed: calls = warm-up + one untimed re-warm per
        # interleaved block + timed samples.
        assert step["n"] == 3 and step["warmup"] == 2 and step["rounds"] >= 1
        assert step["calls"] == 2 + step["rounds"] + 3
        assert roll["n"] == 2 and roll["calls"] == 2 + roll["rounds"] + 2
        assert 0 < step["p10"] <= step["median"] <= step["p90"]
        assert roll["iqr"] == pytest.approx(roll["q75"] - roll["q25"])
        assert r["throughput"] == pytest.approx(2 * r["batch"] / roll["median"])
        assert r["memory"]["kind"] == "cpu-rss" and r["memory"]["peak_bytes"] > 0
        assert r["memory"]["how"]
    ort = [r for r in measured if r["backend"] == "ort-cpu"]
    assert all(r["settings"]["providers"] == ["CPUExecutionProvider"] for r in ort)
    for r in entry["results"]:
        if r["backend"] in ("torch-cudagraph", "ort-cuda-graph") and not torch.cuda.is_available():
            assert r["status"] == "skipped" and "CUDA" in r["reason"] and r["step"] is None
    verdicts = {(v["target"], v["model"]): v for v in doc["targets"]}
    assert verdicts[("parity", "tdmpc2:ci")]["status"] == "met"
    assert verdicts[("gpu-b1024", "tdmpc2:size5m")]["status"] == "not-measured"
    assert verdicts[("cpu-b1-step", "tdmpc2:ci")]["status"] in ("met", "missed")
    markdown = _bench.to_markdown(doc)
    assert "| ort-cpu | cpu | 1 | pass |" in markdown and "not-measured" in markdown


def _tamper(export_dir, dest):
    """A copy of the export whose transition weights are scaled, manifest hashes kept valid
    (an exporter bug, not a corrupted file: integrity checks pass, numbers do not)."""
    import onnx
    from onnx import numpy_helper
    from worldflux_onnx._manifest import sha256_file

    shutil.copytree(export_dir, dest)
    path = dest / "transition.onnx"
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(array * 1.5, init.name))
            break
    else:  # pragma: no cover - the ci preset always has a weight matrix
        raise AssertionError("no weight matrix to tamper with")
    onnx.save(proto, str(path))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["graphs"]["transition"]["sha256"] = sha256_file(path)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_backend_failing_parity_is_refused_without_a_speed(exported, tmp_path):
    model, export_dir = exported
    bad = _tamper(export_dir, tmp_path / "tampered")
    run = _bench.run(bad, reference=model, backends=["torch", "ort-cpu"], device="cpu", **SMALL)
    (torch_result,) = _by_backend(run, "torch")
    (ort_result,) = _by_backend(run, "ort-cpu")
    assert torch_result.status == "ok"
    assert ort_result.status == "refused"
    assert ort_result.parity is not None and ort_result.parity["passed"] is False
    assert "parity failed" in (ort_result.reason or "") and "transition" in ort_result.reason
    assert ort_result.step is None and ort_result.rollout is None
    assert ort_result.throughput is None
    doc = _bench.document([run])
    verdicts = {(v["target"], v["model"]): v for v in doc["targets"]}
    assert verdicts[("parity", "tdmpc2:ci")]["status"] == "missed"
    assert "**refused**" in _bench.to_markdown(doc)


def test_cli_bench_writes_json_and_markdown_reading_weights_from_the_export(
    exported, tmp_path, capsys
):
    _, export_dir = exported
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    code = main(
        [
            "bench",
            str(export_dir),
            "--backends",
            "torch,ort-cpu",
            "--batch",
            "2",
            "--horizon",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--rollout-repeats",
            "2",
            "--device",
            "cpu",
            "--json",
            str(json_path),
            "--markdown",
            str(md_path),
        ]
    )
    assert code == 0, capsys.readouterr()
    doc = json.loads(json_path.read_text())
    (entry,) = doc["runs"]
    # No --reference: the torch side got its weights back from the ONNX initializers.
    assert "read back from the export's ONNX initializers" in entry["reference"]
    assert [r["status"] for r in entry["results"]] == ["ok", "ok"]
    assert md_path.read_text().startswith("Benchmark document")


def test_unknown_backend_is_refused_with_the_closest_name(exported):
    model, export_dir = exported
    with pytest.raises(ConfigError, match="ort-cuda"):
        _bench.run(export_dir, reference=model, backends=["ort-cude"])
    assert main(["bench", str(export_dir), "--backends", "onnx"]) == 2  # a usage error


def test_timing_quantiles_follow_numpy():
    np = pytest.importorskip("numpy")
    samples = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.7]
    t = _bench.Timing.from_samples(samples, warmup=1, calls=9, rounds=1)
    for q, value in ((0.1, t.p10), (0.25, t.q25), (0.5, t.median), (0.9, t.p90)):
        assert value == pytest.approx(float(np.quantile(samples, q)))
    assert _bench.Timing.from_dict(t.to_dict()) == t


def test_fused_backends_export_the_rollout_graph_and_pass_parity_over_its_horizon(tmp_path):
    torch.manual_seed(3)
    run = _bench.run(
        "tdmpc2:ci",
        backends=["ort-cpu", "ort-cpu-fused"],
        device="cpu",
        export_dir=tmp_path / "export",
        **SMALL,
    )
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["graphs"]["rollout"]["horizon"] == SMALL["horizon"]
    assert run.settings["fused_rollout_horizon"] == SMALL["horizon"]
    (steps,) = _by_backend(run, "ort-cpu")
    (fused,) = _by_backend(run, "ort-cpu-fused")
    for result in (steps, fused):
        assert result.status == "ok", result.reason
        assert result.parity["passed"] and result.parity["horizon"] >= SMALL["horizon"]
    assert steps.settings["loader_options"]["fused_rollout"] is False
    assert fused.settings["loader_options"]["fused_rollout"] is True


def test_fused_backend_on_an_export_without_the_fused_graph_is_skipped(exported):
    model, export_dir = exported
    run = _bench.run(export_dir, reference=model, backends=["ort-cpu-fused"], device="cpu", **SMALL)
    (result,) = run.results
    assert result.status == "skipped" and "fused rollout graph" in result.reason


def test_torch_compile_backend_is_checked_against_eager_and_reports_compile_time():
    torch.manual_seed(4)
    run = _bench.run("tdmpc2:ci", backends=["torch", "torch-compile"], device="cpu", **SMALL)
    (eager,) = _by_backend(run, "torch")
    (compiled,) = _by_backend(run, "torch-compile")
    assert compiled.status == "ok", compiled.reason
    assert compiled.parity["passed"]
    assert compiled.parity["max_abs_error"] <= compiled.parity["tolerance"]["atol"]
    assert compiled.settings["compile_s"]["transition"] > 0
    assert compiled.settings["compile_s"]["rollout"] > 0
    assert compiled.step.median > 0 and compiled.rollout.median > 0
    assert eager.settings["mode"].startswith("eager")
    assert compiled.settings["mode"].startswith("torch.compile")
