"""Scalar transforms shared by world-model families: symlog, symexp and two-hot bins.

Reward, return and value heads of DreamerV3 and TD-MPC2 predict a distribution over bins laid
out evenly in symlog space, trained against a two-hot encoding of the symlog of the target. Import
this module explicitly (``from worldflux_registry import functional``): it imports torch, so
``import worldflux_registry`` does not load it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["symexp", "symlog", "two_hot", "two_hot_mean", "two_hot_uniform"]


def symlog(x: Tensor) -> Tensor:
    """Squash ``x`` as ``sign(x) * log(1 + |x|)`` (Hafner et al., DreamerV3, 2023).

    Odd, monotonic and close to the identity near zero; the inverse is `symexp`.
    """
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """Invert `symlog`: ``sign(x) * (exp(|x|) - 1)`` (DreamerV3).

    Overflows to ``inf`` for ``|x|`` above about 88 in float32.
    """
    return torch.sign(x) * torch.expm1(torch.abs(x))


def two_hot(x: Tensor, bins: Tensor) -> Tensor:
    """Two-hot encode ``x`` over increasing ``bins`` (DreamerV3's reward and critic targets).

    Each value puts weight on the two bins around it, in proportion to its closeness, so the
    weighted mean of the bins gives the value back. Values outside ``[bins[0], bins[-1]]`` are
    clipped to the end bin. ``x`` is taken as it is: pass ``symlog(target)`` for bins laid out
    in symlog space.

    Args:
        x: Values of any shape.
        bins: 1-D increasing bin values, at least two.

    Returns:
        ``[*x.shape, len(bins)]`` weights, each row summing to 1.
    """
    x = torch.clamp(x, bins[0], bins[-1])
    n = bins.shape[0]
    below = (bins <= x.unsqueeze(-1)).sum(-1).clamp(1, n - 1) - 1
    above = below + 1
    lo, hi = bins[below], bins[above]
    w_hi = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    out = F.one_hot(below, n) * (1.0 - w_hi).unsqueeze(-1)
    return out + F.one_hot(above, n) * w_hi.unsqueeze(-1)


def two_hot_uniform(x: Tensor, num_bins: int, vmin: float, vmax: float) -> Tensor:
    """Two-hot encode ``x`` over ``num_bins`` evenly spaced bins on ``[vmin, vmax]`` (TD-MPC2).

    The arithmetic of Hansen et al.'s ``two_hot`` (TD-MPC2, 2024): the bin is found from the
    value's position rather than by comparing with every bin. Weights agree with
    ``two_hot(x, torch.linspace(vmin, vmax, num_bins))`` up to float rounding (about 1e-5),
    not bit for bit. Values outside ``[vmin, vmax]`` are clipped; ``x`` is taken as it is (pass
    ``symlog(target)`` for bins in symlog space).

    Returns:
        ``[*x.shape, num_bins]`` weights in ``x``'s dtype, each row summing to 1.
    """
    bin_size = (vmax - vmin) / (num_bins - 1)
    pos = (torch.clamp(x, vmin, vmax) - vmin) / bin_size
    low = torch.clamp(torch.floor(pos), 0, num_bins - 1)
    frac = (pos - low).unsqueeze(-1)
    low_idx = low.long().unsqueeze(-1)
    # At vmax frac is 0, so the wrap-around to bin 0 (as in the official code) adds nothing.
    high_idx = (low_idx + 1) % num_bins
    out = torch.zeros(*x.shape, num_bins, dtype=x.dtype, device=x.device)
    out = out.scatter(-1, low_idx, 1 - frac)
    return out.scatter_add(-1, high_idx, frac)


def two_hot_mean(probs: Tensor, bins: Tensor) -> Tensor:
    """Expected bin value of ``probs`` over ``bins``, summed from both ends inwards (DreamerV3).

    Pairs each bin with its mirror before summing, so for bins symmetric about zero uniform
    probabilities (a fresh, zero-initialised head) give exactly ``0`` rather than a rounding
    residue. ``probs`` is ``[..., len(bins)]`` (for example ``softmax(logits, -1)``); returns
    ``[...]``, in bin space: apply `symexp` to bins laid out in symlog space.
    """
    n = int(bins.shape[0])
    m = n // 2
    lo = (probs[..., :m] * bins[:m]).flip(-1)
    hi = probs[..., n - m :] * bins[n - m :]
    mid = (probs[..., m : n - m] * bins[m : n - m]).sum(-1)
    return mid + (lo + hi).sum(-1)
