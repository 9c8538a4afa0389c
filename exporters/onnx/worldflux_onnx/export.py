"""Lower a `WorldModel`'s graphs to ONNX with ``torch.onnx.export(dynamo=True)``.

Called through ``worldflux_registry.export(model, "onnx", out_dir)``; `export_model` is the
exporter entry named by this package's `ExporterSpec`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worldflux_registry import ExportError, IOContract
from worldflux_registry.plugin_api import temp_sibling

from ._graphs import (
    ALL_GRAPHS,
    COND,
    KNOWN_GRAPHS,
    MODE_GRAPHS,
    MODE_SUFFIX,
    ROLLOUT,
    GraphModule,
    GraphSignature,
    check_graphs,
    check_traced_outputs,
    example_inputs,
    signature,
    without_unused_conditions,
)
from ._manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_EXPORTER,
    META_FAMILY,
    META_FINGERPRINT,
    META_GRAPH,
    META_PRESET,
    check_opset,
    check_replaceable,
    install,
    sha256_file,
    write_json_atomic,
)

__all__ = ["DEFAULT_OPSET", "PRECISIONS", "export_model"]

#: Opset used when none is asked for: the newest that TensorRT 10 and ORT >= 1.18 both run.
DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16", "int8")
#: ONNX operators that ``precision="int8"`` quantizes (dynamic int8: weights int8, activations
#: quantized per call); everything else stays float32.
INT8_OPS = ("MatMul", "Gemm")
#: Batch size of the example inputs: >= 2 so the exporter cannot specialise the batch to 1.
EXAMPLE_BATCH = 2
#: Steps unrolled in the fused ``rollout`` graph when none is asked for.
DEFAULT_ROLLOUT_HORIZON = 16

Progress = Callable[[str, str], None]


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    opset: int | None = None,
    graphs: Sequence[str] | str = ("encode", "transition", "decode"),
    precision: str = "fp32",
    progress: Progress | None = None,
    example_batch: int = EXAMPLE_BATCH,
    overwrite: bool = True,
    mode_graphs: bool = False,
    rollout_horizon: int = DEFAULT_ROLLOUT_HORIZON,
) -> Path:
    """Export ``model``'s graphs to ONNX files plus ``manifest.json`` in ``out_dir``.

    Args:
        model: A `WorldModel` (torch).
        out_dir: Artifact directory; written atomically (temporary sibling, then rename). An
            existing export there is replaced; any other non-empty directory is refused.
        opset: ONNX opset (default `DEFAULT_OPSET`).
        graphs: Graph names, or ``"all"`` for every protocol step the model's capabilities
            allow. The agent step its contract declares (`AgentSpec`: ``"plan"`` / ``"act"``,
            one graph per environment step, every random draw an input) is exported when
            named (``"encode,plan"``, ``"all,plan"``): it is the largest graph by far.
            ``"rollout"`` (asked for by name) adds the fused rollout graph:
            ``rollout_horizon`` transition + decode steps of the model's own ``rollout``,
            unrolled into one graph that `OnnxWorldModel.rollout` runs once per horizon.
        precision: ``"fp32"``, ``"fp16"`` (weights and compute in half, graph inputs and outputs
            float32, normalisation layers float32) or ``"int8"`` (ONNX Runtime's dynamic int8
            quantization of every MatMul/Gemm with a constant weight, one scale per weight;
            inputs, outputs and every other operator float32).
        progress: Called as ``progress(graph, stage)``: stage ``"queued"`` for every graph
            first (so a caller knows the total), then per graph ``"start"``, each step as it
            begins (``"tracing"``, ``"converting"``, ``"quantizing"``, ``"checking"``) and
            ``"done"``.
        example_batch: Batch of the tracing inputs (>= 2; the batch axis stays symbolic).
        mode_graphs: Also export ``<graph>.mode`` for each selected ``encode``, ``transition``,
            ``update`` or ``rollout`` graph that takes noise: the step run with
            ``deterministic=True`` (no noise inputs), which `OnnxWorldModel` runs for
            ``deterministic=True`` calls.
        rollout_horizon: Steps unrolled in the ``rollout`` graph (fixed in the file; the batch
            stays symbolic). Export time and graph size grow linearly with it.

    Raises:
        ExportError: naming the graph, the operator or node at fault and the exporter's report.
    """
    out = Path(out_dir)
    if precision not in PRECISIONS:
        raise ExportError(
            f"unknown precision {precision!r}", hint="use one of " + ", ".join(PRECISIONS)
        )
    if example_batch < 2:
        raise ExportError("example_batch must be >= 2 so the batch axis stays symbolic")
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    contract: IOContract = model.io_contract()  # type: ignore[operator]
    selected = _select_graphs(model, graphs)
    check_replaceable(out, overwrite=overwrite)  # early; checked again under the lock

    fingerprint = contract.fingerprint()
    family = getattr(model, "family", None)
    preset = getattr(model, "preset", None)
    meta = {
        META_FINGERPRINT: fingerprint,
        META_FAMILY: str(family or ""),
        META_PRESET: str(preset or ""),
        META_EXPORTER: _version("worldflux-onnx") or "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    was_training = model.training
    try:
        model.eval()
        traced = _half_model(model) if precision == "fp16" else model
        entries: dict[str, Any] = {}
        sigs: list[GraphSignature] = []
        for graph in selected:
            horizon = rollout_horizon if graph == ROLLOUT else None
            sigs.append(signature(contract, graph, horizon=horizon))
            if mode_graphs and graph in MODE_GRAPHS and sigs[-1].noise:
                sigs.append(signature(contract, graph + MODE_SUFFIX, horizon=horizon))
        for sig in sigs:
            if progress is not None:
                progress(sig.graph, "queued")
        for sig in sigs:
            graph = sig.graph
            if progress is not None:
                progress(graph, "start")
            entries[graph] = _export_graph(
                traced,
                sig,
                contract,
                tmp,
                opset,
                {**meta, META_GRAPH: graph},
                example_batch,
                half=precision == "fp16",
                int8=precision == "int8",
                keep_fp32=tuple(getattr(model, "keep_in_fp32", ())),
                step=None if progress is None else functools.partial(progress, graph),
            )
            if sig.deterministic:
                entries[graph]["mode_of"] = sig.base
            if sig.horizon is not None:
                entries[graph]["horizon"] = sig.horizon
            if progress is not None:
                progress(graph, "done")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": family,
            "preset": preset,
            "config": getattr(model, "config", {}),
            "capabilities": sorted(c.value for c in getattr(model, "capabilities", ())),
            "contract": contract.to_dict(),
            "fingerprint": fingerprint,
            "opset": opset,
            "precision": precision,
            "graphs": entries,
            "versions": _versions(family),
            "parity": None,
        }
        _check_written_opset(tmp, entries, opset)
        write_json_atomic(tmp / MANIFEST, manifest)
        install(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return out


def _select_graphs(model: nn.Module, graphs: Sequence[str] | str) -> tuple[str, ...]:
    supports = getattr(model, "supports", None)

    def ok(graph: str) -> bool:
        # Every graph is a protocol step: export only the steps the model advertises.
        return bool(supports(graph)) if supports is not None else graph != "update"

    if isinstance(graphs, str):
        if graphs == "all":
            return tuple(g for g in ALL_GRAPHS if ok(g))
        graphs = [g.strip() for g in graphs.split(",") if g.strip()]
    if "all" in graphs:  # "all,plan": every protocol step, and the graphs named beside it
        graphs = [*(g for g in ALL_GRAPHS if ok(g)), *(g for g in graphs if g != "all")]
    selected = check_graphs(graphs)
    if not selected:
        raise ExportError("no graph to export", hint="graphs: " + ", ".join(KNOWN_GRAPHS))
    for graph in selected:
        if not ok(graph):
            raise ExportError(
                f"{type(model).__name__} does not advertise {graph!r}, so it has no {graph} graph",
                hint="leave it out of graphs, or use graphs='all'",
                graph=graph,
            )
    return selected


def _export_graph(
    model: nn.Module,
    sig: GraphSignature,
    contract: IOContract,
    tmp: Path,
    opset: int,
    meta: dict[str, str],
    batch: int,
    *,
    half: bool,
    int8: bool = False,
    keep_fp32: tuple[str, ...] = (),
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    import onnx

    step = step or (lambda name: None)

    wrapper = GraphModule(model, sig, half=half).eval()
    args = example_inputs(sig, contract, batch)
    path = tmp / f"{sig.graph}.onnx"
    start = time.perf_counter()
    step("tracing")
    try:
        exported = _trace(wrapper, args, sig)
    except ExportError:
        raise
    except Exception as exc:
        raise _trace_failure(wrapper, args, sig, exc) from exc
    check_traced_outputs(exported, args, sig)
    step("converting")
    try:
        program = _torch_export(exported, sig, opset)
    except Exception as exc:
        raise _export_failure(exported, sig, opset, exc) from exc
    _drop_unread_conditions(program.model.graph)
    sig = without_unused_conditions(sig, [v.name for v in program.model.graph.inputs])
    _name_batch_axis(program.model.graph, sig.inputs[0].batch_axis)
    axes = {p.name: p.batch_axis for p in (*sig.inputs, *sig.outputs)}
    fixed = [
        v.name
        for v in (*program.model.graph.inputs, *program.model.graph.outputs)
        if v.shape is not None
        and len(v.shape) > axes.get(v.name, 0)
        and isinstance(v.shape[axes.get(v.name, 0)], int)
    ]
    if fixed:
        raise ExportError(
            f"graph {sig.graph!r} was exported with a fixed batch size for {fixed}",
            hint="the step turns the batch size into a Python int (int(), .item(), "
            "shape comparisons with constants); keep it a tensor dimension",
            graph=sig.graph,
        )
    for key, value in meta.items():
        program.model.metadata_props[key] = value
    program.save(path)
    if int8:
        step("quantizing")
        _quantize_int8(path, sig, keep_fp32)
    step("checking")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(
            f"graph {sig.graph!r} failed onnx.checker / shape inference: {exc}",
            hint=f"inspect {path}",
            graph=sig.graph,
        ) from exc
    data = sorted(p for p in tmp.iterdir() if p.name.startswith(path.name) and p != path)
    entry: dict[str, Any] = {
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": [p.to_dict() for p in sig.inputs],
        "outputs": [p.to_dict() for p in sig.outputs],
        "noise": list(sig.noise),
        "export_seconds": round(time.perf_counter() - start, 3),
    }
    if data:
        entry["external_data"] = [{"file": p.name, "sha256": sha256_file(p)} for p in data]
    return entry


def _quantize_int8(path: Path, sig: GraphSignature, keep_fp32: tuple[str, ...]) -> None:
    """Replace the float32 graph at ``path`` by its dynamic-int8 quantization (in place).

    MatMul/Gemm nodes whose weight is a parameter under one of ``keep_fp32`` (the model's
    `WorldModel.keep_in_fp32`) stay float32.
    """
    import onnx

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ExportError(
            "precision='int8' needs onnxruntime's quantization tools",
            hint="pip install 'worldflux-registry[onnx]'",
            graph=sig.graph,
        ) from exc
    quantized = path.with_name(path.name + ".int8")
    graph = onnx.load(str(path), load_external_data=False).graph
    # Weights are initializers named after the wrapped model's module path: "model.<key>".
    kept = [
        node.name
        for node in graph.node
        if node.op_type in INT8_OPS
        and any(
            name.removeprefix("model.").startswith(prefix)
            for name in node.input[1:2]
            for prefix in keep_fp32
        )
    ]
    try:
        with _quiet():
            quantize_dynamic(
                str(path),
                str(quantized),
                weight_type=QuantType.QInt8,
                per_channel=False,
                op_types_to_quantize=list(INT8_OPS),
                nodes_to_exclude=kept,
                extra_options={"MatMulConstBOnly": True},
            )
        os.replace(quantized, path)
    except Exception as exc:
        quantized.unlink(missing_ok=True)
        raise ExportError(
            f"graph {sig.graph!r} could not be quantized to int8: {exc}",
            hint="export with precision='fp32' and report the graph",
            graph=sig.graph,
        ) from exc


def _drop_unread_conditions(graph: Any) -> None:
    """Remove ``cond.*`` inputs nothing reads: a step that ignores a side condition must not
    make its callers pass one."""
    graph.inputs[:] = [
        v for v in graph.inputs if not v.name.startswith(COND) or v.uses() or v.is_graph_output()
    ]


def _name_batch_axis(graph: Any, axis: int) -> None:
    """Call the traced batch symbol (``s33``...) ``batch`` everywhere in the graph; ``axis`` is
    the batch axis of the first input."""
    import onnx_ir as ir

    first = graph.inputs[0].shape if graph.inputs else None
    if first is None or len(first) <= axis or not isinstance(first[axis], ir.SymbolicDim):
        return
    symbol = first[axis].value
    if symbol is None or symbol == "batch":
        return
    values = [*graph.inputs, *graph.outputs]
    for node in graph.all_nodes() if hasattr(graph, "all_nodes") else graph:
        values.extend(node.outputs)
    for value in values:
        shape = value.shape
        if shape is None or not any(
            isinstance(d, ir.SymbolicDim) and d.value == symbol for d in shape
        ):
            continue
        dims = [
            "batch" if isinstance(d, ir.SymbolicDim) and d.value == symbol else d for d in shape
        ]
        value.shape = ir.Shape(dims)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace(wrapper: nn.Module, args: tuple[torch.Tensor, ...], sig: GraphSignature) -> Any:
    """``torch.export`` with a symbolic batch axis on every input (after any fixed time axis).

    Done here rather than inside ``torch.onnx.export``, which falls back to static shapes when
    the batch cannot stay symbolic; we want that to fail, naming the line at fault.
    """
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({port.batch_axis: batch} for port in sig.inputs)
    with _quiet(), torch.no_grad():
        return torch.export.export(wrapper, args, dynamic_shapes=(dynamic,), strict=False)


def _torch_export(exported: Any, sig: GraphSignature, opset: int, **extra: Any) -> Any:
    with _quiet(), torch.no_grad():
        core = None if extra else _cached_registry_export(opset)
        if core is not None:
            return core(
                exported,
                input_names=sig.input_names,
                output_names=sig.output_names,
                verbose=False,
                optimize=True,
                opset_version=opset,
            )
        return torch.onnx.export(
            exported,
            (),
            dynamo=True,
            opset_version=opset,
            input_names=sig.input_names,
            output_names=sig.output_names,
            verbose=False,
            optimize=True,
            **extra,
        )


def _cached_registry_export(opset: int) -> Callable[..., Any] | None:
    """``torch.onnx``'s own export step bound to one torchlib registry per opset, or None.

    ``torch.onnx.export`` rebuilds its registry of ONNX translations (every torchlib function
    signature, compiled afresh) on each call: 3 s of a graph's export on a 2-core machine, paid
    once per graph. Reusing one is the only change; torch.onnx.export does the same below.
    This reaches into torch's private exporter module, so it is used only when that module has
    the expected shape (None otherwise: the caller takes the public path).
    """
    if opset not in _REGISTRIES:
        try:
            from torch.onnx._internal.exporter import _constants, _core, _registration

            params = inspect.signature(_core.export).parameters
            if not {"registry", "input_names", "output_names", "opset_version"} <= set(params):
                return None
            registry_opset = max(opset, int(_constants.TORCHLIB_OPSET))
            registry = _registration.ONNXRegistry().from_torchlib(opset_version=registry_opset)
        except Exception:  # a torch whose exporter looks otherwise: use the public API
            return None
        _REGISTRIES[opset] = functools.partial(_core.export, registry=registry)
    return _REGISTRIES[opset]


#: Opset -> torch.onnx's export step bound to its torchlib registry (built once per process).
_REGISTRIES: dict[int, Callable[..., Any]] = {}


_GUARD = re.compile(r"eval (Eq\(\w+, \d+\)) \[guard added\] \(([^)]*)\)")


def _trace_failure(
    wrapper: nn.Module, args: tuple[torch.Tensor, ...], sig: GraphSignature, exc: BaseException
) -> ExportError:
    """An `ExportError` for a failed ``torch.export``; for a batch axis that was specialised,
    the source lines that did it (found by re-tracing with shape logging on)."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), repr(exc))
    if "specialized it to be a constant" not in text and "Constraints violated" not in text:
        return ExportError(
            f"tracing graph {sig.graph!r} with torch.export failed: {first[:400]}",
            hint="the step must be traceable by torch.export(strict=False): no data-dependent "
            "Python control flow on tensor values",
            graph=sig.graph,
        )
    sites = _specialisation_sites(wrapper, args, sig)
    where = "; ".join(f"{loc} ({guard})" for guard, loc in sites) or "an unknown line"
    return ExportError(
        f"graph {sig.graph!r} cannot keep a symbolic batch axis: the code fixes the batch size "
        f"to the example's at {where}",
        hint="keep batch sizes as tensor dims (x.shape[0], not int(x.shape[0]) or .item())",
        graph=sig.graph,
        node=sites[0][1] if sites else None,
    )


