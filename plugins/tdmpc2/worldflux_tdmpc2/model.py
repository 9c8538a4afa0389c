"""TD-MPC2 world model (Hansen, Su and Wang, ICLR 2024) behind the `WorldModel` protocol.

A port of the official implementation (``nicklashansen/tdmpc2`` @ ``e9f5932``,
``common/layers.py``, ``common/world_model.py``, ``common/math.py``, ``tdmpc2.py``) for vector
observations, proven against files the official code wrote (``tests/test_official_tdmpc2.py``);
official checkpoints load through `worldflux_tdmpc2.importer`:

- ``NormedLinear`` = Linear, (Dropout), LayerNorm, Mish; the last layer of the encoder and of the
  dynamics uses SimNorm (softmax over groups of ``simnorm_dim``) in place of Mish.
- Reward and the ``num_q`` Q heads regress onto ``num_bins`` two-hot bins in symlog space
  (``vmin``..``vmax``); their last weights start at zero. Q heads drop out (``dropout``) after
  their first layer in training mode. A target copy of the Q ensemble gives TD targets; it is
  always evaluated without dropout (the official ``train()`` keeps it in eval mode). The Q heads
  are evaluated with the op decomposition of the official ``torch.vmap`` ensemble (matmul plus
  bias, LayerNorm without affine then scale and shift), so their logits match bit for bit.
- Policy prior: tanh-squashed Gaussian with ``log_std`` squashed into ``[log_std_min,
  log_std_max]``, and the official entropy and ``scaled_entropy``.
- Episodic models (``episodic``) have the termination head on ``z``; multi-task models
  (``tasks``) an ``nn.Embedding(max_norm=1)`` task embedding (renormalised in place on lookup,
  as the official module does; a traced/exported graph uses the same rows functionally) and
  per-task action masks (``action_dims``) on the policy and the planner.

Protocol mapping (see ``docs/families/tdmpc2.md``):

- ``encode(obs)`` -> ``State(latent=enc(obs), reward=0)``.
- ``transition(state, a)`` -> ``State(latent=d(z, a), reward=R(z, a))``: TD-MPC2's reward is a
  function of the state *and* the action, so the transition that takes the action also predicts
  it and carries it in the state; ``decode`` then reads it, so rollout rewards line up with the
  actions exactly as in TD-MPC2's planner.
- ``update(state, a, obs)`` -> ``State(latent=enc(obs), reward=R(state.latent, a))``. TD-MPC2
  has no filtering: its posterior *is* the encoding of the new observation.
- ``decode(state)`` -> ``reward`` (from the state), ``value`` (mean of the Q ensemble at the
  policy's mean action: a deterministic summary; the planner uses the official estimate, the
  average of two random heads at a sampled policy action), ``policy_mean`` and, for episodic
  models, ``continue`` (1 - termination probability).
- ``plan_step(state)`` runs the official MPPI planner (`worldflux_tdmpc2.planner`).

Protocol steps are deterministic (dropout acts only in training mode), so no noise inputs are
declared and ``deterministic`` changes nothing there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflux_registry import (
    ActionPayload,
    ConditionPayload,
    ConfigError,
    ContractError,
    LossOutput,
    ModelOutput,
    State,
    Trajectory,
    WorldModel,
)
from worldflux_registry.functional import two_hot_uniform
from worldflux_registry.plugin_api import ActionLike, ObsLike

from . import planner, spec

__all__ = ["SimNorm", "TDMPC2WorldModel", "symexp", "symlog", "two_hot"]

#: The official ``0.5 * log(2 * pi)`` literal (``math.gaussian_logprob``).
_HALF_LOG_2PI = 0.9189385175704956


def symlog(x: Tensor) -> Tensor:
    """``sign(x) * log(1 + |x|)``, with the official op order (not ``log1p``)."""
    return torch.sign(x) * torch.log(1 + torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """``sign(x) * (exp(|x|) - 1)``, the inverse of `symlog`, with the official op order."""
    return torch.sign(x) * (torch.exp(torch.abs(x)) - 1)


def two_hot(x: Tensor, num_bins: int, vmin: float, vmax: float) -> Tensor:
    """Soft two-hot encoding of ``symlog(x)`` over ``num_bins`` bins spanning ``[vmin, vmax]``.

    ``x`` has any shape; the bins are a new last axis. TD-MPC2's ``two_hot``, built on
    `worldflux_registry.functional.two_hot_uniform`.
    """
    return two_hot_uniform(symlog(x), num_bins, vmin, vmax)


def soft_ce(logits: Tensor, target: Tensor, num_bins: int, vmin: float, vmax: float) -> Tensor:
    """Cross-entropy of bin ``logits`` against the two-hot encoding of scalar ``target``."""
    return -(two_hot(target, num_bins, vmin, vmax) * F.log_softmax(logits, dim=-1)).sum(-1)


class SimNorm(nn.Module):
    """Simplicial normalisation: softmax over consecutive groups of ``dim`` features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Apply the groupwise softmax; the shape is unchanged."""
        groups = x.shape[-1] // self.dim
        y = x.reshape(*x.shape[:-1], groups, self.dim)
        return F.softmax(y, dim=-1).reshape(x.shape)


class Mish(nn.Mish):
    """``nn.Mish`` (the official activation); traced for export or ``torch.compile``, the same
    function written as ``x * n / (n + 2)`` with ``n = e^x (e^x + 2)`` (``tanh(softplus(x))``
    in closed form, ``x`` clamped at 20 where both are 1 in float32).

    Eager calls stay ``F.mish``, bitwise the official. ONNX Runtime's CPU ``Softplus`` kernel is
    ~9x slower than these elementwise ops and took over half of an exported MPPI plan's time;
    the closed form is also closer to torch's ``mish`` (max abs 1e-6 against 2e-6).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Mish of ``x``."""
        if not _tracing():
            return F.mish(x)
        e = torch.exp(torch.clamp(x, max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))


