"""ONNX Runtime backend: artifact verification, the WorldModel protocol, providers (CPU here;
the CUDA / CUDA-graph / TensorRT tests run only where a GPU and onnxruntime-gpu are present)."""

from __future__ import annotations

import asyncio
import json
import shutil
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_onnx_export import THIRD_PARTY, assert_agree, exported  # noqa: E402

from worldflux_registry import (  # noqa: E402
    BackendError,
    Capability,
    CapabilityError,
    ConditionPayload,
    ContractError,
    ExportError,
    Registry,
    State,
    WorldModel,
    registry,
)
from worldflux_registry.protocol._inputs import (  # noqa: E402
    encode_input,
    make_actions,
    make_noise,
    make_observations,
    noise_conditions,
)

HAS_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)"
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return exported(tmp_path_factory, THIRD_PARTY, "random")


@pytest.fixture
def copy_of(toy, tmp_path):
    """A private copy of the toy export, free to damage."""
    target = tmp_path / "export"
    shutil.copytree(toy.directory, target)
    return target


def _edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _load(directory: Path, **options):
    from worldflux_onnx.runtime import load_artifact

    return load_artifact(directory, providers=["cpu"], **options)


# -- verification on load ---------------------------------------------------------------------
def test_tampered_graph_file_is_refused_naming_the_graph(copy_of):
    path = copy_of / "transition.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"graph 'transition' file .*sha256.*modified") as info:
        registry.load(copy_of)
    assert info.value.graph == "transition"


def test_missing_graph_file_is_refused_naming_it(copy_of):
    (copy_of / "decode.onnx").unlink()
    with pytest.raises(ExportError, match=r"graph 'decode' file decode\.onnx is missing"):
        registry.load(copy_of)


def test_manifest_from_a_future_format_version_asks_for_an_upgrade(copy_of):
    _edit_manifest(copy_of, format_version=2)
    with pytest.raises(ExportError, match=r"format_version 2, newer than the 1.*upgrade"):
        registry.load(copy_of)


def test_edited_contract_no_longer_matches_the_fingerprint(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["contract"]["observations"][0]["shape"][1] += 1
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"fingerprint .* does not match its contract"):
        _load(copy_of)


def test_graph_file_swapped_for_another_graph_is_caught_by_its_metadata(copy_of):
    from worldflux_onnx._manifest import sha256_file

    shutil.copyfile(copy_of / "encode.onnx", copy_of / "decode.onnx")
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["graphs"]["decode"]["sha256"] = sha256_file(copy_of / "decode.onnx")
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="holds graph 'encode', not 'decode'"):
        _load(copy_of)


def test_wrong_format_and_absent_manifest_are_named(copy_of, tmp_path):
    from worldflux_onnx.runtime import load_artifact

    _edit_manifest(copy_of, format="other.thing")
    with pytest.raises(ExportError, match=r"format 'other\.thing'"):
        load_artifact(copy_of)
    with pytest.raises(ExportError, match=r"no manifest\.json"):
        load_artifact(tmp_path)


# -- the protocol -----------------------------------------------------------------------------
def test_loaded_export_is_a_world_model_with_the_same_contract(toy):
    model = registry.load(toy.directory, device="cpu")
    assert isinstance(model, WorldModel)
    assert model.io_contract() == toy.model.io_contract()
    assert model.contract_fingerprint() == toy.model.contract_fingerprint()
    assert model.family == "toyfamily" and model.preset == "tiny"
    assert list(model.parameters()) == []
    assert model.supports(Capability.ROLLOUT) and model.supports(Capability.UPDATE)
    assert not model.supports(Capability.LOSS)
    assert model.providers == ["CPUExecutionProvider"]
    assert model.graph_path("decode") == toy.directory / "decode.onnx"


def test_an_export_loads_and_rolls_out_without_its_family_installed(toy):
    from worldflux_onnx import plugin as onnx_plugin

    only_the_exporter = Registry(entry_points=False, plugins=[onnx_plugin])
    assert only_the_exporter.list() == []  # no family at all, toyfamily included
    model = only_the_exporter.load(toy.directory, device="cpu")
    assert model.family == "toyfamily"
    contract = toy.model.io_contract()
    gen = torch.Generator().manual_seed(5)
    obs = make_observations(contract, (2,), gen)
    actions = make_actions(contract, (3, 2), gen)
    trajectory = model.rollout(model.encode(obs, deterministic=False), actions)
    assert trajectory.rewards.shape == (3, 2)


