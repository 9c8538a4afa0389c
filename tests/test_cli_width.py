"""Every CLI table fits an 80-column terminal and never splits a name across lines."""

from __future__ import annotations

import json
import re

import pytest

from worldflux_registry import export, parity, registry
from worldflux_registry.cli import main

WIDTH = 80
_BORDER_END = set("┓┃┩│┘┤┐")


def _render(capsys, monkeypatch, *argv: str, code: int = 0) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    assert main(list(argv)) == code
    return capsys.readouterr().out.splitlines()


def _fits(lines: list[str]) -> None:
    too_long = [line for line in lines if len(line.rstrip()) > WIDTH]
    assert not too_long, too_long
    # A boxed table whose right edge is cut off was cropped, not laid out.
    boxed = [line.rstrip() for line in lines if line.strip() and line.lstrip()[0] in "┏┃┡│└"]
    assert all(line[-1] in _BORDER_END for line in boxed), boxed
    # Rich marks a cell it had to truncate with an ellipsis.
    assert not [line for line in lines if "…" in line]


def _whole(lines: list[str], words) -> None:
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


@pytest.mark.parametrize("ref", ["dreamerv3:ci", "tdmpc2:ci"])
def test_info_fits_80_columns(capsys, monkeypatch, ref):
    lines = _render(capsys, monkeypatch, "info", ref)
    _fits(lines)
    spec = registry.get(ref.split(":")[0])
    contract = spec.contract_for({**spec.defaults, **spec.config("ci")})
    names = [
        s["name"]
        for group in contract.to_dict().values()
        if isinstance(group, list)
        for s in group
        if isinstance(s, dict) and "name" in s
    ]
    assert names
    _whole(lines, [spec.model, *spec.presets, *names])
    # Every preset's fingerprint prefix (8 hex digits resolve) is shown whole.
    for preset in spec.presets:
        fingerprint = spec.contract_for(spec.config(preset)).fingerprint()
        assert any(fingerprint[: len("sha256:") + 8] in line for line in lines), preset


def test_parity_table_fits_80_columns(tmp_path):
    from rich.console import Console

    pytest.importorskip("onnxruntime")
    model = registry.load("tdmpc2:ci")
    report = parity.check(model, registry.load(export(model, "onnx", tmp_path / "e", check=False)))
    console = Console(width=WIDTH, record=True, highlight=False)
    report.print(console)
    lines = console.export_text().splitlines()
    _fits(lines)
    _whole(lines, sorted({c.key for c in report.steps}))
    # The verdict column is the last: rich drops a column that does not fit, silently.
    rows = [line for line in lines if line.split()[:1] in (["step"], ["teacher"], ["free"])]
    assert rows and all(line.rstrip().endswith(" ok") for line in rows), rows


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """``export tdmpc2:ci`` through the CLI at 80 columns: (directory, its stdout lines)."""
    pytest.importorskip("onnxruntime")
    import contextlib
    import io
    import os

    out = tmp_path_factory.mktemp("cli") / "t"
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            assert main(["export", "tdmpc2:ci", "--out", str(out)]) == 0
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out, buffer.getvalue().splitlines()


def test_export_summary_and_its_parity_table_fit_80_columns(cli_export):
    out, lines = cli_export
    _fits(lines)
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    _whole(lines, [*graphs, *(g["file"] for g in graphs.values()), "transition/state.latent"])


def test_parity_cli_fits_80_columns_and_says_what_it_wrote(cli_export, capsys, monkeypatch):
    out, _ = cli_export
    report = out.parent / "p.json"
    lines = _render(
        capsys, monkeypatch, "parity", str(out), "--horizon", "4", "--json", str(report)
    )
    err = capsys.readouterr().err  # _render consumed stdout; stderr is read here
    _fits(lines)
    assert report.is_file()
    keys = {f"{c['graph']}/{c['output']}" for c in json.loads(report.read_text())["steps"]}
    _whole(lines, sorted(keys))
    # Notes that qualify the PASS are printed with it.
    assert any("note: no --reference" in line for line in lines)
    del err


def test_info_of_an_export_fits_and_a_tampered_one_is_not_vouched_for(
    cli_export, capsys, monkeypatch, tmp_path
):
    import shutil

    out, _ = cli_export
    lines = _render(capsys, monkeypatch, "info", str(out))
    _fits(lines)
    assert any("passed" in line for line in lines if line.startswith("parity"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with (copy / "decode.onnx").open("ab") as f:
        f.write(b"\0")
    lines = _render(capsys, monkeypatch, "info", str(copy))
    parity_line = "\n".join(lines)
    assert "stale" in parity_line and "decode.onnx" in parity_line
    assert not any("passed" in line for line in lines if line.startswith("parity"))


def test_bench_tables_fit_80_columns(cli_export, capsys, monkeypatch):
    out, _ = cli_export
    argv = ["bench", str(out), "--backends", "torch,ort-cpu", "--warmup", "1", "--repeats", "2"]
    argv += ["--rollout-repeats", "2", "--max-seconds", "0.2", "--horizon", "2"]
    lines = _render(capsys, monkeypatch, *argv)
    _fits(lines)
    _whole(lines, ["torch", "ort-cpu", "tdmpc2:ci"])
    text = "\n".join(lines)
    assert "|---" not in text  # tables for people; Markdown only with --markdown
    # Only the targets this run measured: no GPU target is listed on a CPU-only run.
    assert "GPU, rollout" not in text


def test_a_passing_output_whose_reference_is_about_zero_shows_no_relative_error(cli_export):
    from rich.console import Console

    out, _ = cli_export
    report = (
        parity.ParityReport.from_json(out.parent / "p.json")
        if (out.parent / "p.json").is_file()
        else None
    )
    if report is None:  # the parity CLI test did not run first: check here
        model = registry.load(str(out))
        report = parity.check(registry.load("tdmpc2:ci"), model, horizon=2)
    data = report.to_dict()
    # A passing output where the reference is ~0: the error equals the value (max rel 1) and
    # the directions differ, yet atol holds it.
    step = data["steps"][0]
    step["metrics"].update(max_rel=1.0, cosine=0.0, passed=True)
    console = Console(width=WIDTH, record=True, highlight=False)
    parity.ParityReport.from_dict(data).print(console)
    lines = console.export_text().splitlines()
    _fits(lines)
    key = f"{step['graph']}/{step['output']}"
    row = next(line for line in lines if line.split()[:2] == ["step", key])
    assert row.split()[3:5] == ["-*", "-*"], row
    assert any(line.startswith("-* the reference is about 0") for line in lines)