def _specialisation_sites(
    wrapper: nn.Module, args: tuple[torch.Tensor, ...], sig: GraphSignature
) -> list[tuple[str, str]]:
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        # torch's own switch for shape-guard logs; reset to the defaults afterwards.
        torch._logging.set_logs(dynamic=logging.INFO)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            _trace(wrapper, args, sig)
    finally:
        torch._logging.set_logs()  # type: ignore[attr-defined]
        logger.removeHandler(handler)
    sites = []
    for message in messages:
        match = _GUARD.search(message)
        if match and (match.group(1), match.group(2)) not in sites:
            sites.append((match.group(1), match.group(2)))
    return sites


_OP = re.compile(r"op='([\w.:]+)', overload='([\w.]*)'")
_NODE = re.compile(r"translating node %([\w.]+)")
_TARGET = re.compile(r"target=([\w.:]+)")


def _export_failure(
    exported: Any, sig: GraphSignature, opset: int, exc: BaseException
) -> ExportError:
    """An `ExportError` for ``exc``, after re-running the export with its report enabled."""
    report_dir = Path(tempfile.mkdtemp(prefix=f"worldflux-onnx-{sig.graph}-report-"))
    try:
        _torch_export(exported, sig, opset, report=True, artifacts_dir=str(report_dir))
    except Exception:  # the report is what we came for; the first error is raised
        pass
    reports = sorted(report_dir.glob("*.md"))
    report = str(reports[-1]) if reports else None
    text = "\n".join(str(e) for e in _chain(exc))
    op_match = _OP.search(text)
    operator = None
    if op_match:
        operator = op_match.group(1) + (f".{op_match.group(2)}" if op_match.group(2) else "")
    node_match = _NODE.search(text)
    node = node_match.group(1) if node_match else None
    if operator is None:
        target = _TARGET.search(text)
        operator = target.group(1) if target else None
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
    where = []
    if operator:
        where.append(f"operator {operator}")
    if node:
        where.append(f"node %{node}")
    at = (" at " + ", ".join(where)) if where else ""
    summary = _last_cause(exc)
    return ExportError(
        f"exporting graph {sig.graph!r} to ONNX failed{at}: {summary or first}",
        hint=(
            f"the exporter's report is at {report}"
            if report
            else f"no report was written (looked in {report_dir})"
        )
        + "; replace the operator, or register an ONNX translation for it",
        graph=sig.graph,
        operator=operator,
        node=node,
        report=report,
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _last_cause(exc: BaseException) -> str:
    innermost = _chain(exc)[-1]
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
    return lines[0][:400] if lines else ""


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _is_norm(module: nn.Module) -> bool:
    # Family code often defines its own RMSNorm/LayerNorm; their class names say what they are.
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def _to_float(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def _to_half(_module: nn.Module, _args: tuple[Any, ...], out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out.half()
    return out


def _half_model(model: nn.Module) -> nn.Module:
    """A float16 copy of ``model`` whose normalisation layers compute in float32."""
    half = copy.deepcopy(model).half()
    for module in half.modules():
        if _is_norm(module):
            module.float()
            module.register_forward_pre_hook(_to_float)
            module.register_forward_hook(_to_half)
    return half.eval()


def _check_written_opset(tmp: Path, entries: dict[str, Any], opset: int) -> None:
    """Raise `ExportError` when a graph file declares another default-domain opset than asked
    (an exporter that ignores the request must not leave a manifest that records it)."""
    import onnx

    for graph, entry in entries.items():
        model = onnx.load(str(tmp / entry["file"]), load_external_data=False)
        written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:
            raise ExportError(
                f"asked for opset {opset}, but graph {graph!r} was written with opset {written}",
                hint=f"use opset {written}, or leave --opset out for the default",
                graph=graph,
            )


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions(family: str | None) -> dict[str, str | None]:
    versions = {
        name: _version(name)
        for name in ("worldflux-registry", "worldflux-onnx", "torch", "onnx", "onnxscript")
    }
    if family:
        with contextlib.suppress(Exception):
            from worldflux_registry import registry

            spec = registry.get(family)
            if spec.distribution:
                versions[spec.distribution] = spec.distribution_version
    return versions
