"""Side conditions (`IOContract.conditions`) through export, ONNX Runtime and parity.

A goal-conditioned toy model reads its ``goal`` in ``transition`` and ``decode`` but not in
``encode``: the exported graphs take ``cond.goal`` exactly where the steps read it, ONNX Runtime
agrees with torch given the same goal, and a missing or malformed goal is a clear error.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_onnx_export import assert_agree  # noqa: E402
from torch import nn  # noqa: E402

from worldflux_registry import (  # noqa: E402
    Capability,
    ConditionPayload,
    ContractError,
    IOContract,
    LossOutput,
    ModelOutput,
    NoiseSpec,
    State,
    TensorSpec,
    WorldModel,
    condition_key,
    export,
    parity,
)
from worldflux_registry.protocol._inputs import (  # noqa: E402
    encode_input,
    make_actions,
    make_conditions,
    make_noise,
    make_observations,
    noise_conditions,
)

GOAL = condition_key("goal")
CONTRACT = IOContract(
    observations=(TensorSpec("vector", "float32", ("batch", 5)),),
    state=(TensorSpec("h", "float32", ("batch", 8)),),
    predictions=(
        TensorSpec("reward", "float32", ("batch",)),
        TensorSpec("vector", "float32", ("batch", 5)),
    ),
    action=TensorSpec("action", "float32", ("batch", 2), low=-1.0, high=1.0),
    conditions=(TensorSpec("goal", "float32", ("batch", 3)),),
    noise=(NoiseSpec("transition", ("batch", 8), graphs=("transition",), distribution="normal"),),
).validate()


class GoalModel(WorldModel):
    """A goal-conditioned latent model: the goal steers the dynamics and the reward."""

    family = "goaltoy"
    capabilities = frozenset(
        {Capability.ENCODE, Capability.TRANSITION, Capability.DECODE, Capability.ROLLOUT}
    )

    def __init__(self) -> None:
        super().__init__()
        self.config = {}
        self.enc = nn.Linear(5, 8)
        self.dyn = nn.Linear(8 + 2 + 3, 8)
        self.dec = nn.Linear(8, 5)
        self.rew = nn.Linear(8 + 3, 1)

    def io_contract(self):
        return CONTRACT

    def _goal(self, conditions):
        goal = self.condition("goal", conditions)
        if goal is None:
            raise ContractError(f"GoalModel needs the side condition {GOAL!r}")
        return goal

    def encode(self, obs, deterministic=False):
        obs, _ = self.observations(obs)
        return State({"h": torch.tanh(self.enc(obs["vector"]))})

    def transition(self, state, action, conditions=None, deterministic=False):
        x = torch.cat([state["h"], self.action_tensor(action), self._goal(conditions)], -1)
        h = torch.tanh(self.dyn(x))
        if not deterministic:
            h = h + 0.1 * self.noise("transition", conditions, h.shape[0], device=h.device)
        return State({"h": h})

    def decode(self, state, conditions=None):
        h = state["h"]
        reward = self.rew(torch.cat([h, self._goal(conditions)], -1)).squeeze(-1)
        return ModelOutput({"reward": reward, "vector": self.dec(h)})

    def loss(self, batch):
        return LossOutput(torch.zeros(()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from worldflux_onnx.runtime import load_artifact

    torch.manual_seed(0)
    model = GoalModel().eval()
    out = tmp_path_factory.mktemp("goal") / "export"
    export(
        model,
        "onnx",
        out,
        graphs=("encode", "transition", "decode", "rollout"),
        rollout_horizon=3,
        check=False,
    )
    return model, out, load_artifact(out, providers=["cpu"])


def _inputs(batch, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    obs = make_observations(CONTRACT, (batch,), gen)
    actions = make_actions(CONTRACT, (steps, batch), gen)
    noise = make_noise(CONTRACT, "transition", (steps, batch), gen)
    conds = make_conditions(CONTRACT, (batch,), gen)
    return obs, actions, noise, conds


def test_graphs_take_the_condition_only_where_the_step_reads_it(exported):
    _, out, _ = exported
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    names = {g: [i["name"] for i in e["inputs"]] for g, e in graphs.items()}
    assert "cond.goal" not in names["encode"]
    assert names["transition"] == ["state.h", "action", "cond.goal", "noise.transition"]
    assert names["decode"] == ["state.h", "cond.goal"]
    assert names["rollout"] == ["state.h", "actions", "cond.goal", "noise.transition"]
    shape = next(i["shape"] for i in graphs["rollout"]["inputs"] if i["name"] == "cond.goal")
    assert shape == ["batch", 3]  # no time axis: a condition holds for the whole rollout


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_and_rollouts_match_torch_given_the_same_goal(exported, batch):
    model, _, onnx_model = exported
    obs, actions, noise, conds = _inputs(batch)
    with torch.no_grad():
        start = model.encode(encode_input(obs, {}, conds))
        step = noise_conditions({k: v[0] for k, v in noise.items()}, conds)
        want = model.transition(start, actions[0], step)
        want_pred = model.decode(want, step).predictions
        want_traj = model.rollout(start, actions, noise_conditions(noise, conds))
    got = onnx_model.transition(start, actions[0], step)
    assert_agree("transition", CONTRACT.state, want.tensors, got.tensors)
    got_pred = onnx_model.decode(got, step).predictions
    assert_agree("decode", CONTRACT.predictions, want_pred, got_pred)
    got_traj = onnx_model.rollout(start, actions, noise_conditions(noise, conds))  # 3 fused + 1
    assert_agree("rollout", CONTRACT.predictions, want_traj.predictions, got_traj.predictions)
    other = noise_conditions({k: v[0] for k, v in noise.items()}, {"goal": conds["goal"] + 1})
    moved = onnx_model.decode(got, other).predictions["reward"]
    assert not torch.allclose(moved, got_pred["reward"])  # the goal is really an input


def test_missing_or_malformed_goal_is_a_contract_error_naming_it(exported):
    _, _, onnx_model = exported
    obs, actions, noise, _ = _inputs(2)
    start = onnx_model.encode(obs)
    only_noise = noise_conditions({k: v[0] for k, v in noise.items()})
    with pytest.raises(ContractError, match=r"wf\.cond\.goal") as info:
        onnx_model.transition(start, actions[0], only_noise)
    assert "ConditionPayload" in info.value.hint
    wrong = ConditionPayload({**only_noise.extras, GOAL: torch.zeros(2, 4)})
    with pytest.raises(ContractError, match=r"wf\.cond\.goal"):
        onnx_model.transition(start, actions[0], wrong)
    wrong_batch = ConditionPayload({**only_noise.extras, GOAL: torch.zeros(5, 3)})
    with pytest.raises(ContractError, match="batch 2"):
        onnx_model.decode(start, wrong_batch)


def test_parity_feeds_the_same_goal_to_both_sides(exported):
    model, _, onnx_model = exported
    report = parity.check(model, onnx_model, batch_sizes=(1, 3), horizon=3)
    assert report.passed, report.failures()
    assert {c.graph for c in report.steps} == {"encode", "transition", "decode"}


def test_undeclared_condition_names_are_refused(exported):
    model, _, _ = exported
    with pytest.raises(ContractError, match="not a declared side condition"):
        model.condition("target", None)


def test_bench_times_a_conditioned_export_after_parity(exported):
    from worldflux_registry import bench as _bench

    model, out, _ = exported
    run = _bench.run(
        out,
        reference=model,
        backends=["torch", "ort-cpu", "ort-cpu-fused"],
        device="cpu",
        horizon=3,
        warmup=1,
        repeats=2,
        rollout_repeats=2,
        min_repeats=2,
    )
    for result in run.results:
        assert result.status == "ok", (result.backend, result.reason)
        assert result.backend == "torch" or result.parity["passed"]
