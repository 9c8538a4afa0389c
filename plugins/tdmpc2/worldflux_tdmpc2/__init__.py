"""TD-MPC2 world model family for worldflux-registry.

``worldflux_tdmpc2.plugin`` (the entry point) and ``worldflux_tdmpc2.spec`` are torch-free;
``worldflux_tdmpc2.model`` holds `TDMPC2WorldModel` and is imported when a model is built.
"""
