"""``bench(..., agent=True)`` / ``worldflux-registry bench --agent``: the agent step (TD-MPC2
encode + plan, DreamerV3 act) timed per environment step on torch, torch.compile and ONNX
Runtime, each ORT result gated by parity of the agent graph; a tampered plan or act graph is
refused, a family without an agent step is a typed error. Real runs on small configs; no timing
is asserted.

TD-MPC2 runs on the imported official single-task reference with a cut-down planner (its
weights, not a seeded init: a fresh TD-MPC2 zero-initialises its reward and Q heads, so every
candidate's value ties and elite selections would compare nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("worldflux_onnx")

from _tamper import halve_largest_weight  # noqa: E402
from rich.console import Console  # noqa: E402

from worldflux_registry import CapabilityError, ConfigError, registry  # noqa: E402
from worldflux_registry import bench as _bench  # noqa: E402
from worldflux_registry.cli._main import main  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "official" / "tdmpc2" / "single-task"
PLANNER = {"iterations": 2, "num_samples": 64, "num_elites": 8, "num_pi_trajs": 4}
FAST = {"warmup": 1, "repeats": 3, "min_repeats": 2, "max_seconds": 1.0, "device": "cpu"}


@pytest.fixture(scope="module")
def tdmpc2(tmp_path_factory):
    """(torch model, agent run at batch 1 and 3, its export dir, progress stages) of the
    imported official reference, benchmarked as a checkpoint directory."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("agent")
    ckpt, out = root / "ckpt", root / "onnx"
    config = {"episode_length": "500", **{k: str(v) for k, v in PLANNER.items()}}
    pairs = [x for k, v in config.items() for x in ("--config", f"{k}={v}")]
    args = ["import", "tdmpc2", str(REFERENCE / "checkpoint.pt"), "--out", str(ckpt), *pairs]
    assert main(args) == 0
    stages = []
    run = _bench.run(
        ckpt,
        agent=True,
        backends=["torch", "torch-compile", "ort-cpu"],
        batches=[1, 3],
        export_dir=out,
        progress=lambda what, done, total: stages.append((what, done, total)),
        **FAST,
    )
    return registry.load(ckpt).eval(), run, out, stages