def test_loss_raises_capability_error(toy):
    with pytest.raises(CapabilityError, match="cannot compute a training loss"):
        toy.onnx.loss({})


def test_deterministic_steps_are_refused_on_stochastic_graphs(toy):
    obs = make_observations(toy.model.io_contract(), (2,), torch.Generator().manual_seed(0))
    with pytest.raises(CapabilityError, match=r"no deterministic 'encode\.mode' graph") as info:
        toy.onnx.encode(obs, deterministic=True)
    assert "mode_graphs=True" in info.value.hint


@pytest.fixture(scope="module")
def toy_modes(tmp_path_factory):
    return exported(tmp_path_factory, THIRD_PARTY, "random", mode_graphs=True)


def test_mode_graphs_are_exported_for_stochastic_steps_only(toy_modes):
    contract = toy_modes.model.io_contract()
    graphs = json.loads((toy_modes.directory / "manifest.json").read_text())["graphs"]
    stochastic = [g for g in ("encode", "transition", "update") if contract.noise_for(g)]
    assert stochastic, "the toy family should have a stochastic step"
    modes = sorted(g for g in graphs if g.endswith(".mode"))
    assert modes == sorted(f"{g}.mode" for g in stochastic if g in graphs)
    for name in modes:
        entry = graphs[name]
        assert entry["mode_of"] == name.removesuffix(".mode") and entry["noise"] == []
        assert not any(i["name"].startswith("noise.") for i in entry["inputs"])
        assert entry["file"] == f"{name}.onnx"


def test_deterministic_steps_run_the_mode_graphs_and_match_torch(toy_modes):
    model, onnx_model = toy_modes.model, toy_modes.onnx
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(7)
    obs = make_observations(contract, (3,), gen)
    action = make_actions(contract, (3,), gen)
    actions = make_actions(contract, (4, 3), gen)
    with torch.no_grad():
        ref = model.encode(obs, deterministic=True)
        got = onnx_model.encode(obs, deterministic=True)
        assert_agree("encode.mode", contract.state, ref.tensors, got.tensors)
        ref_t = model.transition(ref, action, deterministic=True)
        got_t = onnx_model.transition(ref, action, deterministic=True)
        assert_agree("transition.mode", contract.state, ref_t.tensors, got_t.tensors)
        if model.supports(Capability.UPDATE):
            ref_u = model.update(ref, action, obs, deterministic=True)
            got_u = onnx_model.update(ref, action, obs, deterministic=True)
            assert_agree("update.mode", contract.state, ref_u.tensors, got_u.tensors)
        ref_r = model.rollout(ref, actions, deterministic=True)
        got_r = onnx_model.rollout(ref, actions, deterministic=True)
    assert_agree("rollout mode", contract.predictions, ref_r.predictions, got_r.predictions)
    torch.manual_seed(0)  # the sampling graphs are still there for deterministic=False
    assert not torch.equal(onnx_model.encode(obs)["latent"], onnx_model.encode(obs)["latent"])


def test_noise_is_sampled_when_not_given_and_used_when_given(toy):
    contract = toy.model.io_contract()
    gen = torch.Generator().manual_seed(0)
    obs = make_observations(contract, (4,), gen)
    torch.manual_seed(1)
    a = toy.onnx.encode(obs)
    b = toy.onnx.encode(obs)
    assert not torch.equal(a["latent"], b["latent"])
    noise = make_noise(contract, "encode", (4,), gen)
    c = toy.onnx.encode(encode_input(obs, noise))
    d = toy.onnx.encode(encode_input(obs, noise))
    assert torch.equal(c["latent"], d["latent"])
    assert c["latent"].shape == (4, *contract.state[1].shape[1:])


def test_state_without_a_declared_key_is_a_contract_error(toy):
    with pytest.raises(ContractError, match=r"missing keys \['latent'\]"):
        toy.onnx.decode(State({"deter": torch.zeros(2, 16)}))


