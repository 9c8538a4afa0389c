"""``optimize``: export a model several ways, measure each here, keep the fastest that passes.

Layer 9 (imports bench, exporting, parity, registry and below). The candidates are the ONNX
exporter's (fp32, int8, with or without the fused rollout graph); what a target means to ONNX
Runtime lives in ``worldflux_onnx.targets``.
"""

from __future__ import annotations

from ._optimize import CANDIDATES, METRICS, CandidateResult, OptimizeResult, optimize

__all__ = ["CANDIDATES", "METRICS", "CandidateResult", "OptimizeResult", "optimize"]
