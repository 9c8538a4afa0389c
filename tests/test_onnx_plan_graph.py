"""The exported TD-MPC2 planner: ``worldflux-registry export ... --graphs ...,plan`` on the
imported official single-task reference writes a ``plan`` graph that passes parity, runs
behind ``OnnxWorldModel.plan_step`` like the torch ``plan_step`` (batch 1 and 3, warm starts,
deterministic and exploring), and a tampered plan graph fails parity at the plan graph.

The planner settings are cut down (2 iterations of 64 samples) so the graph exports in seconds;
the weights are the official reference's. ``worldflux-registry bench --agent`` exports and checks
the official settings (6 iterations of 512 samples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("worldflux_onnx")

from _tamper import halve_largest_weight  # noqa: E402

from worldflux_registry import ConditionPayload, State, parity, registry  # noqa: E402
from worldflux_registry.cli import main  # noqa: E402
from worldflux_registry.plugin_api import make_noise  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "official" / "tdmpc2" / "single-task"
PLANNER = {"iterations": 2, "num_samples": 64, "num_elites": 8, "num_pi_trajs": 4}
GRAPHS = "encode,transition,decode,plan"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch model, ORT model, export dir, CLI export exit code) of the imported reference."""
    from worldflux_onnx.runtime import load_artifact

    root = tmp_path_factory.mktemp("plan")
    config = {"episode_length": "500", **{k: str(v) for k, v in PLANNER.items()}}
    pairs = [x for k, v in config.items() for x in ("--config", f"{k}={v}")]
    ckpt, out = root / "ckpt", root / "onnx"
    assert (
        main(["import", "tdmpc2", str(REFERENCE / "checkpoint.pt"), "--out", str(ckpt), *pairs])
        == 0
    )
    code = main(["export", str(ckpt), "--out", str(out), "--graphs", GRAPHS])
    model = registry.load(ckpt).eval()
    return model, load_artifact(out, providers=["cpu"]), out, code


def test_cli_export_writes_a_plan_graph_that_passes_parity(exported):
    model, onnx_model, out, code = exported
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encode", "transition", "decode", "plan"}
    assert manifest["parity"]["passed"] is True
    plan = manifest["graphs"]["plan"]
    inputs = [i["name"] for i in plan["inputs"]]
    agent = model.io_contract().agent
    assert agent is not None and agent.graph == "plan"
    assert "state.latent" in inputs and "carry.plan_mean" in inputs
    assert [i for i in inputs if i.startswith("noise.")] == [f"noise.{n}" for n in plan["noise"]]
    assert plan["noise"] == [n.name for n in model.io_contract().noise_for("plan")]
    assert [o["name"] for o in plan["outputs"]] == [
        "new_carry.plan_mean",
        "out.plan_action",
        "out.plan_std",
        "out.plan_elites",
        "out.plan_elite_values",
    ]
    assert all(p["shape"][0] == "batch" for p in plan["inputs"] + plan["outputs"])
    report = parity.check(model, onnx_model, batch_sizes=(1, 3), modes=("step",))
    assert report.passed, report.failing_outputs()
    checked = {(c.output, c.batch) for c in report.checks() if c.graph == "plan"}
    assert checked == {
        (name, b)
        for name in (
            "new_carry.plan_mean",
            "out.plan_action",
            "out.plan_std",
            "out.plan_elites",
            "out.plan_elite_values",
        )
        for b in (1, 3)
    }
    # Elites compared per iteration: here every environment picks the same ones throughout.
    selections = [(c.batch, c.agreed, c.passed) for c in report.selections]
    assert selections == [(1, 1, True), (3, 3, True)]


def _noise(model, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"wf.noise.{k}": v
        for k, v in make_noise(model.io_contract(), "plan", (batch,), gen).items()
    }


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_ort_plan_step_matches_torch_over_two_warm_started_steps(exported, batch, deterministic):
    model, onnx_model, _, _ = exported
    agent = model.io_contract().agent
    # Each output's declared parity tolerance (a different elite set is off by ~0.1).
    tolerance = {s.name: s.tolerance for s in (*agent.carry, *agent.outputs)}
    obs_dim = model.io_contract().observations[0].shape[1]
    gen = torch.Generator().manual_seed(batch)
    mine = theirs = None
    with torch.no_grad():
        for step in range(2):
            obs = {"vector": torch.randn(batch, obs_dim, generator=gen)}
            cond = ConditionPayload(_noise(model, batch, 10 * batch + step))
            s = model.encode(obs)
            a = model.plan_step(
                s if mine is None else State({**s.tensors, "plan_mean": mine}),
                None,
                cond,
                deterministic,
            )
            o = onnx_model.encode(obs)
            warm = o if theirs is None else State({**o.tensors, "plan_mean": theirs})
            b = onnx_model.plan_step(warm, None, cond, deterministic)
            assert set(b.tensors) == set(a.tensors)
            for key in ("plan_action", "plan_mean", "plan_std"):
                assert b[key].shape == a[key].shape and b[key].dtype == torch.float32
                np.testing.assert_allclose(
                    b[key].numpy(),
                    a[key].numpy(),
                    *tolerance[key],
                    err_msg=f"{key} step {step}",
                )
            mine, theirs = a["plan_mean"], b["plan_mean"]


def test_deterministic_plan_is_the_zero_exploration_plan(exported):
    model, onnx_model, _, _ = exported
    extras = _noise(model, 2, 5)
    obs = {"vector": torch.randn(2, model.io_contract().observations[0].shape[1])}
    s = onnx_model.encode(obs)
    det = onnx_model.plan_step(s, None, ConditionPayload(extras), True)
    zero = {
        **extras,
        "wf.noise.plan_action_eps": torch.zeros_like(extras["wf.noise.plan_action_eps"]),
    }
    explore = onnx_model.plan_step(s, None, ConditionPayload(zero), False)
    assert torch.equal(det["plan_action"], explore["plan_action"])
    noisy = onnx_model.plan_step(s, None, ConditionPayload(extras), False)
    assert not torch.equal(det["plan_action"], noisy["plan_action"])


def test_ort_plan_step_draws_missing_noise_and_starts_from_zeros(exported):
    model, onnx_model, _, _ = exported
    obs = {"vector": torch.randn(4, model.io_contract().observations[0].shape[1])}
    out = onnx_model.plan_step(onnx_model.encode(obs))
    horizon, actions = model.config["horizon"], model.config["action_dim"]
    assert out["plan_action"].shape == (4, actions) and out["plan_mean"].shape == (
        4,
        horizon,
        actions,
    )
    assert out["plan_action"].abs().max() <= 1.0
    with pytest.raises(Exception, match="action=None"):
        onnx_model.plan_step(onnx_model.encode(obs), torch.zeros(4, actions))


def test_a_tampered_plan_graph_fails_parity_at_the_plan_graph(exported, tmp_path):
    from worldflux_onnx.runtime import load_artifact

    model, _, out, _ = exported
    bad = halve_largest_weight(out, tmp_path / "bad", "plan")
    report = parity.check(
        model, load_artifact(bad, providers=["cpu"]), batch_sizes=(1, 3), modes=("step",)
    )
    assert not report.passed
    failing = report.failing_outputs()
    assert failing and all(f.startswith("plan/") for f in failing), failing
    assert report.localization is not None and report.localization.graph == "plan"
    # The halved weights move the elites' values: no near-tie excuses it, from iteration 1.
    assert report.selections and all(not c.passed for c in report.selections)
    assert {c.first_failing_iteration for c in report.selections} == {1}
    assert not any(c.near_ties for c in report.selections)
