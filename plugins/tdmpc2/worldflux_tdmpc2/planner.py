"""The official TD-MPC2 MPPI planner (``TDMPC2._plan`` / ``_estimate_value``), batched.

Torch only, and traceable: Python loops run over config constants (horizon, iterations) and
unroll; selection is ``topk`` / ``gather``; there is no ``.item()`` and no data-dependent
branch, so `plan` can be exported with ``torch.onnx.export(dynamo=True)`` for fixed shapes.

Every random draw is an input. For a batch of ``B`` environments, with ``H = horizon``,
``I`` = planner iterations (`worldflux_tdmpc2.spec.planner_iterations`), ``N = num_samples``,
``P = num_pi_trajs``, ``K = num_elites``, ``A = action_dim``, the noise tensors are (official
draw in brackets, in the official call order):

- ``pi_eps`` ``[B, H, P, A]`` float32: ``randn_like [P, A]`` of ``pi`` for policy-prior
  trajectory step t (draws 0..H-1);
- ``sample_eps`` ``[B, I, H, N - P, A]`` float32: ``randn [H, N - P, A]``, the ``r`` of
  ``clamp(mean + std * r, -1, 1)`` (first draw of each iteration);
- ``value_eps`` ``[B, I, N, A]`` float32: ``randn_like [N, A]`` of ``pi`` at ``z_H`` in
  ``_estimate_value`` (second draw of each iteration);
- ``q_heads`` ``[B, I, 2]`` int64: ``randperm(num_q)[:2]``, the two heads of ``Q(..., 'avg')``
  (third draw of each iteration);
- ``gumbel_exp`` ``[B, K]`` float32: ``exponential_ [K]``, the ``E`` of
  ``gumbel_softmax_sample`` (the elite is ``argmax(softmax(log(score) - log(E)))``);
- ``action_eps`` ``[B, A]`` float32: ``randn [A]``, exploration noise ``std[0] * eps`` (only
  when not in eval mode; the last draw).

Multi-task eps are raw draws; the policy masks them with the task's action mask, as official.
The model passes them as condition extras ``wf.noise.plan_<name>`` (`noise_key`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from worldflux_registry import ContractError

from . import spec

__all__ = [
    "NOISE_NAMES",
    "PlanConfig",
    "PlanResult",
    "check_noise",
    "draw_noise",
    "estimate_value",
    "noise_key",
    "noise_shapes",
    "plan",
]

#: Planner noise inputs, in the official draw order.
NOISE_NAMES = ("pi_eps", "sample_eps", "value_eps", "q_heads", "gumbel_exp", "action_eps")


def noise_key(name: str) -> str:
    """The condition extra carrying planner noise ``name``: ``wf.noise.plan_<name>``."""
    return f"wf.noise.plan_{name}"


class _Model(Protocol):
    termination_head: Any
    action_masks: Tensor

    def next(self, z: Tensor, action: Tensor, task: Tensor | None = None) -> Tensor: ...
    def reward_value(self, z: Tensor, action: Tensor, task: Tensor | None = None) -> Tensor: ...
    def termination_logits(self, z: Tensor, task: Tensor | None = None) -> Tensor: ...
    def q_logits(
        self, z: Tensor, action: Tensor, target: bool = False, task: Tensor | None = None
    ) -> Tensor: ...
    def pi_info(
        self, z: Tensor, task: Tensor | None = None, eps: Tensor | None = None
    ) -> dict[str, Tensor]: ...
    def _two_hot_inv(self, logits: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class PlanConfig:
    """The planner's constants (official ``config.yaml`` names)."""

    horizon: int
    iterations: int
    num_samples: int
    num_elites: int
    num_pi_trajs: int
    temperature: float
    min_std: float
    max_std: float
    action_dim: int
    episodic: bool
    multitask: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PlanConfig:
        """From a tdmpc2 model config (iterations as the official agent adjusts them)."""
        return cls(
            horizon=config["horizon"],
            iterations=spec.planner_iterations(config),
            num_samples=config["num_samples"],
            num_elites=config["num_elites"],
            num_pi_trajs=config["num_pi_trajs"],
            temperature=float(config["temperature"]),
            min_std=float(config["min_std"]),
            max_std=float(config["max_std"]),
            action_dim=config["action_dim"],
            episodic=bool(config["episodic"]),
            multitask=bool(config["tasks"]),
        )