class NormedLinear(nn.Linear):
    """Linear layer followed by (dropout), LayerNorm and an activation (Mish by default)."""

    def __init__(
        self, fan_in: int, fan_out: int, dropout: float = 0.0, act: nn.Module | None = None
    ) -> None:
        super().__init__(fan_in, fan_out)
        self.ln = nn.LayerNorm(fan_out)
        self.act = act if act is not None else Mish()
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: Tensor) -> Tensor:
        """Linear, dropout, LayerNorm, activation."""
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        out: Tensor = self.act(self.ln(x))
        return out


def mlp(dims: list[int], act: nn.Module | None = None, dropout: float = 0.0) -> nn.Sequential:
    """The official ``layers.mlp``: NormedLinear layers, the last one plain unless ``act``."""
    layers: list[nn.Module] = [
        NormedLinear(a, b, dropout=dropout if i == 0 else 0.0)
        for i, (a, b) in enumerate(pairwise(dims[:-1]))
    ]
    fan_in, fan_out = dims[-2], dims[-1]
    layers.append(NormedLinear(fan_in, fan_out, act=act) if act else nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight, -0.02, 0.02)


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(
        torch.compiler.is_compiling()
        or (exporting is not None and exporting())
        or torch._C._get_tracing_state() is not None
    )


def _q_head(
    head: nn.Module, x: Tensor, *, p: float, keep: Tensor | None, detach: bool = False
) -> Tensor:
    """One Q head with the official vmap op decomposition; dropout when ``p > 0``.

    ``keep`` is the bool keep-mask of the first layer (``[..., mlp_dim]``), drawn when None.
    ``detach`` evaluates with detached weights (the official ``_detach_Qs``).
    """

    def w(t: Tensor) -> Tensor:
        return t.detach() if detach else t

    h = x
    layers: list[nn.Module] = list(head.children())
    for i, layer in enumerate(layers):
        assert isinstance(layer, nn.Linear)
        h = torch.matmul(h, w(layer.weight).t()) + w(layer.bias)
        if isinstance(layer, NormedLinear):
            if i == 0 and p > 0:
                if keep is None:
                    keep = torch.rand_like(h) >= p
                h = h * (keep.to(h.dtype) / (1 - p))
            h = F.layer_norm(h, h.shape[-1:]) * w(layer.ln.weight) + w(layer.ln.bias)
            h = layer.act(h)
    return h


def _running_scale_percentiles(x: Tensor) -> Tensor:
    """The official ``RunningScale._percentile`` (5th and 95th) of ``x`` along dim 0."""
    n = x.shape[0]
    sorted_x = torch.sort(x.flatten(1), dim=0).values
    pct = torch.tensor([5.0, 95.0], device=x.device, dtype=torch.float32)
    positions = pct * (n - 1) / 100
    floored = torch.floor(positions)
    ceiled = torch.clamp(floored + 1, max=n - 1)
    w_ceiled = positions - floored
    w_floored = 1.0 - w_ceiled
    out = (
        sorted_x[floored.long()] * w_floored[:, None] + sorted_x[ceiled.long()] * w_ceiled[:, None]
    )
    return out.reshape(-1, *x.shape[1:]).to(x.dtype)