def test_async_rollout_and_time_major_noise_match_torch(toy):
    contract = toy.model.io_contract()
    gen = torch.Generator().manual_seed(3)
    obs = make_observations(contract, (2,), gen)
    actions = make_actions(contract, (4, 2), gen)
    noise = make_noise(contract, "transition", (4, 2), gen)
    cond = noise_conditions(noise)
    with torch.no_grad():
        start = toy.model.encode(encode_input(obs, make_noise(contract, "encode", (2,), gen)))
        ref = toy.model.rollout(start, actions, cond)
    got = asyncio.run(toy.onnx.async_rollout(start, actions, cond))
    assert got.rewards.shape == ref.rewards.shape == (4, 2)
    assert_agree("rollout", contract.predictions, ref.predictions, got.predictions, 1e-5)


def test_load_refuses_a_dtype(toy):
    with pytest.raises(BackendError, match="precision is chosen at export time"):
        registry.load(toy.directory, dtype="float16")


# -- providers --------------------------------------------------------------------------------
def test_auto_providers_on_a_cpu_only_install_choose_cpu_without_warnings(toy):
    if HAS_CUDA:
        pytest.skip("this machine has CUDA: 'auto' picks it")
    from worldflux_onnx.runtime import load_artifact

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_artifact(toy.directory, providers="auto")
    assert model.plan.names == ["cpu"] and model.device.type == "cpu"


def test_explicit_gpu_providers_fail_clearly_without_a_gpu(toy):
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    from worldflux_onnx.runtime import load_artifact

    with pytest.raises(BackendError, match=r"'cuda' cannot run here.*onnxruntime-gpu"):
        load_artifact(toy.directory, providers=["cuda", "cpu"])
    with pytest.raises(BackendError, match="'tensorrt' cannot run here"):
        load_artifact(toy.directory, providers=["tensorrt"])
    with pytest.raises(BackendError, match=r"unknown providers \['rocm'\]"):
        load_artifact(toy.directory, providers=["rocm"])


def test_tensorrt_without_its_libraries_fails_explicitly_and_auto_falls_back(monkeypatch):
    """Provider choice on an onnxruntime-gpu install whose TensorRT libraries are absent.

    Only the GPU's presence is simulated (this machine has none); the library probe is real.
    """
    from worldflux_onnx import _providers

    missing = _providers.missing_tensorrt_libraries()
    if not missing:
        pytest.skip("TensorRT libraries are installed here")
    gpu_ort = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu_ort)
    monkeypatch.setattr(_providers, "_cuda_ready", lambda: True)
    with pytest.raises(BackendError, match=r"TensorRT libraries not found: libnvinfer\.so"):
        _providers.resolve_providers(["tensorrt", "cuda"])
    with pytest.warns(RuntimeWarning, match="TensorRT provider skipped.*libnvinfer"):
        plan = _providers.resolve_providers("auto", cuda_graph=True)
    assert plan.names == ["cuda", "cpu"]
    assert plan.options[0] == {"device_id": 0, "use_tf32": "0", "enable_cuda_graph": "1"}


def test_tensorrt_options_put_caches_under_the_export(tmp_path, monkeypatch):
    from worldflux_onnx import _providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider"])
    monkeypatch.setattr(_providers, "_cuda_ready", lambda: True)
    monkeypatch.setattr(_providers, "missing_tensorrt_libraries", lambda: [])
    plan = _providers.resolve_providers(["tensorrt"], cache_dir=tmp_path / "trt", trt_fp16=True)
    assert plan.names == ["tensorrt", "cpu"]
    opts = plan.options[0]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt") == opts["trt_timing_cache_path"]
    assert opts["trt_fp16_enable"] is True and (tmp_path / "trt").is_dir()


def test_cuda_provider_runs_fp32_without_tf32_unless_asked(monkeypatch):
    """ORT's CUDA provider defaults to TF32; the loader writes ``use_tf32`` either way."""
    from worldflux_onnx import _providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(_providers, "_cuda_ready", lambda: True)
    assert _providers.resolve_providers(["cuda"]).options[0]["use_tf32"] == "0"
    assert _providers.resolve_providers(["cuda"], use_tf32=True).options[0]["use_tf32"] == "1"


