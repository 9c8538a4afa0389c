"""A parity verdict for reduced precisions: categorical outputs judged by their flip rate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..parity import ParityReport
    from ..protocol._model import WorldModel

__all__ = ["flip_budget_verdict"]


def flip_budget_verdict(
    reference: WorldModel, candidate: Any, batch: int, horizon: int, max_flip_rate: float, seed: int
) -> tuple[ParityReport, dict[str, Any], list[str]]:
    """Parity of ``candidate`` against ``reference`` under a categorical flip budget.

    Each step and teacher-forced rollouts of ``horizon`` steps must stay within the
    tolerances of the candidate's precision (int8's for an int8 export); categorical outputs
    are judged by their flip rate (fraction of samples whose argmax differs), at most
    ``max_flip_rate`` at every step, free-running included. A free-running output that leaves
    its tolerance before any sample flipped fails; one that diverges from the step of the first
    flip on is the flip's consequence, listed in ``diverged_after_flip``.

    Returns:
        The parity report, a JSON summary, and the reasons it fails (empty when it passes).
    """
    from ..parity import Tolerance, check

    contract = reference.io_contract()
    # A flipped categorical sample differs by a whole one-hot step: judge those outputs by
    # their flip rate alone (argmax agreement), not element by element.
    categorical = Tolerance(rtol=0.0, atol=1.0, max_flip_rate=max_flip_rate)
    overrides = {
        f"{group}.{spec.name}": categorical
        for group, specs in (("state", contract.state), ("pred", contract.predictions))
        for spec in specs
        if spec.kind == "categorical"
    }
    report = check(
        reference,
        candidate,
        batch_sizes=(batch,),
        horizon=horizon,
        seed=seed,
        tolerances=overrides,
        enforce=("step", "teacher_forced"),
        localize_failures=False,
    )
    reasons: list[str] = []
    for one in report.steps:
        if not one.passed:
            reasons.append(
                _why("step", one.key, one.categorical, one.metrics.flip_rate, max_flip_rate)
            )
    for curve in report.rollouts:
        if curve.mode == "teacher_forced" and not curve.passed:
            flip = curve.worst("flip_rate") if curve.categorical else None
            reasons.append(_why(curve.mode, curve.key, curve.categorical, flip, max_flip_rate))
    free = [c for c in report.rollouts if c.mode == "free_running"]
    flips = [
        t + 1
        for c in free
        if c.categorical
        for t, rate in enumerate(c.series("flip_rate"))
        if rate is not None and rate > 0
    ]
    first_flip = min(flips) if flips else None
    worst_flip = max((c.worst("flip_rate") or 0.0 for c in free if c.categorical), default=None)
    diverged = []
    for c in free:
        if c.error:
            reasons.append(f"free_running:{c.key} raised: {c.error[:200]}")
        elif c.categorical and not c.passed:
            reasons.append(_why(c.mode, c.key, True, c.worst("flip_rate"), max_flip_rate))
        elif not c.passed:
            step = c.first_failing_step or 0
            if first_flip is None or step < first_flip:
                reasons.append(f"free_running:{c.key} drifts out of tolerance at step {step}")
            else:
                diverged.append(c.key)
    reasons = list(dict.fromkeys(reasons))
    summary: dict[str, Any] = {
        "passed": not reasons,
        "batch": batch,
        "horizon": horizon,
        "precision": report.settings.get("precision"),
        "free_running_flip_rate": worst_flip,
        "first_flip_step": first_flip,
        "diverged_after_flip": sorted(set(diverged)),
        "max_abs": report.summary().get("max_abs"),
    }
    return report, summary, reasons


def _why(mode: str, key: str, categorical: bool, flip_rate: float | None, budget: float) -> str:
    if categorical and flip_rate:
        return f"{mode}:{key} flip rate {flip_rate:.4f} above max_flip_rate {budget:g}"
    return f"{mode}:{key} outside tolerance"
