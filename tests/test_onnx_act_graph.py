"""The exported DreamerV3 actor: ``export(..., graphs=[..., "act"])`` (and ``--graphs ...,act``)
writes an ``act`` graph (posterior update + actor sample, noise as inputs) that passes parity
and runs behind ``OnnxWorldModel.act_step`` like the torch ``act_step``: over consecutive steps
with each side carrying its own state, with a reset row, exploring and deterministic. A tampered
act graph fails parity at the act graph. Checked on ``dreamerv3:ci`` and on both imported
official checkpoints (continuous bounded-normal and discrete categorical actors).
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
from rich.console import Console  # noqa: E402

from worldflux_registry import ConditionPayload, State, export, parity, registry  # noqa: E402
from worldflux_registry.cli import main  # noqa: E402
from worldflux_registry.plugin_api import make_noise, make_observations  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "official" / "dreamerv3"
OFFICIAL = {"vector-image-continuous": "continuous", "image-discrete": "discrete"}
ACT_OUTPUTS = ("new_carry.deter", "new_carry.stoch", "new_carry.prev_action", "out.action")


@pytest.fixture(scope="module")
def ci(tmp_path_factory):
    """(torch model, ORT model, export dir) of ``dreamerv3:ci`` with encode + act."""
    from worldflux_onnx.runtime import load_artifact

    torch.set_num_threads(1)
    model = registry.load("dreamerv3:ci").eval()
    out = tmp_path_factory.mktemp("act") / "onnx"
    export(model, "onnx", out, graphs=["encode", "act"])
    return model, load_artifact(out, providers=["cpu"]), out


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def official(request, tmp_path_factory):
    """(case, torch model, ORT model, CLI export exit code, export dir) of an imported official
    checkpoint, exported with ``--graphs encode,act``."""
    from worldflux_onnx.runtime import load_artifact

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    ckpt, out = root / "ckpt", root / "onnx"
    source = DATA / request.param / "checkpoint"
    kind = OFFICIAL[request.param]
    args = [
        "import",
        "dreamerv3",
        str(source),
        "--out",
        str(ckpt),
        "--config",
        f"action_kind={kind}",
    ]
    assert main(args) == 0
    code = main(["export", str(ckpt), "--out", str(out), "--graphs", "encode,act"])
    model = registry.load(ckpt).eval()
    return request.param, model, load_artifact(out, providers=["cpu"]), code, out


def _noise(model, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = make_noise(model.io_contract(), "act", (batch,), gen)
    return ConditionPayload({f"wf.noise.{k}": v for k, v in noise.items()})


def _episode(model, onnx_model, obs, steps, deterministic, reset_row=None):
    """Both sides over ``steps`` act calls, each carrying its own state; yields both outputs."""
    a = b = None
    for t in range(steps):
        cond = _noise(model, next(iter(obs.values())).shape[0], t)
        if reset_row is not None and t == 1:
            # A new episode in one environment: zero its carry rows on both sides.
            for carry in (a, b):
                for value in carry.tensors.values():
                    value[reset_row] = 0
        with torch.no_grad():
            a = model.act_step(obs, a, cond, deterministic)
            b = onnx_model.act_step(obs, b, cond, deterministic)
        yield a, b


def _assert_same_step(a, b, discrete):
    assert a.tensors.keys() == b.tensors.keys() == {"deter", "stoch", "prev_action", "action"}
    assert torch.equal(a["stoch"], b["stoch"])  # the same posterior sample
    torch.testing.assert_close(b["deter"], a["deter"], rtol=1e-4, atol=1e-5)
    if discrete:
        assert b["action"].dtype == torch.int32 and torch.equal(a["action"], b["action"])
    else:
        torch.testing.assert_close(b["action"], a["action"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["prev_action"], a["prev_action"], rtol=1e-4, atol=1e-5)


def test_export_writes_an_act_graph_of_the_declared_signature(ci):
    model, _, out = ci
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encode", "act"}
    assert manifest["parity"]["passed"] is True
    act = manifest["graphs"]["act"]
    assert [i["name"] for i in act["inputs"]] == [
        "obs.vector",
        "carry.deter",
        "carry.stoch",
        "carry.prev_action",
        "noise.posterior",
        "noise.act_action",
    ]
    assert [o["name"] for o in act["outputs"]] == list(ACT_OUTPUTS)
    assert act["noise"] == [n.name for n in model.io_contract().noise_for("act")]
    assert all(p["shape"][0] == "batch" for p in act["inputs"] + act["outputs"])


def test_parity_covers_every_act_output_at_every_batch(ci):
    model, onnx_model, _ = ci
    report = parity.check(model, onnx_model, batch_sizes=(1, 3), modes=("step",))
    assert report.passed, report.failing_outputs()
    checked = {(c.output, c.batch) for c in report.checks() if c.graph == "act"}
    assert checked == {(name, b) for name in ACT_OUTPUTS for b in (1, 3)}
    saved = json.loads(report.to_json())
    assert {s["output"] for s in saved["steps"] if s["graph"] == "act"} == set(ACT_OUTPUTS)
    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert all(name in text for name in ACT_OUTPUTS), text


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_ort_act_matches_torch_over_consecutive_steps(ci, batch, deterministic):
    model, onnx_model, _ = ci
    obs = make_observations(model.io_contract(), (batch,), torch.Generator().manual_seed(batch))
    steps = list(_episode(model, onnx_model, obs, 3, deterministic, 0 if batch > 1 else None))
    for a, b in steps:
        _assert_same_step(a, b, discrete=False)
    # The carry matters: the third step does not repeat the first.
    assert not torch.equal(steps[0][0]["deter"], steps[2][0]["deter"])


def test_ort_act_deterministic_is_the_zero_noise_step(ci):
    model, onnx_model, _ = ci
    obs = make_observations(model.io_contract(), (4,), torch.Generator().manual_seed(0))
    noise = _noise(model, 4, 0)
    zeros = ConditionPayload({k: torch.zeros_like(v) for k, v in noise.extras.items()})
    with torch.no_grad():
        det = onnx_model.act_step(obs, None, noise, True)
        zero = onnx_model.act_step(obs, None, zeros, False)
        noisy = onnx_model.act_step(obs, None, noise, False)
        mode = model.act_step(obs, None, None, True)
    assert torch.equal(det["action"], zero["action"]) and torch.equal(det["stoch"], zero["stoch"])
    torch.testing.assert_close(det["action"], mode["action"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(det["action"], noisy["action"])


def test_ort_act_draws_missing_noise_and_starts_from_zeros(ci):
    _, onnx_model, _ = ci
    obs = {"vector": torch.randn(2, 4)}
    out = onnx_model.act_step(obs)
    assert out["action"].shape == (2, 2) and out["stoch"].sum(-1).eq(1).all()


def test_a_tampered_act_graph_fails_parity_at_the_act_graph(ci, tmp_path):
    from worldflux_onnx.runtime import load_artifact

    model, _, out = ci
    bad = halve_largest_weight(out, tmp_path / "bad", "act")
    report = parity.check(
        model, load_artifact(bad, providers=["cpu"]), batch_sizes=(1, 3), modes=("step",)
    )
    assert not report.passed
    failing = report.failing_outputs()
    assert failing and all(f.startswith("act/") for f in failing), failing


def test_official_checkpoint_exports_an_act_graph_that_acts_like_torch(official):
    name, model, onnx_model, code, out = official
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True and "act" in manifest["graphs"]
    ref = np.load(DATA / name / "cases.npz")
    obs = {"image": torch.from_numpy(ref["in_obs_image"])}
    if "vector" in model.obs_keys:
        obs["vector"] = torch.from_numpy(ref["in_obs_vector"])
    discrete = OFFICIAL[name] == "discrete"
    for deterministic in (False, True):
        for a, b in _episode(model, onnx_model, obs, 3, deterministic, reset_row=1):
            _assert_same_step(a, b, discrete)
    if discrete:
        assert a["prev_action"].sum(-1).eq(1).all()  # the one-hot of the index
        assert torch.equal(a["prev_action"].argmax(-1).int(), a["action"])


def test_official_act_is_the_official_policy_step_with_zeroed_reset_rows(official):
    name, model, _, _, _ = official
    ref = np.load(DATA / name / "cases.npz")
    obs = {"image": torch.from_numpy(ref["in_obs_image"])}
    if "vector" in model.obs_keys:
        obs["vector"] = torch.from_numpy(ref["in_obs_vector"])
    reset = torch.from_numpy(ref["in_reset"])
    prev = torch.from_numpy(ref["in_prevact"])
    deter, stoch = torch.from_numpy(ref["in_deter"]), torch.from_numpy(ref["in_stoch"])
    cond = _noise(model, 3, 5)
    keep = (~reset).float()
    carry = State(
        {
            "deter": deter * keep[:, None],
            "stoch": stoch * keep[:, None, None],
            "prev_action": model.action_embedding(prev) * keep[:, None],
        }
    )
    with torch.no_grad():
        got = model.act_step(obs, carry, cond)
        state, action = model.policy_step(
            State({"deter": deter, "stoch": stoch}),
            obs,
            prev,
            cond.extras["wf.noise.act_action"],
            is_first=reset,
            posterior_noise=cond.extras["wf.noise.posterior"],
        )
    assert torch.equal(got["action"], action) and torch.equal(got["stoch"], state["stoch"])
    np.testing.assert_allclose(got["deter"], ref["out_post_deter"], atol=1e-5)
