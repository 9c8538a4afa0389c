"""The fused rollout graph: ``horizon`` transition + decode steps in one ONNX graph.

It must agree with torch's own rollout and with the step-by-step ONNX rollout, take noise the
way the protocol does (time-major, per-step, sampled), chain with step graphs for a remainder,
and a tampered fused graph must fail the parity check while the step graphs still pass.
"""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402
from test_onnx_export import assert_agree, exported  # noqa: E402

from worldflux_registry import (  # noqa: E402
    CapabilityError,
    ConditionPayload,
    ContractError,
    ExportError,
    export,
    parity,
    registry,
)
from worldflux_registry.protocol._inputs import (  # noqa: E402
    encode_input,
    make_actions,
    make_noise,
    make_observations,
)

HORIZON = 3
GRAPHS = ("encode", "transition", "decode", "rollout")


@pytest.fixture(scope="module", params=["dreamerv3:ci", "tdmpc2:ci"])
def pair(request, tmp_path_factory):
    return exported(
        tmp_path_factory, request.param, "random", graphs=GRAPHS, rollout_horizon=HORIZON
    )


class _Counting:
    """Counts ``run`` calls of an ORT session (the real session does the work)."""

    def __init__(self, session):
        self.session = session
        self.calls = 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _inputs(contract, steps, batch, seed=7):
    gen = torch.Generator().manual_seed(seed)
    obs = make_observations(contract, (batch,), gen)
    enc = make_noise(contract, "encode", (batch,), gen)
    actions = make_actions(contract, (steps, batch), gen)
    extras = {}
    for graph in ("transition", "decode"):
        for name, value in make_noise(contract, graph, (steps, batch), gen).items():
            extras[f"wf.noise.{name}"] = value
    return obs, enc, actions, extras


def _stepwise(onnx_model):
    """The same export with its fused graph set aside: every step is a session call."""
    fused = onnx_model._graphs.pop("rollout")
    return fused


def test_manifest_records_the_horizon_and_time_major_ports(pair):
    manifest = json.loads((pair.directory / "manifest.json").read_text())
    entry = manifest["graphs"]["rollout"]
    assert entry["horizon"] == HORIZON
    ports = {p["name"]: p["shape"] for p in entry["inputs"] + entry["outputs"]}
    assert ports["actions"][:2] == [HORIZON, "batch"]
    contract = pair.model.io_contract()
    for spec in contract.state:
        assert ports[f"state.{spec.name}"][0] == "batch"
        assert ports[f"states.{spec.name}"][:2] == [HORIZON, "batch"]
    for spec in contract.predictions:
        assert ports[f"pred.{spec.name}"][:2] == [HORIZON, "batch"]
    graph = onnx.load(str(pair.directory / entry["file"]), load_external_data=False).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    assert dims["actions"][:2] == [HORIZON, "batch"]


@pytest.mark.parametrize("batch", [1, 4])
def test_fused_rollout_matches_torch_and_the_step_graphs_with_a_remainder(pair, batch):
    model, onnx_model = pair.model, pair.onnx
    contract = model.io_contract()
    steps = 2 * HORIZON + 2  # two fused calls, then two single steps
    obs, enc, actions, extras = _inputs(contract, steps, batch)
    cond = ConditionPayload(extras) if extras else None
    with torch.no_grad():
        start = model.encode(encode_input(obs, enc))
        want = model.rollout(start, actions, cond)
    counter = _Counting(onnx_model._graphs["rollout"].session)
    onnx_model._graphs["rollout"].session = counter
    try:
        got = onnx_model.rollout(start, actions, cond)
    finally:
        onnx_model._graphs["rollout"].session = counter.session
    assert counter.calls == 2
    assert len(got.states) == steps + 1
    for t in range(1, steps + 1):
        assert_agree(
            f"state {t}", contract.state, want.states[t].tensors, got.states[t].tensors, 1e-4
        )
    assert_agree("predictions", contract.predictions, want.predictions, got.predictions, 1e-4)
    fused = _stepwise(onnx_model)
    try:
        steps_only = onnx_model.rollout(start, actions, cond)
    finally:
        onnx_model._graphs["rollout"] = fused
    assert_agree(
        "fused vs step graphs",
        contract.predictions,
        steps_only.predictions,
        got.predictions,
        1e-5,
    )


