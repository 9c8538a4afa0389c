"""Seeded example inputs generated from a contract (tests, export tracing, parity, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..contract._io import IOContract, NoiseSpec, TensorSpec, condition_key
from ._payloads import ConditionPayload, WorldModelInput

__all__ = [
    "conditions_payload",
    "encode_input",
    "make_actions",
    "make_conditions",
    "make_noise",
    "make_noise_tensor",
    "make_observations",
    "make_tensor",
    "noise_conditions",
    "sample_noise",
]

# Uniform noise stays off the ends: inverse-CDF and Gumbel transforms diverge at 0 and 1.
_EPS = 1e-6


def make_tensor(
    spec: TensorSpec,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """A tensor for ``spec`` whose ``batch`` dim is replaced by ``lead`` (e.g. ``(T, B)``).

    Values lie inside ``[low, high]`` when declared; unbounded floats are standard normal,
    categorical tensors are one-hot samples, discrete ones integer labels below ``classes``.
    """
    rest = spec.concrete_shape(batch=1)[1:]
    shape = (*lead, *rest)
    dtype = getattr(torch, spec.dtype)
    if spec.kind == "categorical":
        assert spec.classes is not None
        idx = torch.randint(0, spec.classes, shape[:-1], generator=generator)
        out = torch.nn.functional.one_hot(idx, spec.classes).to(dtype)
    elif spec.kind == "discrete":
        assert spec.classes is not None
        out = torch.randint(0, spec.classes, shape, generator=generator).to(dtype)
    elif spec.kind == "binary" or spec.dtype == "bool":
        out = (torch.rand(shape, generator=generator) > 0.5).to(dtype)
    elif not spec.is_float:
        low = int(spec.low) if spec.low is not None else 0
        high = int(spec.high) if spec.high is not None else 255
        out = torch.randint(low, high + 1, shape, generator=generator).to(dtype)
    elif spec.low is not None and spec.high is not None:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        out = (spec.low + (spec.high - spec.low) * u).to(dtype)
    else:
        out = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return out.to(device) if device is not None else out


def make_observations(
    contract: IOContract,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Observations for every declared observation name, leading dims ``lead``."""
    return {s.name: make_tensor(s, lead, generator, device) for s in contract.observations}


def make_actions(
    contract: IOContract,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Actions with leading dims ``lead`` (``(B,)`` for one step, ``(T, B)`` for a rollout)."""
    if contract.action is None:
        return None
    spec = contract.action
    if spec.kind == "continuous" and spec.low is None and spec.high is None:
        spec = TensorSpec(spec.name, spec.dtype, spec.shape, low=-1.0, high=1.0)
    return make_tensor(spec, lead, generator, device)


def make_noise(
    contract: IOContract,
    graph: str,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Noise inputs of ``graph`` keyed by noise name, leading dims ``lead``."""
    out = {}
    for noise in contract.noise_for(graph):
        out[noise.name] = make_noise_tensor(noise, lead, generator, device)
    return out


def make_noise_tensor(
    noise: NoiseSpec,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """A seeded ``noise`` tensor with leading dims ``lead`` (uniform noise kept off 0 and 1)."""
    spec = noise.as_tensor_spec()
    if noise.distribution in ("exponential", "permutation"):
        shape = (*lead, *spec.concrete_shape(batch=1)[1:])
        return sample_noise(noise, shape, device=device, generator=generator)
    if noise.distribution == "uniform":
        spec = TensorSpec(spec.name, spec.dtype, spec.shape, low=_EPS, high=1.0 - _EPS)
    return make_tensor(spec, lead, generator, device)


def sample_noise(
    noise: NoiseSpec,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A fresh ``noise`` tensor of ``shape`` as its distribution declares it.

    ``generator`` (on ``device``) seeds it; None uses torch's default generator. Permutation
    noise draws, per leading position, ``randperm(classes)[:k]`` (ranks of uniform draws).
    """
    dtype = getattr(torch, noise.dtype)
    if noise.distribution == "permutation":
        assert noise.classes is not None
        u = torch.rand((*shape[:-1], noise.classes), device=device, generator=generator)
        return u.argsort(dim=-1)[..., : shape[-1]].to(dtype)
    if noise.distribution == "exponential":
        return torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    if noise.distribution == "normal":
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    return torch.rand(shape, device=device, dtype=dtype, generator=generator)


def make_conditions(
    contract: IOContract,
    lead: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Side conditions for every declared condition, leading dims ``lead`` (empty, drawing
    nothing from ``generator``, when the contract declares none)."""
    return {s.name: make_tensor(s, lead, generator, device) for s in contract.conditions}


def noise_conditions(
    noise: Mapping[str, Tensor], conditions: Mapping[str, Tensor] | None = None
) -> ConditionPayload:
    """Noise tensors as the ``wf.noise.<name>`` extras a model reads, plus side conditions as
    ``wf.cond.<name>``."""
    extras: dict[str, Any] = {f"wf.noise.{k}": v for k, v in noise.items()}
    extras.update({condition_key(k): v for k, v in (conditions or {}).items()})
    return ConditionPayload(extras=extras)


def conditions_payload(
    noise: Mapping[str, Tensor], conditions: Mapping[str, Tensor] | None = None
) -> ConditionPayload | None:
    """`noise_conditions`, or None when there is neither noise nor a side condition."""
    return noise_conditions(noise, conditions) if noise or conditions else None


def encode_input(
    obs: dict[str, Tensor],
    noise: dict[str, Tensor],
    conditions: Mapping[str, Tensor] | None = None,
) -> WorldModelInput:
    """An ``encode`` input carrying its noise (and side conditions)."""
    return WorldModelInput(obs, conditions=conditions_payload(noise, conditions))