class PlanResult(NamedTuple):
    """What one planning step computed, per environment (leading dim ``B``)."""

    #: The action to take ``[B, A]``, clamped to [-1, 1].
    action: Tensor
    #: Final MPPI mean ``[B, H, A]`` (the next step's warm start, official ``_prev_mean``).
    mean: Tensor
    #: Final MPPI std ``[B, H, A]``.
    std: Tensor
    #: Elite indices of every iteration ``[B, I, K]`` (``topk``, sorted by value, descending).
    elite_idxs: Tensor
    #: Values of every candidate of every iteration ``[B, I, N]``.
    values: Tensor
    #: Index of the chosen elite in the last iteration's elite set ``[B]``.
    rand_idx: Tensor
    #: Policy-prior trajectories ``[B, H, P, A]``.
    pi_actions: Tensor
    #: MPPI mean entering every iteration ``[B, I, H, A]``.
    mean_in: Tensor
    #: First action before exploration noise and clamping ``[B, A]`` is ``chosen[:, 0]``.
    chosen: Tensor


def noise_shapes(cfg: PlanConfig, batch: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every planner noise input for ``batch`` environments."""
    h, i, n, p = cfg.horizon, cfg.iterations, cfg.num_samples, cfg.num_pi_trajs
    a, k, f32 = cfg.action_dim, cfg.num_elites, torch.float32
    return {
        "pi_eps": ((batch, h, p, a), f32),
        "sample_eps": ((batch, i, h, n - p, a), f32),
        "value_eps": ((batch, i, n, a), f32),
        "q_heads": ((batch, i, 2), torch.int64),
        "gumbel_exp": ((batch, k), f32),
        "action_eps": ((batch, a), f32),
    }


def draw_noise(
    cfg: PlanConfig,
    batch: int,
    num_q: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    names: tuple[str, ...] = NOISE_NAMES,
) -> dict[str, Tensor]:
    """Fresh planner noise from ``generator`` (torch's default when None), as `noise_shapes`.

    Distributions as official: standard normal, Exponential(1) for ``gumbel_exp``, and two
    distinct uniformly chosen heads per iteration for ``q_heads``. The draw order is not the
    official one (the official code interleaves them with the computation).
    """
    shapes = noise_shapes(cfg, batch)
    out: dict[str, Tensor] = {}
    for name in names:
        shape, _ = shapes[name]
        if name == "q_heads":
            u = torch.rand((*shape[:-1], num_q), device=device, generator=generator)
            out[name] = u.argsort(dim=-1)[..., :2]
        elif name == "gumbel_exp":
            out[name] = torch.empty(shape, device=device).exponential_(generator=generator)
        else:
            out[name] = torch.randn(shape, device=device, generator=generator)
    return out


def check_noise(
    cfg: PlanConfig,
    batch: int,
    noise: Mapping[str, Tensor] | None,
    eval_mode: bool,
    device: torch.device,
    generator: torch.Generator | None = None,
    num_q: int = 2,
) -> dict[str, Tensor]:
    """``noise`` checked against `noise_shapes`, with every missing input drawn.

    Raises:
        ContractError: an unknown name, or a tensor whose shape or dtype is not the expected
            one (the message names the expected shape and its layout).
    """
    given = dict(noise or {})
    unknown = sorted(set(given) - set(NOISE_NAMES))
    if unknown:
        raise ContractError(
            f"unknown tdmpc2 planner noise {unknown}",
            hint="planner noise: " + ", ".join(NOISE_NAMES),
            family=spec.FAMILY,
        )
    shapes = noise_shapes(cfg, batch)
    layouts = {
        "pi_eps": "[batch, horizon, num_pi_trajs, action_dim]",
        "sample_eps": "[batch, iterations, horizon, num_samples - num_pi_trajs, action_dim]",
        "value_eps": "[batch, iterations, num_samples, action_dim]",
        "q_heads": "[batch, iterations, 2]",
        "gumbel_exp": "[batch, num_elites]",
        "action_eps": "[batch, action_dim]",
    }
    for name, tensor in given.items():
        shape, dtype = shapes[name]
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ContractError(
                f"tdmpc2 planner noise {noise_key(name)!r} has shape {got}, expected {shape} "
                f"{layouts[name]}",
                hint="see worldflux_tdmpc2.planner.noise_shapes",
                family=spec.FAMILY,
            )
        if tensor.dtype != dtype:
            raise ContractError(
                f"tdmpc2 planner noise {noise_key(name)!r} has dtype {tensor.dtype}, "
                f"expected {dtype}",
                family=spec.FAMILY,
            )
    wanted = tuple(
        n for n in NOISE_NAMES if n not in given and not (eval_mode and n == "action_eps")
    )
    given.update(draw_noise(cfg, batch, num_q, device=device, generator=generator, names=wanted))
    return given


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(torch.compiler.is_compiling() or (exporting is not None and exporting()))


def _top_k(value: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of the ``k`` largest values, ties broken by the lower index.

    That is ONNX ``TopK``'s rule; ``torch.topk`` leaves ties in any order. Eager torch uses a
    stable sort so that it and an exported graph pick the same elites even when values tie (a
    fresh model's zero-initialised reward and Q heads make every candidate tie); traced, it is
    ``topk``, which exports to ``TopK``. Without ties both are ``torch.topk``.
    """
    if _tracing():
        return torch.topk(value, k, dim=-1).indices
    return torch.sort(value, dim=-1, descending=True, stable=True).indices[..., :k]


def _take(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x`` indexed along ``dim`` by per-batch ``idx`` ``[B, M]`` (``x`` is ``[B, ...]``)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    index = idx.reshape(shape).expand(
        *[x.shape[d] if d != dim else idx.shape[1] for d in range(x.dim())]
    )
    return torch.gather(x, dim, index)


def estimate_value(
    model: _Model,
    cfg: PlanConfig,
    z: Tensor,
    actions: Tensor,
    eps: Tensor,
    heads: Tensor,
    weights: Tensor,
    task: Tensor | None,
) -> Tensor:
    """The official ``_estimate_value``: ``[B, N]`` returns of the candidates.

    ``z`` ``[B, N, L]``, ``actions`` ``[B, H, N, A]``, ``eps`` ``[B, N, A]`` (terminal policy
    draw), ``heads`` ``[B, 2]``, ``weights`` ``[B, H + 1]`` (`TDMPC2WorldModel.discount_weights`),
    ``task`` ``[B, 1]`` or None. Episodic models stop adding rewards after the first predicted
    termination (probability > 0.5) and drop the terminal value then.
    """
    g: Tensor | None = None
    term = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    for t in range(cfg.horizon):
        reward = model.reward_value(z, actions[:, t], task)
        z = model.next(z, actions[:, t], task)
        step = weights[:, t, None] * (1 - term) * reward
        g = step if g is None else g + step
        if cfg.episodic:
            done = (torch.sigmoid(model.termination_logits(z, task)) > 0.5).to(z.dtype)
            term = torch.clip(term + done, max=1.0)
    action = model.pi_info(z, task, eps=eps)["action"]
    q = model._two_hot_inv(model.q_logits(z, action, task=task))  # [num_q, B, N]
    picked = torch.gather(q, 0, heads.t()[:, :, None].expand(2, *q.shape[1:]))
    q_avg = picked.sum(0) / 2
    terminal = weights[:, cfg.horizon, None] * (1 - term) * q_avg
    return terminal if g is None else g + terminal


def plan(
    model: _Model,
    cfg: PlanConfig,
    z0: Tensor,
    prev_mean: Tensor,
    noise: Mapping[str, Tensor],
    weights: Tensor,
    *,
    task: Tensor | None = None,
    eval_mode: bool = True,
) -> PlanResult:
    """One official MPPI planning step for ``B`` environments.

    ``z0`` ``[B, L]`` is the encoded observation, ``prev_mean`` ``[B, H, A]`` the previous
    step's final mean (zeros at the first step: the official ``t0`` starts from zeros, and
    shifting zeros gives zeros), ``noise`` as `noise_shapes`, ``weights`` ``[B, H + 1]``,
    ``task`` ``[B]`` int ids (multi-task) or None. ``eval_mode=False`` adds ``std[0] *
    action_eps`` to the chosen first action, as the official ``act(eval_mode=False)``.
    """
    b = z0.shape[0]
    h, n, p, k = cfg.horizon, cfg.num_samples, cfg.num_pi_trajs, cfg.num_elites
    task2 = None if task is None else task.reshape(b, 1)
    mask = None
    if cfg.multitask and task is not None:
        mask = model.action_masks[task.long().reshape(b)][:, None, None, :]  # [B, 1, 1, A]

    # Policy-prior trajectories.
    pi_list = []
    if p > 0:
        zp = z0.unsqueeze(1).repeat(1, p, 1)
        for t in range(h):
            a_t = model.pi_info(zp, task2, eps=noise["pi_eps"][:, t])["action"]
            pi_list.append(a_t)
            if t < h - 1:
                zp = model.next(zp, a_t, task2)
    pi_actions = torch.stack(pi_list, dim=1) if pi_list else z0.new_zeros(b, h, 0, cfg.action_dim)

    z = z0.unsqueeze(1).repeat(1, n, 1)
    mean = torch.cat([prev_mean[:, 1:], torch.zeros_like(prev_mean[:, :1])], dim=1)
    std = torch.full_like(mean, cfg.max_std)
    elite_list, value_list, mean_in = [], [], []
    score = elite_actions = None
    for i in range(cfg.iterations):
        mean_in.append(mean)
        r = noise["sample_eps"][:, i]
        sampled = (mean.unsqueeze(2) + std.unsqueeze(2) * r).clamp(-1, 1)
        actions = torch.cat([pi_actions, sampled], dim=2)  # [B, H, N, A]
        if mask is not None:
            actions = actions * mask
        value = estimate_value(
            model,
            cfg,
            z,
            actions,
            noise["value_eps"][:, i],
            noise["q_heads"][:, i],
            weights,
            task2,
        ).nan_to_num(0)
        elite_idxs = _top_k(value, k)  # [B, K]
        elite_value = torch.gather(value, 1, elite_idxs)
        elite_actions = _take(actions, elite_idxs, 2)  # [B, H, K, A]
        max_value = elite_value.max(-1, keepdim=True).values
        score = torch.exp(cfg.temperature * (elite_value - max_value))
        score = score / score.sum(-1, keepdim=True)
        w = score[:, None, :, None]
        denom = score.sum(-1)[:, None, None] + 1e-9
        mean = (w * elite_actions).sum(dim=2) / denom
        std = ((w * (elite_actions - mean.unsqueeze(2)) ** 2).sum(dim=2) / denom).sqrt()
        std = std.clamp(cfg.min_std, cfg.max_std)
        if mask is not None:
            mean = mean * mask[:, 0]
            std = std * mask[:, 0]
        elite_list.append(elite_idxs)
        value_list.append(value)
    assert score is not None and elite_actions is not None

    # Select an elite: the official gumbel_softmax_sample(score) with E = gumbel_exp.
    gumbels = -noise["gumbel_exp"].log()
    rand_idx = ((score.log() + gumbels) / 1.0).softmax(-1).argmax(-1)  # [B]
    chosen = _take(elite_actions, rand_idx[:, None], 2).squeeze(2)  # [B, H, A]
    a = chosen[:, 0]
    if not eval_mode:
        a = a + std[:, 0] * noise["action_eps"]
    return PlanResult(
        action=a.clamp(-1, 1),
        mean=mean,
        std=std,
        elite_idxs=torch.stack(elite_list, dim=1),
        values=torch.stack(value_list, dim=1),
        rand_idx=rand_idx,
        pi_actions=pi_actions,
        mean_in=torch.stack(mean_in, dim=1),
        chosen=chosen,
    )
