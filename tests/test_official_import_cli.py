"""``worldflux-registry import`` on all five reference cases, then export and parity.

The fidelity of the imported models is proven in ``test_official_tdmpc2.py`` and
``test_official_dreamerv3.py`` through each family's importer; this module checks that the
command line and ``registry.import_checkpoint`` give exactly those models, saved as normal
checkpoint directories with their provenance, and that they deploy: export + parity pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from worldflux_dreamerv3.importer import import_checkpoint as import_dreamerv3
from worldflux_tdmpc2.importer import import_checkpoint as import_tdmpc2

from worldflux_registry import registry
from worldflux_registry.cli import main
from worldflux_registry.plugin_api import encode_input, make_noise, make_observations

DATA = Path(__file__).resolve().parent / "data" / "official"
#: (family, source, --config pairs, importer) per reference case.
CASES = {
    "tdmpc2/single-task": ("tdmpc2", "single-task/checkpoint.pt", {"episode_length": "500"}),
    "tdmpc2/episodic": (
        "tdmpc2",
        "episodic/checkpoint.pt",
        {"episode_length": "1000", "discount_max": "0.99", "rho": "0.7"},
    ),
    "tdmpc2/multitask": ("tdmpc2", "multitask/checkpoint.pt", {"episode_lengths": "500,100,500"}),
    "dreamerv3/vector-image-continuous": (
        "dreamerv3",
        "vector-image-continuous/checkpoint",
        {"action_kind": "continuous"},
    ),
    "dreamerv3/image-discrete": (
        "dreamerv3",
        "image-discrete/checkpoint",
        {"action_kind": "discrete"},
    ),
}
IMPORTERS = {"tdmpc2": import_tdmpc2, "dreamerv3": import_dreamerv3}


def _args(case: str, out: Path) -> list[str]:
    family, source, config = CASES[case]
    pairs = [x for k, v in config.items() for x in ("--config", f"{k}={v}")]
    return ["import", family, str(DATA / family / source), "--out", str(out), *pairs]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_import_writes_the_model_the_importer_builds(case, tmp_path, capsys):
    family, source, config = CASES[case]
    assert main([*_args(case, tmp_path / "ckpt"), "--json"]) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["family"] == family
    record = saved["provenance"]
    assert record == {k: v for k, v in printed.items() if k != "out"}
    direct = IMPORTERS[family](DATA / family / source, config)
    assert record["source_sha256"] == direct.source_sha256
    assert record["official_commit"] == direct.official_commit
    assert set(record["mapped"]) | set(record["dropped"]) == set(direct.mapped) | set(
        direct.dropped
    )
    loaded = registry.load(tmp_path / "ckpt")
    want = direct.model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_missing_config_field_is_named_on_the_command_line(tmp_path, capsys):
    args = _args("dreamerv3/image-discrete", tmp_path / "d")
    assert main(args[: args.index("--config")]) == 1
    err = capsys.readouterr().err
    assert "action_kind" in err and "--config" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["tdmpc2/episodic", "dreamerv3/image-discrete"])
def test_an_imported_official_model_exports_and_passes_parity(case, tmp_path, capsys):
    assert main(_args(case, tmp_path / "ckpt")) == 0, capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "onnx")]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is True, manifest["parity"]
    deployed = registry.load(tmp_path / "onnx")
    model = registry.load(tmp_path / "ckpt")
    contract = model.io_contract()
    gen = torch.Generator().manual_seed(0)
    obs = encode_input(
        make_observations(contract, (2,), gen), make_noise(contract, "encode", (2,), gen)
    )
    with torch.no_grad():
        a, b = model.encode(obs), deployed.encode(obs)
    for key in a.tensors:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), atol=1e-5, rtol=1e-5)
