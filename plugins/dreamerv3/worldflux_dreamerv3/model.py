"""DreamerV3 agent in PyTorch: a port of the official code (danijar/dreamerv3 @ e3f0224).

Module and parameter names mirror the official ``elements`` checkpoint keys (``dyn/dynin0/kernel``
is ``dyn.dynin0.kernel`` here, ``enc`` is ``encoder``, ``dec`` is ``decoder``) and kernels keep
the official layouts (linear ``[in, out]``, conv ``HWIO``, block linear ``[blocks, in, out]``), so
`worldflux_dreamerv3.importer` copies official weights without reshaping them.

What it computes, as the official code does: RSSM with a block GRU (``blocks`` groups), 32
categorical latents with 1% unimix and straight-through gradients, RMSNorm + SiLU everywhere,
MLP / CNN encoders and decoders, raw-space ``symexp_twohot`` reward and value heads, a Bernoulli
continue head, a bounded-normal or categorical actor (``pol``), a critic (``val``) and its slow
copy (``slowval``). Every random draw is an explicit input (uniform noise for Gumbel-max latent
samples, standard-normal or uniform noise for actions), so each step is a deterministic function
of its inputs.

A deployer calls `DreamerV3WorldModel.act_step` once per environment step.
"""

from __future__ import annotations

import math
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
from worldflux_registry.functional import symexp, symlog, two_hot_mean
from worldflux_registry.plugin_api import ActionLike, ObsLike

from . import spec

__all__ = [
    "DreamerV3WorldModel",
    "symexp",
    "symexp_twohot_bins",
    "symlog",
    "twohot_raw",
]

#: Official ``trunc_normal`` initializer: a standard normal truncated to [-2, 2], times this
#: factor (to restore unit variance), times ``sqrt(1 / fan_in)``.
_TRUNC_NORMAL_GAIN = 1.1368


def _trunc_normal_in(param: Tensor, fan_in: int, outscale: float = 1.0) -> None:
    """Official ``winit: trunc_normal_in`` (``nets.Initializer``), scaled by ``outscale``."""
    with torch.no_grad():
        if outscale == 0.0:
            param.zero_()
            return
        nn.init.trunc_normal_(param, 0.0, 1.0, -2.0, 2.0)
        param.mul_(_TRUNC_NORMAL_GAIN * math.sqrt(1.0 / fan_in) * outscale)


