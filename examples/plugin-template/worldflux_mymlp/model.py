"""The mymlp world model: MLP encoder, Gaussian MLP dynamics, a learned filter and MLP heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldflux_registry import ConditionPayload, LossOutput, ModelOutput, State, WorldModel

from . import spec


def _mlp(fan_in: int, hidden: int, fan_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(fan_in, hidden), nn.SiLU(), nn.Linear(hidden, fan_out))


class MyMLPWorldModel(WorldModel):
    """State ``latent``; ``transition`` samples it, ``update`` fuses prior and observation.

    ``loss`` reads ``vector [B, T, obs_dim]``, ``action [B, T, action_dim]`` and
    ``reward [B, T]``, where ``action[:, t]`` is taken after ``vector[:, t]`` and
    ``reward[:, t]`` is what it earned.
    """

    family = "mymlp"
    capabilities = spec.CAPABILITIES

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = {**spec.DEFAULTS, **config}  # JSON-serializable: saved in checkpoints
        obs, act = self.config["obs_dim"], self.config["action_dim"]
        hidden, latent = self.config["hidden"], self.config["latent_dim"]
        self.encoder = _mlp(obs, hidden, latent)
        self.dynamics = _mlp(latent + act, hidden, 2 * latent)
        self.fuse = nn.Linear(2 * latent, latent)
        self.decoder = _mlp(latent, hidden, obs)
        self.reward_head = _mlp(latent, hidden, 1)

    # Steps take and return only contract tensors and have no data-dependent branches, so the
    # ONNX exporter can trace them.
    def _prior(self, z: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        delta, raw_std = self.dynamics(torch.cat([z, action], -1)).chunk(2, -1)
        return z + delta, F.softplus(raw_std) + 0.01

    def _posterior(self, prior_mean: Tensor, vector: Tensor) -> Tensor:
        # Anchored on the observation so that long filtering runs cannot drift.
        embed = self.encoder(vector)
        return embed + self.fuse(torch.cat([prior_mean, embed], -1))

    def encode(self, obs: Any, deterministic: bool = False) -> State:
        """Latent of the first observation (no prior yet, so just the encoder)."""
        tensors, _ = self.observations(obs)
        return State({"latent": self.encoder(tensors["vector"])})

    def transition(
        self,
        state: State,
        action: Any,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Sample the next latent; the noise comes from ``wf.noise.transition`` when given."""
        mean, std = self._prior(state["latent"], self.action_tensor(action))
        if deterministic:
            return State({"latent": mean})
        eps = self.noise("transition", conditions, mean.shape[0], device=mean.device)
        return State({"latent": mean + std * eps})

    def update(
        self,
        state: State,
        action: Any,
        obs: Any,
        conditions: ConditionPayload | None = None,
        deterministic: bool = False,
    ) -> State:
        """Filter: the new observation's embedding, corrected by the prior mean after ``action``."""
        tensors, _ = self.observations(obs)
        mean, _ = self._prior(state["latent"], self.action_tensor(action))
        return State({"latent": self._posterior(mean, tensors["vector"])})

    def decode(self, state: State, conditions: ConditionPayload | None = None) -> ModelOutput:
        """Reconstructed observation and the reward earned on arriving in this state."""
        z = state["latent"]
        reward = self.reward_head(z).squeeze(-1)
        return ModelOutput(predictions={"vector": self.decoder(z), "reward": reward})

    def loss(self, batch: Mapping[str, Tensor]) -> LossOutput:
        """Reconstruction + reward regression + Gaussian NLL of each posterior under its prior."""
        vector, action, reward = batch["vector"], batch["action"], batch["reward"]
        z = self.encoder(vector[:, 0])
        recon = F.mse_loss(self.decoder(z), vector[:, 0])
        reward_loss = vector.new_zeros(())
        prior_loss = vector.new_zeros(())
        steps = vector.shape[1] - 1
        for t in range(steps):
            mean, std = self._prior(z, action[:, t])
            z = self._posterior(mean, vector[:, t + 1])
            out = self.decode(State({"latent": z})).predictions
            recon = recon + F.mse_loss(out["vector"], vector[:, t + 1])
            reward_loss = reward_loss + F.mse_loss(out["reward"], reward[:, t])
            nll = 0.5 * ((z.detach() - mean) / std) ** 2 + std.log()
            prior_loss = prior_loss + nll.mean()
        components = {
            "reconstruction": recon / (steps + 1),
            "reward": reward_loss / steps,
            "prior": 0.1 * prior_loss / steps,
        }
        total = components["reconstruction"] + components["reward"] + components["prior"]
        return LossOutput(loss=total, components=components, metrics={})
