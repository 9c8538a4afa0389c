"""``python -m worldflux_registry``: the command-line interface."""

from ._cli import main

raise SystemExit(main())
