"""DreamerV3 family: spec vs model, contract conformance, sampling, loss and training sanity."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import synthetic_env as se  # noqa: E402
from worldflux_dreamerv3 import plugin, spec  # noqa: E402
from worldflux_dreamerv3.model import DreamerV3WorldModel, twohot_raw  # noqa: E402

from worldflux_registry import ConditionPayload, WorldModelInput  # noqa: E402
from worldflux_registry.protocol._payloads import tensor_problems  # noqa: E402

CI = {**spec.DEFAULTS, **spec.PRESETS["ci"]}
VARIANTS = {
    "vector": CI,
    "image": {**CI, "obs_dim": 0, "image": True},
    "vector+image": {**CI, "image": True},
}


def family():
    (fam,) = plugin.worldflux_registry_families()
    return fam.validate()


def build(config, seed=0):
    torch.manual_seed(seed)
    return DreamerV3WorldModel(**config).eval()


def observations(model, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in model.io_contract().observations:
        shape = s.concrete_shape(batch=batch)
        if s.dtype == "uint8":
            out[s.name] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            out[s.name] = torch.randn(shape, generator=gen)
    return out


def actions(model, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.action_dim, generator=gen) * 2 - 1


def noise(model, name, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    (n,) = [n for n in model.io_contract().noise if n.name == name]
    return torch.rand(n.as_tensor_spec().concrete_shape(batch=batch), generator=gen)


def assert_matches(where, tensors, specs):
    assert sorted(tensors) == sorted(s.name for s in specs), where
    dims: dict[str, int] = {}
    problems = [
        p for s in specs for p in tensor_problems(f"{where} {s.name}", tensors[s.name], s, dims)
    ]
    assert not problems, problems


# -- spec ------------------------------------------------------------------------------------


def test_listing_the_family_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from worldflux_dreamerv3 import plugin
        (fam,) = plugin.worldflux_registry_families()
        fam.validate()
        for preset in fam.presets:
            config = fam.config(preset)
            fam.contract_for(config).fingerprint()
            fam.param_count(config)
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_spec_contract_equals_model_contract(variant):
    config = VARIANTS[variant]
    model = build(config)
    assert family().contract_for(config) == model.io_contract()
    assert model.io_contract().fingerprint() == spec.contract(config).fingerprint()


def test_contract_declares_observations_by_config():
    assert spec.contract(VARIANTS["vector"]).observation_names == ("vector",)
    assert spec.contract(VARIANTS["image"]).observation_names == ("image",)
    assert spec.contract(VARIANTS["vector+image"]).observation_names == ("vector", "image")
    image = spec.contract(VARIANTS["image"]).observations[0]
    assert (image.dtype, image.shape) == ("uint8", ("batch", 64, 64, 3))


def test_config_without_observations_is_refused():
    from worldflux_registry.errors import ConfigError

    with pytest.raises(ConfigError, match="no observation"):
        spec.contract({**CI, "obs_dim": 0})
    with pytest.raises(ConfigError, match="divisible"):
        DreamerV3WorldModel(**{**CI, "deter": 60})


@pytest.mark.parametrize(
    "preset,image",
    [
        ("ci", False),
        ("ci", True),
        ("size1m", False),
        ("size1m", True),
        ("size12m", False),
        ("size12m", True),
    ],
)
def test_param_count_closed_form_matches_module(preset, image):
    config = {**family().config(preset), "image": image}
    with torch.device("meta"):
        model = DreamerV3WorldModel(**config)
    assert spec.param_count(config) == sum(p.numel() for p in model.parameters())


def test_presets_follow_the_official_size_table():
    sizes = {p: family().config(p) for p in spec.PRESETS}
    assert [sizes[p]["deter"] for p in ("size1m", "size12m", "size400m")] == [512, 2048, 12288]
    assert all(c["stoch"] == 32 and c["blocks"] == 8 and c["bins"] == 255 for c in sizes.values())
    counts = [spec.param_count(sizes[p]) for p in spec.PRESETS]
    assert counts == sorted(counts)


# -- conformance -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vector", "vector+image"])
def test_outputs_match_contract(variant):
    model = build(VARIANTS[variant])
    contract = model.io_contract()
    with torch.no_grad():
        state = model.encode(observations(model, 3))
        assert_matches("encode", state.tensors, contract.state)
        state = model.update(state, actions(model, 3), observations(model, 3, seed=5))
        assert_matches("update", state.tensors, contract.state)
        state = model.transition(state, actions(model, 3))
        assert_matches("transition", state.tensors, contract.state)
        model.validate_state_contract(state)
        out = model.decode(state)
        assert_matches("decode", out.predictions, contract.predictions)
        traj = model.rollout(state, torch.rand(4, 3, model.action_dim) * 2 - 1)
    assert len(traj.states) == 5 and traj.rewards.shape == (4, 3)
    assert ((out["continue"] >= 0) & (out["continue"] <= 1)).all()
    if "image" in out.predictions:
        assert ((out["image"] >= 0) & (out["image"] <= 1)).all()
    stoch = state["stoch"]
    assert torch.equal(stoch.sum(-1), torch.ones(stoch.shape[:-1]))


def test_stoch_is_one_hot_and_reward_starts_at_zero():
    model = build(CI)
    with torch.no_grad():
        state = model.encode(observations(model, 4))
        out = model.decode(state)
    assert set(state["stoch"].unique().tolist()) == {0.0, 1.0}
    # Zero-initialised reward logits and antisymmetric bins: exactly zero, as official.
    assert torch.equal(out["reward"], torch.zeros(4))


# -- sampling --------------------------------------------------------------------------------


def test_deterministic_is_honoured_by_every_step():
    model = build(CI)
    obs, act = observations(model, 5), actions(model, 5)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            s0 = model.encode(obs, deterministic=True)
            s1 = model.update(s0, act, obs, deterministic=True)
            s2 = model.transition(s1, act, deterministic=True)
        runs.append((s0, s1, s2))
    for a, b in zip(*runs):
        assert torch.equal(a["stoch"], b["stoch"]) and torch.equal(a["deter"], b["deter"])
    # Sampling differs between seeds (32 latents x 4 classes: a collision is ~impossible).
    samples = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            samples.append(model.transition(model.encode(obs), act)["stoch"])
    assert not torch.equal(*samples)


def test_given_noise_fixes_the_sample():
    model = build(CI)
    obs, act = observations(model, 5), actions(model, 5)

    def run(seed):
        post = noise(model, "posterior", 5, seed)
        prior = noise(model, "prior", 5, seed + 100)
        torch.manual_seed(seed + 7)  # the global generator must not matter
        with torch.no_grad():
            s0 = model.encode(WorldModelInput(obs, ConditionPayload({"wf.noise.posterior": post})))
            s1 = model.update(s0, act, obs, ConditionPayload({"wf.noise.posterior": post}))
            s2 = model.transition(s1, act, ConditionPayload({"wf.noise.prior": prior}))
        return s0["stoch"], s1["stoch"], s2["stoch"]

    same_a, same_b, other = run(0), run(0), run(1)
    for a, b, c in zip(same_a, same_b, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_gumbel_max_sample_follows_the_unimix_probabilities():
    model = build(CI)
    logits = torch.randn(1, 32, 4).expand(4000, 32, 4)
    with torch.no_grad():
        sample = model._sample(logits, torch.rand(4000, 32, 4))
    freq = sample.mean(0)
    assert torch.allclose(freq, model._probs(logits[0]), atol=0.04)
    assert model._probs(torch.tensor([[[100.0, 0, 0, 0]]])).min() >= 0.01 / 4 - 1e-7


def test_straight_through_gradients_reach_logits_and_encoder():
    model = build(CI)
    logits = torch.randn(2, 32, 4, requires_grad=True)
    sample = model._sample(logits, torch.rand(2, 32, 4))
    (sample * torch.randn(2, 32, 4)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # decode(encode(obs)): the only path from the encoder is through the one-hot sample.
    model.zero_grad()
    out = model.decode(model.encode(observations(model, 2)))
    out["vector"].square().sum().backward()
    grad = sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None)
    assert grad > 0


# -- loss ------------------------------------------------------------------------------------


def test_loss_terms_are_finite_and_kl_respects_free_nats():
    data = se.to_torch(se.collect_dataset(4, 8, seed=3))
    model = build(CI)
    model.validate_batch_contract(data)
    out = model.loss(data)
    assert set(out.components) == {"vector", "reward", "continue", "dyn", "rep"}
    assert all(torch.isfinite(v) for v in out.components.values())
    assert out.components["dyn"] >= 1.0 and out.components["rep"] >= 1.0
    out.loss.backward()
    loose = build({**CI, "free_nats": 1000.0}).loss(data)
    # Above the KL, the clip holds each term at exactly the free nats: no gradient from it.
    assert float(loose.components["dyn"].detach()) == pytest.approx(1000.0)
    expected = (
        loose.components["vector"]
        + loose.components["reward"]
        + loose.components["continue"]
        + 1.0 * 1000.0
        + 0.1 * 1000.0
    )
    assert float(loose.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_image_loss_reads_uint8_frames():
    data = se.to_torch(se.collect_dataset(2, 4, seed=4, render=True))
    model = build(VARIANTS["vector+image"])
    model.validate_batch_contract(data)
    out = model.loss(data)
    assert torch.isfinite(out.components["image"]) and out.components["image"] > 0


def test_twohot_expectation_inverts_raw_space_targets():
    # Official symexp_twohot (changed from the 2023 symlog-space two-hot): bins are raw-space,
    # symexp(linspace(-20, 0, 128)) mirrored, and the weights are linear in raw space.
    model = build(CI)
    assert torch.equal(model.bins, -model.bins.flip(0)) and model.bins[127] == 0
    target = torch.tensor([-300.0, -1.5, 0.0, 0.3, 7.0, 1e4])
    enc = twohot_raw(target, model.bins)
    assert torch.allclose(enc.sum(-1), torch.ones(6))
    assert ((enc > 0).sum(-1) <= 2).all()
    assert torch.allclose(enc @ model.bins, target, rtol=1e-5, atol=1e-6)


# -- training sanity -------------------------------------------------------------------------

STEPS = 300


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    model = build(CI)
    evaluation = se.to_torch(se.collect_dataset(64, 32, seed=123))
    keys = se.batch_keys(model)
    with torch.no_grad():
        before = float(model.loss({k: evaluation[k] for k in keys}).loss)
    se.fit(model, se.collect_dataset(512, 32, seed=0), STEPS, batch_size=16, length=16, lr=3e-3)
    with torch.no_grad():
        after = float(model.loss({k: evaluation[k] for k in keys}).loss)
    return model, evaluation, before, after


def test_training_lowers_the_loss_by_30_percent(trained):
    _, _, before, after = trained
    assert after <= 0.7 * before, (before, after)


def test_trained_model_beats_copy_last_observation(trained):
    model, evaluation, _, _ = trained
    predicted = se.one_step_prediction_error(model, evaluation)
    baseline = se.copy_last_error(evaluation)
    assert predicted < baseline, (predicted, baseline)


# -- registry --------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("worldflux_registry.registry._registry") is None,
    reason="worldflux_registry.registry._registry is not there yet",
)
def test_registry_loads_the_ci_preset():
    from worldflux_registry import registry

    model = registry.load("dreamerv3:ci")
    assert isinstance(model, DreamerV3WorldModel)
    assert model.config == family().config("ci")
    assert model.io_contract() == family().contract_for(family().config("ci"))


def test_train_ci_example_saves_a_loadable_checkpoint(tmp_path):
    from worldflux_registry import registry

    example = Path(__file__).resolve().parents[1] / "examples" / "train_ci.py"
    out = tmp_path / "ckpt"
    args = ["dreamerv3", "--steps", "2", "--episodes", "8", "--out", str(out)]
    subprocess.run([sys.executable, str(example), *args], check=True, capture_output=True)
    model = registry.load(str(out))
    assert isinstance(model, DreamerV3WorldModel) and model.preset == "ci"
