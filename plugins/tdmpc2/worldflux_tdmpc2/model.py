"""TD-MPC2 world model (Hansen, Su and Wang, ICLR 2024) behind the `WorldModel` protocol.

Faithful to the official implementation (``nicklashansen/tdmpc2``, ``common/layers.py``,
``common/world_model.py``, ``tdmpc2.py``) for single-task vector observations:

- ``NormedLinear`` = Linear, (Dropout), LayerNorm, Mish; the last layer of the encoder and of the
  dynamics uses SimNorm (softmax over groups of ``simnorm_dim``) in place of Mish.
- Reward and the ``num_q`` Q heads regress onto ``num_bins`` two-hot bins in symlog space
  (``vmin``..``vmax``); their last weights start at zero. Q heads drop out (``dropout``) after
  their first layer. A frozen target copy of the Q ensemble gives TD targets.
- Policy prior: tanh-squashed Gaussian with ``log_std`` squashed into ``[log_std_min,
  log_std_max]``.

Protocol mapping (see ``docs/families/tdmpc2.md``):

- ``encode(obs)`` -> ``State(latent=enc(obs), reward=0)``.
- ``transition(state, a)`` -> ``State(latent=d(z, a), reward=R(z, a))``: TD-MPC2's reward is a
  function of the state *and* the action, so the transition that takes the action also predicts
  it and carries it in the state; ``decode`` then reads it, so rollout rewards line up with the
  actions exactly as in TD-MPC2's planner.
- ``update(state, a, obs)`` -> ``State(latent=enc(obs), reward=R(state.latent, a))``. TD-MPC2
  has no filtering: its posterior *is* the encoding of the new observation (its own control loop
  encodes every observation); the previous latent and action give the reward of the step just
  observed.
- ``decode(state)`` -> ``reward`` (from the state), ``value`` (mean of the Q ensemble at the
  policy's mean action, the expectation of TD-MPC2's average-of-two-random-heads estimate) and
  ``policy_mean``.

Every step is deterministic (dropout acts only in training mode), so no noise inputs are
declared and ``deterministic`` changes nothing.
"""

from __future__ import annotations

import copy
import math
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
from worldflux_registry.functional import symexp, symlog, two_hot_uniform
from worldflux_registry.plugin_api import ActionLike, ObsLike

from . import spec

