# The conformance kit of worldflux-registry, as a pytest plugin (the way pytest ships pytester).
pytest_plugins = ["worldflux_registry.testing"]
