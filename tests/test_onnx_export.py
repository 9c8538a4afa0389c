"""ONNX export: every graph of every registered family agrees with torch on ONNX Runtime (CPU).

Exports are slow (seconds per graph), so each (ref, weights) pair is exported once per test run
and shared by the xdist workers through a locked cache directory (`exported`).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torch import nn  # noqa: E402

from worldflux_registry import (  # noqa: E402
    Capability,
    ConditionPayload,
    ExportError,
    IOContract,
    LossOutput,
    ModelOutput,
    State,
    TensorSpec,
    WorldModel,
    export,
    registry,
)
from worldflux_registry.protocol._inputs import (  # noqa: E402
    encode_input,
    make_actions,
    make_noise,
    make_observations,
    make_tensor,
    noise_conditions,
)

REFERENCE_FAMILIES = ("dreamerv3:ci", "tdmpc2:ci")
THIRD_PARTY = "toyfamily:tiny"
ATOL = 1e-5
BATCHES = (1, 3, 17)


# -- shared exports ---------------------------------------------------------------------------
@dataclass
class Exported:
    """A torch model and its ONNX export (loaded on ORT CPU)."""

    ref: str
    weights: str
    model: WorldModel
    directory: Path
    onnx: WorldModel
    seconds: float


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker has its own basetemp below one per-run directory: share that.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _lock(path: Path):
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def train_a_little(model: WorldModel, steps: int = 4, seed: int = 0) -> WorldModel:
    """A few Adam steps on the model's own loss, on a seeded batch made from its contract."""
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(seed)
    lead = (4, 5)
    batch = make_observations(contract, lead, gen)
    batch["action"] = make_actions(contract, lead, gen)
    for spec in contract.targets:
        batch[spec.name] = make_tensor(spec, lead, gen)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch).loss.backward()
        opt.step()
    return model.eval()


