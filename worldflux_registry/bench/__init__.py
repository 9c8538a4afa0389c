"""Speed benchmarks of one world model across backends, gated by parity.

Layer 8 (imports exporting, parity, registry and below). ``_run`` holds `run`; ``_backends`` the
backends (torch eager, CUDA graphs, ONNX Runtime variants); ``_measure`` timers, memory and the
environment record; ``_results`` the result types; ``_report`` the JSON document and markdown.
"""

from __future__ import annotations

from ._run import (
    BACKENDS,
    FORMAT,
    FORMAT_VERSION,
    TARGETS,
    BackendResult,
    BenchRun,
    Timing,
    check_backend_names,
    document,
    environment,
    evaluate_targets,
    run,
    to_markdown,
    write,
)

__all__ = [
    "BACKENDS",
    "FORMAT",
    "FORMAT_VERSION",
    "TARGETS",
    "BackendResult",
    "BenchRun",
    "Timing",
    "check_backend_names",
    "document",
    "environment",
    "evaluate_targets",
    "run",
    "to_markdown",
    "write",
]
