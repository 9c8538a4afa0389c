"""The mymlp family as the registry sees it: config, presets, contract, hook. No torch here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldflux_registry import Capability, FamilySpec, IOContract, NoiseSpec, TensorSpec, hookimpl

#: Every config field with its default; presets and user overrides may only set these.
DEFAULTS: dict[str, Any] = {"obs_dim": 4, "action_dim": 2, "hidden": 64, "latent_dim": 16}

#: Preset name -> overrides of DEFAULTS.
PRESETS: dict[str, dict[str, Any]] = {"tiny": {"hidden": 32, "latent_dim": 8}, "base": {}}

#: What every mymlp model can do (the model class declares the same set).
CAPABILITIES = frozenset(
    {
        Capability.ENCODE,
        Capability.TRANSITION,
        Capability.UPDATE,
        Capability.DECODE,
        Capability.ROLLOUT,
        Capability.LOSS,
        Capability.REWARD,
        Capability.STOCHASTIC,
        Capability.VECTOR_OBS,
        Capability.CONTINUOUS_ACTIONS,
    }
)


def contract(config: Mapping[str, Any]) -> IOContract:
    """Vector observations in, a Gaussian latent state, observation and reward predictions out."""
    obs, act, latent = config["obs_dim"], config["action_dim"], config["latent_dim"]
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", obs)),),
        action=TensorSpec("action", "float32", ("batch", act), low=-1.0, high=1.0),
        state=(TensorSpec("latent", "float32", ("batch", latent)),),
        predictions=(
            TensorSpec("vector", "float32", ("batch", obs)),
            TensorSpec("reward", "float32", ("batch",)),
        ),
        # transition() samples the next latent; the sample's standard-normal noise is an input.
        noise=(
            NoiseSpec(
                "transition", ("batch", latent), graphs=("transition",), distribution="normal"
            ),
        ),
        targets=(TensorSpec("reward", "float32", ("batch",)),),
    )


def param_count(config: Mapping[str, Any]) -> int:
    """Parameters of a model with ``config``, without building it."""
    obs, act = config["obs_dim"], config["action_dim"]
    hidden, latent = config["hidden"], config["latent_dim"]

    def mlp(fan_in: int, fan_out: int) -> int:
        return fan_in * hidden + hidden + hidden * fan_out + fan_out

    encoder = mlp(obs, latent)
    dynamics = mlp(latent + act, 2 * latent)  # mean and log std
    fuse = 2 * latent * latent + latent
    decoder = mlp(latent, obs)
    reward = mlp(latent, 1)
    return encoder + dynamics + fuse + decoder + reward


@hookimpl
def worldflux_registry_families() -> list[FamilySpec]:
    """Return the mymlp family."""
    return [
        FamilySpec(
            name="mymlp",
            summary="Minimal MLP world model with a Gaussian latent (plugin template)",
            # Imported only when a model is built.
            model="worldflux_mymlp.model:MyMLPWorldModel",
            defaults=DEFAULTS,
            presets=PRESETS,
            default_preset="tiny",
            contract=contract,
            capabilities=CAPABILITIES,
            param_count=param_count,
        )
    ]