def train_with_example_script(ref: str, out: Path, steps: int = 40) -> Path:
    """Weights trained the way users train a ``ci`` preset: ``examples/train_ci.py``."""
    family, preset = ref.split(":")
    script = Path(__file__).resolve().parents[1] / "examples" / "train_ci.py"
    args = [sys.executable, str(script), family, "--preset", preset, "--steps", str(steps)]
    args += ["--episodes", "64", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def exported(tmp_path_factory, ref: str, weights: str, **export_options) -> Exported:
    """Export ``ref`` with ``weights`` ("random" or "trained") once per test run.

    The first worker exports and saves the torch weights beside the export; the others load
    both, so every worker compares the same pair.
    """
    from worldflux_onnx.runtime import load_artifact

    graphs = export_options.pop("graphs", "all")
    tag = "-".join(
        [
            ref.replace(":", "_"),
            weights,
            *([] if graphs == "all" else ["+".join(graphs)]),
            *(f"{k}_{v}" for k, v in export_options.items()),
        ]
    )
    root = _shared_root(tmp_path_factory)
    out, ckpt = root / tag / "onnx", root / tag / "torch"
    with _lock(root / f"{tag}.lock"):
        timing = root / tag / "seconds.txt"
        if (out / "manifest.json").is_file() and (ckpt / "config.json").is_file():
            model = registry.load(ckpt)
            seconds = float(timing.read_text())
        else:
            torch.manual_seed(0)
            if weights == "trained" and ref.endswith(":ci"):
                model = registry.load(train_with_example_script(ref, root / tag / "trained"))
            else:
                model = registry.load(ref)
                if weights == "trained":
                    train_a_little(model)
            start = time.perf_counter()
            export(model, "onnx", out, graphs=graphs, check=False, **export_options)
            seconds = time.perf_counter() - start
            model.save_pretrained(ckpt)
            timing.write_text(f"{seconds}\n")
    return Exported(ref, weights, model.eval(), out, load_artifact(out, providers=["cpu"]), seconds)


# -- comparison -------------------------------------------------------------------------------
def assert_agree(where: str, specs, ref: dict, got: dict, atol: float = ATOL) -> None:
    """fp32 parity: exact samples for one-hot categorical / integer outputs, else max abs.

    An output whose contract declares a tolerance (a raw-space two-hot readout) is held to it.
    """
    problems = []
    for spec in specs:
        a, b = ref[spec.name].detach(), got[spec.name].detach()
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{spec.name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
            continue
        one_hot = spec.kind == "categorical" and bool(((a == 0) | (a == 1)).all())
        if one_hot or not a.is_floating_point() or spec.kind == "discrete":
            if not torch.equal(a, b):
                differ = int((a != b).sum())
                problems.append(f"{spec.name}: {differ} sampled values differ")
        else:
            rtol, abs_tol = spec.tolerance or (0.0, 0.0)
            bound = max(atol, abs_tol) + rtol * a.abs()
            err = float((a - b).abs().max()) if a.numel() else 0.0
            if a.numel() and not bool(((a - b).abs() <= bound).all()):
                problems.append(f"{spec.name}: max abs {err:.3g} beyond {float(bound.max()):.3g}")
    assert not problems, f"{where}: " + "; ".join(problems)


def compare_every_graph(pair: Exported, batch: int, seed: int = 1) -> list[str]:
    """Run each exported graph on torch and ORT with identical inputs and noise."""
    model, onnx_model = pair.model, pair.onnx
    contract: IOContract = model.io_contract()
    gen = torch.Generator().manual_seed(seed + batch)
    obs = make_observations(contract, (batch,), gen)
    graphs = [g for g in ("encode", "transition", "update", "decode") if onnx_model.supports(g)]
    with torch.no_grad():
        enc_noise = make_noise(contract, "encode", (batch,), gen)
        ref_state = model.encode(encode_input(obs, enc_noise))
        got_state = onnx_model.encode(encode_input(obs, enc_noise))
        assert_agree(f"encode b={batch}", contract.state, ref_state.tensors, got_state.tensors)
        action = make_actions(contract, (batch,), gen)
        if "transition" in graphs:
            cond = noise_conditions(make_noise(contract, "transition", (batch,), gen))
            a = model.transition(ref_state, action, cond)
            b = onnx_model.transition(ref_state, action, cond)
            assert_agree(f"transition b={batch}", contract.state, a.tensors, b.tensors)
        if "update" in graphs:
            cond = noise_conditions(make_noise(contract, "update", (batch,), gen))
            obs2 = make_observations(contract, (batch,), gen)
            a = model.update(ref_state, action, obs2, cond)
            b = onnx_model.update(ref_state, action, obs2, cond)
            assert_agree(f"update b={batch}", contract.state, a.tensors, b.tensors)
        if "decode" in graphs:
            noise = make_noise(contract, "decode", (batch,), gen)
            cond = noise_conditions(noise) if noise else None
            a = model.decode(ref_state, cond)
            b = onnx_model.decode(ref_state, cond)
            assert_agree(f"decode b={batch}", contract.predictions, a.predictions, b.predictions)
    return graphs


# -- the reference families and a third-party one ---------------------------------------------
PAIRS = [(ref, w) for ref in REFERENCE_FAMILIES for w in ("random", "trained")]
PAIRS.append((THIRD_PARTY, "random"))


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory) -> Exported:
    ref, weights = request.param
    if ref.split(":")[0] not in registry.list():
        pytest.fail(f"family of {ref} is not registered (is its plugin installed?)")
    return exported(tmp_path_factory, ref, weights)


def test_every_graph_matches_torch_at_batch_1_3_and_17_through_one_file(pair):
    files = {p.name: p.stat().st_ino for p in pair.directory.glob("*.onnx")}
    for batch in BATCHES:
        graphs = compare_every_graph(pair, batch)
    assert {f"{g}.onnx" for g in graphs} == set(files)
    # One file per graph served every batch size: the batch axis is symbolic.
    assert {p.name: p.stat().st_ino for p in pair.directory.glob("*.onnx")} == files


@pytest.mark.parametrize("ref", REFERENCE_FAMILIES)
def test_trained_weights_are_not_the_random_init(ref, tmp_path_factory):
    random = exported(tmp_path_factory, ref, "random").model.state_dict()
    trained = exported(tmp_path_factory, ref, "trained").model.state_dict()
    assert random.keys() == trained.keys()
    changed = [k for k in random if not torch.equal(random[k], trained[k])]
    assert len(changed) > len(random) // 2, changed


def test_update_graph_is_exported_for_families_that_support_it(pair):
    manifest = json.loads((pair.directory / "manifest.json").read_text())
    expected = {"encode", "transition", "decode"}
    if pair.model.supports(Capability.UPDATE):
        expected.add("update")
    assert set(manifest["graphs"]) == expected


def test_rollout_on_ort_matches_torch_given_the_same_noise(pair):
    model, onnx_model = pair.model, pair.onnx
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(7)
    steps, batch = 6, 3
    obs = make_observations(contract, (batch,), gen)
    noise = make_noise(contract, "encode", (batch,), gen)
    actions = make_actions(contract, (steps, batch), gen)
    extras = {}
    for graph in ("transition", "decode"):
        for name, value in make_noise(contract, graph, (steps, batch), gen).items():
            extras[f"wf.noise.{name}"] = value
    cond = ConditionPayload(extras) if extras else None
    with torch.no_grad():
        start = model.encode(encode_input(obs, noise))
        a = model.rollout(start, actions, cond)
        b = onnx_model.rollout(start, actions, cond)
    assert len(a.states) == len(b.states) == steps + 1
    for t in range(1, steps + 1):
        # Free-running over several steps: allow rounding to grow a little past one step's bound.
        assert_agree(
            f"rollout state {t}", contract.state, a.states[t].tensors, b.states[t].tensors, 1e-4
        )
    assert set(a.predictions) == set(b.predictions)
    assert_agree("rollout predictions", contract.predictions, a.predictions, b.predictions, 1e-4)


def test_manifest_records_contract_files_and_versions(pair):
    from worldflux_onnx._manifest import sha256_file

    manifest = json.loads((pair.directory / "manifest.json").read_text())
    contract = pair.model.io_contract()
    assert manifest["format"] == "worldflux.onnx" and manifest["format_version"] == 1
    assert manifest["fingerprint"] == contract.fingerprint() == pair.onnx.contract_fingerprint()
    assert IOContract.from_dict(manifest["contract"]) == contract
    assert manifest["family"] == pair.model.family and manifest["preset"] == pair.ref.split(":")[1]
    assert manifest["opset"] == 18 and manifest["precision"] == "fp32"
    for name, entry in manifest["graphs"].items():
        assert sha256_file(pair.directory / entry["file"]) == entry["sha256"]
        assert [i["shape"][0] for i in entry["inputs"] + entry["outputs"]] == ["batch"] * (
            len(entry["inputs"]) + len(entry["outputs"])
        )
        assert entry["noise"] == [n.name for n in contract.noise_for(name)]
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])