@pytest.fixture(scope="module")
def dreamer(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("act") / "onnx"
    run = _bench.run(
        "dreamerv3:ci",
        agent=True,
        backends=["torch", "ort-cpu"],
        batches=[2],
        export_dir=out,
        **FAST,
    )
    torch.manual_seed(0)
    return registry.load("dreamerv3:ci").eval(), run, out


def _result(run, backend, batch):
    (found,) = [r for r in run.results if r.backend == backend and r.batch == batch]
    return found


def test_plan_agent_step_is_timed_on_every_backend_after_parity(tdmpc2):
    _, run, out, stages = tdmpc2
    assert run.mode == "agent" and run.horizon is None
    assert run.reference.startswith("checkpoint ")
    assert run.settings["agent"]["graph"] == "plan"
    assert run.settings["agent"]["config"]["num_samples"] == PLANNER["num_samples"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encode", "plan"}
    assert [(r.backend, r.batch) for r in run.results] == [
        (b, n) for b in ("torch", "torch-compile", "ort-cpu") for n in (1, 3)
    ]
    for r in run.results:
        assert r.status == "ok", (r.backend, r.batch, r.reason)
        assert r.step is not None and r.rollout is None
        assert r.step.calls == r.step.warmup + r.step.rounds + r.step.n
        assert r.throughput == pytest.approx(r.batch / r.step.median)
    for batch in (1, 3):
        ort = _result(run, "ort-cpu", batch)
        assert ort.parity["passed"] is True and ort.parity["batch_sizes"] == [batch]
        (selection,) = ort.parity["selections"]
        assert selection["graph"] == "plan" and selection["batch"] == batch
        assert selection["iterations"] == PLANNER["iterations"]
        assert selection["agreed"] + len(selection["near_ties"]) == batch
        compiled = _result(run, "torch-compile", batch)
        assert compiled.parity["passed"] and compiled.settings["compile_s"] > 0
    assert stages[-1][1] == stages[-1][2] and stages[1][0] == "exporting to ONNX (encode, plan)"


def test_agent_document_renders_agent_rows_and_agent_targets(tdmpc2):
    _, run, _, _ = tdmpc2
    doc = _bench.document([run])
    json.dumps(doc)  # a JSON document
    (json_run,) = doc["runs"]
    assert json_run["mode"] == "agent" and json_run["results"][0]["rollout"] is None
    verdicts = {(v["target"], v["model"]): v for v in doc["targets"]}
    assert verdicts[("cpu-b1-agent", run.model)]["status"] in ("met", "missed")
    assert verdicts[("cpu-b1-agent-compile", run.model)]["status"] in ("met", "missed")
    # Agent steps are not transitions: the transition targets do not read them.
    assert verdicts[("cpu-b1-step", run.model)]["status"] == "not-measured"
    assert verdicts[("parity", run.model)]["status"] == "met"
    markdown = _bench.to_markdown(doc)
    assert f"### {run.model}: agent step (plan)" in markdown
    assert "| ort-cpu | cpu | 1 | pass" in markdown and "env steps / s" in markdown
    assert "- ort-cpu at batch 3: " in markdown
    console = Console(width=100, record=True)
    console.print(_bench.to_rich(doc, 100))
    text = console.export_text()
    assert "agent step" in text and "env steps/s" in text and "rollout" not in text


def test_act_agent_step_of_dreamerv3_is_timed_after_parity(dreamer):
    _, run, out = dreamer
    assert run.settings["agent"]["graph"] == "act"
    assert set(json.loads((out / "manifest.json").read_text())["graphs"]) == {"encode", "act"}
    for backend in ("torch", "ort-cpu"):
        r = _result(run, backend, 2)
        assert r.status == "ok", r.reason
        assert r.step is not None and r.throughput == pytest.approx(2 / r.step.median)
    ort = _result(run, "ort-cpu", 2)
    assert ort.parity["passed"] and ort.parity["selections"] == []


def test_a_tampered_plan_graph_is_refused_without_a_speed(tdmpc2, tmp_path):
    model, _, out, _ = tdmpc2
    bad = halve_largest_weight(out, tmp_path / "bad", "plan")
    run = _bench.run(bad, agent=True, reference=model, backends=["torch", "ort-cpu"], **FAST)
    assert _result(run, "torch", 1).status == "ok"
    ort = _result(run, "ort-cpu", 1)
    assert ort.status == "refused" and ort.step is None and ort.throughput is None
    assert ort.parity["passed"] is False and "plan" in (ort.reason or "")
    (selection,) = ort.parity["selections"]
    assert selection["failures"] and not selection["near_ties"]
    doc = _bench.document([run])
    assert "**refused**" in _bench.to_markdown(doc)
    verdicts = {(v["target"], v["model"]): v for v in doc["targets"]}
    assert verdicts[("parity", run.model)]["status"] == "missed"
    assert verdicts[("cpu-b1-agent", run.model)]["status"] == "not-measured"


def test_a_tampered_act_graph_is_refused(dreamer, tmp_path):
    model, _, out = dreamer
    bad = halve_largest_weight(out, tmp_path / "bad", "act")
    run = _bench.run(bad, agent=True, reference=model, backends=["ort-cpu"], batches=[2], **FAST)
    (ort,) = run.results
    assert ort.status == "refused" and ort.step is None
    assert "act" in (ort.reason or "")


def test_a_family_without_an_agent_step_is_a_capability_error(toy_model):
    with pytest.raises(CapabilityError, match="declares no agent step") as info:
        _bench.run("toyfamily:tiny", agent=True, reference=toy_model, **FAST)
    assert info.value.capability == "agent" and "without --agent" in (info.value.hint or "")


def test_an_export_without_its_agent_graph_is_a_capability_error(tdmpc2, tmp_path):
    model, _, out, _ = tdmpc2
    bad = tmp_path / "no-plan"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["graphs"]["plan"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CapabilityError, match="no 'plan' graph") as info:
        _bench.run(bad, agent=True, reference=model, **FAST)
    assert "--graphs encode,plan" in (info.value.hint or "")


def test_transition_backends_are_not_agent_backends(capsys):
    with pytest.raises(ConfigError, match="unknown agent backend 'ort-cpu-fused'"):
        _bench.run("tdmpc2:ci", agent=True, backends=["ort-cpu-fused"])
    assert main(["bench", "tdmpc2:ci", "--agent", "--backends", "torch-cudagraph"]) == 2
    err = capsys.readouterr().err
    assert "unknown agent backend 'torch-cudagraph'" in err and "ort-cuda" in err


def test_cli_bench_agent_writes_json_and_markdown(dreamer, tmp_path, capsys):
    _, _, out = dreamer
    doc_path, md_path = tmp_path / "agent.json", tmp_path / "agent.md"
    args = ["bench", str(out), "--agent", "--backends", "torch,ort-cpu", "--batch", "1"]
    args += ["--warmup", "1", "--repeats", "2", "--max-seconds", "0.5", "--device", "cpu"]
    code = main([*args, "--json", str(doc_path), "--markdown", str(md_path)])
    assert code == 0, capsys.readouterr()
    doc = json.loads(doc_path.read_text())
    (run,) = doc["runs"]
    assert run["mode"] == "agent" and [r["status"] for r in run["results"]] == ["ok", "ok"]
    assert "agent step (act)" in md_path.read_text()
    assert "env steps/s" in capsys.readouterr().out
