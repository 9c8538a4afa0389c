"""ONNX Runtime session defaults: no spin-waiting, bounded threads, one argument to override."""

from __future__ import annotations

import pytest

ort = pytest.importorskip("onnxruntime")
from worldflux_onnx._session import DEFAULT_MAX_THREADS, session_options, usable_cores  # noqa: E402

from worldflux_registry import ConfigError, export, registry  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("session") / "tdmpc2"
    return export(registry.load("tdmpc2:ci"), "onnx", out, check=False)


def _config(session, key):
    return session.get_session_options().get_session_config_entry(key)


def test_default_sessions_do_not_spin_and_use_the_usable_cores(export_dir):
    model = registry.load(export_dir)
    assert model.sessions
    for session in model.sessions.values():
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == min(usable_cores(), DEFAULT_MAX_THREADS)
        assert _config(session, "session.intra_op.allow_spinning") == "0"
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_threads_is_the_one_argument_override(export_dir):
    model = registry.load(export_dir, threads=1)
    assert {s.get_session_options().intra_op_num_threads for s in model.sessions.values()} == {1}
    own = ort.SessionOptions()
    own.intra_op_num_threads = 3
    model = registry.load(export_dir, session_options=own, threads=1)
    assert {s.get_session_options().intra_op_num_threads for s in model.sessions.values()} == {3}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_config_errors(bad):
    with pytest.raises(ConfigError, match="threads"):
        session_options(bad)


def test_spinning_can_be_turned_back_on():
    opts = session_options(2, spinning=True)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.intra_op_num_threads == 2