def test_per_step_noise_is_repeated_and_missing_noise_is_sampled(pair):
    model, onnx_model = pair.model, pair.onnx
    contract = model.io_contract()
    batch = 2
    obs, enc, actions, extras = _inputs(contract, HORIZON, batch)
    with torch.no_grad():
        start = model.encode(encode_input(obs, enc))
    per_step = {k: v[0] for k, v in extras.items()}  # no time axis: every step gets the same
    if per_step:
        cond = ConditionPayload(per_step)
        with torch.no_grad():
            want = model.rollout(start, actions, cond)
        got = onnx_model.rollout(start, actions, cond)
        assert_agree(
            "per-step noise", contract.predictions, want.predictions, got.predictions, 1e-4
        )
    sampled = onnx_model.rollout(start, actions)
    for spec in contract.predictions:
        value = sampled.predictions[spec.name]
        assert value.shape[:2] == (HORIZON, batch)
        assert torch.isfinite(value.float()).all()


def test_malformed_noise_extra_is_a_contract_error_naming_it(pair):
    contract = pair.model.io_contract()
    if not contract.noise_for("transition"):
        pytest.skip(f"{pair.ref} takes no transition noise")
    obs, enc, actions, extras = _inputs(contract, HORIZON, 2)
    with torch.no_grad():
        start = pair.model.encode(encode_input(obs, enc))
    key = next(iter(extras))
    bad = ConditionPayload({**extras, key: torch.zeros(HORIZON, 2, 1)})
    with pytest.raises(ContractError, match=key.replace(".", r"\.")):
        pair.onnx.rollout(start, actions, bad)


def test_fused_graph_alone_rolls_out_whole_horizons_only(pair, tmp_path):
    from worldflux_onnx.runtime import load_artifact

    only = tmp_path / "only-rollout"
    shutil.copytree(pair.directory, only)
    manifest = json.loads((only / "manifest.json").read_text())
    manifest["graphs"] = {
        "encode": manifest["graphs"]["encode"],
        "rollout": manifest["graphs"]["rollout"],
    }
    (only / "manifest.json").write_text(json.dumps(manifest))
    onnx_model = load_artifact(only, providers=["cpu"])
    contract = pair.model.io_contract()
    obs, enc, actions, extras = _inputs(contract, 2 * HORIZON, 1)
    cond = ConditionPayload(extras) if extras else None
    start = onnx_model.encode(encode_input(obs, enc))
    traj = onnx_model.rollout(start, actions, cond)
    assert len(traj.states) == 2 * HORIZON + 1
    with pytest.raises(CapabilityError, match="transition and decode"):
        onnx_model.rollout(start, actions[: HORIZON + 1], cond)
    with pytest.raises(CapabilityError):
        onnx_model.transition(start, actions[0])


def test_a_rollout_entry_without_its_horizon_is_refused(pair, tmp_path):
    from worldflux_onnx.runtime import load_artifact

    broken = tmp_path / "no-horizon"
    shutil.copytree(pair.directory, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["graphs"]["rollout"]["horizon"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="horizon"):
        load_artifact(broken, providers=["cpu"])


def test_bad_horizons_are_export_errors(tmp_path):
    model = registry.load("toyfamily:tiny")
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ExportError, match="horizon"):
            export(model, "onnx", tmp_path / "x", graphs=("rollout",), rollout_horizon=bad)


def test_tampered_fused_graph_fails_parity_while_the_step_graphs_pass(pair, tmp_path):
    from worldflux_onnx._manifest import sha256_file

    bad = tmp_path / "tampered"
    shutil.copytree(pair.directory, bad)
    path = bad / "rollout.onnx"
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.ndim == 2:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array * 1.05, init.name))
            break
    onnx.save(proto, str(path))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["graphs"]["rollout"]["sha256"] = sha256_file(path)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    fast = {"batch_sizes": (2,), "horizon": HORIZON, "localize_failures": False}
    honest = parity.check(pair.model, pair.onnx, **fast)
    assert honest.passed, honest.failures()
    report = parity.check(pair.model, registry.load(bad), **fast)
    assert not report.passed
    assert all(c.passed for c in report.steps)  # the step graphs are untouched
    assert any(not c.passed and c.mode == "free_running" for c in report.rollouts)


