"""DreamerV3 world model in PyTorch, following the official implementation (danijar/dreamerv3).

RSSM with a block-diagonal GRU (``blocks`` groups), 32 categorical latents with 1% unimix and
straight-through gradients, RMSNorm + SiLU everywhere, MLP / CNN encoders and decoders, a
two-hot reward head over 255 bins in symlog space and a Bernoulli continue head. Stochastic steps
sample with Gumbel-max from explicit uniform noise, so each graph is a deterministic function
of its inputs (the exporter passes that noise as a plain input).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflux_registry import (
    ConditionPayload,
    ConfigError,
    ContractError,
    LossOutput,
    ModelOutput,
    State,
    WorldModel,
)
from worldflux_registry.functional import symexp, symlog, two_hot, two_hot_mean
from worldflux_registry.plugin_api import ActionLike, ObsLike

from . import spec

__all__ = ["DreamerV3WorldModel", "symexp", "symlog"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale (eps 1e-4, as official)."""

    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.scale


class NormAct(nn.Module):
    """Linear, RMSNorm, SiLU: the official building block."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inp, out)
        self.norm = RMSNorm(out)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.norm(self.linear(x)))


def mlp(inp: int, units: int, layers: int) -> nn.Sequential:
    """``layers`` stacked `NormAct` blocks."""
    return nn.Sequential(*[NormAct(inp if i == 0 else units, units) for i in range(layers)])


class BlockLinear(nn.Module):
    """Block-diagonal linear layer: ``groups`` independent maps of ``inp/groups -> out/groups``."""

    def __init__(self, inp: int, out: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, inp // groups, out // groups))
        self.bias = nn.Parameter(torch.zeros(out))
        bound = 1.0 / (inp // groups) ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.groups, self.weight.shape[1])
        # A batched matmul over the groups, not einsum: ONNX Runtime's Einsum kernel is several
        # times slower than MatMul for this pattern (benchmarks/results/rollout_speed_cpu.md).
        y = torch.matmul(x.transpose(0, 1), self.weight).transpose(0, 1)
        return y.reshape(*lead, -1) + self.bias


class ChannelNorm(nn.Module):
    """`RMSNorm` over the channels of an NCHW feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """Observations -> embedding: MLP on symlog vectors, CNN with max-pooling on images."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.obs_dim = int(config["obs_dim"])
        self.image = bool(config["image"])
        if self.obs_dim:
            self.mlp = mlp(self.obs_dim, int(config["units"]), int(config["enc_layers"]))
        if self.image:
            layers: list[nn.Module] = []
            channels, kernel = spec.IMAGE_SHAPE[-1], int(config["kernel"])
            for mult in config["mults"]:
                depth = int(config["depth"]) * int(mult)
                layers += [
                    nn.Conv2d(channels, depth, kernel, padding=kernel // 2),
                    nn.MaxPool2d(2),
                    ChannelNorm(depth),
                    nn.SiLU(),
                ]
                channels = depth
            self.cnn = nn.Sequential(*layers)

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        # The weights' dtype: float32, or float16 in the half copy an fp16 export traces.
        dtype = next(self.parameters()).dtype
        outs = []
        if self.obs_dim:
            outs.append(self.mlp(symlog(obs["vector"].to(dtype))))
        if self.image:
            img = obs["image"]
            x = img.to(dtype) / 255.0 - 0.5 if img.dtype == torch.uint8 else img.to(dtype) - 0.5
            x = self.cnn(x.permute(0, 3, 1, 2))
            # Flatten channels last, like the official HWC layout.
            outs.append(x.permute(0, 2, 3, 1).flatten(1))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class Decoder(nn.Module):
    """Latent features -> observation reconstructions (symexp vectors, sigmoid images)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.obs_dim = int(config["obs_dim"])
        self.image = bool(config["image"])
        deter, units = int(config["deter"]), int(config["units"])
        stoch_flat = int(config["stoch"]) * int(config["classes"])
        if self.obs_dim:
            self.mlp = mlp(stoch_flat + deter, units, int(config["dec_layers"]))
            self.vec_out = nn.Linear(units, self.obs_dim)
        if self.image:
            kernel = int(config["kernel"])
            depths = [int(config["depth"]) * int(m) for m in config["mults"]]
            self.last, self.bspace = depths[-1], int(config["bspace"])
            space = 4 * 4 * self.last
            self.sp0 = BlockLinear(deter, space, self.bspace)
            self.sp0norm = RMSNorm(self.last)
            self.sp1 = NormAct(stoch_flat, 2 * units)
            self.sp2 = nn.Linear(2 * units, space)
            self.spnorm = RMSNorm(self.last)
            layers: list[nn.Module] = []
            channels = self.last
            for depth in reversed(depths[:-1]):
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(channels, depth, kernel, padding=kernel // 2),
                    ChannelNorm(depth),
                    nn.SiLU(),
                ]
                channels = depth
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, spec.IMAGE_SHAPE[-1], kernel, padding=kernel // 2),
            ]
            self.cnn = nn.Sequential(*layers)

    def forward(self, deter: Tensor, stoch: Tensor) -> dict[str, Tensor]:
        """Raw outputs: ``"vector"`` in symlog space, ``"image"`` in [0, 1] (NHWC)."""
        stoch = stoch.flatten(1)
        out = {}
        if self.obs_dim:
            out["vector"] = self.vec_out(self.mlp(torch.cat([stoch, deter], -1)))
        if self.image:
            g = self.bspace
            # '(g h w c) -> h w (g c)': each deter block paints its own channel group.
            x0 = self.sp0(deter).reshape(-1, g, 4, 4, self.last // g)
            x0 = self.sp0norm(x0.permute(0, 2, 3, 1, 4).reshape(-1, 4, 4, self.last))
            x1 = self.sp2(self.sp1(stoch)).reshape(-1, 4, 4, self.last)
            x = F.silu(self.spnorm(x0 + x1)).permute(0, 3, 1, 2)
            out["image"] = torch.sigmoid(self.cnn(x)).permute(0, 2, 3, 1)
        return out


class DreamerV3WorldModel(WorldModel):
    """The DreamerV3 world model (RSSM, encoder, decoder, reward and continue heads).

    Build it from a full config (``FamilySpec.config(preset)``), usually through
    ``registry.load("dreamerv3:ci")``. States hold ``"deter"`` ``[batch, deter]`` and ``"stoch"``
    ``[batch, stoch, classes]`` (one-hot). ``encode`` runs the posterior step from the zero
    state (as the official agent does on the first step of an episode), ``update`` is the
    filtering step, ``transition`` the prior step used for imagination.
    """

    family = spec.FAMILY
    capabilities = spec.CAPABILITIES

    def __init__(self, **config: Any) -> None:
        super().__init__()
        full = {**spec.DEFAULTS, **config}
        unknown = sorted(set(config) - set(spec.DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown DreamerV3 config fields {unknown}",
                hint="fields: " + ", ".join(sorted(spec.DEFAULTS)),
                family=spec.FAMILY,
            )
        full["mults"] = [int(m) for m in full["mults"]]
        spec.check_config(full)
        self.config = full
        c = full
        self.deter, self.hidden = int(c["deter"]), int(c["hidden"])
        self.stoch, self.classes = int(c["stoch"]), int(c["classes"])
        self.blocks, self.unimix = int(c["blocks"]), float(c["unimix"])
        self.action_dim = int(c["action_dim"])
        self.obs_keys = tuple(
            k for k, on in (("vector", int(c["obs_dim"]) > 0), ("image", bool(c["image"]))) if on
        )
        stoch_flat, units = self.stoch * self.classes, int(c["units"])
        feat = stoch_flat + self.deter

        self.encoder = Encoder(c)
        # RSSM core (official `_core`): inputs projected, block GRU over `blocks` groups.
        self.dynin0 = NormAct(self.deter, self.hidden)
        self.dynin1 = NormAct(stoch_flat, self.hidden)
        self.dynin2 = NormAct(self.action_dim, self.hidden)
        width = self.deter + 3 * self.hidden * self.blocks
        hid: list[nn.Module] = []
        for _ in range(int(c["dynlayers"])):
            hid += [BlockLinear(width, self.deter, self.blocks), RMSNorm(self.deter), nn.SiLU()]
            width = self.deter
        self.dynhid = nn.Sequential(*hid)
        self.dyngru = BlockLinear(width, 3 * self.deter, self.blocks)
        self.obs_net = mlp(self.deter + spec.embed_dim(c), self.hidden, int(c["obslayers"]))
        self.obs_logit = nn.Linear(self.hidden, stoch_flat)
        self.img_net = mlp(self.deter, self.hidden, int(c["imglayers"]))
        self.img_logit = nn.Linear(self.hidden, stoch_flat)

        self.decoder = Decoder(c)
        self.rew_net = mlp(feat, units, int(c["head_layers"]))
        self.rew_out = nn.Linear(units, int(c["bins"]))
        self.con_net = mlp(feat, units, int(c["head_layers"]))
        self.con_out = nn.Linear(units, 1)
        # Official outscale 0.0: the reward head starts out predicting exactly zero.
        nn.init.zeros_(self.rew_out.weight)
        nn.init.zeros_(self.rew_out.bias)
        # Bins in symlog space, made exactly antisymmetric so the symmetric sum cancels.
        bins = torch.linspace(-20.0, 20.0, int(c["bins"]))
        self.register_buffer("bins", (bins - bins.flip(0)) / 2.0, persistent=False)

    # -- RSSM pieces -------------------------------------------------------------------------
    def _core(self, deter: Tensor, stoch: Tensor, action: Tensor) -> Tensor:
        """One block-GRU step (official ``RSSM._core``)."""
        g = self.blocks
        # Squash actions outside [-1, 1] back onto the box, without gradient through the scale.
        action = action / torch.clamp(action.abs(), min=1.0).detach()
        x = torch.cat([self.dynin0(deter), self.dynin1(stoch.flatten(1)), self.dynin2(action)], -1)
        x = x.unsqueeze(1).expand(-1, g, -1)
        x = torch.cat([deter.reshape(-1, g, self.deter // g), x], -1).flatten(1)
        x = self.dyngru(self.dynhid(x))
        reset, cand, update = x.reshape(-1, g, 3, self.deter // g).unbind(2)
        reset = torch.sigmoid(reset.flatten(1))
        cand = torch.tanh(reset * cand.flatten(1))
        update = torch.sigmoid(update.flatten(1) - 1.0)
        return update * cand + (1.0 - update) * deter

    def _logits(self, head: nn.Module, out: nn.Linear, x: Tensor) -> Tensor:
        return out(head(x)).reshape(-1, self.stoch, self.classes)

    def _probs(self, logits: Tensor) -> Tensor:
        """Categorical probabilities with the 1% uniform mixture."""
        probs = torch.softmax(logits, -1)
        return (1.0 - self.unimix) * probs + self.unimix / self.classes

    def _sample(self, logits: Tensor, noise: Tensor | None) -> Tensor:
        """One-hot sample with straight-through gradients; the mode when ``noise`` is None.

        With uniform ``noise`` the sample is Gumbel-max, ``argmax(log p - log(-log u))``, a
        deterministic function of ``(logits, noise)``.
        """
        probs = self._probs(logits)
        score = torch.log(probs)
        if noise is not None:
            u = noise.to(score.dtype).clamp(1e-12, 1.0 - 1e-7)
            score = score - torch.log(-torch.log(u))
        index = score.argmax(-1, keepdim=True)
        classes = torch.arange(self.classes, device=logits.device)
        onehot = (index == classes).to(probs.dtype)
        # Adding an exact zero keeps the forward value exactly one-hot.
        return onehot + (probs - probs.detach())

    def _posterior(
        self, deter: Tensor, embed: Tensor, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        logits = self._logits(self.obs_net, self.obs_logit, torch.cat([deter, embed], -1))
        return self._sample(logits, noise), logits

    def prior_logits(self, deter: Tensor) -> Tensor:
        """Prior logits ``[batch, stoch, classes]`` from the deterministic state."""
        return self._logits(self.img_net, self.img_logit, deter)

    def initial_tensors(self, batch: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The zero carry (official ``RSSM.initial``) the first step starts from."""
        device = device or self.bins.device
        dtype = self._dtype
        return {
            "deter": torch.zeros(batch, self.deter, device=device, dtype=dtype),
            "stoch": torch.zeros(batch, self.stoch, self.classes, device=device, dtype=dtype),
        }

    @property
    def _dtype(self) -> torch.dtype:
        """Compute dtype: float32, or float16 in the half copy an fp16 export traces."""
        return self.dynin0.linear.weight.dtype

    def _obs_tensors(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise ContractError(
                f"observations are missing {missing}",
                hint="declared: " + ", ".join(self.obs_keys),
                family=self.family,
            )
        return {k: obs[k] for k in self.obs_keys}

    # -- the protocol ------------------------------------------------------------------------
    def encode(self, obs: ObsLike, deterministic: bool = False) -> State:
        """Posterior state of a first observation (zero carry, zero action, as on reset).

        Pass a `WorldModelInput` whose conditions hold ``wf.noise.posterior`` to fix the sample.
        """
        tensors, conditions = self.observations(obs)
        tensors = self._obs_tensors(tensors)
        first = next(iter(tensors.values()))
        batch, device = first.shape[0], first.device
        zero = self.initial_tensors(batch, device)
        action = torch.zeros(batch, self.action_dim, device=device, dtype=self._dtype)
        return self._observe(zero, action, tensors, conditions, deterministic)

    def update(
        self,
        state: State,
        action: ActionLike,
        obs: ObsLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Filtering step: GRU step on ``(state, action)``, then the posterior given ``obs``.

        Noise ``wf.noise.posterior`` is read from ``conditions`` or, failing that, from the
        conditions of a `WorldModelInput` ``obs``.
        """
        tensors, obs_conditions = self.observations(obs)
        act = self.action_tensor(action)
        if act is None:
            raise ContractError("update() needs an action", family=self.family)
        return self._observe(
            state.tensors,
            act,
            self._obs_tensors(tensors),
            conditions if conditions is not None else obs_conditions,
            deterministic,
        )

    def _observe(
        self,
        carry: Mapping[str, Tensor],
        action: Tensor,
        obs: Mapping[str, Tensor],
        conditions: ConditionPayload | None,
        deterministic: bool,
    ) -> State:
        deter = self._core(carry["deter"], carry["stoch"], action.to(self._dtype))
        embed = self.encoder(obs)
        noise = (
            None
            if deterministic
            else self.noise("posterior", conditions, deter.shape[0], device=deter.device)
        )
        stoch, _ = self._posterior(deter, embed, noise)
        return State({"deter": deter, "stoch": stoch})

    def transition(
        self,
        state: State,
        action: ActionLike,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Prior (imagination) step: GRU step, then a sample of the prior (``wf.noise.prior``)."""
        act = self.action_tensor(action)
        if act is None:
            raise ContractError("transition() needs an action", family=self.family)
        deter = self._core(state["deter"], state["stoch"], act.to(self._dtype))
        noise = (
            None
            if deterministic
            else self.noise("prior", conditions, deter.shape[0], device=deter.device)
        )
        stoch = self._sample(self.prior_logits(deter), noise)
        return State({"deter": deter, "stoch": stoch})

    def features(self, deter: Tensor, stoch: Tensor) -> Tensor:
        """Head input: flattened stoch then deter (official order)."""
        return torch.cat([stoch.flatten(1), deter], -1)

    def _reward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.rew_out(self.rew_net(feat))
        # Symmetric sum (official trick): uniform probabilities give exactly zero.
        return symexp(two_hot_mean(torch.softmax(logits, -1), self.bins)), logits

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Reconstructions (``"vector"``, ``"image"``), ``"reward"`` and ``"continue"``."""
        deter, stoch = state["deter"], state["stoch"]
        raw = self.decoder(deter, stoch)
        predictions = {}
        if "vector" in raw:
            predictions["vector"] = symexp(raw["vector"])
        if "image" in raw:
            predictions["image"] = raw["image"]
        feat = self.features(deter, stoch)
        predictions["reward"], _ = self._reward(feat)
        predictions["continue"] = torch.sigmoid(self.con_out(self.con_net(feat)).squeeze(-1))
        return ModelOutput(predictions)

    # -- training ----------------------------------------------------------------------------
    def _twohot(self, target: Tensor) -> Tensor:
        """Two-hot encoding of ``symlog(target)`` over the bins."""
        return two_hot(symlog(target), self.bins)

    def _kl(self, post_logits: Tensor, prior_logits: Tensor) -> Tensor:
        """KL(post || prior) of the unimix categoricals, summed over the latents."""
        p = self._probs(post_logits)
        q = self._probs(prior_logits)
        return (p * (torch.log(p) - torch.log(q))).sum((-2, -1))

    def observe_sequence(
        self, batch: Mapping[str, Tensor], deterministic: bool = False
    ) -> dict[str, Tensor]:
        """Filter a ``[batch, time]`` sequence: deter, stoch and posterior logits per step.

        Step 0 starts from the zero carry with a zero action; step ``t`` takes ``action[t-1]``.
        """
        obs = {k: batch[k] for k in self.obs_keys}
        b, t = (int(d) for d in batch["action"].shape[:2])
        embed = self.encoder({k: v.flatten(0, 1) for k, v in obs.items()}).reshape(b, t, -1)
        carry = self.initial_tensors(b, embed.device)
        actions = batch["action"].float()
        deters, stochs, logits = [], [], []
        for i in range(t):
            action = actions[:, i - 1] if i > 0 else torch.zeros_like(actions[:, 0])
            deter = self._core(carry["deter"], carry["stoch"], action)
            noise = None if deterministic else torch.rand_like(carry["stoch"])
            stoch, logit = self._posterior(deter, embed[:, i], noise)
            carry = {"deter": deter, "stoch": stoch}
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return {
            "deter": torch.stack(deters, 1),
            "stoch": torch.stack(stochs, 1),
            "post_logits": torch.stack(logits, 1),
        }

    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """The DreamerV3 world-model loss of a ``[batch, time, ...]`` batch.

        ``batch`` holds the observations, ``"action"`` (``action[t]`` is taken after observing
        step ``t``) and the targets ``"reward"`` / ``"continue"`` that ``action[t]`` produced.
        Components: reconstruction per observation (symlog MSE for vectors, MSE for images,
        summed over features), ``"reward"`` (two-hot cross-entropy), ``"continue"`` (binary
        cross-entropy), ``"dyn"`` and ``"rep"`` (KL with free nats), each averaged over batch
        and time; ``loss`` weights them with the ``*_scale`` config fields.
        """
        c = self.config
        seq = self.observe_sequence(batch)
        b, t = seq["deter"].shape[:2]
        deter, stoch = seq["deter"].flatten(0, 1), seq["stoch"].flatten(0, 1)
        post = seq["post_logits"].flatten(0, 1)
        prior = self.prior_logits(deter)
        free = float(c["free_nats"])
        dyn = torch.clamp(self._kl(post.detach(), prior), min=free).mean()
        rep = torch.clamp(self._kl(post, prior.detach()), min=free).mean()

        components: dict[str, Tensor] = {}
        raw = self.decoder(deter, stoch)
        if "vector" in raw:
            target = symlog(batch["vector"].float().flatten(0, 1))
            components["vector"] = (raw["vector"] - target).square().sum(-1).mean()
        if "image" in raw:
            img = batch["image"].flatten(0, 1)
            target = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
            components["image"] = (raw["image"] - target).square().sum((-3, -2, -1)).mean()
        rec = sum(components.values(), torch.zeros((), device=deter.device))

        # Step t > 0 was reached by action[t-1]: it predicts reward[t-1] and continue[t-1].
        feat = self.features(seq["deter"][:, 1:].flatten(0, 1), seq["stoch"][:, 1:].flatten(0, 1))
        _, rew_logits = self._reward(feat)
        rew_target = self._twohot(batch["reward"][:, :-1].float().flatten())
        rew = -(rew_target * torch.log_softmax(rew_logits, -1)).sum(-1).mean()
        con_logit = self.con_out(self.con_net(feat)).squeeze(-1)
        con_target = batch["continue"][:, :-1].float().flatten()
        con = F.binary_cross_entropy_with_logits(con_logit, con_target)

        loss = (
            float(c["rec_scale"]) * rec
            + float(c["rew_scale"]) * rew
            + float(c["con_scale"]) * con
            + float(c["dyn_scale"]) * dyn
            + float(c["rep_scale"]) * rep
        )
        components.update({"reward": rew, "continue": con, "dyn": dyn, "rep": rep})
        with torch.no_grad():
            metrics = {
                "dyn_kl": float(self._kl(post, prior).mean()),
                "post_entropy": float(_entropy(self._probs(post)).mean()),
                "prior_entropy": float(_entropy(self._probs(prior)).mean()),
                "steps": float(b * t),
            }
        return LossOutput(loss, components, metrics)


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * torch.log(probs)).sum((-2, -1))
