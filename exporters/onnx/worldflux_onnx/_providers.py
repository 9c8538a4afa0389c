"""Choosing ONNX Runtime execution providers: ``"auto"``, or ``tensorrt`` / ``cuda`` / ``cpu``."""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worldflux_registry.errors import BackendError

__all__ = ["ProviderPlan", "missing_tensorrt_libraries", "resolve_providers"]

ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: Shared libraries the TensorRT provider loads, each with the sonames tried in order.
TENSORRT_LIBRARIES = {
    "libnvinfer": ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"),
    "libnvinfer_plugin": (
        "libnvinfer_plugin.so.10",
        "libnvinfer_plugin.so.8",
        "libnvinfer_plugin.so",
    ),
    "libnvonnxparser": ("libnvonnxparser.so.10", "libnvonnxparser.so.8", "libnvonnxparser.so"),
}


class ProviderPlan:
    """Providers (short names, in priority order) with their ORT options."""

    def __init__(self, names: list[str], options: list[dict[str, Any]], device_id: int) -> None:
        self.names = names
        self.options = options
        self.device_id = device_id

    @property
    def ort_names(self) -> list[str]:
        """ONNX Runtime provider names, in priority order."""
        return [ORT_NAMES[n] for n in self.names]

    @property
    def on_gpu(self) -> bool:
        """True when a CUDA-based provider (CUDA or TensorRT) leads."""
        return self.names[0] in ("cuda", "tensorrt")

    def __repr__(self) -> str:
        return f"ProviderPlan({self.names}, device_id={self.device_id})"


def missing_tensorrt_libraries() -> list[str]:
    """Names of the TensorRT libraries that cannot be loaded here (empty when all load)."""
    missing = []
    for name, sonames in TENSORRT_LIBRARIES.items():
        for soname in sonames:
            try:
                ctypes.CDLL(soname)
                break
            except OSError:
                continue
        else:
            missing.append(name + ".so")
    return missing


def _cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_providers(
    providers: str | Sequence[str],
    *,
    device_id: int = 0,
    cache_dir: Path | None = None,
    trt_fp16: bool = False,
    cuda_graph: bool = False,
    use_tf32: bool = False,
) -> ProviderPlan:
    """Turn ``providers`` into ORT providers with options, checking that they can run here.

    ``"auto"``: TensorRT, then CUDA, when onnxruntime-gpu, a GPU and (for TensorRT) its libraries
    are present, always ending with CPU; a provider that cannot run is skipped with a warning
    when onnxruntime-gpu lists it. An explicit list (``["cuda", "cpu"]``) raises `BackendError`
    for any provider that cannot run, naming what is missing. ``use_tf32`` sets the CUDA
    provider's option of that name (always written, so ORT's default of on never applies).
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    auto = isinstance(providers, str) and providers == "auto"
    if auto:
        wanted = ["tensorrt", "cuda", "cpu"]
    else:
        wanted = [providers] if isinstance(providers, str) else list(providers)
        unknown = [p for p in wanted if p not in ORT_NAMES]
        if unknown:
            raise BackendError(
                f"unknown providers {unknown}",
                hint="use 'auto' or a list of " + ", ".join(ORT_NAMES),
            )
    names: list[str] = []
    for name in wanted:
        problem = _problem(name, available)
        if problem is None:
            names.append(name)
        elif not auto:
            raise BackendError(
                f"execution provider {name!r} cannot run here: {problem}", hint=_install_hint(name)
            )
        elif name == "tensorrt" and ORT_NAMES[name] in available:
            # onnxruntime-gpu always lists TensorRT; only say so when it would have been chosen.
            warnings.warn(
                f"TensorRT provider skipped: {problem}; falling back to CUDA/CPU",
                RuntimeWarning,
                stacklevel=3,
            )
    if "cpu" not in names:
        names.append("cpu")
    options = [_options(n, device_id, cache_dir, trt_fp16, cuda_graph, use_tf32) for n in names]
    return ProviderPlan(names, options, device_id)


def _problem(name: str, available: set[str]) -> str | None:
    if ORT_NAMES[name] not in available:
        return f"onnxruntime does not provide {ORT_NAMES[name]} (available: {sorted(available)})"
    if name in ("cuda", "tensorrt") and not _cuda_ready():
        return "no CUDA device is visible to torch"
    if name == "tensorrt":
        missing = missing_tensorrt_libraries()
        if missing:
            return "TensorRT libraries not found: " + ", ".join(missing)
    return None


def _install_hint(name: str) -> str:
    if name == "tensorrt":
        return "install TensorRT 10 (pip install tensorrt) and onnxruntime-gpu, or use 'cuda'"
    if name == "cuda":
        return "install onnxruntime-gpu (pip install 'worldflux-registry[gpu]') on a CUDA machine"
    return "use 'auto'"


def _options(
    name: str,
    device_id: int,
    cache_dir: Path | None,
    trt_fp16: bool,
    cuda_graph: bool,
    use_tf32: bool,
) -> dict[str, Any]:
    if name == "cpu":
        return {}
    if name == "cuda":
        # ORT parses provider options from strings: "1"/"0", not Python's "True"/"False".
        opts: dict[str, Any] = {"device_id": device_id, "use_tf32": "1" if use_tf32 else "0"}
        if cuda_graph:
            opts["enable_cuda_graph"] = "1"
        return opts
    opts = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        opts.update(
            trt_engine_cache_enable=True,
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable=True,
            trt_timing_cache_path=str(cache_dir),
        )
    if cuda_graph:
        opts["trt_cuda_graph_enable"] = True
    return opts
