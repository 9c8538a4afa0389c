"""The Python snippets of the user docs run, and print what their comments say they print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: Pages whose every ``python`` block is executed as written.
PAGES = ("quickstart.md", "load-a-model.md")
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<expected>.+?)(?:\s{2,}\(.*\))?\s*$")


def python_blocks(markdown: str) -> list[str]:
    """The code of every ``python`` block of ``markdown``, in order."""
    return [match.group(1) for match in _BLOCK.finditer(markdown)]


def expected_prints(code: str) -> list[str]:
    """What the ``print(...)  # expected`` comments of ``code`` say it prints, line by line."""
    return [m.group("expected") for m in map(_PRINT.match, code.splitlines()) if m]


def snippets() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        for i, code in enumerate(python_blocks((DOCS / page).read_text(encoding="utf-8"))):
            found.append((page, i, code))
    return found


def test_every_page_has_snippets():
    assert {page for page, _, _ in snippets()} == set(PAGES)


@pytest.mark.parametrize("page, index, code", snippets(), ids=lambda v: str(v)[:20])
def test_snippet_runs_and_prints_what_it_says(page, index, code, tmp_path):
    expected = expected_prints(code)
    # A reader has the first-party distributions, not the test suite's fixture plugins.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if "test-fixtures" not in p),
    }
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, f"{page} snippet {index} failed:\n{run.stderr[-3000:]}"
    printed = run.stdout.splitlines()
    assert printed == expected, f"{page} snippet {index} printed {printed}, docs say {expected}"


def test_the_plugin_page_lists_every_capability_name():
    from worldflux_registry import Capability

    page = (DOCS / "write-a-plugin.md").read_text(encoding="utf-8")
    table = page[page.index("<!-- capability-table") :].split("\n\n")[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert len(listed) == len(set(listed)), f"a capability is listed twice: {listed}"
    assert set(listed) == {c.value for c in Capability}
