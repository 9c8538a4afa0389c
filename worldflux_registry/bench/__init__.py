"""Speed benchmarks of one world model across backends, gated by parity.

Layer 8 (imports exporting, parity, registry and below). ``_run`` holds `run` and gathers the
public names of the other modules; ``_backends`` the backends (torch eager, torch.compile, CUDA
graphs, ONNX Runtime variants); ``_measure`` timers, memory and the environment record;
``_results`` the result types; ``_report`` the JSON document and markdown.
"""

from __future__ import annotations

from . import _run
from ._run import *  # noqa: F403  (the public names, listed once in _run.__all__)

__all__ = list(_run.__all__)
