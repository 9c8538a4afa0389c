"""`export`: write a model to a deployable artifact through an exporter plugin, then check it."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import atomic_write
from ..errors import ExportError, ParityError
from ..registry._artifact import MANIFEST_FILE, read_artifact_manifest

if TYPE_CHECKING:
    from ..parity import ParityReport
    from ..protocol._model import WorldModel
    from ..registry._registry import Registry

__all__ = ["check_export", "export"]

#: Graphs exported when none are named.
DEFAULT_GRAPHS = ("encode", "transition", "decode")


def export(
    model_or_ref: WorldModel | str | os.PathLike[str],
    format: str,
    out_dir: str | os.PathLike[str],
    *,
    opset: int | None = None,
    graphs: Sequence[str] | str = DEFAULT_GRAPHS,
    precision: str = "fp32",
    check: bool | Mapping[str, Any] = True,
    registry: Registry | None = None,
    **options: Any,
) -> Path:
    """Export a model (or a ref the registry loads) with the exporter named ``format``.

    ``export(model, "onnx", "out/")`` writes ``encode``/``transition``/``decode`` graphs and a
    ``manifest.json`` into ``out/`` atomically; ``registry.load("out/")`` loads them back.

    Args:
        model_or_ref: A `WorldModel`, or anything `Registry.load` accepts (``"dreamerv3:ci"``,
            a checkpoint directory).
        format: Exporter name (``"onnx"``); installed exporters are listed by
            ``registry.exporters()``.
        out_dir: The artifact directory (replaced if it holds an earlier export).
        opset: ONNX opset; the exporter's pinned default when None.
        graphs: Graph names, or ``"all"`` (adds ``"update"`` for families that support it).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (the exporter's reduced precisions).
        check: Run `parity.check` between the model and the loaded artifact and store its
            summary in the manifest (a mapping passes options to `parity.check`). A failing
            check warns, except for ``precision="int8"``: quantization is a trade chosen for
            speed, and an int8 artifact outside its tolerances is refused (`ParityError`
            naming the outputs; the artifact stays on disk with the failed verdict recorded).
        registry: The registry to resolve refs and exporters in (default the global one).
        **options: Passed to the exporter (e.g. ``progress=callback(graph, stage)``).

    Raises:
        ResolutionError: no exporter named ``format`` (with the did-you-mean and the extra to
            install), or an unknown ref.
        ExportError: the exporter failed (naming the graph and operator at fault).
    """
    from ..registry._discovery import resolve_target

    if registry is None:
        from ..registry._registry import registry as default_registry

        registry = default_registry
    spec = registry.get_exporter(format)
    if isinstance(model_or_ref, (str, os.PathLike)):
        model = registry.load(model_or_ref)
    else:
        model = model_or_ref
    exporter = resolve_target(
        spec.exporter, what=f"exporter {spec.name!r}", distribution=spec.distribution
    )
    out = Path(exporter(model, out_dir, opset=opset, graphs=graphs, precision=precision, **options))
    if check:
        report = check_export(
            model, out, format, registry=registry, **({} if check is True else dict(check))
        )
        if report is not None and not report.passed and precision == "int8":
            raise ParityError(
                f"the int8 export in {out} is outside the int8 tolerances: "
                f"{report.summary().get('failures')}",
                hint="keep those layers in float32 (WorldModel.keep_in_fp32), or export fp32",
            )
        if report is not None and not report.passed:
            warnings.warn(
                f"parity check of the {spec.name} export in {out} failed: "
                f"{report.summary().get('failures')}",
                RuntimeWarning,
                stacklevel=2,
            )
    return out


def check_export(
    model: Any,
    out: str | os.PathLike[str],
    format: str,
    *,
    registry: Registry | None = None,
    **options: Any,
) -> ParityReport | None:
    """Load the artifact in ``out`` with its exporter's loader, run `parity.check` against
    ``model`` (``options`` go to it) and store the summary in the manifest's ``parity`` entry.

    Unless ``options`` say otherwise, the rollouts cover at least one horizon of a fused
    rollout graph, and a half-precision or int8 artifact is judged on its steps (``enforce``),
    its rollouts reported but not failing: one categorical sample flipped by rounding is a large
    flip rate in a small batch, and sends a free-running rollout down another path.

    Returns None (with a warning) only when the parity package cannot be imported.
    """
    from ..registry._discovery import resolve_target

    if registry is None:
        from ..registry._registry import registry as default_registry

        registry = default_registry
    spec = registry.get_exporter(format)
    if spec.loader is None:
        raise ExportError(
            f"exporter {spec.name!r} cannot load its artifacts, so the parity check cannot run",
            hint="pass check=False",
        )
    try:
        from .. import parity
        from ..parity._check import DEFAULT_HORIZON
        from ..parity._tolerance import normalize_precision
    except ImportError:  # pragma: no cover - parity ships with the core; guard a broken install
        warnings.warn("worldflux_registry.parity is unavailable: export not checked", stacklevel=3)
        return None
    loader = resolve_target(
        spec.loader, what=f"exporter {spec.name!r} loader", distribution=spec.distribution
    )
    candidate = loader(Path(out))
    reduced = normalize_precision(getattr(candidate, "precision", None))
    if reduced in ("float16", "bfloat16", "int8") and "enforce" not in options:
        # In half precision a categorical sample can flip (see DEFAULT_TOLERANCES): one flip
        # in a small batch is a large flip *rate*, and a free-running rollout then follows
        # another path. Judge each graph on the same inputs; report the rollouts.
        options["enforce"] = ("step",)
    fused = getattr(candidate, "fused_rollout_horizon", None)
    if isinstance(fused, int) and fused > DEFAULT_HORIZON and "horizon" not in options:
        # Roll out at least one fused call, so the check covers the fused graph too.
        options["horizon"] = fused
    report = parity.check(model, candidate, **options)
    _store_parity(Path(out), report.summary())
    return report


def _store_parity(out: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary`` as the manifest's ``parity`` entry (atomic replace of the file)."""
    path = out / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = read_artifact_manifest(out, ExportError)
    manifest["parity"] = dict(summary)
    atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