def test_fused_rollout_with_io_binding_writes_each_horizon_into_the_trajectory_buffers(pair):
    from worldflux_onnx.runtime import load_artifact

    bound = load_artifact(pair.directory, providers=["cpu"], io_binding=True)
    contract = pair.model.io_contract()
    steps = 2 * HORIZON + 1
    obs, enc, actions, extras = _inputs(contract, steps, 2)
    cond = ConditionPayload(extras) if extras else None
    start = pair.onnx.encode(encode_input(obs, enc))
    want = pair.onnx.rollout(start, actions, cond)
    got = bound.rollout(start, actions, cond)
    assert_agree("io-binding fused", contract.predictions, want.predictions, got.predictions, 0)
    for t in range(1, steps + 1):
        assert_agree(f"state {t}", contract.state, want.states[t].tensors, got.states[t].tensors, 0)
    key = contract.state[0].name
    assert len({s.tensors[key].untyped_storage().data_ptr() for s in got.states[1:]}) == 1


_HAS_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)"
)
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["iobinding", "cuda-graph"])
def test_fused_rollout_on_cuda_matches_torch_on_the_same_gpu(pair, cuda_graph):
    from worldflux_onnx.runtime import load_artifact

    model = pair.model.to("cuda")
    try:
        onnx_model = load_artifact(pair.directory, providers=["cuda"], cuda_graph=cuda_graph)
        contract = model.io_contract()
        steps = 2 * HORIZON + 1
        for batch in (1, 5, 1):  # the repeated size replays its captured graphs
            obs, enc, actions, extras = _inputs(contract, steps, batch, seed=batch)
            obs = {k: v.cuda() for k, v in obs.items()}
            enc = {k: v.cuda() for k, v in enc.items()}
            cond = ConditionPayload({k: v.cuda() for k, v in extras.items()}) if extras else None
            with torch.no_grad():
                start = model.encode(encode_input(obs, enc))
                want = model.rollout(start, actions.cuda(), cond)
            got = onnx_model.rollout(start, actions.cuda(), cond)
            assert all(v.device.type == "cuda" for v in got.predictions.values())
            assert_agree(
                f"cuda fused b={batch}",
                contract.predictions,
                want.predictions,
                got.predictions,
                1e-4,
            )
    finally:
        pair.model.to("cpu")


def test_parity_shorter_than_the_fused_horizon_says_the_fused_graph_went_unchecked(pair):
    short = parity.check(pair.model, pair.onnx, batch_sizes=(1,), horizon=HORIZON - 1)
    assert any("fused rollout graph (3 steps) was not checked" in n for n in short.notes)
    full = parity.check(pair.model, pair.onnx, batch_sizes=(1,), horizon=HORIZON)
    assert not any("fused rollout graph" in n for n in full.notes)


def test_export_check_rolls_out_at_least_one_fused_horizon(tmp_path):
    torch.manual_seed(0)
    model = registry.load("toyfamily:tiny")
    out = export(model, "onnx", tmp_path / "long", graphs=GRAPHS, rollout_horizon=20)
    summary = json.loads((out / "manifest.json").read_text())["parity"]
    assert summary["passed"] is True
    assert summary["horizon"] == 20


def _count_calls(onnx_model, graph, fn):
    counter = _Counting(onnx_model._graphs[graph].session)
    onnx_model._graphs[graph].session = counter
    try:
        return fn(), counter.calls
    finally:
        onnx_model._graphs[graph].session = counter.session


