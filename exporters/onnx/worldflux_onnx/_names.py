"""Graph names of an ONNX export (torch-free: the manifest reader checks them before any model)."""

from __future__ import annotations

__all__ = [
    "AGENT_GRAPHS",
    "ALL_GRAPHS",
    "COND",
    "KNOWN_GRAPHS",
    "MODE_GRAPHS",
    "MODE_SUFFIX",
    "ROLLOUT",
]

#: The protocol steps the exporter knows, in the order they are written.
ALL_GRAPHS = ("encode", "transition", "update", "decode")
#: The fused rollout graph: ``horizon`` transition + decode steps unrolled into one graph, so a
#: runtime launches one session run (one CUDA-graph replay) per ``horizon`` steps.
ROLLOUT = "rollout"
#: Agent steps (`AgentSpec.graph`): exported when the contract declares one.
AGENT_GRAPHS = ("plan", "act")
#: Every graph name `check_graphs` accepts, in the order they are written.
KNOWN_GRAPHS = (*ALL_GRAPHS, ROLLOUT, *AGENT_GRAPHS)
#: ``<graph>.mode`` is the deterministic variant of a stochastic graph: the step with
#: ``deterministic=True`` (the distribution's mode), without noise inputs.
MODE_SUFFIX = ".mode"
#: Input name prefix of side conditions (`IOContract.conditions`).
COND = "cond."
#: Graphs whose protocol step takes ``deterministic`` (``decode`` does not).
MODE_GRAPHS = ("encode", "transition", "update", ROLLOUT)
