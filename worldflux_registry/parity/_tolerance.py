"""Tolerances: per-dtype defaults, the compute precision of a side, and per-output overrides."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from ..errors import ParityError, did_you_mean

__all__ = [
    "DEFAULT_TOLERANCES",
    "EXACT",
    "Tolerance",
    "TolerancesLike",
    "normalize_precision",
    "resolve_tolerances",
]


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate element may be from the reference element ``b``.

    An element fails when ``|a - b| > atol + rtol * |b|``. For categorical outputs the fraction
    of positions whose argmax differs must also stay at or below ``max_flip_rate`` (0: every
    sample identical).
    """

    rtol: float
    atol: float
    max_flip_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "max_flip_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ParityError(f"tolerance {name}={value!r} must be a number >= 0")

    def to_dict(self) -> dict[str, float]:
        """Plain JSON form."""
        out = {"rtol": float(self.rtol), "atol": float(self.atol)}
        if self.max_flip_rate:
            out["max_flip_rate"] = float(self.max_flip_rate)
        return out

    @classmethod
    def parse(cls, value: Tolerance | Mapping[str, float] | Iterable[float]) -> Tolerance:
        """A `Tolerance` from itself, ``{"rtol":, "atol":}`` or ``(rtol, atol)``."""
        if isinstance(value, Tolerance):
            return value
        try:
            if isinstance(value, Mapping):
                return cls(**{k: float(v) for k, v in value.items()})
            return cls(*(float(v) for v in value))
        except (TypeError, ValueError) as exc:
            raise ParityError(
                f"cannot read a tolerance from {value!r}: {exc}",
                hint="give Tolerance(rtol, atol), a (rtol, atol) pair or {'rtol':, 'atol':}",
            ) from None


#: int8 (dynamic quantization of MatMul/Gemm): each quantized product is off by up to ~1% of its
#: scale, and a network stacks a few: outputs drift by a few percent, and a categorical sample
#: whose two best logits are within that drift flips.
INT8_RTOL = 0.1
INT8_ATOL = 0.05
INT8_MAX_FLIP_RATE = 0.05
#: Default tolerance per compute dtype. float64 and float32 are ``torch.testing.assert_close``'s
#: values. Those for float16 and bfloat16 are for one op: a whole network computed in half
#: rounds at every layer (an fp16 export of ``dreamerv3:ci`` is off by up to 3e-4 absolute and
#: 6e-3 relative), and a categorical sample whose two best logits are that close can flip
#: (0.2 to 0.5% of DreamerV3's categoricals at fp16), so half precisions get network-level
#: values: ten times the element tolerance, and a small flip rate.
DEFAULT_TOLERANCES: Final[Mapping[str, Tolerance]] = MappingProxyType(
    {
        "float64": Tolerance(rtol=1e-7, atol=1e-7),
        "float32": Tolerance(rtol=1.3e-6, atol=1e-5),
        "float16": Tolerance(rtol=1e-2, atol=1e-3, max_flip_rate=0.01),
        "bfloat16": Tolerance(rtol=5e-2, atol=1e-2, max_flip_rate=0.02),
        "int8": Tolerance(rtol=INT8_RTOL, atol=INT8_ATOL, max_flip_rate=INT8_MAX_FLIP_RATE),
    }
)
#: Integer and boolean outputs must match exactly.
EXACT: Final = Tolerance(rtol=0.0, atol=0.0)

_PRECISION_ALIASES: Final = {
    "fp64": "float64",
    "double": "float64",
    "float64": "float64",
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
    "tf32": "float32",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "qint8": "int8",
}
# From tightest to loosest: a comparison takes the loosest precision either side computes in.
_ORDER: Final = ("float64", "float32", "float16", "bfloat16", "int8")

#: Tolerance keys: ``"graph/output"``, ``"output"`` or ``"graph"`` -> tolerance.
TolerancesLike = Mapping[str, "Tolerance | Mapping[str, float] | Iterable[float]"]


def normalize_precision(value: Any) -> str | None:
    """``"float16"`` for ``"fp16"``, ``"half"``, ``torch.float16``...; None when unknown."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.").lower()
    return _PRECISION_ALIASES.get(text)


def loosest(*precisions: str | None) -> str | None:
    """The loosest of the known precisions (bfloat16 > float16 > float32 > float64)."""
    known = [p for p in precisions if p in _ORDER]
    return max(known, key=_ORDER.index) if known else None


def default_tolerance(dtype: str, precision: str | None) -> Tolerance:
    """Default tolerance of an output declared ``dtype`` computed at ``precision``."""
    if not dtype.startswith(("float", "bfloat")):
        return EXACT
    return DEFAULT_TOLERANCES[loosest(dtype, precision) or "float32"]


def resolve_tolerances(
    overrides: TolerancesLike | None, graphs: Iterable[str], outputs: Mapping[str, Iterable[str]]
) -> dict[str, Tolerance]:
    """Check override keys against the graphs and outputs compared; return them parsed.

    Keys are ``"transition/state.deter"`` (one output of one graph), ``"state.deter"`` (that
    output in every graph) or ``"decode"`` (every output of one graph). Unknown keys raise
    `ParityError` with the closest known keys.
    """
    if not overrides:
        return {}
    graphs = list(graphs)
    known = set(graphs)
    for graph, names in outputs.items():
        for name in names:
            known.add(name)
            known.add(f"{graph}/{name}")
    parsed = {}
    for key, value in overrides.items():
        if key not in known:
            raise ParityError(
                f"tolerance key {key!r} names no compared graph or output."
                + did_you_mean(key, sorted(known)),
                hint="use 'graph/output' (e.g. 'transition/state.deter'), 'output' or 'graph'",
            )
        parsed[key] = Tolerance.parse(value)
    return parsed


def pick_tolerance(
    overrides: Mapping[str, Tolerance],
    graph: str,
    output: str,
    dtype: str,
    precision: str | None,
    declared: tuple[float, float] | None = None,
) -> tuple[Tolerance, str]:
    """The tolerance of ``graph/output`` and where it came from.

    In order: an override (its key), the contract's ``declared`` ``(rtol, atol)`` widened to the
    dtype default where that is looser (``contract``), the dtype default (``default:<dtype>``).
    """
    for key in (f"{graph}/{output}", output, graph):
        if key in overrides:
            return overrides[key], key
    if not dtype.startswith(("float", "bfloat")):
        return EXACT, f"exact:{dtype}"
    chosen = loosest(dtype, precision) or "float32"
    default = DEFAULT_TOLERANCES[chosen]
    if declared is not None:
        rtol, atol = declared
        widened = Tolerance(
            rtol=max(rtol, default.rtol),
            atol=max(atol, default.atol),
            max_flip_rate=default.max_flip_rate,
        )
        return widened, "contract"
    return default, f"default:{chosen}"