def symexp_twohot_bins(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``n`` raw-space bins of the official ``symexp_twohot`` head.

    ``symexp(linspace(-20, 0, .))`` mirrored to exactly antisymmetric values (``n`` odd: the
    middle bin is 0), spaced exponentially up to about ``+-4.85e8``.
    """
    if n % 2 == 1:
        half = symexp(torch.linspace(-20.0, 0.0, (n - 1) // 2 + 1, dtype=dtype))
        return torch.cat([half, -half[:-1].flip(0)])
    half = symexp(torch.linspace(-20.0, 0.0, n // 2, dtype=dtype))
    return torch.cat([half, -half.flip(0)])


def twohot_raw(target: Tensor, bins: Tensor) -> Tensor:
    """Two-hot weights of raw-space ``target`` over increasing raw-space ``bins`` (official).

    The weight of each of the two neighbouring bins is linear in raw space (no symlog squash);
    values beyond the end bins put all weight on the end bin. Returns ``[*target.shape, n]``.
    """
    n = int(bins.shape[0])
    t = target.unsqueeze(-1)
    below = ((bins <= t).sum(-1) - 1).clamp(0, n - 1)
    above = (n - (bins > t).sum(-1)).clamp(0, n - 1)
    equal = below == above
    one = torch.ones_like(target)
    to_below = torch.where(equal, one, (bins[below] - target).abs())
    to_above = torch.where(equal, one, (bins[above] - target).abs())
    total = to_below + to_above
    w_below, w_above = to_above / total, to_below / total
    classes = torch.arange(n, device=target.device)
    return (below.unsqueeze(-1) == classes).to(target.dtype) * w_below.unsqueeze(-1) + (
        above.unsqueeze(-1) == classes
    ).to(target.dtype) * w_above.unsqueeze(-1)


# -- building blocks ---------------------------------------------------------------------------


class Linear(nn.Module):
    """``x @ kernel + bias`` with the official layout: ``kernel [in, out]``, ``bias [out]``."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(inp, out))
        self.bias = nn.Parameter(torch.zeros(out))
        _trunc_normal_in(self.kernel, inp, outscale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.kernel) + self.bias


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale (eps 1e-4, as official)."""

    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * (torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.scale)


class BlockLinear(nn.Module):
    """Block-diagonal linear layer (official ``BlockLinear``): ``kernel [groups, in/g, out/g]``.

    Initialised with the fan-in of the full input width, as the official initializer computes
    it for this kernel shape.
    """

    def __init__(self, inp: int, out: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.kernel = nn.Parameter(torch.empty(groups, inp // groups, out // groups))
        self.bias = nn.Parameter(torch.zeros(out))
        _trunc_normal_in(self.kernel, inp)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.groups, self.kernel.shape[1])
        # A batched matmul over the groups, not einsum: ONNX Runtime's Einsum kernel is several
        # times slower than MatMul for this pattern (benchmarks/results/rollout_speed_cpu.md).
        y = torch.matmul(x.transpose(0, 1), self.kernel).transpose(0, 1)
        return y.reshape(*lead, -1) + self.bias


class Conv(nn.Module):
    """Stride-1 SAME convolution on NCHW maps, kernel stored ``HWIO`` as official."""

    def __init__(self, inp: int, out: int, kernel: int, outscale: float = 1.0) -> None:
        super().__init__()
        self.pad = kernel // 2
        self.kernel = nn.Parameter(torch.empty(kernel, kernel, inp, out))
        self.bias = nn.Parameter(torch.zeros(out))
        _trunc_normal_in(self.kernel, kernel * kernel * inp, outscale)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel.permute(3, 2, 0, 1), self.bias, padding=self.pad)


class ChannelNorm(RMSNorm):
    """`RMSNorm` over the channels of an NCHW feature map (official norm on NHWC)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Official ``nets.MLP``: ``layers`` x (``linear{i}``, ``norm{i}``, SiLU)."""

    def __init__(self, inp: int, units: int, layers: int) -> None:
        super().__init__()
        self.layers = layers
        for i in range(layers):
            self.add_module(f"linear{i}", Linear(inp if i == 0 else units, units))
            self.add_module(f"norm{i}", RMSNorm(units))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.layers):
            x = F.silu(getattr(self, f"norm{i}")(getattr(self, f"linear{i}")(x)))
        return x


class MLPHead(nn.Module):
    """Official ``MLPHead``: ``mlp`` then the output layers in ``head``."""

    head: nn.ModuleDict

    def __init__(self, inp: int, units: int, layers: int, head: nn.ModuleDict) -> None:
        super().__init__()
        self.mlp = MLP(inp, units, layers)
        self.head = head


def _head(outscale: float, units: int, **widths: int) -> nn.ModuleDict:
    return nn.ModuleDict({k: Linear(units, w, outscale) for k, w in widths.items()})


def _layer(modules: nn.ModuleDict, *path: str) -> nn.Module:
    """The module at ``path`` in nested ``ModuleDict``s."""
    module: nn.Module = modules
    for key in path:
        assert isinstance(module, nn.ModuleDict)
        module = module[key]
    return module


def _run(module: nn.Module, x: Tensor) -> Tensor:
    y: Tensor = module(x)
    return y


def _norm_act(norm: nn.Module, x: Tensor) -> Tensor:
    return F.silu(norm(x))


class Encoder(nn.Module):
    """Observations -> tokens (official ``Encoder``): symlog-vector MLP, then CNN on images.

    Tokens are ``concat([mlp(symlog(vector)), cnn(image / 255 - 0.5) flattened HWC])``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.obs_dim = int(config["obs_dim"])
        self.image = bool(config["image"])
        self.layers = int(config["enc_layers"])
        units = int(config["units"])
        if self.obs_dim:
            for i in range(self.layers):
                self.add_module(f"mlp{i}", Linear(self.obs_dim if i == 0 else units, units))
                self.add_module(f"mlp{i}norm", RMSNorm(units))
        self.depths = [int(config["depth"]) * int(m) for m in config["mults"]]
        if self.image:
            channels, kernel = spec.IMAGE_SHAPE[-1], int(config["kernel"])
            for i, depth in enumerate(self.depths):
                self.add_module(f"cnn{i}", Conv(channels, depth, kernel))
                self.add_module(f"cnn{i}norm", ChannelNorm(depth))
                channels = depth

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        # The weights' dtype: float32, or float16 in the half copy an fp16 export traces.
        dtype = next(self.parameters()).dtype
        outs = []
        if self.obs_dim:
            x = symlog(obs["vector"].to(dtype))
            for i in range(self.layers):
                x = _norm_act(getattr(self, f"mlp{i}norm"), getattr(self, f"mlp{i}")(x))
            outs.append(x)
        if self.image:
            img = obs["image"]
            x = img.to(dtype) / 255.0 - 0.5 if img.dtype == torch.uint8 else img.to(dtype) - 0.5
            x = x.permute(0, 3, 1, 2)
            for i in range(len(self.depths)):
                x = F.max_pool2d(getattr(self, f"cnn{i}")(x), 2)
                x = _norm_act(getattr(self, f"cnn{i}norm"), x)
            # Flatten channels last, like the official HWC layout.
            outs.append(x.permute(0, 2, 3, 1).flatten(1))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]


