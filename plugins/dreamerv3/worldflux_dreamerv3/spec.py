"""DreamerV3 family declaration: config fields, presets, contract and parameter count (torch-free).

Sizes follow the official ``configs.yaml`` of danijar/dreamerv3 (``size1m`` ... ``size400m``:
RSSM deter / hidden / classes, CNN depth, MLP units). The size names count the whole agent, and
so does `param_count`: world model, actor (``pol``), critic (``val``) and its slow copy
(``slowval``), the modules every official checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from worldflux_registry import (
    AgentSpec,
    Capability,
    ConfigError,
    IOContract,
    NoiseSpec,
    TensorSpec,
)

__all__ = [
    "CAPABILITIES",
    "DEFAULTS",
    "FAMILY",
    "ACTION_KINDS",
    "IMAGE_SHAPE",
    "PRESETS",
    "act_agent",
    "act_noise",
    "contract",
    "embed_dim",
    "param_count",
]

FAMILY: Final = "dreamerv3"
#: Image observations are 64x64 RGB, channels last, as in the official agent.
IMAGE_SHAPE: Final = (64, 64, 3)

#: Every config field with its default (the official size12m world model on vector obs).
DEFAULTS: Final[Mapping[str, Any]] = {
    # observation / action interface
    "obs_dim": 4,  # vector observation size; 0 means no "vector" observation
    "image": False,  # True adds the "image" observation (uint8 [64, 64, 3])
    "action_dim": 2,  # continuous: action width; discrete: number of actions
    "action_kind": "continuous",  # "continuous" (float32 [batch, action_dim] in [-1, 1])
    # or "discrete" (int32 index [batch] below action_dim, one-hot encoded inside)
    # RSSM
    "deter": 2048,
    "hidden": 256,
    "stoch": 32,
    "classes": 16,
    "blocks": 8,
    "unimix": 0.01,
    "dynlayers": 1,
    "imglayers": 2,
    "obslayers": 1,
    # encoder / decoder / heads
    "units": 256,
    "depth": 16,
    "mults": [2, 3, 4, 4],
    "kernel": 5,
    "enc_layers": 3,
    "dec_layers": 3,
    "head_layers": 1,  # reward and continue heads
    "actor_layers": 3,  # policy head (official policy.layers)
    "critic_layers": 3,  # value head and its slow copy (official value.layers)
    "minstd": 0.1,  # bounded-normal policy std range (official policy.minstd / maxstd)
    "maxstd": 1.0,
    "bspace": 8,
    "bins": 255,
    # loss
    "free_nats": 1.0,
    "dyn_scale": 1.0,
    "rep_scale": 0.1,
    "rec_scale": 1.0,
    "rew_scale": 1.0,
    "con_scale": 1.0,
    # continue target (1 - is_terminal) * (1 - 1/horizon) when contdisc (official defaults)
    "horizon": 333,
    "contdisc": True,
}

#: The values ``action_kind`` takes.
ACTION_KINDS: Final = ("continuous", "discrete")


def _size(deter: int, hidden: int, classes: int, depth: int, units: int) -> dict[str, Any]:
    return {
        "deter": deter,
        "hidden": hidden,
        "classes": classes,
        "depth": depth,
        "units": units,
    }


#: Preset name -> overrides of `DEFAULTS`.
PRESETS: Final[Mapping[str, Mapping[str, Any]]] = {
    # Tiny, for tests and CI: trains a few hundred steps on CPU in seconds.
    "ci": _size(64, 32, 4, 2, 32),
    "size1m": _size(512, 64, 4, 4, 64),
    "size12m": _size(2048, 256, 16, 16, 256),
    "size25m": _size(3072, 384, 24, 24, 384),
    "size50m": _size(4096, 512, 32, 32, 512),
    "size100m": _size(6144, 768, 48, 48, 768),
    "size200m": _size(8192, 1024, 64, 64, 1024),
    "size400m": _size(12288, 1536, 96, 96, 1536),
}

CAPABILITIES: Final = frozenset(
    {
        Capability.ENCODE,
        Capability.TRANSITION,
        Capability.UPDATE,
        Capability.DECODE,
        Capability.ROLLOUT,
        Capability.LOSS,
        Capability.REWARD,
        Capability.CONTINUE,
        Capability.STOCHASTIC,
        Capability.VECTOR_OBS,
        Capability.IMAGE_OBS,
        Capability.CONTINUOUS_ACTIONS,
        Capability.DISCRETE_ACTIONS,
        Capability.POLICY,
        Capability.VALUE,
        Capability.ACT,
    }
)


#: Config fields that count something: each must be at least 1.
_POSITIVE = (
    "deter",
    "hidden",
    "stoch",
    "classes",
    "units",
    "depth",
    "blocks",
    "bspace",
    "actor_layers",
    "critic_layers",
)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise `ConfigError` for a config the model cannot be built from."""
    problems = []
    for key in _POSITIVE:
        if int(config[key]) < 1:
            problems.append(f"{key} must be >= 1, got {config[key]}")
    if problems:  # the checks below divide by these
        raise ConfigError("; ".join(problems), family=FAMILY)
    if not 0 <= float(config["unimix"]) < 1:
        problems.append(f"unimix must be in [0, 1), got {config['unimix']}")
    if not 0 < float(config["minstd"]) <= float(config["maxstd"]):
        problems.append(f"need 0 < minstd <= maxstd, got {config['minstd']}, {config['maxstd']}")
    if int(config["obs_dim"]) < 0:
        problems.append(f"obs_dim must be >= 0, got {config['obs_dim']}")
    if int(config["obs_dim"]) == 0 and not config["image"]:
        problems.append("no observation: set obs_dim > 0 and/or image=True")
    if int(config["action_dim"]) < 1:
        problems.append(f"action_dim must be >= 1, got {config['action_dim']}")
    if config["action_kind"] not in ACTION_KINDS:
        problems.append(
            f"action_kind must be one of {', '.join(ACTION_KINDS)}, got {config['action_kind']!r}"
        )
    if int(config["horizon"]) < 1:
        problems.append(f"horizon must be >= 1, got {config['horizon']}")
    if int(config["deter"]) % int(config["blocks"]):
        problems.append(f"deter {config['deter']} is not divisible by blocks {config['blocks']}")
    if config["image"]:
        last = int(config["depth"]) * int(config["mults"][-1])
        if len(config["mults"]) != 4:
            problems.append("image models need 4 CNN stages (mults of length 4): 64 -> 4 pixels")
        if int(config["deter"]) % int(config["bspace"]) or last % int(config["bspace"]):
            problems.append(
                f"deter {config['deter']} and the last CNN depth {last} must be divisible "
                f"by bspace {config['bspace']}"
            )
    if int(config["bins"]) < 2:
        problems.append(f"bins must be >= 2, got {config['bins']}")
    if problems:
        raise ConfigError("; ".join(problems), family=FAMILY)


