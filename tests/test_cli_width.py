"""Every CLI table fits an 80-column terminal and never splits a name across lines."""

from __future__ import annotations

import re

import pytest

from worldflux_registry import export, parity, registry
from worldflux_registry.cli import main

WIDTH = 80
_BORDER_END = set("┓┃┩│┘┤┐")


def _render(capsys, monkeypatch, *argv: str) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    assert main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def _fits(lines: list[str]) -> None:
    too_long = [line for line in lines if len(line.rstrip()) > WIDTH]
    assert not too_long, too_long
    # A boxed table whose right edge is cut off was cropped, not laid out.
    boxed = [line.rstrip() for line in lines if line.strip() and line.lstrip()[0] in "┏┃┡│└"]
    assert all(line[-1] in _BORDER_END for line in boxed), boxed


def _whole(lines: list[str], words: list[str]) -> None:
    text = "\n".join(lines)
    for word in words:
        assert re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w.-])", text), word


def test_list_fits_80_columns(capsys, monkeypatch):
    lines = _render(capsys, monkeypatch, "list")
    _fits(lines)
    _whole(lines, ["dreamerv3", "tdmpc2", "worldflux-dreamerv3", "worldflux-tdmpc2", "size400m"])


def test_plugins_fits_80_columns(capsys, monkeypatch):
    lines = _render(capsys, monkeypatch, "plugins")
    _fits(lines)
    _whole(lines, ["worldflux-dreamerv3", "worldflux-tdmpc2", "worldflux-onnx"])


def test_info_fits_80_columns(capsys, monkeypatch):
    lines = _render(capsys, monkeypatch, "info", "dreamerv3:ci")
    _fits(lines)
    _whole(lines, ["worldflux_dreamerv3.model:DreamerV3WorldModel", "continuous_actions"])
    assert any("sha256:79e9452d" in line for line in lines)


def test_parity_table_fits_80_columns(tmp_path):
    from rich.console import Console

    pytest.importorskip("onnxruntime")
    model = registry.load("tdmpc2:ci")
    report = parity.check(model, registry.load(export(model, "onnx", tmp_path / "e", check=False)))
    console = Console(width=WIDTH, record=True, highlight=False)
    report.print(console)
    lines = console.export_text().splitlines()
    _fits(lines)
    _whole(lines, ["transition/state.latent", "decode/pred.policy_mean"])