@pytest.mark.parametrize("ref", ["dreamerv3:ci", "tdmpc2:ci"])
def test_deterministic_fused_rollout_uses_rollout_mode_or_the_noise_free_graph(
    ref, tmp_path_factory
):
    pair = exported(
        tmp_path_factory,
        ref,
        "random",
        graphs=GRAPHS,
        rollout_horizon=HORIZON,
        mode_graphs=True,
    )
    contract = pair.model.io_contract()
    noisy = bool(contract.noise_for("transition"))
    manifest = json.loads((pair.directory / "manifest.json").read_text())
    assert ("rollout.mode" in manifest["graphs"]) == noisy
    steps = 2 * HORIZON
    obs, enc, actions, _ = _inputs(contract, steps, 2)
    with torch.no_grad():
        start = pair.model.encode(encode_input(obs, enc))
        want = pair.model.rollout(start, actions, None, deterministic=True)
    graph = "rollout.mode" if noisy else "rollout"
    got, calls = _count_calls(
        pair.onnx, graph, lambda: pair.onnx.rollout(start, actions, None, deterministic=True)
    )
    assert calls == 2
    assert_agree("deterministic", contract.predictions, want.predictions, got.predictions, 1e-4)


def test_cuda_graph_bookkeeping_runs_on_cpu_and_never_lends_its_buffers(pair):
    """The fixed-buffer path CUDA graphs use (one binding per graph and batch, inputs copied in,
    outputs copied out), run by ONNX Runtime's CPU provider, which ignores the graph ids."""
    from worldflux_onnx.runtime import _BoundRunner, load_artifact

    fixed = load_artifact(pair.directory, providers=["cpu"])
    fixed._runner = _BoundRunner(torch.device("cpu"), cuda_graph=True)
    contract = pair.model.io_contract()
    held = None
    for batch in (1, 3, 1):
        obs, enc, actions, extras = _inputs(contract, HORIZON + 1, batch, seed=batch)
        cond = ConditionPayload(extras) if extras else None
        start = pair.onnx.encode(encode_input(obs, enc))
        got = fixed.rollout(start, actions, cond)
        want = pair.onnx.rollout(start, actions, cond)
        assert_agree(f"fixed b={batch}", contract.predictions, want.predictions, got.predictions, 0)
        if held is None:
            held = {k: (v, v.clone()) for k, v in got.predictions.items()}
    for value, copy in held.values():  # later replays wrote into their own buffers, not these
        assert torch.equal(value, copy)
    obs, enc, _, _ = _inputs(contract, 1, 3, seed=5)
    first = fixed.encode(encode_input(obs, enc))
    kept = {k: v.clone() for k, v in first.tensors.items()}
    fixed.encode(encode_input({k: v + 1 for k, v in obs.items()}, enc))  # replays b=3 again
    assert_agree("a held encode result", contract.state, kept, first.tensors, 0)
    captured = fixed._runner._captured
    graphs = ("rollout", "transition", "decode", "encode")
    assert set(captured) == {(g, b) for g in graphs for b in (1, 3)} - {("encode", 1)}


def test_fp16_fused_graph_keeps_fp32_io_and_passes_parity_at_fp16_tolerances(tmp_path):
    torch.manual_seed(0)
    model = registry.load("toyfamily:tiny")
    graphs = ("encode", "transition", "decode", "rollout")
    out = export(model, "onnx", tmp_path / "half", graphs=graphs, precision="fp16", check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    proto = onnx.load(str(out / "rollout.onnx")).graph
    f32 = onnx.TensorProto.FLOAT
    floats = [v for v in [*proto.input, *proto.output] if v.type.tensor_type.elem_type in (f32, 10)]
    assert floats and all(v.type.tensor_type.elem_type == f32 for v in floats)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.initializer)


def test_time_major_noise_shorter_than_the_rollout_is_a_contract_error_on_both_sides(pair):
    contract = pair.model.io_contract()
    if not contract.noise_for("transition"):
        pytest.skip(f"{pair.ref} takes no transition noise")
    obs, enc, actions, extras = _inputs(contract, HORIZON + 2, 2)
    short = ConditionPayload({k: v[:HORIZON] for k, v in extras.items()})
    start = pair.onnx.encode(encode_input(obs, enc))
    for model in (pair.model, pair.onnx):
        with torch.no_grad(), pytest.raises(ContractError, match="time steps"):
            model.rollout(start, actions, short)
