"""``optimize``: candidates exported, checked and timed; the fastest passing one installed."""

from __future__ import annotations

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from worldflux_registry import BackendError, ConfigError, ParityError, parity, registry  # noqa: E402
from worldflux_registry.cli import main  # noqa: E402
from worldflux_registry.optimizing import CANDIDATES, optimize  # noqa: E402

#: Every DreamerV3 layer kept in float32 except one prior layer: int8 then changes nothing but
#: the categorical prior, whose near-uniform logits (a fresh model) flip some samples.
_ONLY_PRIOR_INT8 = (
    "dyn.dyn",
    "dyn.obs",
    "dyn.prior0",
    "dyn.priorlogit",
    "encoder",
    "decoder",
    "con.",
    "rew.",
    "val.",
    "slowval.",
    "pol.",
)


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "tpu"}, r"unknown target 'tpu'.*targets: cpu, cuda"),
        ({"max_flip_rate": -0.1}, r"max_flip_rate must be in \[0, 1\]"),
        ({"max_flip_rate": 1.5}, r"max_flip_rate must be in \[0, 1\]"),
        ({"batch": 0}, r"batch must be an int >= 1"),
        ({"metric": "throughput"}, r"unknown metric 'throughput'"),
        ({"candidates": ["int4"]}, r"unknown candidate 'int4'"),
    ],
)
def test_bad_arguments_raise_config_errors_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        optimize("tdmpc2:ci", tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        optimize("tdmpc2:ci", out)
    assert (out / "notes.txt").read_text() == "mine"
    assert _leftovers(tmp_path, "out") == []


def test_cuda_target_without_the_cuda_provider_is_a_backend_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        optimize("tdmpc2:ci", tmp_path / "out", target="cuda")


def test_cli_rejects_a_negative_flip_rate_as_usage(tmp_path, capsys):
    code = main(["optimize", "tdmpc2:ci", "--out", str(tmp_path / "o"), "--max-flip-rate", "-1"])
    assert code == 2
    assert "expected a number in [0, 1]" in capsys.readouterr().err


def test_cli_names_the_targets_for_an_unknown_one(tmp_path, capsys):
    code = main(["optimize", "tdmpc2:ci", "--out", str(tmp_path / "o"), "--target", "tpu"])
    assert code == 1
    assert "targets: cpu, cuda" in capsys.readouterr().err


def test_tdmpc2_installs_the_fastest_passing_candidate(tmp_path, capsys):
    out = tmp_path / "deploy"
    code = main(
        [
            "optimize",
            "tdmpc2:ci",
            "--out",
            str(out),
            "--candidates",
            "fp32,fp32-fused,int8",
            "--batch",
            "2",
            "--horizon",
            "2",
            "--json",
        ]
    )
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    rows = {c["name"]: c for c in doc["candidates"]}
    assert set(rows) == {"fp32", "fp32-fused", "int8"}
    chosen = rows[doc["chosen"]]
    assert chosen["status"] == "chosen" and chosen["parity"]["passed"] is True
    passing = [c for c in rows.values() if c["status"] in ("chosen", "passed")]
    # The chosen one is the fastest rollout among those that passed (whatever the speeds).
    assert chosen["latency_s"]["rollout"] == min(c["latency_s"]["rollout"] for c in passing)
    assert _leftovers(tmp_path, "deploy") == []

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["optimize"]["chosen"] == doc["chosen"]
    assert manifest["precision"] == chosen["precision"]
    assert manifest["parity"]["passed"] is True
    # A step-by-step winner ships without the fused graph (the loader would prefer it).
    assert ("rollout" in manifest["graphs"]) == chosen["fused"]
    deployed = registry.load(out, device="cpu")
    torch.manual_seed(0)
    reference = registry.load("tdmpc2:ci")
    report = parity.check(reference, deployed, batch_sizes=(2,), horizon=2, enforce=("step",))
    assert report.passed, report.failures()


def _prior_only_int8_model():
    torch.manual_seed(0)
    model = registry.load("dreamerv3:ci")
    model.keep_in_fp32 = _ONLY_PRIOR_INT8
    return model


def test_a_zero_flip_budget_rejects_int8_that_flips_and_a_loose_one_accepts_it(tmp_path):
    model = _prior_only_int8_model()
    with pytest.raises(ParityError, match=r"int8: .*flip rate .* above max_flip_rate 0"):
        optimize(
            model,
            tmp_path / "strict",
            candidates=["int8"],
            batch=8,
            horizon=8,
            max_flip_rate=0.0,
            repeats=5,
            max_seconds=0.5,
        )
    assert not (tmp_path / "strict").exists()
    assert _leftovers(tmp_path, "strict") == []

    result = optimize(
        model,
        tmp_path / "loose",
        candidates=["int8"],
        batch=8,
        horizon=8,
        max_flip_rate=1.0,
        repeats=5,
        max_seconds=0.5,
    )
    assert result.chosen == "int8"
    (row,) = result.candidates
    assert row.parity["free_running_flip_rate"] > 0  # it did flip, and was accepted
    assert registry.load(tmp_path / "loose").precision == "int8"


def test_candidates_cover_both_precisions_with_and_without_the_fused_graph():
    assert {(p, f) for p, f in CANDIDATES.values()} == {
        ("fp32", False),
        ("fp32", True),
        ("int8", False),
        ("int8", True),
    }


def test_cli_table_fits_80_columns_and_names_what_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "fast"
    args = ["optimize", "tdmpc2:ci", "--out", str(out), "--candidates", "fp32"]
    code = main([*args, "--horizon", "2"])
    text = capsys.readouterr().out
    assert code == 0
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "chosen" in text and f"wrote fp32 to {out}" in " ".join(text.split())
    assert (out / "manifest.json").is_file()


def test_cli_refuses_a_non_empty_out_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the usage check")

    monkeypatch.setattr("worldflux_registry.optimizing._optimize.optimize", no_model)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["optimize", "tdmpc2:ci", "--out", str(out)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
