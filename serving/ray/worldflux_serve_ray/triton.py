"""`write_triton_repository`: a Triton Inference Server model repository for an ONNX export.

One ``onnxruntime`` backend model per exported graph (``<prefix>_<graph>/1/model.onnx`` and its
``config.pbtxt``), plus an ensemble ``<prefix>_step`` (transition then decode) when the export
has both. Inputs, outputs, dtypes and dims come from the export's manifest. Graphs whose batch
axis leads every tensor get ``max_batch_size``, dynamic batching and one instance group per
device; the fused ``rollout`` graph (time axis first) is written with ``max_batch_size: 0`` and
the batch as a ``-1`` dim. Written here, validated against Triton's ``ModelConfig`` protobuf;
Triton itself was not run (see docs/serve.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldflux_registry import ExportError

__all__ = ["TRITON_DTYPES", "TritonRepository", "triton_config", "write_triton_repository"]

TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}


@dataclass(frozen=True)
class TritonRepository:
    """What `write_triton_repository` wrote: the repository root and its model names."""

    root: Path
    models: tuple[str, ...]


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dtype(entry: Mapping[str, Any]) -> str:
    dtype = str(entry["dtype"])
    if dtype not in TRITON_DTYPES:
        raise ExportError(f"tensor {entry['name']!r} has dtype {dtype!r}, which Triton lacks")
    return TRITON_DTYPES[dtype]


def _batch_first(entries: Sequence[Mapping[str, Any]]) -> bool:
    return all(
        list(e["shape"])[:1] == ["batch"] and "batch" not in list(e["shape"])[1:] for e in entries
    )


def _tensor(entry: Mapping[str, Any], batched: bool) -> str:
    shape = list(entry["shape"])
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
    fields = [f"name: {_q(str(entry['name']))}", f"data_type: {_dtype(entry)}"]
    if batched and not dims:  # one value per row: Triton needs a dim, reshaped away
        fields += ["dims: [ 1 ]", "reshape: { shape: [ ] }"]
    else:
        fields.append("dims: [ " + ", ".join(str(d) for d in dims) + " ]")
    return "  {\n    " + "\n    ".join(fields) + "\n  }"


def triton_config(
    name: str,
    graph: Mapping[str, Any],
    *,
    max_batch_size: int = 64,
    instances: int = 1,
    kind: str = "gpu",
    queue_delay_us: int = 100,
) -> str:
    """The ``config.pbtxt`` text of one graph's model (``graph``: its manifest entry)."""
    inputs, outputs = list(graph["inputs"]), list(graph["outputs"])
    batched = _batch_first(inputs + outputs)
    lines = [
        f"name: {_q(name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [\n" + ",\n".join(_tensor(e, batched) for e in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(e, batched) for e in outputs) + "\n]",
    ]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    group = "KIND_GPU" if kind == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {group}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _ensemble(name: str, prefix: str, graphs: Mapping[str, Any], max_batch_size: int) -> str:
    trans, dec = graphs["transition"], graphs["decode"]
    state_outputs = {str(o["name"]) for o in trans["outputs"]}
    inputs: dict[str, Mapping[str, Any]] = {str(e["name"]): e for e in trans["inputs"]}
    for entry in dec["inputs"]:  # decode reads the transition's new State, not an input
        if "new_" + str(entry["name"]) not in state_outputs:
            inputs.setdefault(str(entry["name"]), entry)
    outputs = [*trans["outputs"], *dec["outputs"]]

    def step(model: str, ins: list[tuple[str, str]], outs: list[str]) -> str:
        maps = [f"      input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in ins]
        maps += [f"      output_map {{ key: {_q(o)} value: {_q(o)} }}" for o in outs]
        return (
            f"    {{\n      model_name: {_q(model)}\n      model_version: -1\n"
            + "\n".join(maps)
            + "\n    }"
        )

    dec_ins = [
        (
            str(e["name"]),
            "new_" + str(e["name"]) if "new_" + str(e["name"]) in state_outputs else str(e["name"]),
        )
        for e in dec["inputs"]
    ]
    steps = [
        step(
            f"{prefix}_transition",
            [(str(e["name"]), str(e["name"])) for e in trans["inputs"]],
            [str(o["name"]) for o in trans["outputs"]],
        ),
        step(f"{prefix}_decode", dec_ins, [str(o["name"]) for o in dec["outputs"]]),
    ]
    batched = _batch_first([*inputs.values(), *outputs])
    return (
        "\n".join(
            [
                f"name: {_q(name)}",
                'platform: "ensemble"',
                f"max_batch_size: {max_batch_size if batched else 0}",
                "input [\n" + ",\n".join(_tensor(e, batched) for e in inputs.values()) + "\n]",
                "output [\n" + ",\n".join(_tensor(e, batched) for e in outputs) + "\n]",
                "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}",
            ]
        )
        + "\n"
    )


def validate_config(text: str) -> Any:
    """Parse ``text`` with Triton's own ``ModelConfig`` protobuf (from ``tritonclient``);
    return the message. An unknown field or a bad value raises ``text_format.ParseError``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_triton_repository(
    export_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_batch_size: int = 64,
    instances: int = 1,
    kind: str = "gpu",
    prefix: str | None = None,
    validate: bool | None = None,
) -> TritonRepository:
    """Write a Triton model repository for the ONNX export ``export_dir`` into ``out``.

    ``kind="gpu"`` puts ``instances`` instances on every GPU (``KIND_GPU`` without ``gpus``),
    ``"cpu"`` on the CPU. ``prefix`` names the models (default ``<family>_<preset>``). With
    ``validate`` (default: when tritonclient is installed) every config is parsed by Triton's
    ``ModelConfig`` protobuf before anything is written. ``out`` must not exist or be empty.

    Raises:
        ExportError: ``export_dir`` is not a readable export, or ``out`` is not empty.
    """
    from worldflux_registry.plugin_api import read_artifact_manifest

    source = Path(export_dir)
    manifest = read_artifact_manifest(source)
    graphs: Mapping[str, Any] = manifest.get("graphs") or {}
    if prefix is None:
        raw = f"{manifest.get('family') or 'model'}_{manifest.get('preset') or 'default'}"
        prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ExportError(
            f"{root} exists and is not an empty directory", hint="pass a new --out directory"
        )
    configs: dict[str, tuple[str, Mapping[str, Any] | None]] = {}
    for graph, entry in graphs.items():
        name = f"{prefix}_{graph.replace('.', '_')}"
        text = triton_config(
            name, entry, max_batch_size=max_batch_size, instances=instances, kind=kind
        )
        configs[name] = (text, entry)
    if "transition" in graphs and "decode" in graphs:
        name = f"{prefix}_step"
        configs[name] = (_ensemble(name, prefix, graphs, max_batch_size), None)
    if validate is None:
        try:
            import tritonclient.grpc.model_config_pb2  # noqa: F401
        except ImportError:
            validate = False
        else:
            validate = True
    if validate:
        for text, _ in configs.values():
            validate_config(text)
    root.mkdir(parents=True, exist_ok=True)
    for name, (text, entry) in configs.items():
        model_dir = root / name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        if entry is not None:
            shutil.copyfile(source / str(entry["file"]), version / "model.onnx")
            for extra in entry.get("external_data", ()):
                shutil.copyfile(source / str(extra["file"]), version / str(extra["file"]))
        (model_dir / "config.pbtxt").write_text(text)
    return TritonRepository(root, tuple(configs))
