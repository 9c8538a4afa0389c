"""The worldflux-registry command line: output, --json and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worldflux_registry.cli._main import main


def _json(capsys, argv):
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_list_json_shows_installed_families(capsys):
    code, data = _json(capsys, ["list", "--json"])
    assert code == 0
    toy = next(d for d in data if d["name"] == "toyfamily")
    assert toy["aliases"] == ["toy"] and toy["distribution"] == "wf-fixture-good"
    assert "tiny-tied" in toy["presets"]


def test_list_filters_by_pattern_and_capability(capsys):
    _, data = _json(capsys, ["list", "toy*", "--json"])
    assert [d["name"] for d in data] == ["toyfamily"]
    _, data = _json(capsys, ["list", "--capability", "stochastic", "--json"])
    assert "toyfamily" in [d["name"] for d in data]
    assert main(["list", "--capability", "telepathy"]) == 1
    assert "unknown capability" in capsys.readouterr().err


def test_list_table_for_people(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toyfamily" in out and "wf-fixture-good" in out


def test_info_reports_parameter_counts_that_match_the_built_model(capsys, fixture_registry):
    code, data = _json(capsys, ["info", "toy", "--json"])
    assert code == 0
    assert data["family"]["name"] == "toyfamily"
    assert data["fingerprint"] == fixture_registry.resolve("toy").fingerprint
    assert data["contract"]["state"][0]["name"] == "deter"
    for preset in data["presets"]:
        model = fixture_registry.load(f"toyfamily:{preset['name']}")
        assert preset["param_count"] == sum(p.numel() for p in model.parameters())


def test_info_table_shows_contract_and_presets(capsys):
    assert main(["info", "toyfamily:small"]) == 0
    out = capsys.readouterr().out
    for text in (
        "Presets",
        "tiny-tied",
        "4,286",
        "Contract of toyfamily:small",
        "noise",
        "sha256:",
    ):
        assert text in out


def test_resolve_json_and_fingerprint_ref(capsys):
    _, data = _json(capsys, ["resolve", "toyfamily:small", "--json"])
    assert data["kind"] == "preset" and data["preset"] == "small"
    code, again = _json(capsys, ["resolve", data["fingerprint"][:16], "--json"])
    assert code == 0 and again["preset"] == "small"


def test_resolve_checkpoint_directory(capsys, toy_model, tmp_path):
    path = toy_model.save_pretrained(tmp_path / "ck")
    code, data = _json(capsys, ["resolve", str(path), "--json"])
    assert code == 0 and data["kind"] == "checkpoint" and data["family"] == "toyfamily"
    assert main(["info", str(path)]) == 0


def test_not_found_is_exit_1_with_a_message_and_no_traceback(capsys):
    assert main(["info", "toyfamly"]) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'toyfamily'" in err
    assert "Traceback" not in err
    assert main(["resolve", "./no/such/dir"]) == 1


def test_usage_errors_are_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["info"]) == 2
    assert main(["--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_plugins_lists_every_plugin_and_exits_1_when_one_is_broken(fixture_sites, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fixture_sites.good), str(fixture_sites.extra)])
    run = subprocess.run(
        [sys.executable, "-m", "worldflux_registry", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr
    records = {r["entry_point"].split(" = ")[0]: r for r in json.loads(run.stdout)}
    assert records["toyfamily"]["status"] == "ok"
    assert records["importfail"]["status"] == "broken"
    assert records["importfail"]["distribution"] == "wf-fixture-importfail"
    assert records["dupea"]["status"] == "conflict"
    env["WORLDFLUX_REGISTRY_BLOCK"] = ",".join(
        r["distribution"] for r in records.values() if r["status"] != "ok"
    )
    run = subprocess.run(
        [sys.executable, "-m", "worldflux_registry", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "blocked" in run.stdout


@pytest.mark.parametrize(
    "module", ["worldflux_registry.cli._export", "worldflux_registry.cli._parity"]
)
def test_extension_modules_register_subcommands_when_present(module):
    from worldflux_registry.cli._main import build_parser

    parser = build_parser()
    try:
        __import__(module)
    except ModuleNotFoundError:
        pytest.skip(f"{module} is not part of this checkout")
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) > 4


def test_version_names_this_distribution_and_the_plugins_found(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"worldflux-registry {version('worldflux-registry')}")
    assert f"worldflux-tdmpc2 {version('worldflux-tdmpc2')}" in out