def test_tf32_setting_in_force_is_reported_per_provider(monkeypatch):
    from worldflux_onnx._providers import ProviderPlan
    from worldflux_onnx.runtime import _tf32_in_force

    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    cpu = ProviderPlan(["cpu"], [{}], 0)
    cuda = ProviderPlan(["cuda", "cpu"], [{}, {}], 0)
    trt = ProviderPlan(["tensorrt", "cuda", "cpu"], [{}, {}, {}], 0)
    assert _tf32_in_force(cpu, True) is False
    assert _tf32_in_force(cuda, False) is False and _tf32_in_force(cuda, True) is True
    # TensorRT has no switch in ONNX Runtime: its builder allows TF32 by default.
    assert _tf32_in_force(trt, False) == {"cuda": False, "tensorrt": True}
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert _tf32_in_force(cuda, True) is False
    assert _tf32_in_force(trt, True) == {"cuda": False, "tensorrt": False}


def test_cpu_model_reports_tf32_off_to_the_parity_checker(toy):
    from worldflux_registry.parity._check import _side_info

    model = registry.load(toy.directory, device="cpu", use_tf32=True)
    assert model.tf32 is False
    assert _side_info(model)["tf32"] is False


# -- results are the caller's own ---------------------------------------------------------------
def _step_inputs(contract, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    obs = make_observations(contract, (batch,), gen)
    return (
        encode_input(obs, make_noise(contract, "encode", (batch,), gen)),
        make_actions(contract, (batch,), gen),
        noise_conditions(make_noise(contract, "transition", (batch,), gen)),
    )


def test_a_returned_state_never_changes_under_its_holder(toy):
    """CPU results are ORT's own fresh buffers: later calls must not write into them."""
    contract = toy.model.io_contract()
    obs, action, cond = _step_inputs(contract, 3, seed=0)
    first = toy.onnx.encode(obs)
    kept = {k: v.clone() for k, v in first.tensors.items()}
    after = toy.onnx.transition(first, action, cond)
    kept_after = {k: v.clone() for k, v in after.tensors.items()}
    decoded = toy.onnx.decode(after)
    kept_pred = {k: v.clone() for k, v in decoded.predictions.items()}
    for seed in (1, 2):  # same shapes, other values: any reused buffer would be overwritten
        other_obs, other_action, other_cond = _step_inputs(contract, 3, seed)
        other = toy.onnx.encode(other_obs)
        toy.onnx.decode(toy.onnx.transition(other, other_action, other_cond))
        assert not torch.equal(other["latent"], kept["latent"])
    for held, copy in ((first, kept), (after, kept_after)):
        for key, value in copy.items():
            assert torch.equal(held[key], value), key
    for key, value in kept_pred.items():
        assert torch.equal(decoded[key], value), key
    pointers = {v.data_ptr() for v in (*first.tensors.values(), *after.tensors.values())}
    assert len(pointers) == len(first.tensors) + len(after.tensors)


def test_editing_a_returned_state_in_place_leaves_the_model_alone(toy):
    contract = toy.model.io_contract()
    obs, action, cond = _step_inputs(contract, 2, seed=5)
    state = toy.onnx.encode(obs)
    before = toy.onnx.transition(state, action, cond)
    expected = {k: v.clone() for k, v in before.tensors.items()}
    for value in (*state.tensors.values(), *before.tensors.values()):
        if value.is_floating_point():
            value.add_(1000.0)
        else:
            value.zero_()
    again = toy.onnx.transition(toy.onnx.encode(obs), action, cond)
    assert_agree("transition after edits", contract.state, expected, again.tensors, 0.0)


def test_rollout_states_and_predictions_are_distinct_per_step(toy):
    contract = toy.model.io_contract()
    gen = torch.Generator().manual_seed(4)
    obs = make_observations(contract, (2,), gen)
    actions = make_actions(contract, (5, 2), gen)
    cond = noise_conditions(make_noise(contract, "transition", (5, 2), gen))
    with torch.no_grad():
        start = toy.model.encode(encode_input(obs, make_noise(contract, "encode", (2,), gen)))
        ref = toy.model.rollout(start, actions, cond)
    got = toy.onnx.rollout(start, actions, cond)
    assert len(got.states) == 6 and got.states[0] is start
    for t in range(1, 6):
        assert_agree(f"state {t}", contract.state, ref.states[t].tensors, got.states[t].tensors)
    assert_agree("rollout", contract.predictions, ref.predictions, got.predictions, 1e-5)
    got.states[1]["latent"].fill_(7.0)  # a held step state is its own memory
    assert not torch.equal(got.states[2]["latent"], got.states[1]["latent"])


def test_cpu_io_binding_writes_in_place_and_agrees_with_the_numpy_path(toy):
    """The IOBinding runner CUDA uses, run on CPU: same numbers, outputs in caller buffers."""
    bound = _load(toy.directory, io_binding=True)
    contract = toy.model.io_contract()
    for batch in (1, 3):
        obs, action, cond = _step_inputs(contract, batch, seed=batch)
        want_state = toy.onnx.encode(obs)
        got_state = bound.encode(obs)
        assert_agree(f"encode b={batch}", contract.state, want_state.tensors, got_state.tensors, 0)
        want = toy.onnx.transition(want_state, action, cond)
        got = bound.transition(got_state, action, cond)
        assert_agree(f"transition b={batch}", contract.state, want.tensors, got.tensors, 0)
        want_pred = toy.onnx.decode(want).predictions
        got_pred = bound.decode(got).predictions
        assert_agree(f"decode b={batch}", contract.predictions, want_pred, got_pred, 0)
    gen = torch.Generator().manual_seed(9)
    actions = make_actions(contract, (4, 2), gen)
    rollout_cond = noise_conditions(make_noise(contract, "transition", (4, 2), gen))
    start = toy.onnx.encode(_step_inputs(contract, 2, seed=9)[0])
    want_traj = toy.onnx.rollout(start, actions, rollout_cond)
    got_traj = bound.rollout(start, actions, rollout_cond)
    assert_agree("rollout", contract.predictions, want_traj.predictions, got_traj.predictions, 0)
    # Every step wrote into one preallocated [T, batch, ...] buffer per state key.
    key = contract.state[0].name
    storages = {s.tensors[key].untyped_storage().data_ptr() for s in got_traj.states[1:]}
    assert len(storages) == 1
    assert got_traj.states[1].tensors[key].data_ptr() != got_traj.states[2].tensors[key].data_ptr()


# -- GPU (skipped without CUDA + onnxruntime-gpu) ----------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["iobinding", "cuda-graph"])
def test_cuda_provider_matches_torch_on_the_same_gpu(toy, cuda_graph):
    from worldflux_onnx.runtime import load_artifact

    model = toy.model.to("cuda")
    onnx_model = load_artifact(toy.directory, providers=["cuda"], cuda_graph=cuda_graph)
    assert onnx_model.device.type == "cuda"
    assert onnx_model.tf32 is False
    cuda_options = onnx_model.sessions["encode"].get_provider_options()["CUDAExecutionProvider"]
    assert cuda_options["use_tf32"] == "0"
    contract = model.io_contract()
    for batch in (1, 3, 17, 3):  # the repeated size replays its captured graph
        gen = torch.Generator().manual_seed(batch)
        obs = {k: v.cuda() for k, v in make_observations(contract, (batch,), gen).items()}
        noise = {k: v.cuda() for k, v in make_noise(contract, "encode", (batch,), gen).items()}
        with torch.no_grad():
            ref = model.encode(encode_input(obs, noise))
        got = onnx_model.encode(encode_input(obs, noise))
        assert got["deter"].device.type == "cuda"
        assert_agree(f"cuda encode b={batch}", contract.state, ref.tensors, got.tensors, 1e-4)
        held = got["deter"].clone()
        onnx_model.encode(encode_input({k: v + 1 for k, v in obs.items()}, noise))
        assert torch.equal(got["deter"], held)  # a replay's buffers are copied out, not lent


@pytest.mark.gpu
@needs_cuda
def test_cuda_rollout_stays_on_the_device(toy):
    from worldflux_onnx.runtime import load_artifact

    model = toy.model.to("cuda")
    onnx_model = load_artifact(toy.directory, providers=["cuda"])
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(0)
    obs = {k: v.cuda() for k, v in make_observations(contract, (5,), gen).items()}
    actions = make_actions(contract, (8, 5), gen).cuda()
    cond = ConditionPayload(
        {
            f"wf.noise.{k}": v.cuda()
            for k, v in make_noise(contract, "transition", (8, 5), gen).items()
        }
    )
    with torch.no_grad():
        start = model.encode(obs)
        ref = model.rollout(start, actions, cond)
    got = onnx_model.rollout(start, actions, cond)
    assert all(v.device.type == "cuda" for v in got.predictions.values())
    assert_agree("cuda rollout", contract.predictions, ref.predictions, got.predictions, 1e-4)