#: Parity tolerance (rtol, atol) of the reward readout, a raw-space two-hot over bins up to
#: ``symexp(20)`` ~ 4.9e8: near a flat head the readout moves by ~1e7 per unit of logit, so the
#: float32 noise of two runtimes (~1e-7 on the logits) moves it by up to ~1; the official code's
#: own jit and eager runs differ by 0.25 there. A peaked (trained) head is far better
#: conditioned and passes by a wide margin.
READOUT_TOLERANCE: Final = (1e-4, 1.0)


def contract(config: Mapping[str, Any]) -> IOContract:
    """The DreamerV3 I/O contract of ``config``.

    Observations: ``"vector"`` float32 ``[batch, obs_dim]`` when ``obs_dim > 0`` and ``"image"``
    uint8 ``[batch, 64, 64, 3]`` when ``image`` (both together are fine). Action: float32
    ``[batch, action_dim]`` in ``[-1, 1]``, or with ``action_kind="discrete"`` an int32 index
    ``[batch]`` below ``action_dim``. State: ``"deter"`` (GRU state) and ``"stoch"``
    (one-hot categorical sample ``[batch, stoch, classes]``). Noise: uniform ``"prior"`` for
    ``transition`` and ``"posterior"`` for ``encode``/``update`` (Gumbel-max sampling).
    """
    check_config(config)
    obs_dim = int(config["obs_dim"])
    stoch, classes = int(config["stoch"]), int(config["classes"])
    observations, predictions = [], []
    if obs_dim:
        observations.append(TensorSpec("vector", "float32", ("batch", obs_dim)))
        predictions.append(
            TensorSpec("vector", "float32", ("batch", obs_dim), description="reconstruction")
        )
    if config["image"]:
        observations.append(TensorSpec("image", "uint8", ("batch", *IMAGE_SHAPE), low=0, high=255))
        predictions.append(
            TensorSpec(
                "image",
                "float32",
                ("batch", *IMAGE_SHAPE),
                low=0.0,
                high=1.0,
                description="reconstruction scaled to [0, 1]",
            )
        )
    predictions += [
        TensorSpec(
            "reward",
            "float32",
            ("batch",),
            description="symexp two-hot expectation",
            tolerance=READOUT_TOLERANCE,
        ),
        TensorSpec(
            "continue",
            "float32",
            ("batch",),
            kind="binary",
            low=0.0,
            high=1.0,
            description="probability that the episode continues",
        ),
    ]
    latent = ("batch", stoch, classes)
    return IOContract(
        observations=tuple(observations),
        action=_action_spec(config),
        state=(
            TensorSpec("deter", "float32", ("batch", int(config["deter"]))),
            TensorSpec(
                "stoch",
                "float32",
                latent,
                kind="categorical",
                classes=classes,
                description="one-hot sample (straight-through gradients)",
            ),
        ),
        predictions=tuple(predictions),
        noise=(NoiseSpec("prior", latent, graphs=("transition",)), *act_noise(config)),
        targets=(
            TensorSpec("reward", "float32", ("batch",), description="reward produced by action[t]"),
            TensorSpec(
                "continue",
                "float32",
                ("batch",),
                kind="binary",
                low=0.0,
                high=1.0,
                description="0.0 when the observation after action[t] is terminal",
            ),
        ),
        agent=act_agent(config),
    )


