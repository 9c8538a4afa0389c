"""TD-MPC2 family declaration: config defaults, presets, contract and parameter count (torch-free).

The presets follow the official model-size table of TD-MPC2 (Hansen, Su and Wang, ICLR 2024,
``tdmpc2/common/__init__.py``): ``sizeNm`` is the official ``model_size=N``. Parameter counts
here are for single-task models at the preset's own ``obs_dim`` / ``action_dim`` (the paper counts
multi-task models with task embeddings, so its numbers differ slightly).

Multi-task models (``tasks > 0``, as the official ``multitask`` config) learn a ``task_dim``
embedding per task and condition the encoder, dynamics, reward, policy and Q heads on it; the task
id is the side condition ``task`` (``wf.cond.task``, int64 ``[batch]``). The official per-task
action masks are not modelled: every task uses all ``action_dim`` actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import Any, Final

from worldflux_registry import Capability, ConfigError, IOContract, TensorSpec

__all__ = [
    "CAPABILITIES",
    "DEFAULTS",
    "FAMILY",
    "PRESETS",
    "contract",
    "param_count",
]

FAMILY: Final = "tdmpc2"

#: Every config field with its default (the official ``config.yaml`` values, model_size 5).
DEFAULTS: Final[dict[str, Any]] = {
    # Observation / action sizes: walker-walk of the DeepMind Control Suite.
    "obs_dim": 24,
    "action_dim": 6,
    # Architecture (official model_size 5).
    "enc_dim": 256,
    "mlp_dim": 512,
    "latent_dim": 512,
    "num_enc_layers": 2,
    "num_q": 5,
    "simnorm_dim": 8,
    "dropout": 0.01,
    "num_bins": 101,
    "vmin": -10.0,
    "vmax": 10.0,
    "log_std_min": -10.0,
    "log_std_max": 2.0,
    # Loss.
    "rho": 0.5,
    "consistency_coef": 20.0,
    "reward_coef": 0.1,
    "value_coef": 0.1,
    "discount": 0.99,
    "tau": 0.01,
    "policy_coef": 0.0,
    "entropy_coef": 1e-4,
    # Optimisation (read by TDMPC2WorldModel.param_groups).
    "enc_lr_scale": 0.3,
    # Multi-task: number of tasks (0: single-task) and task embedding size (official 96).
    "tasks": 0,
    "task_dim": 96,
}

_CI: Final[dict[str, Any]] = {
    "obs_dim": 4,
    "action_dim": 2,
    "enc_dim": 64,
    "mlp_dim": 64,
    "latent_dim": 64,
    "num_enc_layers": 2,
    "num_q": 2,
}
#: Preset name -> overrides. ``ci`` is tiny (tests), ``ci-mt`` its 3-task version; the rest are
#: the official size table.
PRESETS: Final[dict[str, dict[str, Any]]] = {
    "ci": dict(_CI),
    "ci-mt": {**_CI, "tasks": 3, "task_dim": 8},
    "size1m": {"enc_dim": 256, "mlp_dim": 384, "latent_dim": 128, "num_enc_layers": 2, "num_q": 2},
    "size5m": {"enc_dim": 256, "mlp_dim": 512, "latent_dim": 512, "num_enc_layers": 2},
    "size19m": {"enc_dim": 1024, "mlp_dim": 1024, "latent_dim": 768, "num_enc_layers": 3},
    "size48m": {"enc_dim": 1792, "mlp_dim": 1792, "latent_dim": 768, "num_enc_layers": 4},
    "size317m": {
        "enc_dim": 4096,
        "mlp_dim": 4096,
        "latent_dim": 1376,
        "num_enc_layers": 5,
        "num_q": 8,
    },
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
        Capability.VALUE,
        Capability.POLICY,
        Capability.VECTOR_OBS,
        Capability.CONTINUOUS_ACTIONS,
    }
)

_POSITIVE_INTS: Final = (
    "obs_dim",
    "action_dim",
    "enc_dim",
    "mlp_dim",
    "latent_dim",
    "num_enc_layers",
    "num_q",
    "simnorm_dim",
    "task_dim",
)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise `ConfigError` for a config no TD-MPC2 model can be built from."""
    for key in _POSITIVE_INTS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"tdmpc2 {key} must be a positive int, got {value!r}", family=FAMILY)
    if config["latent_dim"] % config["simnorm_dim"]:
        raise ConfigError(
            f"tdmpc2 latent_dim {config['latent_dim']} is not a multiple of "
            f"simnorm_dim {config['simnorm_dim']}",
            hint="SimNorm splits the latent into groups of simnorm_dim",
            family=FAMILY,
        )
    tasks = config["tasks"]
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0:
        raise ConfigError(
            f"tdmpc2 tasks must be an int >= 0 (0: single-task), got {tasks!r}", family=FAMILY
        )
    if config["num_q"] < 2:
        raise ConfigError(
            f"tdmpc2 num_q must be >= 2, got {config['num_q']}",
            hint="TD targets take the minimum of two randomly chosen Q heads",
            family=FAMILY,
        )
    if not isinstance(config["num_bins"], int) or config["num_bins"] < 2:
        raise ConfigError(
            f"tdmpc2 num_bins must be an int >= 2, got {config['num_bins']!r}",
            hint="reward and value heads regress onto num_bins two-hot bins",
            family=FAMILY,
        )
    if not config["vmin"] < config["vmax"]:
        raise ConfigError(
            f"tdmpc2 needs vmin < vmax, got {config['vmin']} and {config['vmax']}", family=FAMILY
        )


