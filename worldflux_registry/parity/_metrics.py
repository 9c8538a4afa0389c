"""Error metrics between a reference and a candidate array, computed in float64."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._tolerance import Tolerance

__all__ = ["REL_EPS", "Metrics", "compare_arrays"]

#: Added to ``|reference|`` in the relative error so that zeros do not divide.
REL_EPS = 1e-12


@dataclass
class Metrics:
    """How one candidate output compares with the reference output.

    Error statistics (``max_abs``, ``max_rel``, ``mean_abs``, ``p99_abs``, ``cosine``,
    ``tol_ratio``) are taken over positions finite on both sides; they are None when there are
    none. ``tol_ratio`` is the worst ``|a - b| / (atol + rtol * |b|)``: above 1 means some
    element breaks tolerance. ``failing`` counts failing elements, a non-finite value that the
    reference does not have at the same position included. ``argmax_agreement`` (categorical
    outputs only) is the fraction of positions whose argmax over the last axis agrees.
    """

    shape: list[int]
    numel: int
    max_abs: float | None
    max_rel: float | None
    mean_abs: float | None
    p99_abs: float | None
    cosine: float | None
    tol_ratio: float | None
    nan_reference: int
    nan_candidate: int
    inf_reference: int
    inf_candidate: int
    failing: int
    passed: bool
    argmax_agreement: float | None = None
    worst_index: list[int] | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flip_rate(self) -> float | None:
        """Fraction of categorical positions whose argmax differs (None if not categorical)."""
        return None if self.argmax_agreement is None else 1.0 - self.argmax_agreement

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (``extra`` left out when empty)."""
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        """Rebuild from `to_dict` output."""
        return cls(**data)

    @classmethod
    def failure(cls, note: str, shape: tuple[int, ...] = ()) -> Metrics:
        """Metrics of a comparison that could not be made (missing output, shape, error)."""
        return cls(
            shape=list(shape),
            numel=0,
            max_abs=None,
            max_rel=None,
            mean_abs=None,
            p99_abs=None,
            cosine=None,
            tol_ratio=None,
            nan_reference=0,
            nan_candidate=0,
            inf_reference=0,
            inf_candidate=0,
            failing=0,
            passed=False,
            note=note,
        )


def _count(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


def compare_arrays(
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerance: Tolerance,
    *,
    categorical: bool = False,
) -> Metrics:
    """Compare two arrays of the same shape element by element (both cast to float64).

    A position where both sides hold NaN, or the same infinity, agrees; any other non-finite
    position fails. For categorical outputs the argmax over the last axis must also agree on at
    least ``1 - tolerance.max_flip_rate`` of the positions.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return Metrics.failure(
            f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}",
            tuple(ref.shape),
        )
    finite_ref = np.isfinite(ref)
    finite_cand = np.isfinite(cand)
    both = finite_ref & finite_cand
    nan_ref, nan_cand = np.isnan(ref), np.isnan(cand)
    same_nonfinite = (nan_ref & nan_cand) | (np.isinf(ref) & np.isinf(cand) & (ref == cand))
    bad_nonfinite = ~both & ~same_nonfinite

    diff = np.abs(cand[both] - ref[both])
    absref = np.abs(ref[both])
    stats: dict[str, Any] = dict.fromkeys(
        ("max_abs", "max_rel", "mean_abs", "p99_abs", "cosine", "tol_ratio")
    )
    worst_index = None
    failing = _count(bad_nonfinite)
    if diff.size:
        allowed = tolerance.atol + tolerance.rtol * absref
        failing += _count(diff > allowed)
        # An exact tolerance (0, 0) still gives a finite ratio: JSON has no infinity.
        with np.errstate(over="ignore", divide="ignore"):
            ratio = np.minimum(diff / np.maximum(allowed, 1e-300), 1e300)
        worst = int(np.argmax(diff))
        worst_index = [int(i) for i in np.unravel_index(np.flatnonzero(both)[worst], ref.shape)]
        a, b = cand[both], ref[both]
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        if norm > 0:
            cosine = float(np.dot(a, b) / norm)
        else:
            cosine = 1.0 if not np.any(a) and not np.any(b) else 0.0
        stats = {
            "max_abs": float(diff.max()),
            "max_rel": float((diff / (absref + REL_EPS)).max()),
            "mean_abs": float(diff.mean()),
            "p99_abs": float(np.percentile(diff, 99)),
            "cosine": cosine,
            "tol_ratio": float(ratio.max()),
        }
    agreement = None
    if categorical and ref.ndim >= 1 and ref.shape[-1] > 0:
        positions = ref.size // ref.shape[-1]
        if positions:
            # NaN never wins an argmax comparison, so a NaN anywhere counts as disagreement.
            same = np.argmax(np.nan_to_num(ref, nan=-np.inf), axis=-1) == np.argmax(
                np.nan_to_num(cand, nan=-np.inf), axis=-1
            )
            same &= ~np.any(nan_ref | nan_cand, axis=-1)
            agreement = float(np.count_nonzero(same) / positions)
    passed = failing == 0
    if agreement is not None and 1.0 - agreement > tolerance.max_flip_rate + 1e-12:
        passed = False
    return Metrics(
        shape=[int(d) for d in ref.shape],
        numel=int(ref.size),
        nan_reference=_count(nan_ref),
        nan_candidate=_count(nan_cand),
        inf_reference=_count(np.isinf(ref)),
        inf_candidate=_count(np.isinf(cand)),
        failing=failing,
        passed=passed,
        argmax_agreement=agreement,
        worst_index=worst_index,
        **stats,
    )
