"""Bad command lines: each is a one-line error with the next step and exit code 1 or 2."""

from __future__ import annotations

import json
import os

import pytest

from worldflux_registry.cli import main


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text('{"format": "worldflux.checkpoint", "n": ' + "9" * 5000 + "}")
    bad = tmp_path / "badexport"
    bad.mkdir()
    (bad / "manifest.json").write_text(
        json.dumps({"format": "worldflux.onnx", "format_version": True, "graphs": {}})
    )
    return tmp_path


def _cases(p):
    cpu_only = []
    try:
        import torch

        if not torch.cuda.is_available():
            cpu_only = [(["bench", "toyfamily", "--device", "cuda", "--backends", "torch"], 1)]
    except ImportError:  # pragma: no cover
        pass
    return [
        (["bench", "toyfamily", "--threads", "-1"], 2),
        (["bench", "toyfamily", "--threads", "many"], 2),
        (["bench", "toyfamily", "--device", "garbage"], 2),
        (["parity", str(p / "badexport"), "--device", "garbage"], 2),
        (["parity", str(p / "badexport"), "--device", "cuda:x"], 2),
        (["bench", "toyfamily", "--json", str(p / "adir")], 2),
        (["bench", "toyfamily", "--markdown", str(p / "afile" / "x.md")], 2),
        (["parity", str(p / "badexport"), "--json", str(p / "adir")], 2),
        (["export", "toyfamily", "--out", str(p / "afile"), "--no-check"], 2),
        (["export", "toyfamily", "--out", str(p / "afile" / "sub"), "--no-check"], 2),
        (["export", "toyfamily", "--out", str(p / "o1"), "--opset", "0", "--no-check"], 1),
        (["export", "toyfamily", "--out", str(p / "o2"), "--opset", "999", "--no-check"], 1),
        (["info", str(p / "nested")], 1),
        (["info", str(p / "huge")], 1),
        (["resolve", str(p / "nested")], 1),
        (["parity", str(p / "badexport")], 2),
        (["resolve", "nosuch::toyfamily"], 1),
        *cpu_only,
    ]


def test_every_bad_call_is_one_line_with_a_next_step(paths, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # narrow: a long message must still be one line
    monkeypatch.delenv("WORLDFLUX_REGISTRY_DEBUG", raising=False)
    for argv, code in _cases(paths):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == code, (argv, rc, err)
        assert "Traceback" not in err, argv
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1, (argv, err)
        assert "(" in lines[0] or code == 2, (argv, lines)  # the next step, in parentheses


def test_an_unexpected_exception_is_one_line_unless_debugging(monkeypatch, capsys):
    from worldflux_registry.cli import _main

    def boom(args):
        raise ZeroDivisionError("deep inside")

    parser = _main.build_parser()
    args = parser.parse_args(["list"])
    args.func = boom
    monkeypatch.setattr(_main, "build_parser", lambda: _FixedParser(args))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError: deep inside" in err and "Traceback" not in err
    monkeypatch.setenv("WORLDFLUX_REGISTRY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["list"])


class _FixedParser:
    def __init__(self, args):
        self.args = args

    def parse_args(self, argv):
        return self.args


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_is_refused_before_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["bench", "toyfamily", "--json", str(locked / "x.json")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
