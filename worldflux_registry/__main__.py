"""``python -m worldflux_registry``: the command-line interface."""

from .cli._main import main

raise SystemExit(main())
