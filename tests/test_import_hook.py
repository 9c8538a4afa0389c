"""Importers of foreign checkpoints are plugins: found by a hook, run, saved with provenance."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from toy_importer import ToyImporterPlugin
from wf_fixture_good import plugin as good_plugin

from worldflux_registry import (
    AmbiguousReferenceError,
    CheckpointError,
    PluginConflictError,
    PluginError,
    Registry,
    ResolutionError,
    registry,
)
from worldflux_registry.cli import main


def _toy_source(tmp_path, hidden=16, extra=None):
    model = Registry(entry_points=False, plugins=[good_plugin]).build(
        good_plugin_spec(), {**good_plugin.DEFAULTS, "hidden": hidden}
    )
    arrays = {f"params/{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    arrays |= {"step": np.array(1000), "opt/mu": np.zeros(3, np.float32)}
    arrays |= extra or {}
    path = tmp_path / "foreign.npz"
    np.savez(path, **arrays)
    return path, model


def good_plugin_spec():
    return Registry(entry_points=False, plugins=[good_plugin]).get("toyfamily")


def _registry(*importers):
    return Registry(entry_points=False, plugins=[good_plugin, *importers])


def test_the_first_party_importers_are_found_through_entry_points():
    names = {i.name: i for i in registry.importers()}
    assert {"tdmpc2:tdmpc2-official-pt", "dreamerv3:dreamerv3-elements"} <= set(names)
    assert names["tdmpc2:tdmpc2-official-pt"].distribution == "worldflux-tdmpc2"
    assert [i.source_format for i in registry.importers("td-mpc2")] == ["tdmpc2-official-pt"]
    plugins = {r.distribution: r for r in registry.plugins()}
    assert plugins["worldflux-dreamerv3"].importers == ("dreamerv3:dreamerv3-elements",)


def test_an_import_writes_a_checkpoint_that_loads_with_the_same_weights(tmp_path):
    source, original = _toy_source(tmp_path, hidden=24)
    reg = _registry(ToyImporterPlugin())
    result = reg.import_checkpoint("toyfamily", source, tmp_path / "ckpt", config={"hidden": "24"})
    assert set(result.dropped) == {"step", "opt/mu"}
    loaded = reg.load(tmp_path / "ckpt")
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())["provenance"]
    assert record["source_format"] == "toy-npz"
    assert record["source_sha256"].startswith("sha256:") and len(record["source_sha256"]) == 71
    assert record["official_commit"] == "toy@1"
    assert record["dropped"]["step"].startswith("training state")
    assert len(record["mapped"]) == len(original.state_dict())


def test_what_the_importer_refuses_reaches_the_caller_typed(tmp_path):
    reg = _registry(ToyImporterPlugin())
    source, _ = _toy_source(tmp_path)
    with pytest.raises(CheckpointError, match="--config hidden=N"):
        reg.import_checkpoint("toyfamily", source, tmp_path / "a")
    bad, _ = _toy_source(tmp_path, extra={"mystery": np.ones(2)})
    with pytest.raises(CheckpointError, match="unknown tensor 'mystery'"):
        reg.import_checkpoint("toyfamily", bad, tmp_path / "b", config={"hidden": "16"})
    with pytest.raises(CheckpointError, match="does not exist"):
        reg.import_checkpoint("toyfamily", tmp_path / "nope.npz", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_importer_returning_the_wrong_type_is_a_typed_error(tmp_path):
    source, _ = _toy_source(tmp_path)
    reg = _registry(ToyImporterPlugin("toy_importer:not_a_checkpoint"))
    with pytest.raises(CheckpointError, match="returned dict, not an ImportedCheckpoint"):
        reg.import_checkpoint("toyfamily", source, tmp_path / "out")
    with pytest.raises(PluginError, match="cannot import importer"):
        _registry(ToyImporterPlugin("toy_importer:missing")).import_checkpoint(
            "toyfamily", source, tmp_path / "out"
        )


def test_choosing_an_importer():
    with pytest.raises(ResolutionError, match="no importer for family 'toyfamily'"):
        _registry().get_importer("toyfamily")
    two = _registry(ToyImporterPlugin(), ToyImporterPlugin(fmt="toy-other"))
    with pytest.raises(AmbiguousReferenceError, match="several formats: toy-npz, toy-other"):
        two.get_importer("toyfamily")
    assert two.get_importer("toyfamily", "toy-other").source_format == "toy-other"
    with pytest.raises(ResolutionError, match="Did you mean 'toy-npz'"):
        two.get_importer("toyfamily", "toy-npy")
    clash = _registry(ToyImporterPlugin(), ToyImporterPlugin())
    with pytest.raises(PluginConflictError, match="toyfamily:toy-npz"):
        clash.get_importer("toyfamily", "toy-npz")


def test_cli_import_prints_what_was_kept_and_dropped(tmp_path, capsys, monkeypatch):
    source, _ = _toy_source(tmp_path)
    # The subpackage shares its name with the process-wide registry, which the package binds.
    monkeypatch.setattr(
        sys.modules["worldflux_registry.registry._registry"],
        "registry",
        _registry(ToyImporterPlugin()),
    )
    code = main(
        [
            "import",
            "toyfamily",
            str(source),
            "--out",
            str(tmp_path / "d"),
            "--config",
            "hidden=16",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dropped"] == {
        "opt/mu": "training state (counter / optimizer moments)",
        "step": "training state (counter / optimizer moments)",
    }
    assert (
        main(
            ["import", "toyfamily", str(source), "--out", str(tmp_path / "e"), "--config", "hidden"]
        )
        == 1
    )
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert main(["import", "nosuchfamily", str(source), "--out", str(tmp_path / "f")]) == 1
    assert "no model family named 'nosuchfamily'" in capsys.readouterr().err
