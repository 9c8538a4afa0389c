"""The WorldModel protocol and its payloads, on a small model written here."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from torch import nn

from worldflux_registry import (
    ActionPayload,
    Capability,
    CapabilityError,
    ConditionPayload,
    ContractError,
    IOContract,
    LossOutput,
    ModelOutput,
    NoiseSpec,
    State,
    TensorSpec,
    Trajectory,
    WorldModel,
    WorldModelInput,
)

CONTRACT = IOContract(
    observations=(TensorSpec("vector", "float32", ("batch", 3)),),
    state=(TensorSpec("h", "float32", ("batch", 4)),),
    predictions=(
        TensorSpec("vector", "float32", ("batch", 3)),
        TensorSpec("reward", "float32", ("batch",)),
    ),
    action=TensorSpec("action", "float32", ("batch", 2), low=-1.0, high=1.0),
    noise=(NoiseSpec("prior", ("batch", 4), graphs=("transition",), distribution="normal"),),
    targets=(TensorSpec("reward", "float32", ("batch",)),),
).validate()


class LinearModel(WorldModel):
    capabilities = frozenset({Capability.ENCODE, Capability.TRANSITION, Capability.DECODE})

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.dyn = nn.Linear(6, 4)
        self.dec = nn.Linear(4, 4)

    def io_contract(self) -> IOContract:
        return CONTRACT

    def encode(self, obs, deterministic=False):
        obs, _ = self.observations(obs)
        return State({"h": torch.tanh(self.enc(obs["vector"]))})

    def transition(self, state, action, conditions=None, deterministic=False):
        a = self.action_tensor(action)
        h = torch.tanh(self.dyn(torch.cat([state["h"], a], -1)))
        if not deterministic:
            h = h + 0.1 * self.noise("prior", conditions, h.shape[0], device=h.device)
        return State({"h": h})

    def decode(self, state, conditions=None):
        out = self.dec(state["h"])
        return ModelOutput({"vector": out[:, :3], "reward": out[:, 3]})

    def loss(self, batch):
        return LossOutput(torch.zeros(()))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LinearModel().eval()


def test_default_rollout_stacks_predictions_and_keeps_the_invariant(model):
    state = model.encode(torch.randn(5, 3))
    actions = torch.rand(7, 5, 2) * 2 - 1
    traj = model.rollout(state, actions, deterministic=True)
    assert len(traj.states) == 8 and len(traj) == 8 and traj.horizon == 7
    assert traj.rewards.shape == (7, 5)
    assert traj.predictions["vector"].shape == (7, 5, 3)
    # Step t of the rollout is exactly transition + decode from step t-1.
    s2 = model.transition(traj.states[1], actions[1], deterministic=True)
    torch.testing.assert_close(traj.states[2]["h"], s2["h"], rtol=0, atol=0)
    torch.testing.assert_close(traj.rewards[1], model.decode(s2)["reward"], rtol=0, atol=0)


def test_rollout_slices_time_major_noise_per_step(model):
    state = model.encode(torch.randn(2, 3))
    actions = torch.zeros(3, 2, 2)
    noise = torch.randn(3, 2, 4)
    traj = model.rollout(state, actions, ConditionPayload({"wf.noise.prior": noise}))
    again = model.rollout(state, actions, ConditionPayload({"wf.noise.prior": noise}))
    torch.testing.assert_close(traj.states[-1]["h"], again.states[-1]["h"], rtol=0, atol=0)
    expected = model.transition(state, actions[0], ConditionPayload({"wf.noise.prior": noise[0]}))
    torch.testing.assert_close(traj.states[1]["h"], expected["h"], rtol=0, atol=0)
    other = model.rollout(state, actions, ConditionPayload({"wf.noise.prior": noise + 1}))
    assert not torch.equal(other.states[1]["h"], traj.states[1]["h"])


def test_rollout_rejects_unknown_modes(model):
    state = model.encode(torch.randn(1, 3))
    with pytest.raises(CapabilityError, match="rollout mode 'teacher'"):
        model.rollout(state, torch.zeros(2, 1, 2), mode="teacher")


def test_noise_of_the_wrong_shape_is_named(model):
    state = model.encode(torch.randn(2, 3))
    bad = ConditionPayload({"wf.noise.prior": torch.zeros(2, 5)})
    with pytest.raises(ContractError, match=r"wf\.noise\.prior.*\(2, 5\)"):
        model.transition(state, torch.zeros(2, 2), bad)


def test_validate_state_contract_checks_keys_shapes_and_dtypes(model):
    model.validate_state_contract(State({"h": torch.zeros(2, 4)}))
    with pytest.raises(ContractError, match=r"missing keys \['h'\].*unexpected keys \['z'\]"):
        model.validate_state_contract(State({"z": torch.zeros(2, 4)}))
    with pytest.raises(ContractError, match=r"state 'h' has shape \(2, 5\)"):
        model.validate_state_contract(State({"h": torch.zeros(2, 5)}))
    with pytest.raises(ContractError, match="dtype float64, expected float32"):
        model.validate_state_contract(State({"h": torch.zeros(2, 4, dtype=torch.float64)}))


def test_validate_batch_contract_wants_batch_time_layout(model):
    good = {
        "vector": torch.zeros(4, 6, 3),
        "action": torch.zeros(4, 6, 2),
        "reward": torch.zeros(4, 6),
    }
    model.validate_batch_contract(good)
    with pytest.raises(ContractError, match="missing keys"):
        model.validate_batch_contract({"vector": torch.zeros(4, 6, 3)})
    with pytest.raises(ContractError, match="time=5 but another tensor has time=6"):
        model.validate_batch_contract({**good, "reward": torch.zeros(4, 5)})
    with pytest.raises(ContractError, match="dtype int64"):
        model.validate_batch_contract({**good, "action": torch.zeros(4, 6, 2, dtype=torch.long)})


def test_require_names_what_is_supported(model):
    assert model.supports("encode") and not model.supports(Capability.LOSS)
    model.require("transition")
    with pytest.raises(CapabilityError, match="does not support 'update'"):
        model.require(Capability.UPDATE)
    with pytest.raises(CapabilityError, match="does not implement update"):
        model.update(State({"h": torch.zeros(1, 4)}), torch.zeros(1, 2), torch.zeros(1, 3))


def test_inputs_accept_payloads_and_the_async_variants_agree(model):
    obs = torch.randn(2, 3)
    s1 = model.encode(WorldModelInput({"vector": obs}))
    s2 = asyncio.run(model.async_encode(obs))
    torch.testing.assert_close(s1["h"], s2["h"])
    action = ActionPayload(kind="continuous", tensor=torch.zeros(2, 2))
    t1 = model.transition(s1, action, deterministic=True)
    t2 = asyncio.run(model.async_transition(s1, torch.zeros(2, 2), None, True))
    torch.testing.assert_close(t1["h"], t2["h"])
    out = model.sample_step(s1, action, deterministic=True)
    torch.testing.assert_close(out.state["h"], t1["h"])
    traj = asyncio.run(model.async_rollout(s1, torch.zeros(2, 2, 2), deterministic=True))
    assert traj.horizon == 2


def test_contract_fingerprint_comes_from_the_contract(model):
    assert model.contract_fingerprint() == CONTRACT.fingerprint()


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (ActionPayload(kind="jump"), "unknown action kind 'jump'"),
        (
            ActionPayload(kind="continuous", tensor=torch.zeros(1), discrete=torch.zeros(1)),
            "several primary fields",
        ),
        (ActionPayload(kind="continuous", tokens=torch.zeros(1)), "takes field tensor"),
        (ActionPayload(kind="none", text=["go"]), "kind 'none' but field 'text'"),
    ],
)
def test_action_payload_validation(payload, needle):
    with pytest.raises(ContractError) as info:
        payload.validate()
    assert needle in str(info.value)


def test_action_payload_api_version_is_checked():
    ActionPayload(kind="text", text=["left"]).validate(api_version="v0.1")
    with pytest.raises(ContractError, match="unsupported api_version 'v9'"):
        ActionPayload().validate(api_version="v9")


def test_condition_payload_warns_when_lax_and_raises_when_strict():
    payload = ConditionPayload({"goal": 1, "wf.goal.pos": torch.zeros(2, 3)})
    with pytest.warns(DeprecationWarning, match="'goal' is not namespaced"):
        problems = payload.validate()
    assert len(problems) == 1
    with pytest.raises(ContractError, match="not namespaced"):
        payload.validate(strict=True)
    ok = ConditionPayload({"wf.goal.pos": torch.zeros(2, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ok.validate(strict=True, allowed_extra_keys={"wf.goal.pos"}) == []
    with pytest.raises(ContractError, match="is not allowed"):
        ok.validate(strict=True, allowed_extra_keys={"wf.goal.vel"})
    schema = {"wf.goal.pos": TensorSpec("pos", "float32", ("batch", 2))}
    with pytest.raises(ContractError, match=r"shape \(2, 3\), expected \('batch', 2\)"):
        ok.validate(strict=True, extra_schema=schema)


def test_loss_output_items_lists_total_then_components():
    out = LossOutput(torch.tensor(3.0), {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    assert [k for k, _ in out.items()] == ["loss", "a", "b"]


def test_trajectory_enforces_its_invariants():
    states = [State({"h": torch.zeros(2, 4)}) for _ in range(3)]
    Trajectory(states, torch.zeros(2, 2, 1), rewards=torch.zeros(2, 2))
    with pytest.raises(ContractError, match="3 states for 3 actions"):
        Trajectory(states, torch.zeros(3, 2, 1))
    with pytest.raises(ContractError, match="batch 2, actions have 5"):
        Trajectory(states, torch.zeros(2, 5, 1))
    with pytest.raises(ContractError, match="values has 2 steps, expected 3"):
        Trajectory(states, torch.zeros(2, 2, 1), values=torch.zeros(2, 2))


def test_state_validate_checks_batch_consistency_and_allows_scalars():
    State({"h": torch.zeros(2, 4), "t": torch.tensor(3)}).validate()
    with pytest.raises(ContractError, match="'z' has batch 3 but 'h' has batch 2"):
        State({"h": torch.zeros(2, 4), "z": torch.zeros(3)}).validate()
