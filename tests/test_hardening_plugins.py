"""Plugins that misbehave: sys.exit and KeyboardInterrupt are isolated (a real Ctrl-C is not),
their prints keep off stdout, slow ones are timed, and a family name two distributions claim
stays reachable by a distribution-qualified ref."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from worldflux_registry import PluginConflictError, Registry
from worldflux_registry.cli import _main
from worldflux_registry.hookspecs import hookimpl


def _dist(root: Path, name: str, module_source: str) -> str:
    """A plugin distribution on ``root`` (a dist-info directory and its module), its module."""
    module = "wfh_" + uuid.uuid4().hex[:8]
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[worldflux_registry]\nplug = {module}\n")
    return module


TOY = """
from wf_fixture_good.plugin import worldflux_registry_families as _good
from worldflux_registry.hookspecs import hookimpl

@hookimpl
def worldflux_registry_families():
    return _good()
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    for name in (
        "WORLDFLUX_REGISTRY_STRICT",
        "WORLDFLUX_REGISTRY_PLUGINS",
        "WORLDFLUX_REGISTRY_BLOCK",
    ):
        monkeypatch.delenv(name, raising=False)
    return root


def _record(registry: Registry, distribution: str):
    return next(r for r in registry.plugins() if r.distribution == distribution)


def test_sys_exit_at_import_marks_only_that_plugin_broken(site):
    _dist(site, "wfh-exits", "import sys\nsys.exit(3)\n")
    registry = Registry()
    record = _record(registry, "wfh-exits")
    assert record.status == "broken" and "sys.exit(3)" in record.error
    assert "toyfamily" in registry.list()


def test_sys_exit_and_keyboard_interrupt_in_a_hook_are_isolated():
    class Exits:
        @hookimpl
        def worldflux_registry_families(self):
            raise SystemExit(0)

    class Interrupts:
        @hookimpl
        def worldflux_registry_families(self):
            raise KeyboardInterrupt

    registry = Registry(entry_points=False, plugins=[Exits(), Interrupts()])
    errors = sorted(r.error for r in registry.plugins())
    assert errors == [
        "called sys.exit(0)",
        "raised KeyboardInterrupt itself (no Ctrl-C was pressed)",
    ]


def test_a_real_ctrl_c_while_a_plugin_runs_still_stops_discovery():
    class Slow:
        @hookimpl
        def worldflux_registry_families(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            return []

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Registry(entry_points=False, plugins=[Slow()]).plugins()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_plugin_prints_go_to_stderr_and_list_json_stays_parseable(site, monkeypatch, capsys):
    _dist(site, "wfh-chatty", 'print("hello from a plugin")\n' + TOY.replace("toy", "toy"))
    monkeypatch.setattr(_main, "_registry", lambda: Registry())
    assert _main.main(["list", "--json"]) == 0
    captured = capsys.readouterr()
    assert "hello from a plugin" in captured.err
    json.loads(captured.out)


def test_each_plugin_is_timed_and_slow_ones_are_reported(monkeypatch, capsys):
    class Slow:
        @hookimpl
        def worldflux_registry_families(self):
            time.sleep(1.05)
            return []

    registry = Registry(entry_points=False, plugins=[Slow()])
    [record] = registry.plugins()
    assert record.seconds >= 1.0 and record.to_dict()["seconds"] == record.seconds
    monkeypatch.setattr(_main, "_registry", lambda: registry)
    monkeypatch.setenv("COLUMNS", "200")
    assert _main.main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "slow" in captured.out and "slow plugins" in captured.err


def test_a_conflicting_family_stays_reachable_by_distribution(site):
    _dist(site, "wfh-impostor", TOY)  # claims toyfamily, like wf-fixture-good
    registry = Registry()
    with pytest.raises(PluginConflictError) as info:
        registry.get("toyfamily")
    assert "wf-fixture-good::toyfamily" in info.value.hint
    assert "wfh-impostor::toyfamily" in info.value.hint
    assert registry.get("wf-fixture-good::toyfamily").distribution == "wf-fixture-good"
    resolved = registry.resolve("wfh_impostor::toyfamily:small")
    assert (resolved.family, resolved.preset) == ("toyfamily", "small")
    model = registry.load("wf-fixture-good::toyfamily:tiny")
    assert model.family == "toyfamily"


def test_a_checkpoint_of_a_conflicting_family_loads_through_its_distribution(
    site, toy_model, tmp_path
):
    import dataclasses

    good = Registry().get("toyfamily")
    model = toy_model
    model.family_spec = dataclasses.replace(good, distribution="wf-fixture-good")
    model.save_pretrained(tmp_path / "ckpt")
    _dist(site, "wfh-impostor2", TOY)
    Registry().load(str(tmp_path / "ckpt"))


def test_an_unknown_qualified_ref_says_which_exist(site):
    registry = Registry()
    with pytest.raises(
        Exception, match=r"distribution-qualified refs: .*wf-fixture-good::toyfamily"
    ):
        registry.get("nosuch::toyfamily")


def test_a_plugin_printing_at_import_leaves_sys_stdout_alone(site):
    _dist(site, "wfh-printer", 'print("x")\n')
    stdout = sys.stdout
    Registry().plugins()
    assert sys.stdout is stdout