class TDMPC2WorldModel(WorldModel):
    """The TD-MPC2 world model; config fields as in `worldflux_tdmpc2.spec.DEFAULTS`.

    ``loss(batch)`` takes ``vector`` ``[B, T, obs_dim]``, ``action`` ``[B, T, action_dim]`` and
    ``reward`` ``[B, T]`` in the registry's batch layout: step ``t`` holds ``o_t``, the action
    ``a_t`` taken after seeing it and the reward it produced. The horizon is ``T - 1`` (the last
    action and reward have no next observation and are unused), i.e. the official
    ``obs[0..H]``, ``action[0..H-1]``, ``reward[0..H-1]``. ``continue`` ``[B, T]`` (0.0 where
    the step into ``o_{t+1}`` terminated; the official ``terminated = 1 - continue``) is read
    when present (required for episodic models). A multi-task model (``tasks > 0``) also reads
    ``task`` ``[B]`` (int task ids) from the batch, and from the condition extra
    ``wf.cond.task`` in every protocol step.
    """

    family = spec.FAMILY
    capabilities = spec.CAPABILITIES

    def __init__(self, **config: Any) -> None:
        super().__init__()
        unknown = sorted(set(config) - set(spec.DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown tdmpc2 config fields {unknown}",
                family=spec.FAMILY,
                hint="fields: " + ", ".join(sorted(spec.DEFAULTS)),
            )
        cfg = {**spec.DEFAULTS, **config}
        spec.check_config(cfg)
        self.config = cfg
        obs, act, lat = cfg["obs_dim"], cfg["action_dim"], cfg["latent_dim"]
        enc, hid, bins = cfg["enc_dim"], cfg["mlp_dim"], cfg["num_bins"]
        simnorm = cfg["simnorm_dim"]
        emb = spec.task_dim(cfg)
        self.encoder = mlp(
            [obs + emb] + [enc] * max(cfg["num_enc_layers"] - 1, 1) + [lat], act=SimNorm(simnorm)
        )
        self.dynamics = mlp([lat + act + emb, hid, hid, lat], act=SimNorm(simnorm))
        self.reward_head = mlp([lat + act + emb, hid, hid, bins])
        self.pi_head = mlp([lat + emb, hid, hid, 2 * act])
        self.qs = nn.ModuleList(
            mlp([lat + act + emb, hid, hid, bins], dropout=cfg["dropout"])
            for _ in range(cfg["num_q"])
        )
        self.apply(_init_weights)
        last_layers = [self.reward_head[-1]] + [q[-1] for q in self.qs]  # type: ignore[index]
        for layer in last_layers:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
        self.target_qs = copy.deepcopy(self.qs).requires_grad_(False)
        # Created last, so single-task models draw their initial weights exactly as before.
        self.task_emb = nn.Embedding(cfg["tasks"], emb, max_norm=1.0) if cfg["tasks"] else None
        if self.task_emb is not None:
            _init_weights(self.task_emb)
        self.termination_head = mlp([lat + emb, hid, hid, 1]) if cfg["episodic"] else None
        if self.termination_head is not None:
            self.termination_head.apply(_init_weights)
        bin_values = torch.linspace(cfg["vmin"], cfg["vmax"], bins)
        self.bins: Tensor
        self.register_buffer("bins", bin_values, persistent=False)
        # Per-task action masks (official _action_masks), rebuilt from the config.
        masks = torch.zeros(max(cfg["tasks"], 1), act)
        for i, n in enumerate(spec.action_dims(cfg)):
            masks[i, :n] = 1.0
        self.action_masks: Tensor
        self.register_buffer("action_masks", masks, persistent=False)
        # Per-task discounts: official float32 tensor (multi-task); single-task uses a float.
        self.discounts = spec.discounts(cfg)
        self.discount_table: Tensor
        self.register_buffer(
            "discount_table", torch.tensor(self.discounts, dtype=torch.float32), persistent=False
        )
        # Running 5%-95% range of Q used to scale the policy loss (official RunningScale).
        self.q_scale: Tensor
        self.register_buffer("q_scale", torch.ones(()))
        # The target soft update of a train-mode loss() runs at the start of the next one
        # (i.e. after the optimizer step in between, as the official agent does).
        self._target_update_pending = False

    def train(self, mode: bool = True) -> TDMPC2WorldModel:
        """Set training mode; the target Q copy stays in eval mode (no dropout), as official."""
        super().train(mode)
        self.target_qs.train(False)
        return self

    # -- building blocks (the official WorldModel methods) -------------------------------------
    def _two_hot_inv(self, logits: Tensor) -> Tensor:
        return symexp((F.softmax(logits, dim=-1) * self.bins).sum(-1))

    def task_embedding(self, task: Tensor) -> Tensor:
        """Rows of the task embedding for int ids ``task`` (any shape), at norm <= 1.

        Eagerly this is the official ``nn.Embedding(max_norm=1)`` lookup, which renormalises the
        looked-up rows of the weight *in place* (``row *= 1 / (norm + 1e-7)`` when norm > 1), so
        the stored weight changes on first use exactly as in the official model; a traced or
        exported graph computes the same rows without mutating the weight.
        """
        assert self.task_emb is not None
        weight = self.task_emb.weight
        ids = task.long()
        if _tracing():
            rows = weight[ids]
            norm = rows.norm(dim=-1, keepdim=True)
            scale = torch.where(norm > 1.0, 1.0 / (norm + 1e-7), torch.ones_like(norm))
            return rows * scale.detach()
        return F.embedding(ids, weight, max_norm=1.0)

    def with_task(self, x: Tensor, task: Tensor | None) -> Tensor:
        """``x`` with the task embedding appended (the official ``task_emb``); ``x`` as is for a
        single-task model. ``task`` holds int task ids ``[batch]``; ``x`` is ``[..., batch, D]``.
        """
        if self.task_emb is None:
            return x
        if task is None:
            raise ContractError(
                f"this multi-task tdmpc2 ({self.config['tasks']} tasks) needs task ids",
                hint="pass ConditionPayload({'wf.cond.task': ids}) (int64 [batch]); "
                "batch['task'] for loss()",
                family=self.family,
            )
        emb = self.task_embedding(task)
        return torch.cat([x, emb.expand(*x.shape[:-1], -1)], dim=-1)

    def _mask(self, task: Tensor | None) -> Tensor | None:
        """Action mask rows ``[..., action_dim]`` of ``task`` (None for single-task models)."""
        if self.task_emb is None or task is None:
            return None
        return self.action_masks[task.long()]

    def encode_vector(self, obs: Tensor, task: Tensor | None = None) -> Tensor:
        """Latent of a vector observation ``[..., obs_dim]``."""
        z: Tensor = self.encoder(self.with_task(obs, task))
        return z

    def next(self, z: Tensor, action: Tensor, task: Tensor | None = None) -> Tensor:
        """Next latent ``d(z, a)``."""
        out: Tensor = self.dynamics(torch.cat([self.with_task(z, task), action], dim=-1))
        return out

    def reward(self, z: Tensor, action: Tensor, task: Tensor | None = None) -> Tensor:
        """Reward bin logits ``R(z, a)`` (``[..., num_bins]``); see `reward_value` for scalars."""
        out: Tensor = self.reward_head(torch.cat([self.with_task(z, task), action], dim=-1))
        return out

    def reward_value(self, z: Tensor, action: Tensor, task: Tensor | None = None) -> Tensor:
        """Scalar reward ``R(z, a)`` (``[...]``)."""
        return self._two_hot_inv(self.reward(z, action, task))

    def termination_logits(self, z: Tensor, task: Tensor | None = None) -> Tensor:
        """Termination logit of latent ``z`` (``[...]``; episodic models only)."""
        if self.termination_head is None:
            raise ContractError(
                "this tdmpc2 has no termination head",
                hint="build it with episodic=True",
                family=self.family,
            )
        out: Tensor = self.termination_head(self.with_task(z, task))
        return out.squeeze(-1)

    def q_logits(
        self,
        z: Tensor,
        action: Tensor,
        target: bool = False,
        task: Tensor | None = None,
        *,
        dropout_keep: Tensor | None = None,
        detach: bool = False,
    ) -> Tensor:
        """Bin logits of every Q head, ``[num_q, ..., num_bins]`` (target copy when asked).

        Online heads drop out in training mode; ``dropout_keep`` (bool ``[num_q, ...,
        mlp_dim]``, the official bernoulli keep-mask) replaces the random draw. The target
        heads never drop out. ``detach`` uses detached online weights (the official
        ``_detach_Qs`` of the policy loss).
        """
        za = torch.cat([self.with_task(z, task), action], dim=-1)
        heads = self.target_qs if target else self.qs
        p = self.config["dropout"] if (self.training and not target) else 0.0
        outs = [
            _q_head(
                head,
                za,
                p=p,
                keep=None if dropout_keep is None else dropout_keep[i],
                detach=detach,
            )
            for i, head in enumerate(heads)
        ]
        return torch.stack(outs)

    def q_value(
        self,
        z: Tensor,
        action: Tensor,
        kind: str = "min",
        target: bool = False,
        task: Tensor | None = None,
        *,
        heads: Tensor | None = None,
        dropout_keep: Tensor | None = None,
        detach: bool = False,
    ) -> Tensor:
        """The official ``Q(..., return_type=kind)`` as a scalar ``[...]``: ``"min"`` or
        ``"avg"`` of two heads, ``heads`` (int64, the first two of the official
        ``randperm(num_q)``; drawn when None)."""
        logits = self.q_logits(z, action, target, task, dropout_keep=dropout_keep, detach=detach)
        if heads is None:
            heads = torch.randperm(self.config["num_q"], device=logits.device)
        q = self._two_hot_inv(logits[heads[:2]])
        if kind == "min":
            return q.min(0).values
        if kind == "avg":
            return q.sum(0) / 2
        raise ValueError(f"kind must be 'min' or 'avg', got {kind!r}")

    def q_min_of_two(
        self, z: Tensor, action: Tensor, target: bool = True, task: Tensor | None = None
    ) -> Tensor:
        """TD-MPC2's pessimistic value: minimum over two randomly chosen Q heads (``[...]``)."""
        return self.q_value(z, action, "min", target, task)

    def pi_info(
        self,
        z: Tensor,
        task: Tensor | None = None,
        eps: Tensor | None = None,
        deterministic: bool = False,
    ) -> dict[str, Tensor]:
        """The official ``pi(z, task)``: action and info, with multi-task action masks.

        ``eps`` is the raw standard-normal draw shaped like the action (masked here, as the
        official code masks it); drawn when None, zero when ``deterministic``. Returns
        ``action``, ``mean`` (tanh of the masked mean), ``log_std`` (masked), ``log_prob``,
        ``entropy`` and ``scaled_entropy`` (``[...]``).
        """
        mu, raw_log_std = self.pi_head(self.with_task(z, task)).chunk(2, dim=-1)
        lo, hi = self.config["log_std_min"], self.config["log_std_max"]
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw_log_std) + 1)
        if deterministic:
            eps = torch.zeros_like(mu)
        elif eps is None:
            eps = torch.randn_like(mu)
        mask = self._mask(task)
        if mask is not None:
            mu, log_std, eps = mu * mask, log_std * mask, eps * mask
            size: Tensor | int = mask.sum(-1, keepdim=True)
        else:
            size = eps.shape[-1]
        log_prob = ((-0.5 * eps.pow(2) - log_std) - _HALF_LOG_2PI).sum(-1, keepdim=True)
        scaled_log_prob = log_prob * size
        sample = mu + eps * log_std.exp()
        mean, action = torch.tanh(mu), torch.tanh(sample)
        log_prob = log_prob - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
        entropy_scale = scaled_log_prob / (log_prob + 1e-8)
        return {
            "action": action,
            "mean": mean,
            "log_std": log_std,
            "log_prob": log_prob.squeeze(-1),
            "entropy": -log_prob.squeeze(-1),
            "scaled_entropy": (-log_prob * entropy_scale).squeeze(-1),
        }

    def pi(
        self,
        z: Tensor,
        deterministic: bool = False,
        eps: Tensor | None = None,
        task: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Policy prior: ``(mean action, action, log_prob)``, actions in ``[-1, 1]``.

        ``eps`` (standard normal, shaped like the action) is the sampling noise; drawn from
        torch's generator when None. ``deterministic=True`` returns the mean as the action.
        """
        info = self.pi_info(z, task, eps, deterministic)
        return info["mean"], info["action"], info["log_prob"]

    def value(self, z: Tensor, task: Tensor | None = None) -> Tensor:
        """Mean over the Q ensemble at the policy prior's mean action (``[...]``)."""
        mean, _, _ = self.pi(z, deterministic=True, task=task)
        return self._two_hot_inv(self.q_logits(z, mean, task=task)).mean(0)

    # -- protocol ------------------------------------------------------------------------------
    def _vector(self, obs: ObsLike) -> tuple[Tensor, ConditionPayload | None]:
        tensors, conditions = self.observations(obs)
        if "vector" not in tensors:
            raise ContractError(
                f"tdmpc2 observations need key 'vector', got {sorted(tensors)}",
                hint="pass {'vector': tensor[batch, obs_dim]}",
            )
        return tensors["vector"], conditions

    def _task(self, conditions: ConditionPayload | None) -> Tensor | None:
        return self.condition("task", conditions) if self.task_emb is not None else None

    def _action(self, action: ActionLike) -> Tensor:
        a = self.action_tensor(action)
        if a is None:
            raise ContractError("tdmpc2 transition and update need an action [batch, action_dim]")
        return a

    def encode(self, obs: ObsLike, deterministic: bool = False) -> State:
        """Encode a vector observation; the state's ``reward`` is 0 (no step led here yet)."""
        vector, conditions = self._vector(obs)
        z = self.encode_vector(vector, self._task(conditions))
        return State({"latent": z, "reward": z.new_zeros(z.shape[:-1])})

    def transition(
        self,
        state: State,
        action: ActionLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Next latent ``d(z, a)``, carrying the predicted reward ``R(z, a)`` of this step."""
        z, a, task = state["latent"], self._action(action), self._task(conditions)
        return State({"latent": self.next(z, a, task), "reward": self.reward_value(z, a, task)})

    def update(
        self,
        state: State,
        action: ActionLike,
        obs: ObsLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Posterior after ``action`` and the observation it produced.

        TD-MPC2 does no filtering: the posterior latent is the encoding of ``obs``. The previous
        latent and ``action`` give the predicted reward of the step just observed.
        """
        z, a = state["latent"], self._action(action)
        vector, obs_conditions = self._vector(obs)
        task = self._task(conditions if conditions is not None else obs_conditions)
        latent = self.encode_vector(vector, task)
        return State({"latent": latent, "reward": self.reward_value(z, a, task)})

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Predictions of a state: ``reward`` (of the step into it), ``value``, ``policy_mean``
        and, for episodic models, ``continue`` (1 - termination probability of the state)."""
        z, task = state["latent"], self._task(conditions)
        mean, _, _ = self.pi(z, deterministic=True, task=task)
        value = self._two_hot_inv(self.q_logits(z, mean, task=task)).mean(0)
        predictions = {"reward": state["reward"], "value": value, "policy_mean": mean}
        if self.termination_head is not None:
            predictions["continue"] = 1 - torch.sigmoid(self.termination_logits(z, task))
        return ModelOutput(predictions=predictions)

    def rollout(
        self,
        initial_state: State,
        action_sequence: Tensor | ActionPayload,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        mode: str = "autoregressive",
    ) -> Trajectory:
        """`WorldModel.rollout` with ``values`` filled in (``[T + 1, batch]``, initial included).

        ``values`` are the deterministic ensemble means of `decode`; the official planning
        objective (two random heads at a sampled action, termination-aware) is `plan_step`'s.
        """
        traj = super().rollout(initial_state, action_sequence, conditions, deterministic, mode)
        first = self.decode(initial_state, conditions).predictions["value"]
        rest = (traj.predictions or {}).get("value")
        traj.values = first[None] if rest is None else torch.cat([first[None], rest])
        return traj

    # -- planning ------------------------------------------------------------------------------
    def discount_weights(self, task: Tensor | None, batch: int) -> Tensor:
        """Weights ``[batch, horizon + 1]`` of the planner's reward at step t and terminal value.

        As the official ``_estimate_value`` accumulates them: single-task in Python double
        (then used as float32), multi-task as a float32 product of ``discount[task]``.
        """
        horizon = self.config["horizon"]
        device = self.discount_table.device
        if self.task_emb is None or task is None:
            weights, w = [1.0], 1.0
            for _ in range(horizon):
                w = w * self.discounts[0]
                weights.append(w)
            row = torch.tensor(weights, dtype=torch.float32, device=device)
            return row.expand(batch, -1)
        d = self.discount_table[task.long().reshape(batch)]
        cols = [torch.ones_like(d)]
        for _ in range(horizon):
            cols.append(cols[-1] * d)
        return torch.stack(cols, dim=-1)

    def plan(
        self,
        z: Tensor,
        prev_mean: Tensor | None = None,
        noise: Mapping[str, Tensor] | None = None,
        task: Tensor | None = None,
        eval_mode: bool = True,
        generator: torch.Generator | None = None,
    ) -> planner.PlanResult:
        """Run the official MPPI planner from latents ``z`` ``[B, latent_dim]``.

        ``prev_mean`` ``[B, horizon, action_dim]`` is the previous step's final MPPI mean (the
        official ``_prev_mean``; zeros or None = the first step of an episode, ``t0``).
        ``noise`` maps the names of `worldflux_tdmpc2.planner.noise_shapes` to tensors; missing
        ones are drawn from ``generator`` (torch's default when None). ``eval_mode=False`` adds
        the official exploration noise. Returns every intermediate (`planner.PlanResult`).
        """
        with torch.no_grad():
            batch = z.shape[0]
            cfg = planner.PlanConfig.from_config(self.config)
            drawn = planner.check_noise(
                cfg, batch, noise, eval_mode, z.device, generator, self.config["num_q"]
            )
            if prev_mean is None:
                prev_mean = z.new_zeros(batch, cfg.horizon, cfg.action_dim)
            elif tuple(prev_mean.shape) != (batch, cfg.horizon, cfg.action_dim):
                raise ContractError(
                    f"tdmpc2 plan_mean has shape {tuple(prev_mean.shape)}, expected "
                    f"{(batch, cfg.horizon, cfg.action_dim)} [batch, horizon, action_dim]",
                    hint="pass the plan_mean of the previous plan_step (zeros at t0)",
                    family=self.family,
                )
            if self.task_emb is not None and task is None:
                self.with_task(z, None)  # raises the ContractError naming the condition
            weights = self.discount_weights(task, batch)
            return planner.plan(
                self, cfg, z, prev_mean, drawn, weights, task=task, eval_mode=eval_mode
            )

    def plan_step(
        self,
        state: State,
        action: ActionLike = None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> State:
        """One official MPPI planning step (``TDMPC2.act`` with ``mpc=True``) per environment.

        ``state`` is an `encode`d observation (``latent`` ``[B, latent_dim]``), optionally with
        ``plan_mean`` ``[B, horizon, action_dim]``: the warm start, i.e. the ``plan_mean`` of
        the previous step's returned State (absent or zeros = first step, official ``t0``).
        ``action`` must be None (the planner chooses it). ``deterministic=True`` is the official
        ``eval_mode`` (no exploration noise; MPPI still samples). Noise: the condition extras
        ``wf.noise.plan_<name>`` of `planner.noise_shapes` (any missing one is drawn from
        ``generator``); multi-task models read ``wf.cond.task``.

        Returns a State with ``latent`` and ``reward`` (as given), ``plan_action``
        ``[B, action_dim]`` (the action to take, clamped to [-1, 1]), ``plan_mean`` (the warm
        start for the next step) and ``plan_std`` ``[B, horizon, action_dim]``, and each
        iteration's elites and their values, ``plan_elites`` (int64) and ``plan_elite_values``
        ``[B, iterations, num_elites]``.
        """
        if action is not None:
            raise ContractError(
                "tdmpc2 plan_step chooses the action; pass action=None",
                hint="use transition() to step the model with a given action",
                family=self.family,
            )
        z = state["latent"]
        task = self._task(conditions)
        extras = {} if conditions is None else conditions.extras
        noise = {
            name: extras[planner.noise_key(name)]
            for name in planner.NOISE_NAMES
            if planner.noise_key(name) in extras
        }
        prev = state.tensors.get("plan_mean")
        result = self.plan(z, prev, noise, task, eval_mode=deterministic, generator=generator)
        reward = state.tensors.get("reward")
        return State(
            {
                "latent": z,
                "reward": z.new_zeros(z.shape[:-1]) if reward is None else reward,
                "plan_action": result.action,
                "plan_mean": result.mean,
                "plan_std": result.std,
                "plan_elites": result.elite_idxs,
                "plan_elite_values": torch.gather(result.values, 2, result.elite_idxs),
            }
        )

    # -- training ------------------------------------------------------------------------------
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups as the official agent uses them.

        The encoder learns at ``lr * enc_lr_scale`` (0.3), everything else at ``lr``; the
        frozen target Q copy is left out. The official recipe is Adam with ``lr=3e-4`` and
        gradient-norm clipping at 20 (the official policy head has its own Adam, ``eps=1e-5``;
        with ``policy_coef=0`` it gets no gradient from `loss` here)::

            opt = torch.optim.Adam(model.param_groups(3e-4))
        """
        encoder = list(self.encoder.parameters())
        seen = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        return [
            {"params": encoder, "lr": lr * self.config["enc_lr_scale"]},
            {"params": rest, "lr": lr},
        ]

    @torch.no_grad()
    def soft_update_target(self, tau: float | None = None) -> None:
        """Polyak-average the online Q heads into the target copy (``tau`` from the config)."""
        tau = self.config["tau"] if tau is None else tau
        for online, target in zip(self.qs.parameters(), self.target_qs.parameters(), strict=True):
            target.lerp_(online, tau)

    def _discount(self, task: Tensor | None) -> Tensor | float:
        if self.task_emb is None or task is None:
            return self.discounts[0]
        return self.discount_table[task.long()]

    def loss_terms(
        self,
        batch: Mapping[str, Tensor],
        noise: Mapping[str, Tensor] | None = None,
        policy: bool = True,
    ) -> dict[str, Tensor]:
        """Every quantity of the official ``TDMPC2._update`` loss, time-major.

        ``batch`` as for `loss`. ``noise`` (optional, time-major like the official draws):
        ``td_pi_eps`` ``[H, B, A]``, ``td_q_heads`` int64 ``[>= 2]``, ``q_dropout`` bool
        ``[num_q, H, B, mlp_dim]`` (keep-mask), ``pi_eps`` ``[H + 1, B, A]``,
        ``pi_q_dropout`` ``[num_q, H + 1, B, mlp_dim]``, ``pi_q_heads`` ``[>= 2]``; missing ones
        are drawn. Returns ``next_z``, ``td_targets``, ``zs``, ``qs`` (logits), ``reward_preds``,
        ``termination_pred`` (episodic), the losses ``consistency``, ``reward``, ``value``,
        ``termination``, ``total`` and the `policy_loss` terms prefixed ``pi_``.
        """
        cfg = self.config
        noise = dict(noise or {})
        obs, action, reward = batch["vector"], batch["action"], batch["reward"]
        task = batch.get("task")
        if obs.dim() != 3 or obs.shape[1] < 2:
            raise ContractError(
                f"tdmpc2 loss needs vector [batch, time >= 2, obs_dim], got {tuple(obs.shape)}",
                hint="action[:, t] is taken after vector[:, t]; reward[:, t] is what it produced",
            )
        if self.termination_head is not None and "continue" not in batch:
            raise ContractError(
                "episodic tdmpc2 loss needs batch['continue'] [batch, time]",
                hint="0.0 where the step into vector[:, t + 1] terminated",
                family=self.family,
            )
        # Time-major, as in the official code; the last action and reward lead nowhere observed.
        obs = obs.transpose(0, 1)
        action = action.transpose(0, 1)[:-1]
        reward = reward.transpose(0, 1)[:-1]
        horizon = action.shape[0]
        if "continue" in batch:
            terminated = 1 - batch["continue"].transpose(0, 1)[:-1].to(reward.dtype)
        else:
            terminated = torch.zeros_like(reward)
        bins, vmin, vmax, rho = cfg["num_bins"], cfg["vmin"], cfg["vmax"], cfg["rho"]

        with torch.no_grad():
            next_z = self.encode_vector(obs[1:], task)
            td_pi = self.pi_info(next_z, task, eps=noise.get("td_pi_eps"))["action"]
            q_next = self.q_value(
                next_z, td_pi, "min", target=True, task=task, heads=noise.get("td_q_heads")
            )
            discount = self._discount(task)
            td_targets = reward + discount * (1 - terminated) * q_next

        z = self.encode_vector(obs[0], task)
        zs = [z]
        consistency: Tensor | float = 0.0
        for t in range(horizon):
            z = self.next(z, action[t], task)
            consistency = consistency + F.mse_loss(z, next_z[t]) * rho**t
            zs.append(z)
        all_zs = torch.stack(zs)
        latents = all_zs[:-1]
        qs = self.q_logits(latents, action, task=task, dropout_keep=noise.get("q_dropout"))
        reward_preds = self.reward(latents, action, task)
        reward_loss: Tensor | float = 0.0
        value_loss: Tensor | float = 0.0
        for t in range(horizon):
            reward_loss = (
                reward_loss + soft_ce(reward_preds[t], reward[t], bins, vmin, vmax).mean() * rho**t
            )
            for q in range(cfg["num_q"]):
                ce = soft_ce(qs[q, t], td_targets[t], bins, vmin, vmax)
                value_loss = value_loss + ce.mean() * rho**t
        consistency = consistency / horizon
        reward_loss = reward_loss / horizon
        terms: dict[str, Tensor] = {}
        termination_loss: Tensor | float = 0.0
        if self.termination_head is not None:
            termination_pred = self.termination_logits(all_zs[1:], task)
            termination_loss = F.binary_cross_entropy_with_logits(termination_pred, terminated)
            terms["termination_pred"] = termination_pred
        value_loss = value_loss / (horizon * cfg["num_q"])
        total = (
            cfg["consistency_coef"] * consistency
            + cfg["reward_coef"] * reward_loss
            + cfg["termination_coef"] * termination_loss
            + cfg["value_coef"] * value_loss
        )
        assert isinstance(total, Tensor)
        terms.update(
            next_z=next_z,
            td_targets=td_targets,
            terminated=terminated,
            zs=all_zs,
            qs=qs,
            reward_preds=reward_preds,
            consistency=torch.as_tensor(consistency),
            reward=torch.as_tensor(reward_loss),
            value=torch.as_tensor(value_loss),
            termination=torch.as_tensor(termination_loss, device=total.device),
            total=total,
        )
        if policy:
            pieces = self.policy_loss(all_zs.detach(), task, noise)
            terms.update({f"pi_{k}": v for k, v in pieces.items()})
        return terms

    def policy_loss(
        self,
        zs: Tensor,
        task: Tensor | None = None,
        noise: Mapping[str, Tensor] | None = None,
        update_scale: bool | None = None,
    ) -> dict[str, Tensor]:
        """The official ``update_pi`` loss on latents ``zs`` ``[H + 1, B, latent_dim]``.

        Q-maximisation with the official scaled-entropy bonus, on detached Q weights (the
        official ``_detach_Qs``, in the model's mode: dropout in training mode). The running
        Q scale (`q_scale`, official ``RunningScale``) is updated first when ``update_scale``
        (default: in training mode with gradients enabled). ``noise``: ``pi_eps``,
        ``pi_q_dropout``, ``pi_q_heads`` (see `loss_terms`). Returns ``loss``, ``action``,
        ``entropy``, ``scaled_entropy``, ``q_avg`` (before scaling), ``q_scaled`` and
        ``scale``. The official agent evaluates this after the world model's optimizer step.
        """
        cfg = self.config
        noise = dict(noise or {})
        info = self.pi_info(zs, task, eps=noise.get("pi_eps"))
        q = self.q_value(
            zs,
            info["action"],
            "avg",
            task=task,
            heads=noise.get("pi_q_heads"),
            dropout_keep=noise.get("pi_q_dropout"),
            detach=True,
        )
        if update_scale is None:
            update_scale = self.training and torch.is_grad_enabled()
        if update_scale:
            with torch.no_grad():
                lo, hi = _running_scale_percentiles(q[0].detach()[:, None])
                value = torch.clamp(hi - lo, min=1.0).reshape(())
                self.q_scale.lerp_(value, cfg["tau"])
        q_scaled = q / self.q_scale
        rho = torch.pow(cfg["rho"], torch.arange(zs.shape[0], device=zs.device))
        per_step = -(cfg["entropy_coef"] * info["scaled_entropy"] + q_scaled).mean(-1)
        loss = (per_step * rho).mean()
        return {
            "loss": loss,
            "action": info["action"],
            "entropy": info["entropy"],
            "scaled_entropy": info["scaled_entropy"],
            "q_avg": q,
            "q_scaled": q_scaled,
            "scale": self.q_scale.clone(),
        }

    def loss(
        self, batch: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None = None
    ) -> LossOutput:
        """TD-MPC2 world-model loss: consistency, reward, value (and termination, policy).

        In training mode with gradients enabled, the target Q copy is Polyak-updated (``tau``)
        at the start of every call but the first: the update of step k runs after the optimizer
        step k, before the TD targets of step k + 1, as in the official agent (which updates
        after each step), so an imported target copy is used as loaded by the first call.

        The policy-prior loss (official ``update_pi``: Q-maximisation with the scaled entropy
        bonus, on detached latents and Q weights, so it trains only the policy head) is added
        with weight ``policy_coef`` (0 by default: the world-model terms only); it is always
        reported in ``metrics``. ``noise``: see `loss_terms`.
        """
        if self.training and torch.is_grad_enabled():
            if self._target_update_pending:
                self.soft_update_target()
            self._target_update_pending = True
        cfg = self.config
        terms = self.loss_terms(batch, noise)
        total = terms["total"]
        policy_loss = terms["pi_loss"]
        if cfg["policy_coef"]:
            total = total + cfg["policy_coef"] * policy_loss
        components = {k: terms[k] for k in ("consistency", "reward", "value")}
        if self.termination_head is not None:
            components["termination"] = terms["termination"]
        if cfg["policy_coef"]:
            components["policy"] = policy_loss
        with torch.no_grad():
            pred_reward = self._two_hot_inv(terms["reward_preds"])
            reward = batch["reward"].transpose(0, 1)[:-1]
            metrics = {
                "policy_loss": policy_loss.detach(),
                "policy_entropy": terms["pi_entropy"].detach().mean(),
                "policy_scaled_entropy": terms["pi_scaled_entropy"].detach().mean(),
                "reward_mae": (pred_reward - reward).abs().mean(),
                "td_target_mean": terms["td_targets"].mean(),
                "q_scale": self.q_scale.clone(),
            }
            if self.termination_head is not None:
                metrics.update(
                    termination_statistics(
                        torch.sigmoid(terms["termination_pred"][-1]), terms["terminated"][-1]
                    )
                )
        return LossOutput(loss=total, components=components, metrics=metrics)  # type: ignore[arg-type]


def termination_statistics(pred: Tensor, target: Tensor, eps: float = 1e-9) -> dict[str, Tensor]:
    """The official termination rate and F1 of probabilities ``pred`` against 0/1 ``target``."""
    rate = target.sum() / len(target)
    tp = ((pred > 0.5) & (target == 1)).sum()
    fn = ((pred <= 0.5) & (target == 1)).sum()
    fp = ((pred > 0.5) & (target == 0)).sum()
    recall = tp / (tp + fn + eps)
    precision = tp / (tp + fp + eps)
    f1 = 2 * (precision * recall) / (precision + recall + eps)
    return {"termination_rate": rate, "termination_f1": f1}
