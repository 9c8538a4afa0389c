"""ONNX exports under attack: only a valid export is replaced, user files kept, the manifest
schema-checked in one place, every file confined, runtime failures typed, kill -9 safe."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("onnxruntime")

from worldflux_onnx._manifest import (
    check_opset,
    check_replaceable,
    install,
    read_verified,
)
from worldflux_onnx.runtime import load_artifact

from worldflux_registry import BackendError, ExportError, export
from worldflux_registry._files import stale_siblings


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch
    from wf_fixture_good import plugin

    from worldflux_registry import Registry

    torch.manual_seed(0)
    model = Registry(entry_points=False, plugins=[plugin]).load("toyfamily:tiny")
    out = tmp_path_factory.mktemp("export") / "onnx"
    export(model, "onnx", out, graphs=["decode"], check=False)
    return model, out


@pytest.fixture
def artifact(exported, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(exported[1], out)
    return out


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_a_web_app_with_a_manifest_json_is_never_replaced(exported, tmp_path):
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my pwa", "icons": []}')
    (app / "index.html").write_text("<html></html>")
    before = sorted(str(p.relative_to(app)) for p in app.rglob("*"))
    with pytest.raises(ExportError, match="refusing to replace"):
        export(exported[0], "onnx", app, graphs=["decode"], check=False)
    assert sorted(str(p.relative_to(app)) for p in app.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]


def test_reexporting_keeps_user_files_and_gets_normal_permissions(exported, artifact):
    (artifact / "NOTES.md").write_text("deployed on 2026-12-01")
    export(exported[0], "onnx", artifact, graphs=["decode"], check=False)
    assert (artifact / "NOTES.md").read_text() == "deployed on 2026-12-01"
    mask = os.umask(0)
    os.umask(mask)
    for name in ("manifest.json", "decode.onnx"):
        assert (artifact / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert stale_siblings(artifact) == []


@pytest.mark.parametrize("opset", [0, 12, 24, 999, True, "18"])
def test_an_opset_out_of_range_is_refused_before_any_work(opset):
    with pytest.raises(ExportError, match="opset"):
        check_opset(opset)


def _edit(path: Path, change) -> None:
    data = _manifest(path)
    change(data)
    (path / "manifest.json").write_text(json.dumps(data))


def _graph(data):
    return next(iter(data["graphs"].values()))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(graphs={}), "lists no graphs"),
        (lambda d: d.update(format_version=True), "invalid format_version"),
        (lambda d: d.update(precision="fp64"), "precision"),
        (lambda d: d.update(opset=999), "opset"),
        (lambda d: _graph(d).pop("file"), "not a plain file name"),
        (lambda d: _graph(d).pop("sha256"), "no valid sha256"),
        (lambda d: _graph(d).update(file=5), "not a plain file name"),
        (lambda d: _graph(d).update(file="/etc/passwd"), "not a plain file name"),
        (lambda d: _graph(d).update(file="../decode.onnx"), "not a plain file name"),
        (lambda d: _graph(d).update(external_data=[{"file": "../../etc/shadow"}]), "plain"),
        (lambda d: d["graphs"].update(evil=_graph(d)), "unknown graph"),
    ],
    ids=[
        "no-graphs",
        "bool-version",
        "fp64",
        "opset",
        "no-file",
        "no-sha256",
        "file-int",
        "absolute",
        "dotdot",
        "external-data-outside",
        "unknown-graph",
    ],
)
def test_a_malformed_manifest_is_an_export_error(artifact, change, match):
    _edit(artifact, change)
    with pytest.raises(ExportError, match=match) as info:
        load_artifact(artifact, providers=["cpu"])
    assert info.value.hint


def test_a_symlinked_graph_leaving_the_directory_is_refused_unhashed(artifact, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"top secret")
    (artifact / "decode.onnx").unlink()
    (artifact / "decode.onnx").symlink_to(secret)
    with pytest.raises(ExportError, match="symlink leading outside") as info:
        load_artifact(artifact, providers=["cpu"])
    assert hashlib.sha256(b"top secret").hexdigest() not in str(info.value)


def test_a_fifo_as_graph_file_is_refused_at_once(artifact):
    (artifact / "decode.onnx").unlink()
    os.mkfifo(artifact / "decode.onnx")
    start = time.perf_counter()
    with pytest.raises(ExportError, match="not a regular file"):
        load_artifact(artifact, providers=["cpu"])
    assert time.perf_counter() - start < 5


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
PATHS = st.sampled_from(
    [
        ("format_version",),
        ("precision",),
        ("opset",),
        ("graphs",),
        ("fingerprint",),
        ("contract",),
        ("graphs", "decode"),
        ("graphs", "decode", "file"),
        ("graphs", "decode", "sha256"),
        ("graphs", "decode", "inputs"),
        ("graphs", "decode", "external_data"),
        ("graphs", "decode", "horizon"),
        ("graphs", "decode", "mode_of"),
    ]
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATHS, value=JSON)
def test_any_manifest_mutation_loads_or_raises_export_error(exported, tmp_path, path, value):
    out = tmp_path / "m"
    if not out.exists():
        shutil.copytree(exported[1], out)
    original = _manifest(exported[1])
    data = copy.deepcopy(original)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (out / "manifest.json").write_text(json.dumps(data))
    try:
        read_verified(out)
    except ExportError as exc:
        assert len(str(exc)) < 2000


def test_an_input_sized_allocation_failing_in_ort_is_a_backend_error_naming_the_graph():
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper
    from worldflux_onnx.runtime import _CpuRunner

    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["out"])],
        "alloc",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    class Run:  # the part of _GraphRun the runner reads
        graph = "decode"
        output_names = ("out",)
        output_keys = ("out",)

    Run.session = session
    small = _CpuRunner().run(Run, {"shape": torch.tensor([3])}, 1, None)
    assert np.array_equal(small["out"].numpy(), np.zeros(3, np.float32))
    with pytest.raises(BackendError, match="graph 'decode'") as info:
        _CpuRunner().run(Run, {"shape": torch.tensor([1 << 62])}, 1, None)
    assert info.value.graph == "decode"


KILL_EXPORT_WRITER = r"""
import shutil, sys
from pathlib import Path
from worldflux_onnx._manifest import install
from worldflux_registry._files import temp_sibling
out, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
print("ready", flush=True)
i = 0
while True:
    tmp = temp_sibling(out)
    shutil.copytree(sources[i % 2], tmp)
    install(tmp, out)
    i += 1
