"""The agent step in the contract (`AgentSpec`) and the new noise distributions."""

from __future__ import annotations

import pytest

from worldflux_registry import AgentSpec, ContractError, IOContract, NoiseSpec, TensorSpec, registry

OBS = (TensorSpec("vector", "float32", ("batch", 4)),)
STATE = (TensorSpec("latent", "float32", ("batch", 8)),)
MEAN = TensorSpec("plan_mean", "float32", ("batch", 3, 2))
ACTION = TensorSpec("plan_action", "float32", ("batch", 2), low=-1.0, high=1.0)
NOISE = (
    NoiseSpec("eps", ("batch", 2), ("plan",), "normal"),
    NoiseSpec("heads", ("batch", 4, 2), ("plan",), "permutation", "int64", 5),
    NoiseSpec("gumbel", ("batch", 6), ("plan",), "exponential"),
)


def contract(**agent) -> IOContract:
    spec = AgentSpec(
        **{"graph": "plan", "action": "plan_action", "outputs": (ACTION,), "carry": (MEAN,)} | agent
    )
    return IOContract(observations=OBS, state=STATE, predictions=(), noise=NOISE, agent=spec)


def test_agent_round_trips_and_is_fingerprinted():
    c = contract(explore=("eps",)).validate()
    assert IOContract.from_dict(c.to_dict()) == c
    plain = IOContract(observations=OBS, state=STATE, predictions=(), noise=NOISE)
    assert "agent" not in plain.to_dict()
    assert c.fingerprint() != plain.fingerprint()
    assert c.agent is not None and c.agent.action_spec == ACTION


def test_optional_fields_leave_old_fingerprints_unchanged():
    old = IOContract(
        observations=OBS,
        state=STATE,
        predictions=(),
        noise=(NoiseSpec("prior", ("batch", 4), ("transition",)),),
    )
    # The canonical JSON of a contract without the new fields is what it always was.
    assert old.canonical_json() == (
        '{"noise":[{"graphs":["transition"],"name":"prior","shape":["batch",4]}],'
        '"observations":[{"dtype":"float32","name":"vector","shape":["batch",4]}],'
        '"predictions":[],"state":[{"dtype":"float32","name":"latent","shape":["batch",8]}]}'
    )


@pytest.mark.parametrize(
    ("agent", "match"),
    [
        ({"graph": "imagine"}, "agent graph"),
        ({"action": "missing"}, "not one of its outputs"),
        ({"explore": ("nope",)}, "explore noise"),
        ({"carry": (MEAN, MEAN)}, "declared twice"),
        ({"selection": ("plan_action",)}, "agent selection"),
        ({"selection": ("plan_action", "nope")}, "agent selection"),
    ],
)
def test_bad_agent_specs_are_named(agent, match):
    with pytest.raises(ContractError, match=match):
        contract(**agent).validate()


@pytest.mark.parametrize(
    "noise",
    [
        NoiseSpec("p", ("batch", 2), ("plan",), "permutation", "float32", 5),
        NoiseSpec("p", ("batch", 6), ("plan",), "permutation", "int64", 5),
        NoiseSpec("p", ("batch", 2), ("plan",), "permutation", "int64"),
        NoiseSpec("p", ("batch", 2), ("plan",), "normal", classes=3),
    ],
)
def test_bad_permutation_noise_is_refused(noise):
    with pytest.raises(ContractError):
        noise.validate()


def test_new_distributions_draw_what_they_declare():
    torch = pytest.importorskip("torch")
    from worldflux_registry.plugin_api import make_noise, sample_noise

    gen = torch.Generator().manual_seed(0)
    drawn = make_noise(contract(), "plan", (7,), gen)
    heads = drawn["heads"]
    assert heads.shape == (7, 4, 2) and heads.dtype == torch.int64
    assert heads.min() >= 0 and heads.max() < 5 and (heads[..., 0] != heads[..., 1]).all()
    assert drawn["gumbel"].shape == (7, 6) and (drawn["gumbel"] > 0).all()
    again = make_noise(contract(), "plan", (7,), torch.Generator().manual_seed(0))
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    wide = sample_noise(NOISE[1], (2000, 2))
    counts = torch.bincount(wide.flatten(), minlength=5)
    assert counts.min() > 600  # every head is chosen, about equally often


def test_tdmpc2_declares_its_plan_step_and_noise():
    family = registry.get("tdmpc2")
    c = family.contract_for(family.config("ci")).validate()
    assert c.agent is not None and c.agent.graph == "plan"
    assert [s.name for s in c.agent.carry] == ["plan_mean"]
    assert c.agent.action == "plan_action" and c.agent.explore == ("plan_action_eps",)
    assert c.agent.selection == ("plan_elites", "plan_elite_values")
    names = [n.name for n in c.noise_for("plan")]
    assert names == [
        "plan_pi_eps",
        "plan_sample_eps",
        "plan_value_eps",
        "plan_q_heads",
        "plan_gumbel_exp",
        "plan_action_eps",
    ]
    assert not c.noise_for("encode") and not c.noise_for("transition")


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_dreamerv3_declares_its_act_step_and_noise(kind):
    family = registry.get("dreamerv3")
    c = family.contract_for({**family.config("ci"), "action_kind": kind}).validate()
    assert c.agent is not None and c.agent.graph == "act" and c.agent.action == "action"
    assert [s.name for s in c.agent.carry] == ["deter", "stoch", "prev_action"]
    assert c.agent.explore == ("posterior", "act_action") and not c.agent.selection
    noise = {n.name: n for n in c.noise_for("act")}
    assert list(noise) == ["posterior", "act_action"]
    assert noise["act_action"].distribution == ("uniform" if kind == "discrete" else "normal")
    action = c.agent.action_spec
    assert (action.dtype, len(action.shape)) == (
        ("int32", 1) if kind == "discrete" else ("float32", 2)
    )
    # The posterior noise is shared with encode and update, as before.
    assert [n.name for n in c.noise_for("update")] == ["posterior"]
