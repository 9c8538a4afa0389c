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


def test_every_subcommand_help_has_examples_and_every_option_a_help_text():
    from worldflux_registry.cli._main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        text = parser.format_help()
        assert "examples:\n  worldflux-registry " + name in text, name
        for action in parser._actions:
            assert action.help, (name, action.dest)


def test_help_shows_defaults_once():
    from worldflux_registry.cli._main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(sub.choices["bench"].format_help().split())
    assert "timed transitions (default: 50)" in text
    assert text.count("(default: torch,ort-cpu)") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "dreamerv3:ci", "--out", "{tmp}/e", "--graphs", "encode,bogus"],
        ["export", "dreamerv3:ci", "--out", "{tmp}/full"],
        ["bench", "dreamerv3:ci", "--backends", "torch,onnx"],
        ["parity", "{tmp}/full", "--json", "{tmp}"],
    ],
)
def test_usage_errors_exit_2_before_any_model_loads(argv, tmp_path, capsys, monkeypatch):
    from worldflux_registry.registry._registry import Registry

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(Registry, "load", no_load)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() and not err.startswith("\n"), err
    assert "error" in err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_all_combines_with_named_graphs():
    from worldflux_registry.cli._main import build_parser

    args = build_parser().parse_args(
        ["export", "dreamerv3:ci", "--out", "d", "--graphs", "all,rollout"]
    )
    assert args.graphs == ["all", "rollout"]


def test_parity_on_a_directory_that_is_no_export_names_the_export_command(tmp_path, capsys):
    assert main(["parity", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "worldflux-registry export REF --out" in err and "export(model" not in err


def test_an_unknown_family_suggests_the_family_not_its_aliases(capsys):
    assert main(["info", "dreamerv"]) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'dreamerv3'?" in err
    assert "'dreamer'" not in err.split("(")[0]
