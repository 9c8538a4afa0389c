"""Parity checker: honest copies pass, perturbed ones fail at the right graph and output."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from worldflux_registry import (
    Capability,
    IOContract,
    LossOutput,
    ModelOutput,
    NoiseSpec,
    ParityError,
    State,
    TensorSpec,
    parity,
)
from worldflux_registry.parity import ParityReport, Tolerance
from worldflux_registry.protocol._model import WorldModel

B = "batch"


class ToyRSSM(WorldModel):
    """A small Gaussian RSSM: continuous state, explicit normal noise, every graph."""

    family = "parity-toy"
    capabilities = frozenset(
        {
            Capability.ENCODE,
            Capability.TRANSITION,
            Capability.UPDATE,
            Capability.DECODE,
            Capability.ROLLOUT,
            Capability.STOCHASTIC,
            Capability.REWARD,
        }
    )

    def __init__(self, obs_dim: int = 4, action_dim: int = 2, deter: int = 8, stoch: int = 4):
        super().__init__()
        self.config = {"obs_dim": obs_dim, "action_dim": action_dim, "deter": deter, "stoch": stoch}
        self.deter, self.stoch = deter, stoch
        torch.manual_seed(0)
        self.enc = nn.Linear(obs_dim, deter + 2 * stoch)
        self.cell = nn.Linear(deter + stoch + action_dim, deter)
        self.prior = nn.Linear(deter, 2 * stoch)
        self.post = nn.Linear(deter + obs_dim, 2 * stoch)
        self.reward = nn.Linear(deter + stoch, 1)
        self.obs_head = nn.Linear(deter + stoch, obs_dim)

    def io_contract(self) -> IOContract:
        c = self.config
        return IOContract(
            observations=(TensorSpec("vector", "float32", (B, c["obs_dim"]), low=-1, high=1),),
            state=(
                TensorSpec("deter", "float32", (B, self.deter)),
                TensorSpec("stoch", "float32", (B, self.stoch)),
            ),
            predictions=(
                TensorSpec("reward", "float32", (B,)),
                TensorSpec("obs", "float32", (B, c["obs_dim"])),
            ),
            action=TensorSpec("action", "float32", (B, c["action_dim"]), low=-1, high=1),
            noise=(NoiseSpec("z", (B, self.stoch), ("encode", "transition", "update"), "normal"),),
        )

    def _sample(self, stats, conditions, deterministic):
        mean, logstd = stats.chunk(2, dim=-1)
        if deterministic:
            return mean
        z = self.noise("z", conditions, mean.shape[0], device=mean.device)
        return mean + torch.exp(logstd.clamp(-5, 2)) * z

    def encode(self, obs, deterministic=False):
        obs, conditions = self.observations(obs)
        h = self.enc(obs["vector"])
        deter = torch.tanh(h[:, : self.deter])
        return State(
            {"deter": deter, "stoch": self._sample(h[:, self.deter :], conditions, deterministic)}
        )

    def transition(self, state, action, conditions=None, deterministic=False):
        a = self.action_tensor(action)
        deter = torch.tanh(self.cell(torch.cat([state["deter"], state["stoch"], a], -1)))
        return State(
            {"deter": deter, "stoch": self._sample(self.prior(deter), conditions, deterministic)}
        )

    def update(self, state, action, obs, conditions=None, deterministic=False):
        obs, _ = self.observations(obs)
        prior = self.transition(state, action, None, deterministic=True)
        stats = self.post(torch.cat([prior["deter"], obs["vector"]], -1))
        return State(
            {"deter": prior["deter"], "stoch": self._sample(stats, conditions, deterministic)}
        )

    def decode(self, state, conditions=None):
        feat = torch.cat([state["deter"], state["stoch"]], -1)
        return ModelOutput({"reward": self.reward(feat).squeeze(-1), "obs": self.obs_head(feat)})

    def loss(self, batch):
        return LossOutput(torch.zeros(()))


class ChaoticCategorical(WorldModel):
    """Logistic-map dynamics (error doubles per step) driving Gumbel-max categorical samples."""

    family = "parity-chaos"
    capabilities = frozenset({Capability.ENCODE, Capability.TRANSITION, Capability.DECODE})

    def __init__(self):
        super().__init__()
        self.config = {}
        torch.manual_seed(1)
        self.enc = nn.Linear(4, 8)
        self.act = nn.Linear(2, 8)
        self.logits = nn.Linear(8, 20)
        self.offset = nn.Parameter(torch.zeros(8))

    def io_contract(self) -> IOContract:
        return IOContract(
            observations=(TensorSpec("vector", "float32", (B, 4), low=-1, high=1),),
            state=(
                TensorSpec("deter", "float32", (B, 8)),
                TensorSpec("stoch", "float32", (B, 4, 5), kind="categorical", classes=5),
            ),
            predictions=(TensorSpec("reward", "float32", (B,)),),
            action=TensorSpec("action", "float32", (B, 2), low=-1, high=1),
            noise=(NoiseSpec("gumbel", (B, 4, 5), ("encode", "transition")),),
        )

    def _stoch(self, deter, conditions):
        u = self.noise("gumbel", conditions, deter.shape[0], device=deter.device)
        logits = 3.0 * self.logits(deter).view(-1, 4, 5) - torch.log(-torch.log(u))
        return nn.functional.one_hot(logits.argmax(-1), 5).float()

    def encode(self, obs, deterministic=False):
        obs, conditions = self.observations(obs)
        deter = 0.1 + 0.8 * torch.sigmoid(self.enc(obs["vector"]))
        return State({"deter": deter, "stoch": self._stoch(deter, conditions)})

    def transition(self, state, action, conditions=None, deterministic=False):
        d = state["deter"]
        d = 4.0 * d * (1.0 - d) + 1e-3 * torch.tanh(self.act(self.action_tensor(action)))
        d = (d + self.offset).clamp(1e-4, 1.0 - 1e-4)
        return State({"deter": d, "stoch": self._stoch(d, conditions)})

    def decode(self, state, conditions=None):
        classes = torch.arange(5, dtype=torch.float32)
        reward = state["deter"].sum(-1) + (state["stoch"] * classes).sum((-1, -2))
        return ModelOutput({"reward": reward})

    def loss(self, batch):
        return LossOutput(torch.zeros(()))


def perturbed(model, name, delta, index=0):
    other = copy.deepcopy(model)
    with torch.no_grad():
        dict(other.named_parameters())[name].view(-1)[index] += delta
    return other


@pytest.fixture(scope="module")
def toy():
    return ToyRSSM()


def test_honest_copy_passes_every_mode(toy):
    report = parity.check(toy, copy.deepcopy(toy))
    assert report.passed, report.failures()
    assert report.localization is None
    graphs = {c.graph for c in report.steps}
    assert graphs == {"encode", "transition", "update", "decode"}
    keys = {c.key for c in report.steps}
    assert "decode/pred.obs" in keys and "update/state.stoch" in keys
    assert {c.batch for c in report.steps} == {1, 7}
    curves = report.curves("free_running", "transition/state.deter")
    assert [len(c.steps) for c in curves] == [16, 16]
    assert all(c.metrics.max_abs == 0 for c in report.steps)


@pytest.mark.parametrize(
    ("param", "graph", "output", "clean"),
    [
        ("enc.weight", "encode", "state.deter", {"transition", "update", "decode"}),
        ("cell.weight", "transition", "state.deter", {"encode", "decode"}),
        ("post.weight", "update", "state.stoch", {"encode", "transition", "decode"}),
        ("reward.bias", "decode", "pred.reward", {"encode", "transition", "update"}),
    ],
)
def test_perturbed_parameter_fails_at_its_graph_and_output(toy, param, graph, output, clean):
    report = parity.check(toy, perturbed(toy, param, 1e-3), horizon=4)
    assert not report.passed
    loc = report.localization
    assert (loc.graph, loc.output, loc.mode, loc.step) == (graph, output, "step", None)
    assert loc.cause == "candidate"  # not ONNX: exporter and runtime cannot be told apart
    failing = {c.graph for c in report.steps if not c.passed}
    assert graph in failing and not failing & clean
    worst = max(c.metrics.max_abs for c in report.checks(f"{graph}/{output}"))
    assert 1e-5 < worst < 1e-2


def test_nan_in_candidate_is_counted_and_fails(toy):
    report = parity.check(toy, perturbed(toy, "obs_head.weight", float("nan")), horizon=3)
    assert not report.passed
    for check in report.checks("decode/pred.obs"):
        assert check.metrics.nan_candidate == check.batch  # column 0 of every row
        assert check.metrics.nan_reference == 0
        assert check.metrics.failing == check.batch
        assert not check.passed
    assert all(c.passed for c in report.checks("decode/pred.reward"))
    assert report.localization.key == "decode/pred.obs"
    json.loads(report.to_json())  # non-finite values never reach the JSON
    row = next(r for r in report.rows() if r["key"] == "decode/pred.obs" and r["mode"] == "step")
    assert row["nan"] == 8


def test_tolerance_override_changes_the_verdict(toy):
    loose_fail = perturbed(toy, "reward.bias", 1e-4)
    assert not parity.check(toy, loose_fail, horizon=3).passed
    for key in ("decode/pred.reward", "pred.reward", "decode"):
        report = parity.check(toy, loose_fail, horizon=3, tolerances={key: (0.0, 1e-3)})
        assert report.passed, key
        assert report.checks("decode/pred.reward")[0].tolerance_source == key

    tiny = perturbed(toy, "reward.bias", 1e-6)
    assert parity.check(toy, tiny, horizon=3).passed
    strict = parity.check(toy, tiny, horizon=3, tolerances={"pred.reward": Tolerance(0.0, 1e-8)})
    assert not strict.passed
    assert strict.failing_outputs() == ["decode/pred.reward"]
    exact = parity.check(toy, tiny, horizon=3, tolerances={"decode": parity.EXACT})
    assert not exact.passed
    json.loads(exact.to_json())  # an exact tolerance still gives finite ratios


def test_unknown_tolerance_key_suggests_the_closest(toy):
    with pytest.raises(ParityError, match=r"state\.deter"):
        parity.check(toy, toy, tolerances={"transition/state.detr": (1, 1)})


def test_candidate_precision_picks_the_default_tolerance(toy):
    ref = perturbed(toy, "reward.bias", 10.0)  # |reward| ~ 10: relative tolerance dominates
    half = perturbed(ref, "reward.bias", 1e-4)
    assert not parity.check(ref, half, modes=("step",)).passed
    half.precision = "fp16"  # fp16 compute behind fp32 inputs and outputs, as an fp16 export
    report = parity.check(ref, half, modes=("step",))
    assert report.passed
    assert report.settings["precision"] == "float16"
    assert report.steps[0].tolerance_source == "default:float16"
    assert report.candidate["precision"] == "float16"


def test_free_running_divergence_of_categorical_model_reports_first_failing_step():
    ref = ChaoticCategorical()
    cand = perturbed(ref, "offset", 1e-7)
    for i in range(1, 8):
        with torch.no_grad():
            cand.offset[i] += 1e-7
    report = parity.check(ref, cand, batch_sizes=(7,), horizon=40)
    assert not report.passed
    assert all(c.passed for c in report.steps)
    assert all(c.passed for c in report.curves("teacher_forced"))
    (deter,) = report.curves("free_running", "transition/state.deter")
    (stoch,) = report.curves("free_running", "transition/state.stoch")
    first = deter.first_failing_step
    assert first is not None and 2 <= first < 40
    assert all(r is not None and r <= 1 for r in deter.series("tol_ratio")[: first - 1])
    assert deter.series("tol_ratio")[first - 1] > 1
    flips = stoch.series("flip_rate")
    assert stoch.first_failing_step is not None and stoch.first_failing_step >= first
    assert flips[0] == 0 and flips[stoch.first_failing_step - 1] > 0
    assert report.first_failing_step("free_running") == first
    loc = report.localization
    assert (loc.mode, loc.cause, loc.step, loc.key) == (
        "free_running",
        "drift",
        first,
        "transition/state.deter",
    )
    lenient = parity.check(
        ref, cand, batch_sizes=(7,), horizon=40, enforce=("step", "teacher_forced")
    )
    assert lenient.passed and lenient.first_failing_step("free_running") == first


def test_contract_mismatch_raises(toy):
    with pytest.raises(ParityError, match="contract"):
        parity.check(toy, ToyRSSM(obs_dim=5))


def test_candidate_exception_is_a_failure_not_a_crash(toy):
    class Broken(ToyRSSM):
        def decode(self, state, conditions=None):
            raise RuntimeError("kernel exploded")

    broken = Broken()
    broken.load_state_dict(toy.state_dict())
    report = parity.check(toy, broken, horizon=2)
    assert not report.passed
    assert any("kernel exploded" in e for e in report.errors)
    assert report.failures("step") == ["step:decode/pred.reward", "step:decode/pred.obs"]
    # rollout() calls decode too, so free-running fails as a whole, with the error kept
    assert all(not c.passed and c.error for c in report.curves("free_running"))
    assert report.localization.graph == "decode"


def test_strict_tf32_turns_tf32_off_during_the_check_and_restores_it(toy):
    seen = []

    class Spy(ToyRSSM):
        def encode(self, obs, deterministic=False):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return super().encode(obs, deterministic)

    spy = Spy()
    spy.load_state_dict(toy.state_dict())
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        report = parity.check(toy, spy, modes=("step",), strict_tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        relaxed = parity.check(toy, spy, modes=("step",))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen[:2] == [False, False] and seen[-1] is True
    assert report.reference["tf32"] == {"matmul": False, "cudnn": False}
    assert report.settings["strict_tf32"] is True
    assert relaxed.candidate["tf32"]["matmul"] is True


def test_report_json_roundtrip_summary_table_and_plot(toy, tmp_path):
    report = parity.check(toy, perturbed(toy, "cell.weight", 1e-3), horizon=5)
    path = tmp_path / "parity.json"
    text = report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert (data["format"], data["version"], data["passed"]) == ("worldflux.parity", 1, False)
    assert data["localization"]["graph"] == "transition"
    again = ParityReport.from_json(path)
    assert again.to_dict() | {"created": 0} == report.to_dict() | {"created": 0}

    summary = report.summary()
    assert summary["passed"] is False and summary["localization"]["key"] == "transition/state.deter"
    assert "step:transition/state.deter" in summary["failures"]
    json.dumps(summary, allow_nan=False)

    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "FAIL" in text and "transition/state.deter" in text and "teacher" in text

    png = report.plot(tmp_path / "plots" / "err.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(toy, tmp_path, monkeypatch):
    report = parity.check(toy, toy, modes=("teacher_forced",), horizon=2)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"worldflux-registry\[plot\]"):
        report.plot(tmp_path / "x.png")


def test_bad_arguments_raise_parity_error(toy):
    with pytest.raises(ParityError, match="teacher_forced"):
        parity.check(toy, toy, modes=("teacher-forced",))
    with pytest.raises(ParityError, match="batch_sizes"):
        parity.check(toy, toy, batch_sizes=(0,))
    with pytest.raises(ParityError, match="precision"):
        parity.check(toy, toy, precision="fp8")


def test_compare_arrays_metrics_in_float64():
    ref = np.array([[1.0, 2.0, 0.0], [np.nan, np.inf, 4.0]])
    cand = np.array([[1.0, 2.5, 0.0], [np.nan, np.inf, np.nan]])
    m = parity.compare_arrays(ref, cand, Tolerance(0.0, 0.1))
    assert m.max_abs == 0.5 and m.worst_index == [0, 1]
    assert m.max_rel == pytest.approx(0.25)
    assert (m.nan_reference, m.nan_candidate, m.inf_reference, m.inf_candidate) == (1, 2, 1, 1)
    assert m.failing == 2 and not m.passed  # 2.5 vs 2.0, and NaN where 4.0 was expected
    probs = np.array([[0.1, 0.9], [0.6, 0.4]])
    m = parity.compare_arrays(probs, probs[:, ::-1], Tolerance(1, 1), categorical=True)
    assert m.argmax_agreement == 0.0 and not m.passed
    m = parity.compare_arrays(
        probs, probs[:, ::-1], Tolerance(1, 1, max_flip_rate=1.0), categorical=True
    )
    assert m.passed


def test_public_names():
    assert all(hasattr(parity, n) for n in parity.__all__)
    assert len(set(parity.__all__)) == len(parity.__all__)
    for name in ("check", "ParityReport", "Tolerance", "DEFAULT_TOLERANCES"):
        assert name in parity.__all__
    assert parity.DEFAULT_TOLERANCES["float32"] == Tolerance(1.3e-6, 1e-5)
    assert parity.DEFAULT_TOLERANCES["float16"] == Tolerance(1e-2, 1e-3, max_flip_rate=0.01)
    assert parity.DEFAULT_TOLERANCES["bfloat16"] == Tolerance(5e-2, 1e-2, max_flip_rate=0.02)