def contract(config: Mapping[str, Any]) -> IOContract:
    """The I/O contract of a TD-MPC2 model with ``config``.

    State: ``latent`` (the SimNorm latent) and ``reward`` (the reward the model predicts for the
    transition that produced this latent; 0 after ``encode``). Predictions: ``reward``,
    ``value`` (mean of the Q ensemble at the policy prior's mean action) and ``policy_mean``.
    """
    check_config(config)
    obs_dim, action_dim, latent_dim = config["obs_dim"], config["action_dim"], config["latent_dim"]
    reward = TensorSpec(
        "reward", "float32", ("batch",), description="reward of the step into this state"
    )
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", obs_dim)),),
        action=TensorSpec("action", "float32", ("batch", action_dim), low=-1.0, high=1.0),
        state=(
            TensorSpec(
                "latent",
                "float32",
                ("batch", latent_dim),
                low=0.0,
                high=1.0,
                description=f"SimNorm latent: softmax over groups of {config['simnorm_dim']}",
            ),
            reward,
        ),
        predictions=(
            reward,
            TensorSpec(
                "value", "float32", ("batch",), description="mean Q at the policy's mean action"
            ),
            TensorSpec(
                "policy_mean",
                "float32",
                ("batch", action_dim),
                low=-1.0,
                high=1.0,
                description="tanh of the policy prior's mean",
            ),
        ),
        targets=(TensorSpec("reward", "float32", ("batch",)),),
        conditions=(
            TensorSpec(
                "task",
                "int64",
                ("batch",),
                kind="discrete",
                classes=config["tasks"],
                description="task id of each sample (multi-task models)",
            ),
        )
        if config["tasks"]
        else (),
    )


def _normed_linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out + 2 * fan_out  # weight, bias, LayerNorm affine


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _mlp(dims: list[int], last_normed: bool) -> int:
    hidden = sum(_normed_linear(a, b) for a, b in pairwise(dims[:-1]))
    last = _normed_linear if last_normed else _linear
    return hidden + last(dims[-2], dims[-1])


def param_count(config: Mapping[str, Any]) -> int:
    """Trainable parameters of a TD-MPC2 model with ``config`` (the target Q copy excluded)."""
    check_config(config)
    obs, act, lat = config["obs_dim"], config["action_dim"], config["latent_dim"]
    enc, mlp, bins = config["enc_dim"], config["mlp_dim"], config["num_bins"]
    # Multi-task models feed the task embedding into every head.
    emb = config["task_dim"] if config["tasks"] else 0
    encoder = _mlp([obs + emb] + [enc] * max(config["num_enc_layers"] - 1, 1) + [lat], True)
    dynamics = _mlp([lat + act + emb, mlp, mlp, lat], True)
    reward = _mlp([lat + act + emb, mlp, mlp, bins], False)
    policy = _mlp([lat + emb, mlp, mlp, 2 * act], False)
    q = _mlp([lat + act + emb, mlp, mlp, bins], False)
    embedding = config["tasks"] * emb
    return int(encoder + dynamics + reward + policy + config["num_q"] * q + embedding)