"""


def test_a_reader_sees_the_old_or_the_new_export_across_kill_9(exported, tmp_path):
    versions = []
    for tag in ("a", "b"):
        src = tmp_path / f"src-{tag}"
        shutil.copytree(exported[1], src)
        (src / "decode.onnx").write_bytes((src / "decode.onnx").read_bytes() + tag.encode() * 64)
        data = _manifest(src)
        digest = "sha256:" + hashlib.sha256((src / "decode.onnx").read_bytes()).hexdigest()
        data["graphs"]["decode"]["sha256"] = digest
        (src / "manifest.json").write_text(json.dumps(data))
        versions.append(digest)
    out = tmp_path / "onnx"
    shutil.copytree(tmp_path / "src-a", out)
    (out / "USER.txt").write_text("mine")
    reads = 0
    for cycle in range(2):
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILL_EXPORT_WRITER,
                str(out),
                *(str(tmp_path / f"src-{t}") for t in "ab"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
            deadline = time.perf_counter() + 0.5 + 0.4 * cycle
            while time.perf_counter() < deadline:
                manifest, _ = read_verified(out)  # every file hashed against its manifest
                assert manifest["graphs"]["decode"]["sha256"] in versions
                reads += 1
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(30)
            writer.stdout.close()
            writer.stderr.close()
        read_verified(out)
    assert reads > 10
    tmp = tmp_path / ".onnx.tmp-feedfacecafe"
    shutil.copytree(tmp_path / "src-b", tmp)
    install(tmp, out)  # the next writer cleans up after the killed one
    assert stale_siblings(out) == []
    assert (out / "USER.txt").read_text() == "mine"


def test_check_replaceable_refuses_a_file_and_accepts_an_empty_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        check_replaceable(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