def test_graph_files_carry_fingerprint_and_names_in_metadata(pair):
    import onnx

    for path in pair.directory.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["worldflux.fingerprint"] == pair.model.contract_fingerprint()
        assert meta["worldflux.graph"] == path.stem
        assert meta["worldflux.family"] == pair.model.family
        assert meta["worldflux.preset"] == pair.ref.split(":")[1]
        assert meta["worldflux.exporter_version"]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"


def test_export_time_of_dreamerv3_ci_is_recorded(tmp_path_factory):
    pair = exported(tmp_path_factory, "dreamerv3:ci", "random")
    manifest = json.loads((pair.directory / "manifest.json").read_text())
    per_graph = {g: e["export_seconds"] for g, e in manifest["graphs"].items()}
    print(f"\ndreamerv3:ci export: {pair.seconds:.1f}s in all, per graph {per_graph}")
    assert all(s > 0 for s in per_graph.values())
    assert pair.seconds < 120


# -- nothing family-specific ------------------------------------------------------------------
def test_exporter_source_names_no_family():
    import worldflux_onnx

    package = Path(worldflux_onnx.__file__).parent
    text = "\n".join(p.read_text().lower() for p in package.glob("*.py"))
    for name in ("dreamer", "tdmpc", "toyfamily"):
        assert name not in text


def test_export_through_the_registry_ref_runs_the_parity_check(tmp_path):
    out = export(THIRD_PARTY, "onnx", tmp_path / "toy", check={"horizon": 3, "batch_sizes": (2,)})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["fingerprint"] == manifest["fingerprint"]
    loaded = registry.load(out)
    assert type(loaded).__name__ == "OnnxWorldModel"
    assert loaded.contract_fingerprint() == manifest["fingerprint"]


