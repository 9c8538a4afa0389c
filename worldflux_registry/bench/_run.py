"""Speed benchmarks of one world model across backends, gated by parity.

`run` measures a model (a registry ref, exported first with the export timed, or an export
directory) on each requested backend and batch size: the latency of one ``transition`` and of a
whole rollout (``horizon`` x transition + decode), as median and spread after warm-up, the rollout
throughput, peak memory, the device, package versions and TF32 settings. With ``agent=True`` it
times the contract's agent step instead (one call per environment step: ``encode`` + ``plan`` or
``act``) and its environment steps per second. A backend's speed is
reported only after `worldflux_registry.parity.check` (or, for a CUDA-graph replay of the torch
model, a direct comparison with eager torch) passed; otherwise the backend is *refused* with the
reason. `document` gathers runs into a versioned JSON document, `to_markdown` renders it with the
speed targets marked met, missed or not measured.

Torch, ONNX Runtime and the model code are imported inside the functions that need them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._torch_env import tf32 as use_tf32
from ..errors import BackendError, CapabilityError, ConfigError
from ..registry._artifact import MANIFEST_FILE, read_artifact_manifest
from ..registry._from_export import model_from_export
from ._agent import AGENT_BACKENDS, _prepare_agent_backend, agent_spec, describe_call
from ._backends import _FUSED, _INT8, BACKENDS, _Context, _fail, _prepare_backend
from ._measure import _loadavg, _time_interleaved, _Timer, environment
from ._report import (
    FORMAT,
    FORMAT_VERSION,
    TARGETS,
    document,
    evaluate_targets,
    to_markdown,
    to_rich,
    write,
)
from ._results import BackendResult, BenchRun, Timing
from ._verdict import flip_budget_verdict

if TYPE_CHECKING:
    from ..protocol._model import WorldModel

# The public names of the _bench_* modules are re-exported here so that callers, benchmarks and
# the API docs keep one import path.
__all__ = [
    "AGENT_BACKENDS",
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
    "flip_budget_verdict",
    "run",
    "to_markdown",
    "to_rich",
    "write",
]


#: ``progress(what, done, total)``: see `run`.
Progress = Callable[[str, int, int], None]


# -- the public entry point -------------------------------------------------------------------
def run(
    ref: str | Path,
    *,
    agent: bool = False,
    backends: Sequence[str] = ("torch", "ort-cpu"),
    batches: Sequence[int] = (1,),
    horizon: int = 16,
    reference: WorldModel | str | Path | None = None,
    export_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    warmup: int = 5,
    repeats: int = 50,
    rollout_repeats: int = 20,
    min_repeats: int = 5,
    max_seconds: float = 10.0,
    parity_batches: Sequence[int] | None = None,
    parity_horizon: int = 4,
    tolerances: Any = None,
    tf32: bool = False,
    ort_options: Mapping[str, Any] | None = None,
    torch_threads: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> BenchRun:
    """Benchmark ``ref`` on ``backends`` at each batch size in ``batches``.

    Args:
        ref: A registry ref (``"dreamerv3:size12m"``; built with seeded random weights, then
            exported to ONNX with the export timed), a checkpoint directory, or an export
            directory.
        agent: Time the contract's agent step (`AgentSpec`: ``encode`` + ``plan`` for a
            planner, ``act`` for an actor) per environment step on `AGENT_BACKENDS`, instead of
            transitions and rollouts; ``batches`` are environment batches. Each ORT result is
            gated by `worldflux_registry.parity.check` of the agent graph (elite selections
            judged with its near-tie rule), ``torch-compile`` by a comparison with eager.
        reference: The torch model to compare with and to time as ``"torch"``: a `WorldModel`,
            or a checkpoint directory. For an export directory without one, the family / preset
            of its manifest is built and its weights are read back from the ONNX initializers
            where every parameter is found there (otherwise parity will refuse the ORT backends).
        export_dir: Where to export a ref (a temporary directory, removed afterwards, if None);
            an ``ort-cpu-int8`` backend adds an int8 export beside it, ``<export_dir>-int8``.
        device: Device of the torch backends: ``"auto"`` (CUDA when available), ``"cpu"``,
            ``"cuda"``.
        parity_batches: Batch sizes of the parity check (default: each benchmarked batch
            capped at 64); ``parity_horizon`` its rollout length.
        tf32: Allow TF32 on both sides (off by default: fp32 against fp32).
        ort_options: Extra options passed to the ONNX loader (session options, threads).
        torch_threads: ``torch.set_num_threads`` for the run (restored afterwards).
        progress: Called as ``progress(what, done, total)`` as each stage begins: what runs
            now (``"exporting to ONNX"``, ``"ort-cpu at batch 1: parity check, warm-up"``,
            ``"timing 4 series, interleaved"``), how many stages are done, how many there are.
            Called once more with ``done == total`` at the end.

    Raises:
        ConfigError: an unknown backend, a batch or horizon below 1.
        CapabilityError: ``agent=True`` for a model whose contract declares no agent step, or
            an export without its agent graph.
    """
    import torch

    from ..exporting import export

    known = AGENT_BACKENDS if agent else BACKENDS
    unknown = [b for b in backends if b not in known]
    if unknown:
        from ..errors import did_you_mean

        raise ConfigError(
            f"unknown {'agent ' if agent else ''}backend {unknown[0]!r}."
            f"{did_you_mean(unknown[0], known)}",
            hint=("agent backends: " if agent else "backends: ") + ", ".join(known),
        )
    if not batches or min(batches) < 1 or horizon < 1:
        raise ConfigError(f"batches {list(batches)} and horizon {horizon} must be >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    old_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    path = Path(ref)
    is_export = (path / MANIFEST_FILE).is_file()
    # Stages: the reference model, the export (of a ref), each backend x batch, the timing.
    stages = [1 + (0 if is_export else 1) + len(backends) * len(batches) + 1, 0]

    def stage(what: str) -> None:
        if progress is not None:
            progress(what, stages[1], stages[0])
        stages[1] += 1

    try:
        export_time = None
        int8_dir: Path | None = None
        int8_export_time = None
        stage("building the torch reference")
        if is_export:
            source = "export"
            manifest = read_artifact_manifest(path, ConfigError)
            fused_horizon = (manifest.get("graphs", {}).get("rollout") or {}).get("horizon")
            model, ref_desc = _reference_for_export(path, manifest, reference, seed)
            out_dir = path
            name = _model_name(manifest.get("family", "?"), manifest.get("preset"))
            if agent:
                spec = agent_spec(model.io_contract(), name)
                if spec.graph not in manifest.get("graphs", {}):
                    raise CapabilityError(
                        f"the export {path} has no {spec.graph!r} graph: its agent step cannot "
                        "be benchmarked",
                        hint=f"re-export with --graphs encode,{spec.graph} (or bench the "
                        "checkpoint, which exports it)",
                        capability=spec.graph,
                    )
        else:
            source = "ref"
            model, ref_desc = _reference_for_ref(str(ref), reference, seed, config_overrides)
            name = _model_name(model.family or "?", model.preset)
            if agent:
                spec = agent_spec(model.io_contract(), name)
            if export_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="wf-bench-")
                out_dir = Path(tmp.name) / "export"
            else:
                out_dir = Path(export_dir)
            fused_horizon = horizon if any(b.endswith(_FUSED) for b in backends) else None
            graphs: tuple[str, ...] = ("encode", "transition", "decode")
            if agent:
                graphs = ("encode", spec.graph)
            elif fused_horizon:
                graphs += ("rollout",)
            stage("exporting to ONNX (" + ", ".join(graphs) + ")")
            t0 = time.perf_counter()
            export(model, "onnx", out_dir, graphs=graphs, rollout_horizon=horizon)
            export_time = time.perf_counter() - t0
            if not agent and any(b.endswith(_INT8) for b in backends):
                # Beside the fp32 export; the *-int8 backends run it (parity decides, not export).
                int8_dir = out_dir.with_name(out_dir.name + "-int8")
                t0 = time.perf_counter()
                export(model, "onnx", int8_dir, graphs=graphs[:3], precision="int8", check=False)
                int8_export_time = time.perf_counter() - t0
        model = model.to("cpu").eval()
        bench = BenchRun(
            model=name,
            family=model.family or "?",
            preset=model.preset,
            fingerprint=model.contract_fingerprint(),
            source=source,
            reference=ref_desc,
            horizon=None if agent else horizon,
            batches=list(batches),
            export_time_s=export_time,
            results=[],
            settings={
                "seed": seed,
                "device": device,
                "warmup": warmup,
                "repeats": repeats,
                "rollout_repeats": rollout_repeats,
                "max_seconds": max_seconds,
                "parity_horizon": parity_horizon,
                "fused_rollout_horizon": fused_horizon,
                "int8_export_s": int8_export_time,
                "tf32": tf32,
                "torch_threads": torch.get_num_threads(),
                "ort_options": dict(ort_options or {}),
                "stochastic": "explicit noise inputs (same tensors on every backend)",
            },
            mode="agent" if agent else "transition",
        )
        if agent:
            for key in ("rollout_repeats", "parity_horizon", "fused_rollout_horizon"):
                del bench.settings[key]
            bench.settings["agent"] = {
                "graph": spec.graph,
                "call": describe_call(spec),
                "action": spec.action,
                "config": _scalar_config(model),
            }
        ctx = _Context(
            model=model,
            export_dir=out_dir,
            device=device,
            horizon=horizon,
            seed=seed,
            timing={
                "warmup": warmup,
                "repeats": repeats,
                "rollout_repeats": rollout_repeats,
                "min_repeats": min_repeats,
                "max_seconds": max_seconds,
            },
            parity={"horizon": parity_horizon, "batches": parity_batches, "tol": tolerances},
            fused_horizon=fused_horizon,
            int8_dir=int8_dir,
            tf32=tf32,
            ort_options=dict(ort_options or {}),
        )
        bench.settings["loadavg_before"] = _loadavg()
        timers: list[_Timer] = []
        with use_tf32(tf32), torch.inference_mode():
            for backend in backends:
                for batch in batches:
                    stage(f"{backend} at batch {batch}: loading, parity check, warm-up")
                    if agent:
                        result, timer = _prepare_agent_backend(ctx, spec, backend, batch)
                    else:
                        result, timer = _prepare_backend(ctx, backend, batch)
                    bench.results.append(result)
                    if timer is not None:
                        timers.append(timer)
            # Each series stops at its repeats or after max_seconds of timed calls.
            series = sum(1 + (t.rollout is not None) for t in timers)
            stage(
                f"timing {series} series, interleaved (at most about {series * max_seconds:.0f} s)"
            )
            try:
                _time_interleaved(timers, min_repeats=min_repeats, max_seconds=max_seconds)
            except Exception as exc:  # a failure mid-timing voids every timing of this run
                for t in timers:
                    _fail(t.result, exc)
        bench.settings["loadavg_after"] = _loadavg()
        stage("done")
        return bench
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()


def _model_name(family: str, preset: str | None) -> str:
    return f"{family}:{preset}" if preset else family


def _scalar_config(model: WorldModel) -> dict[str, Any]:
    """The model's config values that are plain scalars (planner settings, sizes)."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return {}
    return {
        str(k): v for k, v in config.items() if isinstance(v, (bool, int, float, str)) or v is None
    }


