"""The TD-MPC2 family: spec, building blocks, protocol mapping, loss and a training sanity run."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("worldflux_tdmpc2")

import synthetic_env as se  # noqa: E402
from worldflux_tdmpc2 import spec  # noqa: E402
from worldflux_tdmpc2.model import SimNorm, TDMPC2WorldModel, symexp, symlog, two_hot  # noqa: E402

from worldflux_registry import registry  # noqa: E402
from worldflux_registry.contract._io import Capability  # noqa: E402
from worldflux_registry.errors import ConfigError  # noqa: E402
from worldflux_registry.state._state import State  # noqa: E402

CI = {**spec.DEFAULTS, **spec.PRESETS["ci"]}


def build(**overrides) -> TDMPC2WorldModel:
    torch.manual_seed(0)
    return TDMPC2WorldModel(**{**CI, **overrides}).eval()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- spec -------------------------------------------------------------------------------------
def test_presets_follow_the_official_size_table():
    table = {
        "size1m": (256, 384, 128, 2, 2),
        "size5m": (256, 512, 512, 2, 5),
        "size19m": (1024, 1024, 768, 3, 5),
        "size48m": (1792, 1792, 768, 4, 5),
        "size317m": (4096, 4096, 1376, 5, 8),
    }
    for preset, expected in table.items():
        cfg = {**spec.DEFAULTS, **spec.PRESETS[preset]}
        got = tuple(cfg[k] for k in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q"))
        assert got == expected, preset


@pytest.mark.parametrize("preset", list(spec.PRESETS))
def test_param_count_matches_the_module(preset):
    cfg = {**spec.DEFAULTS, **spec.PRESETS[preset]}
    with torch.device("meta"):
        model = TDMPC2WorldModel(**cfg)
    assert spec.param_count(cfg) == trainable(model)


def test_param_counts_are_near_the_size_names():
    # The names count the paper's multi-task models; single-task counts land close to them.
    for preset, millions in [("size1m", 1), ("size5m", 5), ("size19m", 19), ("size48m", 48)]:
        count = spec.param_count({**spec.DEFAULTS, **spec.PRESETS[preset]})
        assert 0.75 * millions < count / 1e6 < 1.3 * millions, (preset, count)


def test_registry_serves_the_family_by_name_and_alias():
    family = registry.get("tdmpc2")
    assert registry.get("td-mpc2") is family or registry.get("td-mpc2") == family
    assert family.distribution == "worldflux-tdmpc2"
    assert set(family.presets) == set(spec.PRESETS)
    assert family.capabilities == TDMPC2WorldModel.capabilities


def test_model_contract_equals_the_spec_contract():
    model = registry.load("tdmpc2:ci")
    assert isinstance(model, TDMPC2WorldModel)
    assert model.io_contract() == registry.get("tdmpc2").contract_for(model.config)
    assert model.io_contract().state_keys == ("latent", "reward")
    # The only noise is the planner's: the protocol steps are deterministic.
    contract = model.io_contract()
    assert all(not contract.noise_for(g) for g in ("encode", "transition", "update", "decode"))
    assert {n.name for n in contract.noise} == {n.name for n in contract.noise_for("plan")}
    assert not model.supports(Capability.STOCHASTIC)


@pytest.mark.parametrize(
    "overrides",
    [{"latent_dim": 60}, {"num_q": 1}, {"num_bins": 1}, {"vmin": 1.0, "vmax": -1.0}],
    ids=["latent-not-multiple-of-simnorm", "one-q", "one-bin", "vmin-above-vmax"],
)
def test_bad_config_is_refused_before_building(overrides):
    with pytest.raises(ConfigError):
        spec.contract({**CI, **overrides})
    with pytest.raises(ConfigError):
        TDMPC2WorldModel(**{**CI, **overrides})


# -- building blocks --------------------------------------------------------------------------
def test_simnorm_puts_every_group_on_the_simplex():
    x = torch.randn(5, 64) * 4
    y = SimNorm(8)(x).reshape(5, 8, 8)
    assert torch.allclose(y.sum(-1), torch.ones(5, 8))
    assert (y >= 0).all()


def test_two_hot_is_inverted_by_the_bin_expectation():
    x = torch.tensor([-50.0, -3.0, -0.37, 0.0, 0.2, 1.0, 7.5, 400.0])
    encoded = two_hot(x, 101, -10.0, 10.0)
    assert torch.allclose(encoded.sum(-1), torch.ones(8))
    assert ((encoded > 0).sum(-1) <= 2).all()
    bins = torch.linspace(-10.0, 10.0, 101)
    assert torch.allclose(symexp((encoded * bins).sum(-1)), x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-5)


def test_fresh_reward_and_value_heads_predict_zero():
    model = build()
    state = model.encode(torch.randn(3, 4))
    out = model.decode(model.transition(state, torch.zeros(3, 2)))
    assert torch.allclose(out["reward"], torch.zeros(3), atol=1e-6)
    assert torch.allclose(out["value"], torch.zeros(3), atol=1e-6)


def test_policy_prior_is_a_tanh_gaussian():
    model = build()
    z = model.encode(torch.randn(6, 4))["latent"]
    mean, action, _ = model.pi(z, deterministic=True)
    assert torch.equal(mean, action)
    eps = torch.randn(6, 2)
    _, a1, lp1 = model.pi(z, eps=eps)
    _, a2, lp2 = model.pi(z, eps=eps)
    assert torch.equal(a1, a2) and torch.equal(lp1, lp2)
    assert (a1.abs() <= 1).all() and torch.isfinite(lp1).all()


def test_target_q_is_a_frozen_copy_outside_the_trainable_parameters():
    model = build()
    assert all(not p.requires_grad for p in model.target_qs.parameters())
    assert "target_qs.0.0.weight" in model.state_dict()
    assert spec.param_count(model.config) == trainable(model)


# -- protocol mapping -------------------------------------------------------------------------
def test_transition_carries_the_reward_of_the_action_it_takes():
    model = build()
    with torch.no_grad():
        for p in model.reward_head[-1].parameters():
            p.normal_()
        state = model.encode(torch.randn(4, 4))
        assert torch.equal(state["reward"], torch.zeros(4))
        action = torch.rand(4, 2) * 2 - 1
        nxt = model.transition(state, action)
        assert torch.allclose(nxt["reward"], model.reward_value(state["latent"], action))
        assert torch.allclose(nxt["latent"], model.next(state["latent"], action))
        assert torch.equal(model.decode(nxt)["reward"], nxt["reward"])


def test_update_is_the_encoder_posterior_with_the_observed_steps_reward():
    model = build()
    with torch.no_grad():
        for p in model.reward_head[-1].parameters():
            p.normal_()
        state = model.encode(torch.randn(4, 4))
        action, obs = torch.rand(4, 2), torch.randn(4, 4)
        post = model.update(state, action, obs, deterministic=True)
        assert torch.equal(post["latent"], model.encode(obs)["latent"])
        assert torch.allclose(post["reward"], model.transition(state, action)["reward"])


def test_rollout_rewards_line_up_with_actions_and_values_cover_every_state():
    model = build()
    with torch.no_grad():
        for p in model.reward_head[-1].parameters():
            p.normal_()
        state = model.encode(torch.randn(2, 4))
        actions = torch.rand(5, 2, 2) * 2 - 1
        traj = model.rollout(state, actions, deterministic=True)
        z = state["latent"]
        for t in range(5):
            assert torch.allclose(traj.rewards[t], model.reward_value(z, actions[t]), atol=1e-6)
            z = model.next(z, actions[t])
        assert traj.values.shape == (6, 2)
        assert torch.allclose(traj.values[-1], model.value(z), atol=1e-6)


def test_every_step_is_deterministic_in_eval_mode():
    model = build()
    obs, action = torch.randn(3, 4), torch.rand(3, 2)
    s1, s2 = model.encode(obs), model.encode(obs, deterministic=True)
    assert torch.equal(s1["latent"], s2["latent"])
    t1, t2 = model.transition(s1, action), model.transition(s1, action, deterministic=True)
    assert torch.equal(t1["latent"], t2["latent"])
    d1, d2 = model.decode(t1), model.decode(t1)
    assert all(torch.equal(d1[k], d2[k]) for k in d1.predictions)


# -- loss -------------------------------------------------------------------------------------
def _batch(b=8, t=4):
    data = se.collect_dataset(episodes=b, length=t, seed=3)
    return se.to_torch({k: data[k] for k in ("vector", "action", "reward")})


def test_loss_has_the_three_weighted_terms():
    model = build()
    out = model.loss(_batch())
    assert set(out.components) == {"consistency", "reward", "value"}
    c = model.config
    expected = (
        c["consistency_coef"] * out.components["consistency"]
        + c["reward_coef"] * out.components["reward"]
        + c["value_coef"] * out.components["value"]
    )
    assert torch.allclose(out.loss, expected)
    # Zero-initialised heads give uniform bins: each step's cross-entropy is about log(101),
    # weighted by rho**t and averaged over the horizon.
    horizon = 3
    weight = sum(c["rho"] ** t for t in range(horizon)) / horizon
    assert out.components["reward"].item() == pytest.approx(math.log(101) * weight, rel=0.05)
    out.loss.backward()
    assert model.encoder[0].weight.grad is not None
    assert model.dynamics[0].weight.grad is not None


def test_training_loss_soft_updates_the_target_q_and_eval_loss_does_not():
    model = build()
    with torch.no_grad():
        model.qs[0][0].weight.add_(1.0)
    before = model.target_qs[0][0].weight.clone()
    model.loss(_batch())  # eval mode: no update
    assert torch.equal(model.target_qs[0][0].weight, before)
    model.train()
    # Official schedule: the soft update follows each optimizer step, so the first train-mode
    # call uses the target as it is, and the update of step k runs at the start of call k + 1.
    model.loss(_batch())
    assert torch.equal(model.target_qs[0][0].weight, before)
    model.loss(_batch())
    online = model.qs[0][0].weight.detach()
    assert torch.allclose(model.target_qs[0][0].weight, before.lerp(online, model.config["tau"]))


def test_policy_loss_trains_only_the_policy_head():
    model = build(policy_coef=1.0).train()
    out = model.loss(_batch())
    assert "policy" in out.components
    model.zero_grad()
    out.components["policy"].backward()
    assert model.pi_head[0].weight.grad is not None
    assert model.pi_head[0].weight.grad.abs().sum() > 0
    others = [model.encoder, model.dynamics, model.reward_head, model.qs]
    for module in others:
        for p in module.parameters():
            assert p.grad is None or not p.grad.any()


# -- training sanity --------------------------------------------------------------------------
def _next_latent_errors(model, data):
    """Next-latent MSE of the dynamics vs copying the last latent, and reward MAE vs the mean.

    TD-MPC2 has no observation decoder, so next-step prediction is judged in its own latent
    space: ``d(enc(o_t), a_t)`` against ``enc(o_{t+1})``, with ``enc(o_t)`` as the baseline.
    """
    v, a, r, c = data["vector"], data["action"], data["reward"], data["continue"]
    with torch.no_grad():
        z = model.encode(v.flatten(0, 1))["latent"].unflatten(0, v.shape[:2])
        state = State({"latent": z[:, :-1].flatten(0, 1), "reward": torch.zeros(1)})
        nxt = model.transition(state, a[:, :-1].flatten(0, 1), deterministic=True)
    pred = nxt["latent"].unflatten(0, (v.shape[0], -1))
    reward = nxt["reward"].unflatten(0, (v.shape[0], -1))
    # o_t still live (not past a termination); the absorbing tail would flatter both sides.
    live = torch.cat([torch.ones_like(c[:, :1]), c[:, :-2]], 1)

    def mean(x):
        return float((x * live).sum() / live.sum())

    target = z[:, 1:]
    return {
        "model": mean(((pred - target) ** 2).mean(-1)),
        "copy": mean(((z[:, :-1] - target) ** 2).mean(-1)),
        "reward": mean((reward - r[:, :-1]).abs()),
        "reward_mean_baseline": mean((r[:, :-1] - mean(r[:, :-1])).abs()),
    }


@pytest.fixture
def one_thread():
    # Tiny models train fastest on one thread; 2-core CI boxes thrash with more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_param_groups_slow_the_encoder_and_skip_the_target():
    model = build()
    groups = model.param_groups(1e-3)
    assert groups[0]["lr"] == pytest.approx(3e-4) and groups[1]["lr"] == 1e-3
    grouped = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert sum(p.numel() for p in grouped) == trainable(model)


def test_ci_preset_learns_the_point_mass_in_300_steps(one_thread):
    torch.manual_seed(0)
    model = registry.load("tdmpc2:ci").train()
    train = se.collect_dataset(episodes=128, length=16, seed=0)
    held_out = se.to_torch(se.collect_dataset(episodes=64, length=16, seed=1))
    # The official recipe (slower encoder, clip 20) at the official horizon 3 (4 observations).
    optimizer = torch.optim.Adam(model.param_groups(1e-3))
    stream = se.iterate_batches(train, 128, seed=0, keys=se.batch_keys(model), length=4)
    losses = []
    for _ in range(300):
        out = model.loss(se.to_torch(next(stream)))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        optimizer.step()
        losses.append(out.loss.item())
    model.eval()
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last <= 0.7 * first, (first, last)
    err = _next_latent_errors(model, held_out)
    assert err["model"] < 0.8 * err["copy"], err
    assert err["reward"] < 0.6 * err["reward_mean_baseline"], err


# -- docs ---------------------------------------------------------------------------------------
def preset_table() -> str:
    """The preset table of docs/families/tdmpc2.md, generated from the spec."""
    fields = ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "obs_dim")
    fields += ("action_dim", "tasks")
    rows = [
        "| preset | " + " | ".join(fields) + " | parameters |",
        "|---|" + "---:|" * (len(fields) + 1),
    ]
    for name, overrides in spec.PRESETS.items():
        cfg = {**spec.DEFAULTS, **overrides}
        cells = " | ".join(str(cfg[k]) for k in fields)
        rows.append(f"| `{name}` | {cells} | {spec.param_count(cfg):,} |")
    return "\n".join(rows)


def test_docs_preset_table_matches_the_spec():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "families" / "tdmpc2.md").read_text()
    start = page.index("-->", page.index("<!-- preset-table")) + len("-->")
    table = page[start : page.index("<!-- /preset-table -->")].strip()
    assert table == preset_table(), "regenerate the table with tests/test_tdmpc2.py:preset_table"


# -- multi-task -------------------------------------------------------------------------------
def _mt_inputs(batch=4, seed=0):
    from worldflux_registry.protocol._inputs import make_actions, make_conditions, make_observations

    model = registry.load("tdmpc2:ci-mt").eval()
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(seed)
    obs = make_observations(contract, (batch,), gen)
    actions = make_actions(contract, (3, batch), gen)
    return model, contract, obs, actions, make_conditions(contract, (batch,), gen)


def test_multitask_contract_declares_the_task_condition_and_the_embedding_conditions_every_head():
    model, contract, obs, actions, _ = _mt_inputs()
    (task,) = contract.conditions
    assert (task.name, task.dtype, task.kind, task.classes) == ("task", "int64", "discrete", 3)
    assert model.task_emb is not None and model.task_emb.weight.shape == (3, 8)
    from worldflux_registry import ConditionPayload, WorldModelInput

    vector = obs["vector"][:1].expand(3, -1)  # one observation, seen under each task
    cond = ConditionPayload({"wf.cond.task": torch.arange(3)})
    with torch.no_grad():
        state = model.encode(WorldModelInput({"vector": vector}, cond))
        nxt = model.transition(state, actions[0][:1].expand(3, -1), cond)
        pred = model.decode(nxt, cond).predictions
    for latent in (state["latent"], nxt["latent"], pred["policy_mean"]):
        assert not torch.allclose(latent[0], latent[1]) and not torch.allclose(latent[1], latent[2])


def test_multitask_steps_without_task_ids_name_the_condition():
    from worldflux_registry import ContractError

    model, _, obs, _, _ = _mt_inputs()
    with pytest.raises(ContractError, match=r"wf\.cond\.task"):
        model.encode(obs)
    with pytest.raises(ContractError, match=r"batch\['task'\]"):
        model.loss(_batch())


def test_multitask_embedding_rows_are_used_at_norm_at_most_one():
    model, *_ = _mt_inputs()
    with torch.no_grad():
        # Rows far outside the unit ball (the official init, U(-0.02, 0.02), starts inside it).
        model.task_emb.weight.mul_(1000.0)
        assert (model.task_emb.weight.norm(dim=-1) > 2).all()
        out = model.with_task(torch.zeros(3, 0), torch.arange(3))
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    # As the official nn.Embedding(max_norm=1), the lookup renormalised the stored rows too.
    assert torch.allclose(model.task_emb.weight.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_multitask_loss_trains_with_task_ids(one_thread):
    model = TDMPC2WorldModel(**{**spec.DEFAULTS, **spec.PRESETS["ci-mt"]})
    batch = _batch(b=12, t=4)
    batch["task"] = torch.arange(12) % 3
    opt = torch.optim.Adam(model.param_groups(3e-3))
    model.train()
    first = model.loss(batch).loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(batch).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert model.task_emb.weight.grad is not None and model.task_emb.weight.grad.abs().sum() > 0


def test_multitask_export_takes_the_task_in_every_graph_and_passes_parity(tmp_path):
    pytest.importorskip("onnxscript")
    import json

    from worldflux_registry import export

    model, *_ = _mt_inputs()
    out = export(model, "onnx", tmp_path / "mt", graphs="all")  # check=True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True, manifest["parity"]["failures"]
    for graph, entry in manifest["graphs"].items():
        assert "cond.task" in [i["name"] for i in entry["inputs"]], graph
