"""TD-MPC2 family declaration: config defaults, presets, contract and parameter count (torch-free).

The presets follow the official model-size table of TD-MPC2 (Hansen, Su and Wang, ICLR 2024,
``tdmpc2/common/__init__.py``): ``sizeNm`` is the official ``model_size=N``. Parameter counts
here are for single-task models at the preset's own ``obs_dim`` / ``action_dim`` (the paper counts
multi-task models with task embeddings, so its numbers differ slightly).

Multi-task models (``tasks > 0``, as the official ``multitask`` config) learn a ``task_dim``
embedding per task and condition the encoder, dynamics, reward, policy, termination and Q heads on
it; the task id is the side condition ``task`` (``wf.cond.task``, int64 ``[batch]``). Task ``i``
uses the first ``action_dims[i]`` of the ``action_dim`` actions (the official ``_action_masks``);
``action_dims=None`` gives every task all of them.

Episodic models (``episodic=True``) add the official termination head; their contract predicts
``continue`` and their loss reads the ``continue`` target.

Derived values follow the official parser and agent (`task_dim`, `discounts`,
`planner_iterations`); a field left ``None`` means "derive it as the official code does".
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
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
    "PRESETS",
    "action_dims",
    "check_config",
    "contract",
    "discount_for",
    "discounts",
    "param_count",
    "plan_agent",
    "plan_noise",
    "planner_iterations",
    "task_dim",
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
    "termination_coef": 1.0,
    "tau": 0.01,
    "policy_coef": 0.0,
    "entropy_coef": 1e-4,
    # Discount: None follows the official episode-length rule (`discount_for`); a float wins.
    "discount": None,
    "episode_length": 500,
    "episode_lengths": None,  # multi-task: one per task (None: episode_length for every task)
    "discount_denom": 5,
    "discount_min": 0.95,
    "discount_max": 0.995,
    # Optimisation (read by TDMPC2WorldModel.param_groups).
    "enc_lr_scale": 0.3,
    # Multi-task: number of tasks (0: single-task), task embedding size (None: the official
    # parser's rule, see `task_dim`) and per-task action sizes (None: action_dim for all).
    "tasks": 0,
    "task_dim": None,
    "action_dims": None,
    # Official model_size of the preset (only read by the task_dim rule); None for custom sizes.
    "model_size": None,
    # Episodic tasks: a termination head (official cfg.episodic).
    "episodic": False,
    # MPPI planner (official config.yaml); plan_step reads these.
    "horizon": 3,
    "iterations": 6,
    "num_samples": 512,
    "num_elites": 64,
    "num_pi_trajs": 24,
    "temperature": 0.5,
    "min_std": 0.05,
    "max_std": 2.0,
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
    "size1m": {
        "enc_dim": 256,
        "mlp_dim": 384,
        "latent_dim": 128,
        "num_enc_layers": 2,
        "num_q": 2,
        "model_size": 1,
    },
    "size5m": {
        "enc_dim": 256,
        "mlp_dim": 512,
        "latent_dim": 512,
        "num_enc_layers": 2,
        "model_size": 5,
    },
    "size19m": {
        "enc_dim": 1024,
        "mlp_dim": 1024,
        "latent_dim": 768,
        "num_enc_layers": 3,
        "model_size": 19,
    },
    "size48m": {
        "enc_dim": 1792,
        "mlp_dim": 1792,
        "latent_dim": 768,
        "num_enc_layers": 4,
        "model_size": 48,
    },
    "size317m": {
        "enc_dim": 4096,
        "mlp_dim": 4096,
        "latent_dim": 1376,
        "num_enc_layers": 5,
        "num_q": 8,
        "model_size": 317,
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
        Capability.PLAN,
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
    "episode_length",
    "horizon",
    "iterations",
    "num_samples",
    "num_elites",
)


def task_dim(config: Mapping[str, Any]) -> int:
    """Size of the task embedding: 0 for single-task models.

    ``task_dim=None`` follows the official parser: 96 for mt80 (``tasks == 80``) and for model
    sizes 1 and 317, else 64.
    """
    if not config["tasks"]:
        return 0
    if config["task_dim"] is not None:
        return int(config["task_dim"])
    return 96 if config["tasks"] == 80 or config.get("model_size") in (1, 317) else 64


def action_dims(config: Mapping[str, Any]) -> list[int]:
    """Actions each task uses (the first ``action_dims[i]``); one entry for single-task."""
    if config["action_dims"] is not None:
        return [int(d) for d in config["action_dims"]]
    return [config["action_dim"]] * max(config["tasks"], 1)


def discount_for(config: Mapping[str, Any], episode_length: int) -> float:
    """The official discount heuristic for an episode length (``TDMPC2._get_discount``)."""
    frac = episode_length / config["discount_denom"]
    return float(min(max((frac - 1) / frac, config["discount_min"]), config["discount_max"]))


def discounts(config: Mapping[str, Any]) -> list[float]:
    """Discount of every task (one entry for single-task), as the official agent derives it.

    An explicit ``discount`` wins; otherwise each task's episode length (``episode_lengths``,
    else ``episode_length``) goes through `discount_for`.
    """
    if config["discount"] is not None:
        return [float(config["discount"])] * max(config["tasks"], 1)
    lengths = config["episode_lengths"]
    if lengths is None:
        lengths = [config["episode_length"]] * max(config["tasks"], 1)
    return [discount_for(config, int(n)) for n in lengths]


def planner_iterations(config: Mapping[str, Any]) -> int:
    """MPPI iterations actually run: the official agent adds 2 when ``action_dim >= 20``."""
    return int(config["iterations"]) + 2 * int(config["action_dim"] >= 20)


def _int_list(config: Mapping[str, Any], key: str, length: int, lo: int, hi: int | None) -> None:
    value = config[key]
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) == length
    ok = ok and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        for v in value
    )
    if not ok:
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(
            f"tdmpc2 {key} must be None or a list of {length} ints {bound} (one per task), "
            f"got {value!r}",
            family=FAMILY,
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
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(
            f"tdmpc2 dropout must be a number in [0, 1), got {dropout!r}", family=FAMILY
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
    td = config["task_dim"]
    if td is not None and (isinstance(td, bool) or not isinstance(td, int) or td < 1):
        raise ConfigError(f"tdmpc2 task_dim must be None or an int >= 1, got {td!r}", family=FAMILY)
    _int_list(config, "action_dims", tasks, 1, config["action_dim"])
    _int_list(config, "episode_lengths", tasks, 1, None)
    if config["action_dims"] is not None and not tasks:
        raise ConfigError("tdmpc2 action_dims is for multi-task models (tasks > 0)", family=FAMILY)
    if config["episode_lengths"] is not None and not tasks:
        raise ConfigError(
            "tdmpc2 episode_lengths is for multi-task models (tasks > 0)",
            hint="single-task models take episode_length",
            family=FAMILY,
        )
    if not isinstance(config["episodic"], bool):
        raise ConfigError(
            f"tdmpc2 episodic must be a bool, got {config['episodic']!r}", family=FAMILY
        )
    pi_trajs = config["num_pi_trajs"]
    if isinstance(pi_trajs, bool) or not isinstance(pi_trajs, int) or pi_trajs < 0:
        raise ConfigError(
            f"tdmpc2 num_pi_trajs must be an int >= 0, got {pi_trajs!r}", family=FAMILY
        )
    if not pi_trajs < config["num_samples"] or not config["num_elites"] <= config["num_samples"]:
        raise ConfigError(
            f"tdmpc2 needs num_pi_trajs < num_samples and num_elites <= num_samples, got "
            f"{pi_trajs}, {config['num_samples']}, {config['num_elites']}",
            family=FAMILY,
        )


#: Parity tolerance (rtol, atol) of the two-hot readouts (reward, value): ``symexp`` of a sum over
#: symlog bins up to ``vmax = 10`` multiplies an error of the sum by up to ``e**10``, so the
#: float32 noise of two runtimes (1e-6 on a latent after 16 free-running steps) reaches 2e-5 on
#: these outputs while every other output stays within the default tolerance.
READOUT_TOLERANCE: Final = (1e-4, 1e-4)
#: Parity tolerance of the planner's outputs: MPPI weighs its elites by
#: ``exp(temperature * value)``, values summed from the two-hot readouts above, so their float32
#: noise moves the mean, std and action by up to ~1e-4 (ONNX Runtime CPU against torch on the
#: official single-task reference checkpoint, random warm starts); a different elite set moves
#: them by ~1e-1.
PLAN_TOLERANCE: Final = (1e-3, 1e-3)


def contract(config: Mapping[str, Any]) -> IOContract:
    """The I/O contract of a TD-MPC2 model with ``config``.

    State: ``latent`` (the SimNorm latent) and ``reward`` (the reward the model predicts for the
    transition that produced this latent; 0 after ``encode``). Predictions: ``reward``,
    ``value`` (mean of the Q ensemble at the policy prior's mean action) and ``policy_mean``;
    episodic models also predict ``continue`` (1 - the termination head's probability) and take
    it as a training target (0.0 where the step into ``o_{t+1}`` terminated).
    """
    check_config(config)
    obs_dim, action_dim, latent_dim = config["obs_dim"], config["action_dim"], config["latent_dim"]
    reward = TensorSpec(
        "reward",
        "float32",
        ("batch",),
        description="reward of the step into this state",
        tolerance=READOUT_TOLERANCE,
    )
    episodic = (
        (
            TensorSpec(
                "continue",
                "float32",
                ("batch",),
                low=0.0,
                high=1.0,
                description="1 - termination probability of this state (episodic models)",
            ),
        )
        if config["episodic"]
        else ()
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
                "value",
                "float32",
                ("batch",),
                description="mean Q at the policy's mean action",
                tolerance=READOUT_TOLERANCE,
            ),
            TensorSpec(
                "policy_mean",
                "float32",
                ("batch", action_dim),
                low=-1.0,
                high=1.0,
                description="tanh of the policy prior's mean",
            ),
            *episodic,
        ),
        targets=(TensorSpec("reward", "float32", ("batch",)), *episodic),
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
        noise=plan_noise(config),
        agent=plan_agent(config),
    )


def plan_noise(config: Mapping[str, Any]) -> tuple[NoiseSpec, ...]:
    """Every random draw of one MPPI planning step (`worldflux_tdmpc2.planner`), graph ``plan``.

    Condition extras ``wf.noise.plan_<name>``, in the official draw order: ``pi_eps``
    ``[batch, horizon, num_pi_trajs, action_dim]`` normal, ``sample_eps``
    ``[batch, iterations, horizon, num_samples - num_pi_trajs, action_dim]`` normal,
    ``value_eps`` ``[batch, iterations, num_samples, action_dim]`` normal, ``q_heads``
    ``[batch, iterations, 2]`` int64 (``randperm(num_q)[:2]``), ``gumbel_exp``
    ``[batch, num_elites]`` Exponential(1) and ``action_eps`` ``[batch, action_dim]`` normal
    (exploration, read only when ``deterministic=False``).
    """
    h, i, n = config["horizon"], planner_iterations(config), config["num_samples"]
    p, k, a = config["num_pi_trajs"], config["num_elites"], config["action_dim"]
    graphs = ("plan",)
    return (
        NoiseSpec("plan_pi_eps", ("batch", h, p, a), graphs, "normal"),
        NoiseSpec("plan_sample_eps", ("batch", i, h, n - p, a), graphs, "normal"),
        NoiseSpec("plan_value_eps", ("batch", i, n, a), graphs, "normal"),
        NoiseSpec("plan_q_heads", ("batch", i, 2), graphs, "permutation", "int64", config["num_q"]),
        NoiseSpec("plan_gumbel_exp", ("batch", k), graphs, "exponential"),
        NoiseSpec("plan_action_eps", ("batch", a), graphs, "normal"),
    )


def plan_agent(config: Mapping[str, Any]) -> AgentSpec:
    """The agent step: `TDMPC2WorldModel.plan_step` (MPPI) on an encoded state.

    Carry ``plan_mean`` ``[batch, horizon, action_dim]`` (the warm start; zeros at the first
    step); outputs ``plan_action`` ``[batch, action_dim]`` in [-1, 1] and ``plan_std``. The
    exploration noise ``plan_action_eps`` is scaled by ``plan_std[:, 0]``, so its zeros give
    the ``deterministic=True`` (official ``eval_mode``) action exactly. ``plan_elites`` and
    ``plan_elite_values`` ``[batch, iterations, num_elites]`` record each iteration's elites
    (best first) and their values: the step's `AgentSpec.selection`, which parity compares to
    tell a near-tie between two elites from a wrong planner.
    """
    h, a = config["horizon"], config["action_dim"]
    elites = ("batch", planner_iterations(config), config["num_elites"])
    return AgentSpec(
        graph="plan",
        action="plan_action",
        carry=(
            TensorSpec(
                "plan_mean",
                "float32",
                ("batch", h, a),
                low=-1.0,
                high=1.0,
                description="MPPI mean: the warm start of the next step (zeros at t0)",
                tolerance=PLAN_TOLERANCE,
            ),
        ),
        outputs=(
            TensorSpec(
                "plan_action",
                "float32",
                ("batch", a),
                low=-1.0,
                high=1.0,
                description="the action to take",
                tolerance=PLAN_TOLERANCE,
            ),
            TensorSpec(
                "plan_std",
                "float32",
                ("batch", h, a),
                description="final MPPI standard deviation",
                tolerance=PLAN_TOLERANCE,
            ),
            TensorSpec(
                "plan_elites",
                "int64",
                elites,
                kind="discrete",
                classes=config["num_samples"],
                description="elite candidates of each iteration, best first",
            ),
            TensorSpec(
                "plan_elite_values",
                "float32",
                elites,
                description="their estimated returns",
                tolerance=PLAN_TOLERANCE,
            ),
        ),
        explore=("plan_action_eps",),
        selection=("plan_elites", "plan_elite_values"),
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
    emb = task_dim(config)
    encoder = _mlp([obs + emb] + [enc] * max(config["num_enc_layers"] - 1, 1) + [lat], True)
    dynamics = _mlp([lat + act + emb, mlp, mlp, lat], True)
    reward = _mlp([lat + act + emb, mlp, mlp, bins], False)
    policy = _mlp([lat + emb, mlp, mlp, 2 * act], False)
    q = _mlp([lat + act + emb, mlp, mlp, bins], False)
    termination = _mlp([lat + emb, mlp, mlp, 1], False) if config["episodic"] else 0
    embedding = config["tasks"] * emb
    total = encoder + dynamics + reward + policy + termination + config["num_q"] * q + embedding
    return int(total)