class Decoder(nn.Module):
    """Latent -> reconstructions (official ``Decoder``): vector in symlog space, image in [0, 1].

    The vector MLP reads ``concat([stoch, deter])`` (official order, the opposite of the heads).
    The image path: ``sp0`` (block linear on deter, each block paints its own channel group) plus
    ``sp2(silu(sp1norm(sp1(stoch))))``, ``spnorm``, SiLU, then per level nearest 2x upsampling,
    conv, norm, SiLU, and a last upsampling, ``imgout`` conv and sigmoid.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.obs_dim = int(config["obs_dim"])
        self.image = bool(config["image"])
        deter, units = int(config["deter"]), int(config["units"])
        stoch_flat = int(config["stoch"]) * int(config["classes"])
        if self.obs_dim:
            self.mlp = MLP(stoch_flat + deter, units, int(config["dec_layers"]))
            self.vec = nn.ModuleDict(
                {"vector": nn.ModuleDict({"pred": Linear(units, self.obs_dim)})}
            )
        if self.image:
            kernel = int(config["kernel"])
            self.depths = [int(config["depth"]) * int(m) for m in config["mults"]]
            self.last, self.bspace = self.depths[-1], int(config["bspace"])
            space = 4 * 4 * self.last
            self.sp0 = BlockLinear(deter, space, self.bspace)
            self.sp1 = Linear(stoch_flat, 2 * units)
            self.sp1norm = RMSNorm(2 * units)
            self.sp2 = Linear(2 * units, space)
            self.spnorm = RMSNorm(self.last)
            channels = self.last
            for i in reversed(range(len(self.depths) - 1)):
                self.add_module(f"conv{i}", Conv(channels, self.depths[i], kernel))
                self.add_module(f"conv{i}norm", ChannelNorm(self.depths[i]))
                channels = self.depths[i]
            self.imgout = Conv(channels, spec.IMAGE_SHAPE[-1], kernel)

    def forward(self, deter: Tensor, stoch: Tensor) -> dict[str, Tensor]:
        """Raw outputs: ``"vector"`` in symlog space, ``"image"`` in [0, 1] (NHWC)."""
        stoch = stoch.flatten(1)
        out = {}
        if self.obs_dim:
            pred = _layer(self.vec, "vector", "pred")
            out["vector"] = _run(pred, self.mlp(torch.cat([stoch, deter], -1)))
        if self.image:
            g = self.bspace
            # '(g h w c) -> h w (g c)': each deter block paints its own channel group.
            x0 = self.sp0(deter).reshape(-1, g, 4, 4, self.last // g)
            x0 = x0.permute(0, 2, 3, 1, 4).reshape(-1, 4, 4, self.last)
            x1 = self.sp2(_norm_act(self.sp1norm, self.sp1(stoch))).reshape(-1, 4, 4, self.last)
            x = _norm_act(self.spnorm, x0 + x1).permute(0, 3, 1, 2)
            for i in reversed(range(len(self.depths) - 1)):
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                x = _norm_act(getattr(self, f"conv{i}norm"), getattr(self, f"conv{i}")(x))
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            out["image"] = torch.sigmoid(self.imgout(x)).permute(0, 2, 3, 1)
        return out


class RSSM(nn.Module):
    """Official ``RSSM`` parameters: ``dynin*``/``dynhid*``/``dyngru`` core, ``obs*`` posterior
    and ``prior*`` heads (the model's methods compute with them)."""

    def __init__(self, config: Mapping[str, Any], embed: int, action_width: int) -> None:
        super().__init__()
        deter, hidden = int(config["deter"]), int(config["hidden"])
        blocks = int(config["blocks"])
        stoch_flat = int(config["stoch"]) * int(config["classes"])
        self.dynlayers = int(config["dynlayers"])
        self.obslayers = int(config["obslayers"])
        self.imglayers = int(config["imglayers"])
        self.dynin0, self.dynin0norm = Linear(deter, hidden), RMSNorm(hidden)
        self.dynin1, self.dynin1norm = Linear(stoch_flat, hidden), RMSNorm(hidden)
        self.dynin2, self.dynin2norm = Linear(action_width, hidden), RMSNorm(hidden)
        width = deter + 3 * hidden * blocks
        for i in range(self.dynlayers):
            self.add_module(f"dynhid{i}", BlockLinear(width, deter, blocks))
            self.add_module(f"dynhid{i}norm", RMSNorm(deter))
            width = deter
        self.dyngru = BlockLinear(width, 3 * deter, blocks)
        width = deter + embed
        for i in range(self.obslayers):
            self.add_module(f"obs{i}", Linear(width if i == 0 else hidden, hidden))
            self.add_module(f"obs{i}norm", RMSNorm(hidden))
        self.obslogit = Linear(hidden, stoch_flat)
        for i in range(self.imglayers):
            self.add_module(f"prior{i}", Linear(deter if i == 0 else hidden, hidden))
            self.add_module(f"prior{i}norm", RMSNorm(hidden))
        self.priorlogit = Linear(hidden, stoch_flat)

    def stack(self, name: str, layers: int, x: Tensor) -> Tensor:
        """``layers`` x (``{name}{i}``, ``{name}{i}norm``, SiLU)."""
        for i in range(layers):
            x = _norm_act(getattr(self, f"{name}{i}norm"), getattr(self, f"{name}{i}")(x))
        return x


# -- the model ---------------------------------------------------------------------------------


class DreamerV3WorldModel(WorldModel):
    """The DreamerV3 agent: world model (RSSM, encoder, decoder, reward and continue heads),
    actor ``pol``, critic ``val`` and slow critic ``slowval``.

    Build it from a full config (``FamilySpec.config(preset)``), usually through
    ``registry.load("dreamerv3:ci")``, or import official weights with
    ``worldflux_dreamerv3.importer.import_checkpoint``. States hold ``"deter"``
    ``[batch, deter]`` and ``"stoch"`` ``[batch, stoch, classes]`` (one-hot). ``encode`` runs the
    posterior step from the zero state (as the official agent does on ``is_first``), ``update``
    the filtering step, ``transition`` the prior step used for imagination.

    Actions are float32 ``[batch, action_dim]`` (continuous) or, with
    ``action_kind="discrete"``, an int32 index ``[batch]`` one-hot encoded inside.

    Acting: call `act_step` once per environment step (posterior update + actor sample, noise as
    explicit tensors), the protocol's agent step, exported as the ``act`` graph; `policy_step`
    is the same step with the official ``Agent.policy`` arguments. ``plan_step`` is not the
    acting method for this family: it keeps the base behaviour (a prior step).
    """

    family = spec.FAMILY
    capabilities = spec.CAPABILITIES
    #: Kept float32 in int8 exports, chosen by free-running parity (benchmarks/int8_search.py,
    #: size12m at batch 64, 16 steps, flip budget 0.05): the whole prior head and the GRU's
    #: input layers (int8 there flipped 7.5% of the prior samples; fp32 there 3.3-3.6% over
    #: three seeds, and the int8 block GRU and deter input still run a transition 1.3-1.6x
    #: faster than the fp32 export, benchmarks/results/int8_speed_cpu.md), the decoder
    #: (int8 put its vector reconstruction 1.24x past the int8 tolerance), the posterior logits,
    #: and the raw-space two-hot heads (their readout multiplies logit noise by ~1e7 near a flat
    #: head).
    keep_in_fp32 = (
        "dyn.dynin",
        "dyn.prior",
        "dyn.obslogit",
        "decoder.",
        "rew.",
        "val.",
        "slowval.",
    )
    bins: Tensor

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
        self.discrete = c["action_kind"] == "discrete"
        self.obs_keys = tuple(
            k for k, on in (("vector", int(c["obs_dim"]) > 0), ("image", bool(c["image"]))) if on
        )
        stoch_flat, units = self.stoch * self.classes, int(c["units"])
        feat, bins = stoch_flat + self.deter, int(c["bins"])

        self.encoder = Encoder(c)
        self.dyn = RSSM(c, spec.embed_dim(c), self.action_dim)
        self.decoder = Decoder(c)
        # Official outscales: 0.0 for the two-hot heads (they start out predicting exactly 0),
        # 1.0 for the continue head, 0.01 for the policy outputs.
        self.rew = MLPHead(feat, units, int(c["head_layers"]), _head(0.0, units, logits=bins))
        self.con = MLPHead(feat, units, int(c["head_layers"]), _head(1.0, units, logit=1))
        pol_out = (
            _head(0.01, units, logits=self.action_dim)
            if self.discrete
            else _head(0.01, units, mean=self.action_dim, stddev=self.action_dim)
        )
        self.pol = MLPHead(feat, units, int(c["actor_layers"]), nn.ModuleDict({"action": pol_out}))
        layers = int(c["critic_layers"])
        self.val = MLPHead(feat, units, layers, _head(0.0, units, logits=bins))
        self.slowval = MLPHead(feat, units, layers, _head(0.0, units, logits=bins))
        # A fresh official agent's slow critic is a copy of the critic.
        self.slowval.load_state_dict(self.val.state_dict())
        self.register_buffer("bins", symexp_twohot_bins(bins), persistent=False)

    # -- RSSM pieces -------------------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        """Compute dtype: float32, or float16 in the half copy an fp16 export traces."""
        return self.dyn.dynin0.kernel.dtype

    def action_embedding(self, action: Tensor) -> Tensor:
        """The action as the core reads it (official ``DictConcat``): float ``[batch, width]``.

        Continuous actions pass as they are; a discrete int index becomes its one-hot (a float
        ``[batch, action_dim]`` one-hot or probability vector is taken as given).
        """
        if self.discrete and not action.is_floating_point():
            classes = torch.arange(self.action_dim, device=action.device)
            return (action.long().unsqueeze(-1) == classes).to(self._dtype)
        return action.to(self._dtype)

    def _core(self, deter: Tensor, stoch: Tensor, action: Tensor) -> Tensor:
        """One block-GRU step (official ``RSSM._core``) on an embedded action."""
        d, g = self.dyn, self.blocks
        # Squash actions outside [-1, 1] back onto the box, without gradient through the scale.
        action = action / torch.clamp(action.abs(), min=1.0).detach()
        x0 = _norm_act(d.dynin0norm, d.dynin0(deter))
        x1 = _norm_act(d.dynin1norm, d.dynin1(stoch.flatten(1)))
        x2 = _norm_act(d.dynin2norm, d.dynin2(action))
        x = torch.cat([x0, x1, x2], -1).unsqueeze(1).expand(-1, g, -1)
        x = torch.cat([deter.reshape(-1, g, self.deter // g), x], -1).flatten(1)
        x = d.dyngru(d.stack("dynhid", d.dynlayers, x))
        # The gates are split inside each block: per block [reset | cand | update].
        reset, cand, update = x.reshape(-1, g, 3, self.deter // g).unbind(2)
        reset = torch.sigmoid(reset.flatten(1))
        cand = torch.tanh(reset * cand.flatten(1))
        update = torch.sigmoid(update.flatten(1) - 1.0)
        return update * cand + (1.0 - update) * deter

    def _logits(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.stoch, self.classes)

    def posterior_logits(self, deter: Tensor, tokens: Tensor) -> Tensor:
        """Posterior logits ``[batch, stoch, classes]`` (before unimix) from deter and tokens."""
        d = self.dyn
        return self._logits(d.obslogit(d.stack("obs", d.obslayers, torch.cat([deter, tokens], -1))))

    def prior_logits(self, deter: Tensor) -> Tensor:
        """Prior logits ``[batch, stoch, classes]`` (before unimix) from the deterministic state."""
        d = self.dyn
        return self._logits(d.priorlogit(d.stack("prior", d.imglayers, deter)))

    def _probs(self, logits: Tensor) -> Tensor:
        """Categorical probabilities with the uniform mixture (official ``unimix``)."""
        probs = torch.softmax(logits, -1)
        return (1.0 - self.unimix) * probs + self.unimix * (1.0 / self.classes)

    def unimix_logits(self, logits: Tensor) -> Tensor:
        """``log`` of the unimix probabilities: the logits of the official latent distribution."""
        return torch.log(self._probs(logits))

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

    def initial_tensors(self, batch: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The zero carry (official ``RSSM.initial``) the first step starts from."""
        device = device or self.bins.device
        dtype = self._dtype
        return {
            "deter": torch.zeros(batch, self.deter, device=device, dtype=dtype),
            "stoch": torch.zeros(batch, self.stoch, self.classes, device=device, dtype=dtype),
        }

    def _zero_action(self, batch: int, device: torch.device) -> Tensor:
        return torch.zeros(batch, self.action_dim, device=device, dtype=self._dtype)

    def _obs_tensors(self, obs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise ContractError(
                f"observations are missing {missing}",
                hint="declared: " + ", ".join(self.obs_keys),
                family=self.family,
            )
        return {k: obs[k] for k in self.obs_keys}

    def observe_step(
        self,
        deter: Tensor,
        stoch: Tensor,
        prev_action: Tensor,
        tokens: Tensor,
        reset: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One posterior step (official ``RSSM._observe``): ``(deter, stoch, post_logits)``.

        ``reset`` (bool ``[batch]``, the official ``is_first``) zeroes the carry and the
        embedded previous action of its rows (a discrete action's one-hot becomes the zero
        vector). ``noise`` is uniform ``[batch, stoch, classes]`` for the Gumbel-max sample;
        None gives the mode.
        """
        actemb = self.action_embedding(prev_action)
        if reset is not None:
            keep = (~reset.bool()).to(deter.dtype)
            deter = deter * keep.unsqueeze(-1)
            stoch = stoch * keep.view(-1, 1, 1)
            actemb = actemb * keep.unsqueeze(-1)
        deter = self._core(deter, stoch, actemb)
        logits = self.posterior_logits(deter, tokens)
        return deter, self._sample(logits, noise), logits

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
        action = self._zero_action(batch, device)
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
        tokens = self.encoder(obs)
        batch = tokens.shape[0]
        noise = (
            None
            if deterministic
            else self.noise("posterior", conditions, batch, device=tokens.device)
        )
        deter, stoch, _ = self.observe_step(
            carry["deter"], carry["stoch"], action, tokens, None, noise
        )
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
        deter = self._core(state["deter"], state["stoch"], self.action_embedding(act))
        noise = (
            None
            if deterministic
            else self.noise("prior", conditions, deter.shape[0], device=deter.device)
        )
        stoch = self._sample(self.prior_logits(deter), noise)
        return State({"deter": deter, "stoch": stoch})

    def features(self, deter: Tensor, stoch: Tensor) -> Tensor:
        """Head input (official ``feat2tensor``): ``concat([deter, stoch.flatten()])``."""
        return torch.cat([deter, stoch.flatten(1)], -1)

    # -- heads -------------------------------------------------------------------------------
    def _twohot_pred(self, logits: Tensor) -> Tensor:
        """Official ``TwoHot.pred``: ``sum(softmax(logits) * bins)`` summed symmetrically.

        Bins are raw-space, so this is already the raw value (uniform logits give exactly 0).
        """
        # In float32 as official (TwoHot casts its logits); a half copy's bins would overflow.
        return two_hot_mean(torch.softmax(logits.float(), -1), self._bins32).to(logits.dtype)

    def _twohot_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Official ``TwoHot.loss``: cross-entropy against `twohot_raw` of the raw target."""
        weights = twohot_raw(target.float(), self._bins32)
        return -(weights * torch.log_softmax(logits.float(), -1)).sum(-1)

    @property
    def _bins32(self) -> Tensor:
        """`bins` in float32 (rebuilt for a half copy, where 4.85e8 does not fit)."""
        if self.bins.dtype == torch.float32:
            return self.bins
        return symexp_twohot_bins(int(self.bins.shape[0])).to(self.bins.device)

    def reward_logits(self, feat: Tensor) -> Tensor:
        """Reward head logits ``[batch, bins]`` from `features`."""
        return _run(self.rew.head["logits"], self.rew.mlp(feat))

    def continue_logit(self, feat: Tensor) -> Tensor:
        """Continue head logit ``[batch]`` from `features`."""
        return _run(self.con.head["logit"], self.con.mlp(feat)).squeeze(-1)

    def value_logits(self, feat: Tensor, slow: bool = False) -> Tensor:
        """Critic logits ``[batch, bins]`` (``slowval`` when ``slow``) from `features`."""
        head = self.slowval if slow else self.val
        return _run(head.head["logits"], head.mlp(feat))

    def value(self, state: State, slow: bool = False) -> Tensor:
        """Critic prediction ``[batch]`` in raw return space (``slowval`` when ``slow``)."""
        return self._twohot_pred(
            self.value_logits(self.features(state["deter"], state["stoch"]), slow)
        )

    def policy(self, feat: Tensor) -> dict[str, Tensor]:
        """Actor distribution parameters from `features`.

        Continuous (official ``bounded_normal``): ``{"mean": tanh(.), "std": (maxstd - minstd)
        * sigmoid(. + 2) + minstd}``, each ``[batch, action_dim]``. Discrete (official
        ``categorical``, no unimix): ``{"logits": [batch, action_dim]}``.
        """
        x = self.pol.mlp(feat)
        if self.discrete:
            return {"logits": _run(_layer(self.pol.head, "action", "logits"), x)}
        lo, hi = float(self.config["minstd"]), float(self.config["maxstd"])
        std = (hi - lo) * torch.sigmoid(_run(_layer(self.pol.head, "action", "stddev"), x) + 2.0)
        mean = torch.tanh(_run(_layer(self.pol.head, "action", "mean"), x))
        return {"mean": mean, "std": std + lo}

    def policy_logp(self, dist: Mapping[str, Tensor], action: Tensor) -> Tensor:
        """Log-probability ``[batch]`` of ``action`` under `policy` output ``dist`` (official).

        Continuous: a plain Normal density summed over the dims (no tanh Jacobian, no
        clipping); discrete: ``log_softmax(logits)[action]`` for an int index.
        """
        if self.discrete:
            logp = torch.log_softmax(dist["logits"], -1)
            return logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        mean, std = dist["mean"], dist["std"]
        z = (action.to(mean.dtype) - mean) / std
        return (-0.5 * z.square() - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def policy_entropy(self, dist: Mapping[str, Tensor]) -> Tensor:
        """Entropy ``[batch]`` of `policy` output ``dist`` (summed over action dims)."""
        if self.discrete:
            logp = torch.log_softmax(dist["logits"], -1)
            return -(logp.exp() * logp).sum(-1)
        std = dist["std"]
        return (0.5 * torch.log(2 * math.pi * std.square()) + 0.5).sum(-1)

    def policy_entropy_bounds(self) -> tuple[Tensor, Tensor]:
        """Per-dim entropies of ``Normal(0, minstd)`` and ``Normal(0, maxstd)`` ``[action_dim]``
        (official ``minent`` / ``maxent`` of the bounded-normal policy; continuous only)."""
        stds = torch.tensor([float(self.config["minstd"]), float(self.config["maxstd"])])
        ent = 0.5 * torch.log(2 * math.pi * stds.square()) + 0.5
        lo, hi = (e.expand(self.action_dim).to(self.bins.device) for e in ent)
        return lo, hi

    def sample_action(
        self, dist: Mapping[str, Tensor], noise: Tensor | None, deterministic: bool = False
    ) -> Tensor:
        """An action from `policy` output ``dist`` and explicit ``noise``.

        Continuous: ``mean + std * noise`` with standard-normal ``noise [batch, action_dim]``
        (not clipped: the official env wrapper clips to the action box); ``deterministic``
        gives ``mean``. Discrete: Gumbel-max ``argmax(logits - log(-log u))`` with uniform
        ``noise [batch, action_dim]``, an int32 index ``[batch]``; ``deterministic`` gives the
        argmax. ``noise`` None (and not ``deterministic``) draws it from torch's generator.
        """
        if self.discrete:
            logits = dist["logits"]
            if not deterministic:
                if noise is None:
                    noise = torch.rand_like(logits)
                u = noise.to(logits.dtype).clamp(1e-12, 1.0 - 1e-7)
                logits = logits - torch.log(-torch.log(u))
            return logits.argmax(-1).to(torch.int32)
        mean = dist["mean"]
        if deterministic:
            return mean
        if noise is None:
            noise = torch.randn_like(mean)
        return mean + dist["std"] * noise.to(mean.dtype)

    def act_step(
        self,
        obs: ObsLike,
        carry: State | None = None,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """One agent step (official ``Agent.policy``): posterior update, then an actor sample.

        What a deployer calls once per environment step (the contract's ``act`` agent step,
        exported as the ``act`` graph): pass the `State` the previous call returned as
        ``carry`` (None on the first step), step the environment with its ``"action"``.

        Args:
            obs: Observations (a mapping or a `WorldModelInput`, whose conditions are used when
                ``conditions`` is None).
            carry: ``"deter"``, ``"stoch"`` and ``"prev_action"`` (`spec.act_agent`); a missing
                one is zeros. All-zero rows are the official reset (``is_first``): zero the
                rows of environments starting a new episode.
            conditions: Noise ``wf.noise.posterior`` (uniform ``[batch, stoch, classes]``) and
                ``wf.noise.act_action`` (``[batch, action_dim]``: standard normal, or uniform
                for a discrete actor); a missing one is drawn from torch's generator.
            deterministic: Posterior mode and action mode (mean / argmax), no noise read.

        Returns:
            ``deter``, ``stoch`` (the posterior), ``prev_action`` (the carry of the next step:
            the action, or a discrete action's one-hot) and ``action`` (float32
            ``[batch, action_dim]`` unclipped, or an int32 index ``[batch]``).
        """
        tensors, obs_conditions = self.observations(obs)
        conditions = conditions if conditions is not None else obs_conditions
        tensors = self._obs_tensors(tensors)
        first = next(iter(tensors.values()))
        batch, device = first.shape[0], first.device
        given = {} if carry is None else carry.tensors
        zero = self.initial_tensors(batch, device)
        zero["prev_action"] = self._zero_action(batch, device)
        state = State({k: given.get(k, v) for k, v in zero.items() if k != "prev_action"})
        prev = given.get("prev_action", zero["prev_action"])
        post, noise = None, None
        if not deterministic:
            post = self.noise("posterior", conditions, batch, device=device)
            noise = self.noise("act_action", conditions, batch, device=device)
        new, action = self.policy_step(
            state, tensors, prev, noise, posterior_noise=post, deterministic=deterministic
        )
        return State(
            {**new.tensors, "prev_action": self.action_embedding(action), "action": action}
        )

    def policy_step(
        self,
        state: State | None,
        obs: Mapping[str, Tensor],
        prev_action: Tensor | None,
        noise: Tensor | None = None,
        *,
        is_first: Tensor | None = None,
        posterior_noise: Tensor | None = None,
        deterministic: bool = False,
    ) -> tuple[State, Tensor]:
        """The official ``Agent.policy`` signature of `act_step`: posterior update, then an actor
        sample, with the reset flags as an argument and the action returned beside the state.

        Pass the state and action this method returned on the previous step (``None`` for both
        on the first step), the new observation and the per-step noise.

        Args:
            state: Previous posterior state, or None at the start (zero carry).
            obs: Observations ``{"vector": [batch, obs_dim], "image": uint8 [batch, 64, 64, 3]}``.
            prev_action: The action returned by the previous call (None: zeros).
            noise: Action noise: continuous, standard normal ``[batch, action_dim]``
                (``action = mean + std * noise``); discrete, uniform in (0, 1)
                ``[batch, action_dim]`` (Gumbel-max). None draws it from torch's generator.
            is_first: bool ``[batch]``: rows starting a new episode, whose carry and previous
                action are zeroed (official ``obs["is_first"]``); None: only when ``state`` is
                None.
            posterior_noise: uniform ``[batch, stoch, classes]`` for the latent sample (None:
                drawn from torch's generator).
            deterministic: Use the posterior mode and the action mode instead of samples.

        Returns:
            ``(state, action)``: the posterior state and the action, float32
            ``[batch, action_dim]`` unclipped (clip to [-1, 1] for the environment, feed it back
            unclipped, as the official agent does) or an int32 index ``[batch]``.
        """
        tensors = self._obs_tensors(obs)
        tokens = self.encoder(tensors)
        batch, device = tokens.shape[0], tokens.device
        carry = self.initial_tensors(batch, device) if state is None else state.tensors
        if prev_action is None:
            prev_action = self._zero_action(batch, device)
        if state is None and is_first is None:
            is_first = torch.ones(batch, dtype=torch.bool, device=device)
        if deterministic:
            posterior_noise = None
        elif posterior_noise is None:
            posterior_noise = torch.rand(batch, self.stoch, self.classes, device=device)
        deter, stoch, _ = self.observe_step(
            carry["deter"], carry["stoch"], prev_action, tokens, is_first, posterior_noise
        )
        dist = self.policy(self.features(deter, stoch))
        action = self.sample_action(dist, noise, deterministic)
        return State({"deter": deter, "stoch": stoch}), action

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Reconstructions (``"vector"`` raw, ``"image"`` in [0, 1]), ``"reward"`` and
        ``"continue"``.

        ``"reward"`` is the raw-space two-hot expectation; ``"continue"`` the head's probability,
        which official training targets at ``(1 - is_terminal) * (1 - 1/horizon)``.
        """
        deter, stoch = state["deter"], state["stoch"]
        raw = self.decoder(deter, stoch)
        predictions = {}
        if "vector" in raw:
            predictions["vector"] = symexp(raw["vector"])
        if "image" in raw:
            predictions["image"] = raw["image"]
        feat = self.features(deter, stoch)
        predictions["reward"] = self._twohot_pred(self.reward_logits(feat))
        predictions["continue"] = torch.sigmoid(self.continue_logit(feat))
        return ModelOutput(predictions)

    # -- training ----------------------------------------------------------------------------
    def _kl(self, post_logits: Tensor, prior_logits: Tensor) -> Tensor:
        """KL(post || prior) of the unimix categoricals, summed over the latents (official)."""
        post, prior = self.unimix_logits(post_logits), self.unimix_logits(prior_logits)
        lp, lq = torch.log_softmax(post, -1), torch.log_softmax(prior, -1)
        return (torch.softmax(post, -1) * (lp - lq)).sum(-1).sum(-1)

    def _entropy(self, logits: Tensor) -> Tensor:
        """Entropy of the unimix categoricals, summed over the latents (official)."""
        mixed = self.unimix_logits(logits)
        return -(torch.softmax(mixed, -1) * torch.log_softmax(mixed, -1)).sum(-1).sum(-1)

    def _official_layout(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``prevact``, ``reset``, ``reward``, ``con`` (continue target) of either layout."""
        action = batch["action"]
        b, t = (int(d) for d in action.shape[:2])
        device = action.device
        if "is_terminal" in batch:
            return {
                "prevact": action,
                "reset": batch["is_first"].bool(),
                "reward": batch["reward"].float(),
                "con": self.continue_target(batch["is_terminal"]),
            }
        # Project layout: action[t] follows obs t and produced reward[t] and continue[t].
        prevact = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)
        reset = torch.zeros(b, t, dtype=torch.bool, device=device)
        reset[:, 0] = True
        return {
            "prevact": prevact,
            "reset": reset,
            "reward": batch["reward"][:, :-1].float(),
            "con": batch["continue"][:, :-1].float() * self._con_discount,
        }

    def observe_sequence(
        self, batch: Mapping[str, Tensor], deterministic: bool = False
    ) -> dict[str, Tensor]:
        """Filter a ``[batch, time]`` sequence: deter, stoch and posterior logits per step.

        The carry starts at zero. In the project layout step ``t`` takes ``action[t-1]``
        (step 0 a zero action); in the official layout (``"is_first"`` and ``"is_terminal"`` in
        ``batch``) ``action[t]`` is the action before obs ``t`` and rows with ``is_first``
        restart from the zero carry and a zero action, as the official ``RSSM.observe``.
        """
        layout = self._official_layout(batch)
        obs = {k: batch[k] for k in self.obs_keys}
        b, t = (int(d) for d in batch["action"].shape[:2])
        tokens = self.encoder({k: v.flatten(0, 1) for k, v in obs.items()}).reshape(b, t, -1)
        carry = self.initial_tensors(b, tokens.device)
        deter, stoch = carry["deter"], carry["stoch"]
        deters, stochs, logits = [], [], []
        for i in range(t):
            noise = None if deterministic else torch.rand_like(stoch)
            deter, stoch, logit = self.observe_step(
                deter, stoch, layout["prevact"][:, i], tokens[:, i], layout["reset"][:, i], noise
            )
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return {
            "deter": torch.stack(deters, 1),
            "stoch": torch.stack(stochs, 1),
            "post_logits": torch.stack(logits, 1),
        }

    @property
    def _con_discount(self) -> float:
        return 1.0 - 1.0 / float(self.config["horizon"]) if self.config["contdisc"] else 1.0

    def continue_target(self, is_terminal: Tensor) -> Tensor:
        """Official continue target: ``(1 - is_terminal)``, times ``1 - 1/horizon`` if contdisc."""
        return (~is_terminal.bool()).float() * self._con_discount

    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """The DreamerV3 world-model loss of a ``[batch, time, ...]`` batch (official terms).

        Two layouts. Project layout (the contract's targets): observations, ``"action"``
        (``action[t]`` is taken after observing step ``t``) and ``"reward"`` / ``"continue"``
        that ``action[t]`` produced; the reward and continue of the step a sequence starts at
        are not in such a batch, so those two losses cover steps ``1..T-1``. Official layout
        (``"is_first"`` and ``"is_terminal"`` present, bool ``[batch, time]``): ``"action"[t]``
        led to obs ``t``, ``"reward"[t]`` came with it; every loss covers every step and
        ``is_first`` rows reset the posterior.

        Components: reconstruction per observation (symlog MSE for vectors, MSE for images,
        summed over features), ``"reward"`` (raw-space two-hot cross-entropy), ``"continue"``
        (binary cross-entropy against `continue_target`), ``"dyn"`` and ``"rep"`` (KL with
        free nats), each averaged over batch and time; ``loss`` weights them with the
        ``*_scale`` config fields. The actor and critic losses (imagination with sampled
        actions, lambda returns, return normalisation) are not part of it.
        """
        c = self.config
        layout = self._official_layout(batch)
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

        # Heads read features of the steps that have targets (all, or 1..T-1, see above).
        first = t - layout["reward"].shape[1]
        feat = self.features(
            seq["deter"][:, first:].flatten(0, 1), seq["stoch"][:, first:].flatten(0, 1)
        )
        rew = self._twohot_loss(self.reward_logits(feat), layout["reward"].flatten()).mean()
        con_target = layout["con"].flatten()
        con_logit = self.continue_logit(feat)
        con = -(
            con_target * F.logsigmoid(con_logit) + (1 - con_target) * F.logsigmoid(-con_logit)
        ).mean()

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
                "post_entropy": float(self._entropy(post).mean()),
                "prior_entropy": float(self._entropy(prior).mean()),
                "steps": float(b * t),
            }
        return LossOutput(loss, components, metrics)
