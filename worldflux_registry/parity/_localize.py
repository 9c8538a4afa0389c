"""Localising a failed check: the first graph and output at fault, and for ONNX candidates
whether the exported graph or the runtime executing it is to blame."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import WorldFluxRegistryError
from ..registry._artifact import read_artifact_manifest
from ._metrics import compare_arrays
from ._report import CAUSES, GRAPHS, MODES, Localization, OutputCheck, RolloutCurve

if TYPE_CHECKING:
    from ._report import ParityReport

__all__ = ["localize", "onnx_graph_file", "run_reference_evaluator"]


@dataclass
class _Site:
    """What was fed to a graph and what came out, kept for localising a failure."""

    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    candidate: dict[str, np.ndarray]


def onnx_graph_file(candidate: Any, graph: str) -> Path | None:
    """The ``.onnx`` file the candidate runs for ``graph``, or None if it is not ONNX.

    Duck-typed: ``candidate.graph_path(graph)``, else ``candidate.artifact_dir`` (or
    ``export_dir``) holding a ``manifest.json`` whose ``graphs`` entry names the file.
    """
    graph_path = getattr(candidate, "graph_path", None)
    if callable(graph_path):
        try:
            found = graph_path(graph)
        except Exception:
            found = None
        if found:
            return Path(found)
    directory = getattr(candidate, "artifact_dir", None) or getattr(candidate, "export_dir", None)
    if not directory:
        return None
    try:
        manifest = read_artifact_manifest(directory)
    except WorldFluxRegistryError:
        return None
    graphs = manifest.get("graphs")
    entry: Any = None
    if isinstance(graphs, Mapping):
        entry = graphs.get(graph)
    elif isinstance(graphs, list):
        entry = next((g for g in graphs if isinstance(g, dict) and g.get("name") == graph), None)
    if isinstance(entry, str):
        return Path(directory) / entry
    if isinstance(entry, Mapping):
        name = entry.get("file") or entry.get("path")
        if isinstance(name, str):
            return Path(directory) / name
    return None


def run_reference_evaluator(
    path: Path, feeds: Mapping[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    """Run ``onnx.reference.ReferenceEvaluator`` on a graph file; return the named outputs."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KeyError(f"no value for graph inputs {missing}")
    graph_outputs = [o.name for o in model.graph.output]
    wanted = [_graph_output(name, graph_outputs) for name in outputs]
    evaluator = ReferenceEvaluator(model)
    values = evaluator.run(wanted, {n: feeds[n] for n in names})
    return {name: np.asarray(v) for name, v in zip(outputs, values, strict=True)}


def _graph_output(output: str, graph_outputs: list[str]) -> str:
    """The graph output carrying ``output`` (``state.deter`` may be named ``new_state.deter``:
    an ONNX graph cannot give an output the name of an input)."""
    if output in graph_outputs:
        return output
    group, _, key = output.partition(".")
    for name in graph_outputs:
        prefix, _, rest = name.partition(".")
        if rest == key and prefix.endswith(group):
            return name
    raise KeyError(f"the graph has no output for {output!r} (outputs: {graph_outputs})")


def _first_step_failure(report: ParityReport) -> OutputCheck | None:
    batches = report.settings.get("batch_sizes", [])
    failing = [c for c in report.steps if not c.passed]
    if not failing:
        return None
    order = {key: i for i, key in enumerate(dict.fromkeys(c.key for c in report.steps))}
    return min(
        failing,
        key=lambda c: (
            GRAPHS.index(c.graph),
            order[c.key],
            batches.index(c.batch) if c.batch in batches else 0,
        ),
    )


def _first_curve_failure(report: ParityReport, mode: str) -> RolloutCurve | None:
    failing = [c for c in report.rollouts if c.mode == mode and not c.passed]
    if not failing:
        return None
    order = {key: i for i, key in enumerate(dict.fromkeys(c.key for c in report.rollouts))}
    return min(
        failing,
        key=lambda c: (c.first_failing_step or 0, GRAPHS.index(c.graph), order[c.key]),
    )


def localize(
    report: ParityReport,
    candidate: Any,
    sites: Mapping[tuple[str, str, int, int | None], _Site],
) -> Localization | None:
    """Where the failing ``report`` goes wrong first, and why (see `Localization`)."""
    for mode in MODES:
        if mode == "step":
            check = _first_step_failure(report)
            if check is None:
                continue
            site = sites.get(("step", check.graph, check.batch, None))
            loc = Localization(check.graph, check.output, mode, check.batch, None, "", "")
            return _blame(loc, candidate, site, check.tolerance, check.categorical)
        curve = _first_curve_failure(report, mode)
        if curve is None:
            continue
        step = curve.first_failing_step
        loc = Localization(curve.graph, curve.output, mode, curve.batch, step, "", "")
        if mode == "teacher_forced":
            site = sites.get(("teacher_forced", curve.graph, curve.batch, step))
            return _blame(loc, candidate, site, curve.tolerance, curve.categorical)
        teacher = report.curves("teacher_forced", curve.key)
        if curve.error:
            loc.cause, loc.detail = "candidate", curve.error
        elif teacher and all(c.passed for c in teacher):
            loc.cause = "rollout" if step == 1 else "drift"
            loc.detail = CAUSES[loc.cause]
        else:
            loc.cause = "unknown"
            loc.detail = (
                "free-running diverges; run the teacher_forced mode to tell single-step "
                "error from compounding drift"
            )
        return loc
    return None


def _blame(
    loc: Localization,
    candidate: Any,
    site: _Site | None,
    tolerance: Any,
    categorical: bool,
) -> Localization:
    path = onnx_graph_file(candidate, loc.graph)
    if path is None:
        loc.cause, loc.detail = "candidate", CAUSES["candidate"]
        return loc
    if site is None or loc.output not in site.reference:
        loc.cause = "unknown"
        loc.detail = "the inputs of the failing graph were not kept"
        return loc
    try:
        got = run_reference_evaluator(path, site.feeds, [loc.output])[loc.output]
    except Exception as exc:
        loc.cause = "unknown"
        loc.detail = (
            f"the ONNX reference evaluator could not run {path.name}: {type(exc).__name__}: {exc}"
        )
        return loc
    loc.evaluator = compare_arrays(
        site.reference[loc.output], got, tolerance, categorical=categorical
    )
    if loc.output in site.candidate:
        loc.evaluator_vs_candidate = compare_arrays(
            got, site.candidate[loc.output], tolerance, categorical=categorical
        )
    loc.cause = "runtime" if loc.evaluator.passed else "exporter"
    detail = CAUSES[loc.cause]
    if loc.evaluator.max_abs is not None:
        detail += f" (evaluator vs torch: max abs {loc.evaluator.max_abs:.2e})"
    loc.detail = detail
    return loc
