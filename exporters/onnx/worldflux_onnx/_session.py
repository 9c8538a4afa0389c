"""ONNX Runtime session defaults for deployment: no spin-waiting, a bounded thread pool.

ONNX Runtime's own defaults (one intra-op thread per core, threads spin-waiting between
kernels) are tuned for a machine the model has to itself. On a shared machine (a simulator, a
robot's control loop, other models beside it) the spinning threads compete with everything else:
one world-model transition took 2x longer that way than with one thread. The defaults here stop
spinning and size the pool from the cores this process may use.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DEFAULT_MAX_THREADS", "session_options", "usable_cores"]

#: Upper bound on the default intra-op threads: small world-model graphs stop scaling before
#: this, and a larger pool only adds synchronisation.
DEFAULT_MAX_THREADS = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, *, spinning: bool = False) -> Any:
    """`onnxruntime.SessionOptions` with the project's deployment defaults.

    ``threads`` intra-op threads (default: the usable cores, at most `DEFAULT_MAX_THREADS`);
    ``spinning=False`` sets ``session.intra_op.allow_spinning`` and ``inter_op`` to ``"0"`` so
    idle pool threads sleep instead of burning a core; full graph optimisation; sequential
    execution (one step's kernels depend on each other).
    """
    import onnxruntime as ort

    from worldflux_registry import ConfigError

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}", hint="e.g. threads=1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(usable_cores(), DEFAULT_MAX_THREADS)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
    opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return opts