def act_noise(config: Mapping[str, Any]) -> tuple[NoiseSpec, ...]:
    """The posterior noise and the agent step's action noise (graph ``act``).

    ``posterior`` (``wf.noise.posterior``): uniform ``[batch, stoch, classes]``, the Gumbel-max
    sample of the unimix posterior, read by ``encode``, ``update`` and ``act``. ``act_action``
    (``wf.noise.act_action``) ``[batch, action_dim]``: standard normal for a continuous actor
    (``action = mean + std * noise``), uniform for a discrete one (Gumbel-max over the logits).
    """
    latent = ("batch", int(config["stoch"]), int(config["classes"]))
    kind = "uniform" if config["action_kind"] == "discrete" else "normal"
    return (
        NoiseSpec("posterior", latent, graphs=("encode", "update", "act")),
        NoiseSpec("act_action", ("batch", int(config["action_dim"])), ("act",), kind),
    )


def act_agent(config: Mapping[str, Any]) -> AgentSpec:
    """The agent step: `DreamerV3WorldModel.act_step` (the official ``Agent.policy``).

    Carry: the posterior ``deter`` and ``stoch`` and ``prev_action``, the action the step took,
    as the core embeds it: the float32 action itself (unclipped, as the official agent feeds it
    back), or the one-hot of a discrete index. Zeros are the official reset (``is_first``):
    zero carry and a zero action embedding. Output: ``action``, as the contract's action but
    unclipped (float32 ``[batch, action_dim]``, or an int32 index ``[batch]``). Both noises are
    exploration noise: zeros give the ``deterministic=True`` step (posterior mode, action mode)
    up to float ties of the Gumbel-max argmax, whose constant shift keeps the argmax.
    """
    n = int(config["action_dim"])
    stoch, classes = int(config["stoch"]), int(config["classes"])
    discrete = config["action_kind"] == "discrete"
    prev = (
        TensorSpec(
            "prev_action",
            "float32",
            ("batch", n),
            kind="categorical",
            classes=n,
            description="one-hot of the action the previous step took (zeros at t0)",
        )
        if discrete
        else TensorSpec(
            "prev_action",
            "float32",
            ("batch", n),
            description="the action the previous step took, unclipped (zeros at t0)",
        )
    )
    action = (
        TensorSpec(
            "action",
            "int32",
            ("batch",),
            kind="discrete",
            classes=n,
            low=0,
            high=n - 1,
            description="the action to take (an index)",
        )
        if discrete
        else TensorSpec(
            "action",
            "float32",
            ("batch", n),
            description="the action to take, unclipped: clip to [-1, 1] for the environment",
        )
    )
    return AgentSpec(
        graph="act",
        action="action",
        carry=(
            TensorSpec("deter", "float32", ("batch", int(config["deter"]))),
            TensorSpec(
                "stoch",
                "float32",
                ("batch", stoch, classes),
                kind="categorical",
                classes=classes,
                description="one-hot posterior sample",
            ),
            prev,
        ),
        outputs=(action,),
        explore=("posterior", "act_action"),
    )