__all__ = ["SimNorm", "TDMPC2WorldModel", "symexp", "symlog", "two_hot"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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


class NormedLinear(nn.Linear):
    """Linear layer followed by (dropout), LayerNorm and an activation (Mish by default)."""

    def __init__(
        self, fan_in: int, fan_out: int, dropout: float = 0.0, act: nn.Module | None = None
    ) -> None:
        super().__init__(fan_in, fan_out)
        self.ln = nn.LayerNorm(fan_out)
        self.act = act if act is not None else nn.Mish()
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


class TDMPC2WorldModel(WorldModel):
    """The TD-MPC2 world model; config fields as in `worldflux_tdmpc2.spec.DEFAULTS`.

    ``loss(batch)`` takes ``vector`` ``[B, T, obs_dim]``, ``action`` ``[B, T, action_dim]`` and
    ``reward`` ``[B, T]`` in the registry's batch layout: step ``t`` holds ``o_t``, the action
    ``a_t`` taken after seeing it and the reward it produced. The horizon is ``T - 1`` (the last
    action and reward have no next observation and are unused), i.e. the official
    ``obs[0..H]``, ``action[0..H-1]``, ``reward[0..H-1]``. A multi-task model (``tasks > 0``)
    also reads ``task`` ``[B]`` (int task ids) from the batch, and from the condition extra
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
        emb = cfg["task_dim"] if cfg["tasks"] else 0
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
        self.task_emb = nn.Embedding(cfg["tasks"], cfg["task_dim"]) if cfg["tasks"] else None
        bin_values = torch.linspace(cfg["vmin"], cfg["vmax"], bins)
        self.register_buffer("bins", bin_values, persistent=False)
        # Running 5%-95% range of Q used to scale the optional policy loss (official RunningScale).
        self.q_scale: Tensor
        self.register_buffer("q_scale", torch.ones(()))

    # -- building blocks (the official WorldModel methods) -------------------------------------
    def _two_hot_inv(self, logits: Tensor) -> Tensor:
        bins: Tensor = self.bins  # type: ignore[assignment]
        return symexp((F.softmax(logits, dim=-1) * bins).sum(-1))

    def with_task(self, x: Tensor, task: Tensor | None) -> Tensor:
        """``x`` with the task embedding appended (the official ``task_emb``); ``x`` as is for a
        single-task model. ``task`` holds int task ids ``[batch]``; ``x`` is ``[..., batch, D]``.

        The embedding is renormalised to norm <= 1 on the fly (the official
        ``nn.Embedding(max_norm=1)`` does it in place, which tracing cannot export).
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
        emb = self.task_emb.weight[task.long()]
        emb = emb * torch.clamp(1.0 / (emb.norm(dim=-1, keepdim=True) + 1e-7), max=1.0)
        return torch.cat([x, emb.expand(*x.shape[:-1], -1)], dim=-1)

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

    def q_logits(
        self, z: Tensor, action: Tensor, target: bool = False, task: Tensor | None = None
    ) -> Tensor:
        """Bin logits of every Q head, ``[num_q, ..., num_bins]`` (target copy when asked)."""
        za = torch.cat([self.with_task(z, task), action], dim=-1)
        heads = self.target_qs if target else self.qs
        return torch.stack([q(za) for q in heads])

    def q_min_of_two(
        self, z: Tensor, action: Tensor, target: bool = True, task: Tensor | None = None
    ) -> Tensor:
        """TD-MPC2's pessimistic value: minimum over two randomly chosen Q heads (``[...]``)."""
        pick = torch.randperm(self.config["num_q"])[:2].tolist()
        za = torch.cat([self.with_task(z, task), action], dim=-1)
        heads = self.target_qs if target else self.qs
        q1, q2 = (self._two_hot_inv(heads[i](za)) for i in pick)
        return torch.minimum(q1, q2)

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
        mu, raw_log_std = self.pi_head(self.with_task(z, task)).chunk(2, dim=-1)
        lo, hi = self.config["log_std_min"], self.config["log_std_max"]
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw_log_std) + 1)
        if deterministic:
            eps = torch.zeros_like(mu)
        elif eps is None:
            eps = torch.randn_like(mu)
        sample = mu + eps * log_std.exp()
        log_prob = (-0.5 * eps.pow(2) - log_std - _HALF_LOG_2PI).sum(-1)
        mean, action = torch.tanh(mu), torch.tanh(sample)
        log_prob = log_prob - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1)
        return mean, action, log_prob

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
        """Predictions of a state: ``reward`` (of the step into it), ``value``, ``policy_mean``."""
        z, task = state["latent"], self._task(conditions)
        mean, _, _ = self.pi(z, deterministic=True, task=task)
        value = self._two_hot_inv(self.q_logits(z, mean, task=task)).mean(0)
        return ModelOutput(
            predictions={"reward": state["reward"], "value": value, "policy_mean": mean}
        )

    def rollout(
        self,
        initial_state: State,
        action_sequence: Tensor | ActionPayload,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
        mode: str = "autoregressive",
    ) -> Trajectory:
        """`WorldModel.rollout` with ``values`` filled in (``[T + 1, batch]``, initial included).

        ``sum(rewards) + discount-weighted values[-1]`` is TD-MPC2's planning objective.
        """
        traj = super().rollout(initial_state, action_sequence, conditions, deterministic, mode)
        first = self.decode(initial_state, conditions).predictions["value"]
        rest = (traj.predictions or {}).get("value")
        traj.values = first[None] if rest is None else torch.cat([first[None], rest])
        return traj

    # -- training ------------------------------------------------------------------------------
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups as the official agent uses them.

        The encoder learns at ``lr * enc_lr_scale`` (0.3), everything else at ``lr``; the
        frozen target Q copy is left out. The official recipe is Adam with ``lr=3e-4`` and
        gradient-norm clipping at 20::

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

    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """TD-MPC2 world-model loss: consistency, reward and value terms (and optional policy).

        In training mode with gradients enabled the target Q copy is first Polyak-updated
        (``tau``). Calling ``loss`` once per optimizer step therefore reproduces the official
        "soft update after every step" schedule (the first call is a no-op: target == online).

        The policy-prior loss (Q-maximisation with entropy bonus, on detached latents and
        detached Q weights, so it trains only the policy head) is added with weight
        ``policy_coef`` (0 by default: the world-model terms only); it is always reported in
        ``metrics``.
        """
        cfg = self.config
        obs, action, reward = batch["vector"], batch["action"], batch["reward"]
        task = batch.get("task")
        if obs.dim() != 3 or obs.shape[1] < 2:
            raise ContractError(
                f"tdmpc2 loss needs vector [batch, time >= 2, obs_dim], got {tuple(obs.shape)}",
                hint="action[:, t] is taken after vector[:, t]; reward[:, t] is what it produced",
            )
        if self.training and torch.is_grad_enabled():
            self.soft_update_target()
        # Time-major, as in the official code; the last action and reward lead nowhere observed.
        obs = obs.transpose(0, 1)
        action = action.transpose(0, 1)[:-1]
        reward = reward.transpose(0, 1)[:-1]
        horizon = action.shape[0]
        bins, vmin, vmax = cfg["num_bins"], cfg["vmin"], cfg["vmax"]
        weights = cfg["rho"] ** torch.arange(horizon, device=obs.device, dtype=obs.dtype)

        with torch.no_grad():
            next_z = self.encode_vector(obs[1:], task)
            _, next_action, _ = self.pi(next_z, task=task)
            q_next = self.q_min_of_two(next_z, next_action, task=task)
            td_target = reward + cfg["discount"] * q_next

        z = self.encode_vector(obs[0], task)
        zs = [z]
        consistency = obs.new_zeros(())
        for t in range(horizon):
            z = self.next(z, action[t], task)
            consistency = consistency + F.mse_loss(z, next_z[t]) * weights[t]
            zs.append(z)
        latents = torch.stack(zs[:-1])
        reward_ce = soft_ce(self.reward(latents, action, task), reward, bins, vmin, vmax)  # [H, B]
        q_logits = self.q_logits(latents, action, task=task)
        q_ce = soft_ce(q_logits, td_target, bins, vmin, vmax)  # [Q, H, B]
        consistency = consistency / horizon
        reward_loss = (reward_ce.mean(-1) * weights).sum() / horizon
        value_loss = (q_ce.mean(-1) * weights).sum(-1).mean() / horizon
        total = (
            cfg["consistency_coef"] * consistency
            + cfg["reward_coef"] * reward_loss
            + cfg["value_coef"] * value_loss
        )
        policy_loss = self._policy_loss(torch.stack(zs).detach(), task)
        if cfg["policy_coef"]:
            total = total + cfg["policy_coef"] * policy_loss
        components = {"consistency": consistency, "reward": reward_loss, "value": value_loss}
        if cfg["policy_coef"]:
            components["policy"] = policy_loss
        with torch.no_grad():
            pred_reward = self._two_hot_inv(self.reward(latents, action, task))
            metrics = {
                "policy_loss": policy_loss.detach(),
                "reward_mae": (pred_reward - reward).abs().mean(),
                "td_target_mean": td_target.mean(),
                "q_scale": self.q_scale.clone(),
            }
        return LossOutput(loss=total, components=components, metrics=metrics)

    def _policy_loss(self, zs: Tensor, task: Tensor | None) -> Tensor:
        cfg = self.config
        _, action, log_prob = self.pi(zs, task=task)
        detached = {k: v.detach() for k, v in self.qs.named_parameters()}
        za = torch.cat([self.with_task(zs, task), action], dim=-1)
        pick = torch.randperm(cfg["num_q"])[:2].tolist()
        q = torch.stack(
            [
                self._two_hot_inv(torch.func.functional_call(self.qs[i], _sub(detached, i), (za,)))
                for i in pick
            ]
        ).mean(0)  # [H + 1, B]
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                lo, hi = torch.quantile(
                    q[0].detach().float(), torch.tensor([0.05, 0.95], device=q.device)
                )
                self.q_scale.lerp_(torch.clamp(hi - lo, min=1.0), cfg["tau"])
        q = q / self.q_scale
        weights = cfg["rho"] ** torch.arange(zs.shape[0], device=zs.device, dtype=zs.dtype)
        per_step = -(cfg["entropy_coef"] * -log_prob + q).mean(-1)
        loss: Tensor = (per_step * weights).mean()
        return loss


def _sub(params: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    prefix = f"{index}."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
