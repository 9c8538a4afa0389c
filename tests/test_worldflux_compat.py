"""The protocol means what WorldFlux's means: each test pins one behaviour of the seed's API
(``/work/shared/seed-protocol-api.txt`` and WorldFlux's sources) that this project once did
differently. Deliberate differences are listed in docs/worldflux-compat.md."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pytest

torch = pytest.importorskip("torch")

import worldflux_registry as wr  # noqa: E402
from worldflux_registry import (  # noqa: E402
    ActionPayload,
    Capability,
    ConditionPayload,
    ContractError,
    IOContract,
    LossOutput,
    ModelOutput,
    Registry,
    State,
    TensorSpec,
    Trajectory,
    WorldModel,
    WorldModelInput,
)
from worldflux_registry.errors import (  # noqa: E402
    CapabilityError,
    ConfigError,
    ConfigurationError,
    ModelNotFoundError,
    ResolutionError,
    ShapeMismatchError,
    StateError,
    StateFormatError,
    ValidationError,
)


def states(n: int, batch: int = 2) -> list[State]:
    return [State({"h": torch.full((batch, 4), float(i))}) for i in range(n)]


# -- State ---------------------------------------------------------------------------------------
def test_state_clone_copies_tensors_and_meta():
    state = State({"h": torch.zeros(2, 3)}, {"step": 1})
    copy = state.clone()
    copy.tensors["h"].add_(1)
    copy.meta["step"] = 2
    assert torch.equal(state["h"], torch.zeros(2, 3)) and state.meta == {"step": 1}


def test_state_get_returns_the_default_for_a_missing_key():
    state = State({"h": torch.zeros(2, 3)})
    assert state.get("h") is state.tensors["h"]
    assert state.get("z") is None
    sentinel = torch.ones(1)
    assert state.get("z", sentinel) is sentinel


def test_empty_state_has_no_batch_size():
    with pytest.raises(StateError, match="no tensors"):
        _ = State().batch_size
    with pytest.raises(ValueError):  # WorldFlux raises a ValueError here
        _ = State().batch_size


def test_empty_state_does_not_validate():
    with pytest.raises(StateError, match="no tensors"):
        State().validate()
    with pytest.raises(ShapeMismatchError, match="batch"):
        State({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}).validate()


# -- Trajectory ----------------------------------------------------------------------------------
def test_trajectory_len_counts_states_and_horizon_counts_actions():
    traj = Trajectory(states(4), torch.zeros(3, 2, 1))
    assert len(traj) == 4
    assert traj.horizon == 3
    assert traj.batch_size == 2


def test_trajectory_to_tensor_stacks_a_state_key_over_time():
    traj = Trajectory(states(3), torch.zeros(2, 2, 1))
    stacked = traj.to_tensor("h")
    assert stacked.shape == (3, 2, 4)
    assert torch.equal(stacked[:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(StateError, match="no key 'z'"):
        traj.to_tensor("z")


def test_trajectory_to_and_detach_keep_every_field():
    leaf = torch.zeros(2, 2, requires_grad=True)
    traj = Trajectory(
        states(3), torch.zeros(2, 2, 1), rewards=leaf * 2, values=torch.zeros(3, 2),
        predictions={"reward": leaf * 3},
    )  # fmt: skip
    detached = traj.detach()
    assert not detached.rewards.requires_grad and not detached.predictions["reward"].requires_grad
    assert detached.values is not None and len(detached) == 3
    moved = traj.to("cpu")
    assert moved.rewards.device.type == "cpu" and moved.horizon == 2


def test_trajectory_errors_are_state_errors():
    with pytest.raises(StateError, match="3 states for 3 actions"):
        Trajectory(states(3), torch.zeros(3, 2, 1))
    with pytest.raises(StateError, match="at least one state"):
        Trajectory([], torch.zeros(0, 2, 1))


# -- ModelOutput, LossOutput, WorldModelInput ----------------------------------------------------
def test_model_output_fields_all_default():
    out = ModelOutput()
    assert out.predictions == {} and out.state is None
    assert out.uncertainty is None and out.aux == {}


def test_model_output_preds_is_an_alias_of_predictions():
    reward = torch.zeros(2)
    out = ModelOutput(preds={"reward": reward})
    assert out.predictions["reward"] is reward and out.preds is out.predictions
    out.preds = {"obs": reward}
    assert list(out.predictions) == ["obs"]
    assert dict(out.items()) == {"obs": reward}


def test_model_output_validate_checks_batch_consistency():
    ModelOutput({"a": torch.zeros(2, 3), "b": torch.zeros(2)}).validate()
    ModelOutput().validate()
    with pytest.raises(ShapeMismatchError, match="'b' batch size mismatch"):
        ModelOutput({"a": torch.zeros(2, 3), "b": torch.zeros(3)}).validate()
    with pytest.raises(ShapeMismatchError, match="state/predictions"):
        ModelOutput({"a": torch.zeros(2)}, state=State({"h": torch.zeros(5, 1)})).validate()


def test_loss_output_items_is_a_view_of_total_and_components():
    out = LossOutput(torch.tensor(3.0), {"a": torch.tensor(1.0)})
    assert list(dict(out.items())) == ["loss", "a"]
    assert len(out.items()) == 2


def test_world_model_input_has_context_and_action_with_defaults():
    empty = WorldModelInput()
    assert empty.observations == {} and empty.context == {} and empty.action is None
    assert isinstance(empty.conditions, ConditionPayload)
    act = ActionPayload(kind="continuous", tensor=torch.zeros(2, 1))
    given = WorldModelInput({"vector": torch.zeros(2, 3)}, {"prev": torch.zeros(2, 1)}, act)
    assert given.action is act and "prev" in given.context


# -- ConditionPayload ----------------------------------------------------------------------------
def test_condition_payload_has_worldflux_named_fields():
    goal = torch.zeros(2, 3)
    cond = ConditionPayload(text_condition=["go"], goal=goal, spatial=None, camera_pose=goal)
    assert cond.text_condition == ["go"] and cond.goal is goal and cond.camera_pose is goal
    assert cond.extras == {}
    # positional order is WorldFlux's: text_condition first
    assert ConditionPayload(["left"]).text_condition == ["left"]


def test_condition_validate_takes_worldflux_plain_dict_schemas():
    cond = ConditionPayload(extras={"wf.goal.pos": torch.zeros(2, 3)})
    assert cond.validate(strict=True, extra_schema={"wf.goal.pos": {"dtype": "float32"}}) == []
    ok_tail = {"wf.goal.pos": {"dtype": "float32", "shape": [3]}}
    assert cond.validate(strict=True, extra_schema=ok_tail) == []
    with pytest.raises(ContractError, match="trailing dims"):
        cond.validate(strict=True, extra_schema={"wf.goal.pos": {"shape": [4]}})
    with pytest.raises(ContractError, match="dtype float32, expected int64"):
        cond.validate(strict=True, extra_schema={"wf.goal.pos": {"dtype": "int64"}})


def test_lax_condition_problems_warn_with_deprecation_warning():
    cond = ConditionPayload(extras={"goal": 1})
    with pytest.warns(DeprecationWarning, match="not namespaced"):
        cond.validate()


def test_api_version_v3_turns_deprecations_into_errors():
    cond = ConditionPayload(extras={"goal": 1})
    with pytest.raises(ContractError, match="not namespaced"):
        cond.validate(api_version="v3")
    ConditionPayload(extras={"wf.goal.pos": 1}).validate(api_version="v3")
    ActionPayload(kind="continuous", tensor=torch.zeros(1, 2)).validate(api_version="v3")
    with pytest.raises(ContractError, match="hybrid"):
        ActionPayload(kind="hybrid", tensor=torch.zeros(1, 2)).validate(api_version="v3")


# -- ActionPayload -------------------------------------------------------------------------------
def test_discrete_action_in_tensor_validates():
    labels = torch.tensor([0, 3])
    payload = ActionPayload(kind="discrete", tensor=labels)
    assert payload.validate() is payload
    assert payload.primary() is labels


def test_hybrid_kind_is_deprecated_not_rejected():
    with pytest.warns(DeprecationWarning, match="hybrid"):
        ActionPayload(kind="hybrid", tensor=torch.zeros(1, 2)).validate()


def test_primary_is_the_first_set_of_tensor_tokens_latent():
    tokens = torch.tensor([[1, 2]])
    # WorldFlux's primary() ignores kind: a token payload given in `tensor` returns it
    assert ActionPayload(kind="token", tensor=tokens).primary() is tokens
    assert ActionPayload(kind="latent", latent=tokens).primary() is tokens
    assert ActionPayload(kind="text", text=["go"]).primary() is None
    assert ActionPayload().primary() is None


# -- exceptions ----------------------------------------------------------------------------------
def test_worldflux_exception_names_catch_this_projects_errors():
    assert ValidationError is ContractError
    assert ModelNotFoundError is ResolutionError
    assert ConfigurationError is ConfigError
    assert issubclass(StateFormatError, StateError) and issubclass(StateError, ContractError)
    for name in (
        "StateError",
        "ValidationError",
        "ShapeMismatchError",
        "CapabilityError",
        "ModelNotFoundError",
        "ConfigurationError",
    ):
        assert name in wr.__all__ and name in wr.errors.__all__, name
    with pytest.raises(ModelNotFoundError):
        Registry(entry_points=False).get("nope")
    with pytest.raises(StateError):  # a malformed payload, caught as WorldFlux users catch it
        State.deserialize(b"nope")
    err = ShapeMismatchError("batch mismatch", expected=(3,), got=(2,))
    assert (err.expected, err.got) == ((3,), (2,)) and "expected (3,), got (2,)" in str(err)


# -- WorldModel: only loss is abstract; rollout squeezes a [batch, 1] reward --------------------
CONTRACT = IOContract(
    observations=(TensorSpec("vector", "float32", ("batch", 3)),),
    action=TensorSpec("action", "float32", ("batch", 2)),
    state=(TensorSpec("h", "float32", ("batch", 4)),),
    predictions=(TensorSpec("reward", "float32", ("batch", 1)),),
)


class LossOnly(WorldModel):
    """A model implementing only ``loss``: WorldFlux can build it."""

    capabilities = frozenset({Capability.LOSS})

    def io_contract(self) -> IOContract:
        return CONTRACT

    def loss(self, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        return LossOutput(torch.zeros(()))


class ColumnReward(LossOnly):
    """Predicts its reward laid out [batch, 1]."""

    capabilities = frozenset({Capability.TRANSITION, Capability.DECODE, Capability.ROLLOUT})

    def transition(self, state, action, conditions=None, deterministic=False):
        return State({"h": state["h"] + self.action_tensor(action).sum(-1, keepdim=True)})

    def decode(self, state, conditions=None):
        return ModelOutput({"reward": state["h"][:, :1]})


def test_a_model_implementing_only_loss_can_be_built():
    model = LossOnly()
    state = State({"h": torch.zeros(2, 4)})
    with pytest.raises(NotImplementedError, match="encode"):
        model.encode(torch.zeros(2, 3))
    with pytest.raises(NotImplementedError, match="transition"):
        model.transition(state, torch.zeros(2, 2))
    with pytest.raises(CapabilityError, match="decoder"):
        model.decode(state)
    with pytest.raises(CapabilityError):  # also ours: encode's error is a CapabilityError
        model.encode(torch.zeros(2, 3))


def test_rollout_squeezes_a_column_reward_to_time_by_batch():
    model = ColumnReward()
    traj = model.rollout(State({"h": torch.zeros(2, 4)}), torch.ones(5, 2, 2))
    assert traj.rewards.shape == (5, 2)
    assert traj.predictions["reward"].shape == (5, 2, 1)  # the contract's own layout, stacked
    assert torch.equal(traj.rewards[:, 0], torch.arange(2.0, 12.0, 2.0))


def test_validation_is_silent_for_outputs_that_follow_the_contract():
    model = ColumnReward()
    model.validate_outputs = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.rollout(State({"h": torch.zeros(2, 4)}), torch.ones(3, 2, 2))
