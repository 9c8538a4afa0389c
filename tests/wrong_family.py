"""A deliberately wrong family for the contract-enforcement tests: image predictions declared
``[batch, 32, 32, 3]`` float32, produced as the ``fault`` config field says (``"none"``,
``"channels_first"`` ``[batch, 3, 32, 32]``, or ``"float64"``), and discrete int64 actions of
``CLASSES`` labels. Register it with ``Registry(entry_points=False, plugins=[WrongFamilyPlugin])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldflux_registry import FamilySpec, IOContract, TensorSpec
from worldflux_registry.hookspecs import hookimpl

CLASSES = 5
SIDE = 32


def contract(config: Mapping[str, Any]) -> IOContract:
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", 4)),),
        action=TensorSpec("action", "int64", ("batch",), kind="discrete", classes=CLASSES),
        state=(TensorSpec("h", "float32", ("batch", 8)),),
        predictions=(
            TensorSpec("image", "float32", ("batch", SIDE, SIDE, 3)),
            TensorSpec("reward", "float32", ("batch", 1)),
        ),
        targets=(TensorSpec("reward", "float32", ("batch", 1)),),
    )


SPEC = FamilySpec(
    name="wrongimg",
    summary="Image decoder whose outputs may break its contract (test fixture).",
    model="wrong_family:WrongImageModel",
    defaults={"fault": "none"},
    presets={
        "honest": {},
        "channels-first": {"fault": "channels_first"},
        "float64": {"fault": "float64"},
    },
    default_preset="honest",
    contract=contract,
    capabilities=frozenset({"encode", "transition", "decode", "rollout", "loss"}),
    version="0.0.1",
)


class WrongFamilyPlugin:
    """The plugin object (its hook returns `SPEC`)."""

    @staticmethod
    @hookimpl
    def worldflux_registry_families() -> list[FamilySpec]:
        return [SPEC]


def _model_class() -> type:
    import torch
    from torch import nn

    from worldflux_registry import LossOutput, ModelOutput, State, WorldModel

    class WrongImageModel(WorldModel):
        family = "wrongimg"
        capabilities = SPEC.capabilities

        def __init__(self, fault: str = "none") -> None:
            super().__init__()
            self.config = {"fault": fault}
            self.enc = nn.Linear(4, 8)
            self.act = nn.Embedding(CLASSES, 8)
            self.dec = nn.Linear(8, 3 * SIDE * SIDE)
            self.rew = nn.Linear(8, 1)

        def encode(self, obs, deterministic=False):
            observations, _ = self.observations(obs)
            return State({"h": torch.tanh(self.enc(observations["vector"]))})

        def transition(self, state, action, conditions=None, deterministic=False):
            labels = self.action_tensor(action)
            return State({"h": torch.tanh(state["h"] + self.act(labels))})

        def decode(self, state, conditions=None):
            flat = self.dec(state["h"])
            fault = self.config["fault"]
            if fault == "channels_first":
                image = flat.view(-1, 3, SIDE, SIDE)
            else:
                image = flat.view(-1, SIDE, SIDE, 3)
            if fault == "float64":
                image = image.double()
            return ModelOutput({"image": image, "reward": self.rew(state["h"])})

        def loss(self, batch: Mapping[str, Any]) -> LossOutput:
            return LossOutput(self.rew.weight.sum() * 0)

    return WrongImageModel


def __getattr__(name: str) -> Any:
    # The model class imports torch: built on first access, so the plugin stays torch-free.
    if name == "WrongImageModel":
        cls = _model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
