"""The family passes the worldflux-registry conformance kit (every preset of mymlp)."""

from worldflux_registry.testing.conformance import *  # noqa: F403