def _action_spec(config: Mapping[str, Any]) -> TensorSpec:
    n = int(config["action_dim"])
    if config["action_kind"] == "discrete":
        return TensorSpec(
            "action",
            "int32",
            ("batch",),
            kind="discrete",
            classes=n,
            low=0,
            high=n - 1,
            description="action index (one-hot encoded inside the model)",
        )
    return TensorSpec("action", "float32", ("batch", n), low=-1.0, high=1.0)


def _linear(i: int, o: int) -> int:
    return i * o + o


def _block_linear(i: int, o: int, groups: int) -> int:
    return i * o // groups + o


def _conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def _mlp(i: int, units: int, layers: int) -> int:
    """Linear + RMSNorm layers."""
    total = 0
    for _ in range(layers):
        total += _linear(i, units) + units
        i = units
    return total


def embed_dim(config: Mapping[str, Any]) -> int:
    """Width of the encoder output the posterior reads."""
    width = int(config["units"]) if int(config["obs_dim"]) else 0
    if config["image"]:
        width += 4 * 4 * int(config["depth"]) * int(config["mults"][-1])
    return width


def param_count(config: Mapping[str, Any]) -> int:
    """Number of parameters of ``config`` (closed form, no torch).

    Counts encoder, RSSM, decoder, reward and continue heads, actor, critic and slow critic.
    """
    check_config(config)
    c = {k: config[k] for k in DEFAULTS}
    deter, hidden, units = int(c["deter"]), int(c["hidden"]), int(c["units"])
    stoch_flat = int(c["stoch"]) * int(c["classes"])
    blocks, kernel = int(c["blocks"]), int(c["kernel"])
    obs_dim, feat = int(c["obs_dim"]), stoch_flat + deter
    depths = [int(c["depth"]) * int(m) for m in c["mults"]]
    total = 0
    # encoder
    if obs_dim:
        total += _mlp(obs_dim, units, int(c["enc_layers"]))
    if c["image"]:
        channels = IMAGE_SHAPE[-1]
        for d in depths:
            total += _conv(channels, d, kernel) + d
            channels = d
    # RSSM core: three input projections, block-diagonal hidden layers and GRU
    total += _mlp(deter, hidden, 1) + _mlp(stoch_flat, hidden, 1)
    total += _mlp(int(c["action_dim"]), hidden, 1)
    width = deter + 3 * hidden * blocks
    for _ in range(int(c["dynlayers"])):
        total += _block_linear(width, deter, blocks) + deter
        width = deter
    total += _block_linear(width, 3 * deter, blocks)
    # posterior and prior logits
    total += _mlp(deter + embed_dim(c), hidden, int(c["obslayers"]))
    total += _linear(hidden, stoch_flat)
    total += _mlp(deter, hidden, int(c["imglayers"])) + _linear(hidden, stoch_flat)
    # decoder
    if obs_dim:
        total += _mlp(feat, units, int(c["dec_layers"])) + _linear(units, obs_dim)
    if c["image"]:
        last = depths[-1]
        space = 4 * 4 * last
        total += _block_linear(deter, space, int(c["bspace"]))
        total += _mlp(stoch_flat, 2 * units, 1) + _linear(2 * units, space) + last
        channels = last
        for d in reversed(depths[:-1]):
            total += _conv(channels, d, kernel) + d
            channels = d
        total += _conv(channels, IMAGE_SHAPE[-1], kernel)
    # heads
    total += _mlp(feat, units, int(c["head_layers"])) + _linear(units, int(c["bins"]))
    total += _mlp(feat, units, int(c["head_layers"])) + _linear(units, 1)
    # actor: bounded normal (mean and stddev) or categorical logits
    act = int(c["action_dim"])
    total += _mlp(feat, units, int(c["actor_layers"]))
    total += _linear(units, act) * (2 if c["action_kind"] == "continuous" else 1)
    # critic and its slow copy
    total += 2 * (_mlp(feat, units, int(c["critic_layers"])) + _linear(units, int(c["bins"])))
    return total
