"""Parity: prove two implementations of the WorldModel protocol agree, step by step and over
rollouts (torch vs ONNX Runtime, fp32 vs fp16, one device vs another).

>>> report = parity.check(torch_model, onnx_model)          # doctest: +SKIP
>>> report.passed, report.print(), report.to_json("parity.json")  # doctest: +SKIP

Importing this package imports torch and numpy; onnx and matplotlib are imported only when a
failure is localised or a plot is drawn.
"""

from __future__ import annotations

from ._check import check
from ._localize import onnx_graph_file
from ._metrics import REL_EPS, Metrics, compare_arrays
from ._report import (
    FORMAT,
    GRAPHS,
    MODES,
    VERSION,
    Localization,
    OutputCheck,
    ParityReport,
    RolloutCurve,
    SelectionCheck,
)
from ._tolerance import DEFAULT_TOLERANCES, EXACT, Tolerance, normalize_precision

__all__ = [
    "DEFAULT_TOLERANCES",
    "EXACT",
    "FORMAT",
    "GRAPHS",
    "Localization",
    "MODES",
    "Metrics",
    "OutputCheck",
    "ParityReport",
    "REL_EPS",
    "RolloutCurve",
    "SelectionCheck",
    "Tolerance",
    "VERSION",
    "check",
    "compare_arrays",
    "normalize_precision",
    "onnx_graph_file",
]
