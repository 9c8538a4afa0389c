"""Record the CLI at 80 columns as SVG: the captures shown on the command-line page.

Run from anywhere: ``python docs/assets/cli/make_captures.py``. Each command runs in one
temporary directory (so paths read ``d``) through ``worldflux_registry.cli.main``, with every
rich console it opens replaced by one recording console 80 columns wide: stdout and stderr
appear in the order a terminal shows them. Progress bars are not animated in a recording; their
per-graph lines are.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import rich.console

HERE = Path(__file__).resolve().parent
WIDTH = 80
COMMANDS = {
    "list": ["list"],
    "info": ["info", "dreamerv3:ci"],
    "export": ["export", "dreamerv3:ci", "--out", "d"],
    "parity": ["parity", "d", "--horizon", "8", "--plot", "parity-plot.png"],
    "bench": ["bench", "dreamerv3:ci", "--repeats", "20", "--rollout-repeats", "10"],
}


def record(name: str, argv: list[str]) -> int:
    """Run ``worldflux-registry ARGV`` and save what it printed as ``<name>.svg`` here."""
    from worldflux_registry.cli import main

    console = rich.console.Console(
        width=WIDTH, record=True, file=io.StringIO(), color_system="truecolor", highlight=False
    )
    original = rich.console.Console
    rich.console.Console = lambda *args, **kwargs: console  # type: ignore[assignment, misc]
    plain = io.StringIO()
    stdout, sys.stdout = sys.stdout, plain  # print() of a path: kept, after the tables
    try:
        console.print(f"[bold]$ worldflux-registry {' '.join(argv)}[/]")
        code = main(argv)
    finally:
        rich.console.Console = original  # type: ignore[misc]
        sys.stdout = stdout
    for line in plain.getvalue().splitlines():
        console.print(line, markup=False)
    console.save_svg(str(HERE / f"{name}.svg"), title=f"worldflux-registry {argv[0]}")
    print(f"{name}.svg: exit {code}")
    return code


def main() -> int:
    os.environ["COLUMNS"] = str(WIDTH)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        codes = [record(name, argv) for name, argv in COMMANDS.items()]
        plot = Path(tmp) / "parity-plot.png"
        if plot.is_file():
            (HERE / "parity-plot.png").write_bytes(plot.read_bytes())
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