def test_reexport_replaces_the_directory_and_refuses_foreign_ones(tmp_path):
    torch.manual_seed(0)
    model = registry.load(THIRD_PARTY)
    out = export(model, "onnx", tmp_path / "x", graphs=("decode",), check=False)
    first = json.loads((out / "manifest.json").read_text())["graphs"]["decode"]["sha256"]
    with torch.no_grad():
        model.decoder.weight.add_(1.0)
    export(model, "onnx", out, graphs=("decode",), check=False)
    second = json.loads((out / "manifest.json").read_text())["graphs"]["decode"]["sha256"]
    assert first != second
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary siblings left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export directory"):
        export(model, "onnx", foreign, graphs=("decode",), check=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unknown_exporter_and_graph_names_are_clear(tmp_path):
    from worldflux_registry import ResolutionError

    with pytest.raises(ResolutionError, match="onnx"):
        export(THIRD_PARTY, "onx", tmp_path / "a", check=False)
    with pytest.raises(ExportError, match="unknown graphs"):
        export(THIRD_PARTY, "onnx", tmp_path / "b", graphs=("encode", "decoder"), check=False)


# -- failures ---------------------------------------------------------------------------------
CONTRACT = IOContract(
    observations=(TensorSpec("vector", "float32", ("batch", 3)),),
    state=(TensorSpec("h", "float32", ("batch", 3)),),
    predictions=(TensorSpec("eig", "float32", ("batch", 3)),),
    action=TensorSpec("action", "float32", ("batch", 2), low=-1.0, high=1.0),
).validate()


class EigModel(WorldModel):
    """Decodes with an eigen-decomposition, which has no ONNX lowering."""

    capabilities = frozenset({Capability.ENCODE, Capability.TRANSITION, Capability.DECODE})

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3) if norm else nn.Identity()

    def io_contract(self):
        return CONTRACT

    def encode(self, obs, deterministic=False):
        obs, _ = self.observations(obs)
        return State({"h": self.norm(self.lin(obs["vector"]))})

    def transition(self, state, action, conditions=None, deterministic=False):
        return State({"h": state["h"] + self.action_tensor(action).sum(-1, keepdim=True)})

    def decode(self, state, conditions=None):
        h = state["h"]
        sym = h.unsqueeze(-1) * h.unsqueeze(-2)
        return ModelOutput({"eig": torch.linalg.eigvals(sym).real})

    def loss(self, batch):
        return LossOutput(torch.zeros(()))


def test_unsupported_operator_raises_export_error_naming_it_and_the_report(tmp_path):
    out = tmp_path / "eig"
    with pytest.raises(ExportError) as info:
        export(EigModel(), "onnx", out, graphs=("decode",), check=False)
    err = info.value
    assert err.graph == "decode"
    assert "aten.linalg_eig" in str(err) and err.operator.startswith("aten.linalg_eig")
    assert err.report and Path(err.report).is_file() and err.report in str(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_fp16_export_keeps_fp32_io_and_fp32_normalisation(tmp_path):
    import onnx
    from worldflux_onnx.runtime import load_artifact

    torch.manual_seed(0)
    model = EigModel(norm=True).eval()
    out = export(model, "onnx", tmp_path / "h", graphs=("encode",), precision="fp16", check=False)
    graph = onnx.load(str(out / "encode.onnx")).graph
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == f32 for v in [*graph.input, *graph.output])
    weights = {i.name: i.data_type for i in graph.initializer}
    assert weights["model.lin.weight"] == f16
    assert weights["model.norm.weight"] == f32
    onnx_model = load_artifact(out, providers=["cpu"])
    assert onnx_model.precision == "fp16"
    x = torch.randn(4, 3)
    with torch.no_grad():
        ref = model.encode(x)["h"]
    got = onnx_model.encode(x)["h"]
    assert got.dtype == torch.float32
    assert float((ref - got).abs().max().detach()) < 1e-2


def test_batch_fixed_by_python_int_is_an_export_error_naming_the_line(tmp_path):
    class Pinned(EigModel):
        def encode(self, obs, deterministic=False):
            obs, _ = self.observations(obs)
            n = int(obs["vector"].shape[0])
            return State({"h": self.lin(obs["vector"]) + torch.zeros(n, 3)})

    with pytest.raises(ExportError, match=r"symbolic batch axis.*test_onnx_export\.py:\d+") as info:
        export(Pinned(), "onnx", tmp_path / "p", graphs=("encode",), check=False)
    assert info.value.graph == "encode"