def _reference_for_ref(
    ref: str,
    reference: WorldModel | str | Path | None,
    seed: int,
    overrides: Mapping[str, Any] | None,
) -> tuple[WorldModel, str]:
    import torch

    from ..registry._registry import registry

    if reference is not None:
        return _given_reference(reference)
    torch.manual_seed(seed)
    model = registry.load(ref, device="cpu", **dict(overrides or {}))
    if Path(ref).is_dir():
        return model, f"checkpoint {ref}"
    return model, f"random weights (torch.manual_seed({seed}))"


def _given_reference(reference: WorldModel | str | Path) -> tuple[WorldModel, str]:
    from ..protocol._model import WorldModel
    from ..registry._registry import registry

    if isinstance(reference, WorldModel):
        return reference, "given model"
    return registry.load(reference, device="cpu"), f"checkpoint {reference}"


def _reference_for_export(
    path: Path,
    manifest: Mapping[str, Any],
    reference: WorldModel | str | Path | None,
    seed: int,
) -> tuple[WorldModel, str]:
    import torch

    if reference is not None:
        return _given_reference(reference)
    torch.manual_seed(seed)
    model, missing = model_from_export(path, manifest)
    total = len(model.state_dict())
    loaded = total - len(missing)
    return model, (
        f"{loaded} of {total} tensors read back from the export's ONNX initializers, the rest "
        f"(unused by the exported graphs, or folded by the exporter) at a seeded init "
        f"(torch.manual_seed({seed})); parity decides whether that reference is sound"
    )


def check_backend_names(names: Sequence[str], *, agent: bool = False) -> list[str]:
    """Validate backend names given by a user; raise `BackendError` naming the closest one.

    ``agent=True`` checks them against `AGENT_BACKENDS` (the backends of an agent benchmark).
    """
    from ..errors import did_you_mean

    known = AGENT_BACKENDS if agent else BACKENDS
    for name in names:
        if name not in known:
            what = "agent backend" if agent else "backend"
            raise BackendError(
                f"unknown {what} {name!r}.{did_you_mean(name, known)}",
                hint=f"{what}s: " + ", ".join(known),
            )
    return list(names)