def test_cli_export_writes_the_artifact_and_reports_progress(tmp_path, capsys):
    from worldflux_registry.cli._main import main

    out = tmp_path / "cli"
    args = ["export", THIRD_PARTY, "--out", str(out), "--graphs", "decode", "--no-check"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out
    assert "exported decode in" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["parity"] is None


def test_a_prediction_the_step_does_not_return_is_named(tmp_path):
    class Forgetful(EigModel):
        def decode(self, state, conditions=None):
            return ModelOutput({"other": state["h"]})

    with pytest.raises(ExportError, match=r"decode\(\) returned no 'pred\.eig'") as info:
        export(Forgetful(), "onnx", tmp_path / "f", graphs=("decode",), check=False)
    assert info.value.graph == "decode" and info.value.output == "pred.eig"


def test_cli_export_mode_graphs_adds_the_deterministic_variant(tmp_path, capsys):
    from worldflux_registry.cli._main import main

    out = tmp_path / "cli-mode"
    args = ["export", THIRD_PARTY, "--out", str(out), "--graphs", "transition"]
    assert main([*args, "--no-check", "--mode-graphs"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"transition", "transition.mode"}
    mode = manifest["graphs"]["transition.mode"]
    assert (out / mode["file"]).is_file()
    assert not any(i["name"].startswith("noise.") for i in mode["inputs"])


def test_cli_export_rollout_horizon_writes_the_fused_graph(tmp_path, capsys):
    from worldflux_registry.cli._main import main

    out = tmp_path / "cli-rollout"
    args = ["export", THIRD_PARTY, "--out", str(out), "--graphs", "encode,rollout"]
    assert main([*args, "--no-check", "--rollout-horizon", "2"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encode", "rollout"}
    assert manifest["graphs"]["rollout"]["horizon"] == 2
    assert [p["shape"][0] for p in manifest["graphs"]["rollout"]["outputs"]] == [2] * len(
        manifest["graphs"]["rollout"]["outputs"]
    )


def test_a_graph_the_model_does_not_advertise_is_refused(tmp_path):
    class NoDecode(EigModel):
        capabilities = frozenset({Capability.ENCODE, Capability.TRANSITION})

    with pytest.raises(ExportError, match="does not advertise 'decode'") as info:
        export(NoDecode(), "onnx", tmp_path / "nd", graphs=("decode",), check=False)
    assert info.value.graph == "decode"


def test_fp16_export_of_dreamerv3_passes_its_check_and_a_tampered_one_fails(tmp_path):
    """Half-precision tolerances are loose enough for fp16 rounding, tight enough for a bug."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from worldflux_onnx._manifest import sha256_file

    from worldflux_registry import parity

    torch.manual_seed(0)
    model = registry.load("dreamerv3:ci")
    out = export(model, "onnx", tmp_path / "half", precision="fp16")  # check=True
    summary = json.loads((out / "manifest.json").read_text())["parity"]
    assert summary["passed"] is True, summary["failures"]
    path = out / "transition.onnx"
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.ndim == 2:
            # A layout bug: the weight's input columns in reverse order.
            bad = np.ascontiguousarray(array[:, ::-1])
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(bad, init.name))
            break
    onnx.save(proto, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["transition"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = parity.check(model, registry.load(out), batch_sizes=(4,), horizon=4)
    assert not report.passed
    # The reversed weight multiplies the deterministic state, which a fresh model's encode
    # leaves at zero (zero biases, as official): it shows from the first transition of a rollout.
    failing = [c for c in (*report.steps, *report.rollouts) if not c.passed]
    assert any(c.graph == "transition" for c in failing), [c.graph for c in failing]


def test_cli_info_on_an_export_lists_its_graphs_and_parity(tmp_path, capsys, monkeypatch):
    from worldflux_registry.cli._main import main

    monkeypatch.setenv("COLUMNS", "200")  # rich folds table cells to the terminal's width

    out = tmp_path / "info"
    args = ["export", THIRD_PARTY, "--out", str(out), "--graphs", "transition,decode,rollout"]
    assert main([*args, "--rollout-horizon", "2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["manifest"]["graphs"]) == {"transition", "decode", "rollout"}
    assert data["manifest"]["parity"]["passed"] is True
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Graphs" in text and "fused: 2 steps per call" in text
    assert "parity" in text and "passed" in text
