"""A small point-mass environment simulated with numpy, and helpers to train world models on it.

Shared by the family tests and ``examples/train_ci.py`` (which imports this file by path), so
there is one copy. Nothing here names a family: batches are keyed by contract names.

The environment: a point mass in the plane, ``obs = [x, y, vx, vy]`` (``"vector"``, 4 floats),
continuous force ``action`` in ``[-1, 1]^2``, reward ``1 - |position|``. Leaving the box
``|x|, |y| <= 1`` terminates the episode. Dynamics are deterministic, so a world model can learn
them exactly. ``render=True`` adds an ``"image"`` observation: a 64x64x3 uint8 picture of the
mass (a bright square) with a velocity tail.

Batch layout (one convention for every family): arrays ``[batch, time, ...]`` where step ``t``
holds observation ``o_t``, the action ``a_t`` taken after seeing it, and what that action
produced: ``reward[t]`` and ``continue[t]`` (0.0 when ``o_{t+1}`` is terminal). After a
termination the episode is absorbing: the observation freezes, reward and continue are 0, so
every sequence has the full length without padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ACTION_DIM",
    "IMAGE_SIZE",
    "OBS_DIM",
    "PointMassEnv",
    "collect_dataset",
    "copy_last_error",
    "fit",
    "iterate_batches",
    "one_step_prediction_error",
    "sample_batch",
    "to_torch",
]

OBS_DIM = 4
ACTION_DIM = 2
IMAGE_SIZE = 64
DT = 0.1
FORCE = 5.0
DRAG = 5.0
BOUND = 1.0
#: Observations are reported in metres of a 8 m wide arena (the simulation runs in a unit box);
#: at unit scale the reconstruction terms are too small next to DreamerV3's 1-nat free KL.
OBS_SCALE = 4.0


@dataclass
class PointMassEnv:
    """A deterministic 2-D point mass; ``reset`` and ``step`` work on a batch of envs at once."""

    batch: int = 1
    seed: int = 0
    render: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.state = np.zeros((self.batch, 4), np.float64)
        self.done = np.zeros(self.batch, bool)

    def reset(self) -> dict[str, np.ndarray]:
        """Start every env inside the box with a random position and velocity."""
        pos = self.rng.uniform(-0.5, 0.5, (self.batch, 2))
        vel = self.rng.normal(0.0, 0.2, (self.batch, 2))
        self.state = np.concatenate([pos, vel], -1)
        self.done = np.zeros(self.batch, bool)
        return self.observe()

    def observe(self) -> dict[str, np.ndarray]:
        """The current observations (``"vector"``, and ``"image"`` when rendering)."""
        obs = {"vector": (OBS_SCALE * self.state).astype(np.float32)}
        if self.render:
            obs["image"] = render(self.state)
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Apply ``action [batch, 2]``; return ``(obs, reward, continue)``, each per env."""
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        pos, vel = self.state[:, :2], self.state[:, 2:]
        vel = vel + DT * (FORCE * action - DRAG * vel)
        pos = pos + DT * vel
        new = np.concatenate([pos, vel], -1)
        live = ~self.done
        # Terminated envs are absorbing: they keep their state and earn nothing.
        self.state = np.where(live[:, None], new, self.state)
        outside = np.abs(self.state[:, :2]).max(-1) > BOUND
        reward = np.where(live, 1.0 - np.linalg.norm(self.state[:, :2], axis=-1), 0.0)
        self.done = self.done | outside
        cont = (~self.done).astype(np.float32)
        return self.observe(), reward.astype(np.float32), cont


def render(state: np.ndarray) -> np.ndarray:
    """64x64x3 uint8 frames of ``state [batch, 4]``: the mass in red, a velocity tail in green."""
    batch = state.shape[0]
    frames = np.zeros((batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    frames[..., 2] = 40
    scale = (IMAGE_SIZE - 1) / (2 * BOUND * 1.2)

    def pixel(xy: np.ndarray) -> np.ndarray:
        return np.clip(np.round((xy + 1.2 * BOUND) * scale), 0, IMAGE_SIZE - 1).astype(int)

    head = pixel(state[:, :2])
    tail = pixel(state[:, :2] - 0.5 * state[:, 2:])
    for i in range(batch):
        (hx, hy), (tx, ty) = head[i], tail[i]
        frames[i, max(ty - 1, 0) : ty + 2, max(tx - 1, 0) : tx + 2, 1] = 200
        frames[i, max(hy - 2, 0) : hy + 3, max(hx - 2, 0) : hx + 3, 0] = 255
    return frames


def collect_dataset(
    episodes: int = 256,
    length: int = 32,
    *,
    seed: int = 0,
    render: bool = False,
    smoothness: float = 0.5,
) -> dict[str, np.ndarray]:
    """Roll out a random smooth policy: arrays ``[episodes, length, ...]`` keyed by contract names.

    Keys: ``"vector"`` (float32 ``[.., 4]``), ``"image"`` (uint8 ``[.., 64, 64, 3]``, only with
    ``render``), ``"action"`` (float32 ``[.., 2]``), ``"reward"`` and ``"continue"`` (float32).
    Actions follow a clipped AR(1) process so trajectories move instead of jittering in place.
    """
    env = PointMassEnv(batch=episodes, seed=seed, render=render)
    rng = np.random.default_rng(seed + 1)
    obs = env.reset()
    keys = list(obs)
    steps: dict[str, list[np.ndarray]] = {k: [] for k in [*keys, "action", "reward", "continue"]}
    action = rng.uniform(-1, 1, (episodes, ACTION_DIM))
    for _ in range(length):
        action = np.clip(
            smoothness * action + (1 - smoothness) * rng.uniform(-1, 1, action.shape) * 2.0,
            -1.0,
            1.0,
        )
        for k in keys:
            steps[k].append(obs[k])
        steps["action"].append(action.astype(np.float32))
        obs, reward, cont = env.step(action)
        steps["reward"].append(reward)
        steps["continue"].append(cont)
    return {k: np.stack(v, axis=1) for k, v in steps.items()}


def sample_batch(
    dataset: Mapping[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
    *,
    keys: Sequence[str] | None = None,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Random episodes (and a random window of ``length`` steps) from ``dataset``."""
    keys = list(dataset) if keys is None else list(keys)
    episodes, total = next(iter(dataset.values())).shape[:2]
    idx = rng.integers(0, episodes, batch_size)
    length = total if length is None else length
    start = int(rng.integers(0, total - length + 1))
    return {k: dataset[k][idx, start : start + length] for k in keys}


def iterate_batches(
    dataset: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    keys: Sequence[str] | None = None,
    length: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of `sample_batch` draws."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_batch(dataset, batch_size, rng, keys=keys, length=length)


def to_torch(batch: Mapping[str, np.ndarray], device: Any = None) -> dict[str, Any]:
    """The batch as torch tensors (dtypes kept: uint8 images stay uint8)."""
    import torch

    return {k: torch.as_tensor(np.ascontiguousarray(v), device=device) for k, v in batch.items()}


def batch_keys(model: Any) -> list[str]:
    """The keys a model's ``loss`` reads: observation names, ``"action"``, target names."""
    contract = model.io_contract()
    keys = list(contract.observation_names) + [t.name for t in contract.targets]
    if contract.action is not None:
        keys.append("action")
    return keys


def fit(
    model: Any,
    dataset: Mapping[str, np.ndarray],
    steps: int,
    *,
    batch_size: int = 16,
    length: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    clip: float = 100.0,
    log_every: int = 0,
) -> list[float]:
    """Train ``model`` with Adam on batches from ``dataset``; return the loss of every step.

    Batches hold exactly the keys the model's contract names (checked with
    ``validate_batch_contract``), so this works for any family that implements ``loss``.
    """
    import torch

    torch.manual_seed(seed)
    keys = batch_keys(model)
    stream = iterate_batches(dataset, batch_size, seed=seed, keys=keys, length=length)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in range(steps):
        batch = to_torch(next(stream), device)
        if step == 0:
            model.validate_batch_contract(batch)
        out = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(float(out.loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            parts = " ".join(f"{k}={float(v.detach()):.3f}" for k, v in out.components.items())
            print(f"step {step:4d} loss {losses[-1]:.4f} {parts}", flush=True)
    model.eval()
    return losses


def _alive(batch: Mapping[str, Any], t: int) -> Any:
    """1.0 where the episode still runs at step ``t`` (``o_t`` is not past a termination)."""
    import torch

    cont = batch["continue"]
    return torch.ones_like(cont[:, 0]) if t == 0 else cont[:, t - 1]


def one_step_prediction_error(
    model: Any, batch: Mapping[str, Any], *, key: str = "vector", warmup: int = 4
) -> float:
    """MSE of the model's next-observation prediction after filtering at least ``warmup`` steps.

    For each step ``t >= warmup - 1`` the model filters ``o_0..o_t`` with ``encode``/``update``
    (mode, no sampling), imagines one step with ``transition(state, a_t)``, decodes and compares
    ``key`` with ``o_{t+1}``. Steps after a termination do not count. ``batch`` holds torch
    tensors ``[batch, time, ...]``.
    """
    import torch

    obs_keys = list(model.io_contract().observation_names)
    errors, weights = [], []
    with torch.no_grad():
        state = model.encode({k: batch[k][:, 0] for k in obs_keys}, deterministic=True)
        total = int(batch["action"].shape[1])
        for t in range(total - 1):
            if t >= 1:
                obs_t = {k: batch[k][:, t] for k in obs_keys}
                state = model.update(state, batch["action"][:, t - 1], obs_t, deterministic=True)
            if t + 1 < warmup:
                continue
            nxt = model.transition(state, batch["action"][:, t], deterministic=True)
            pred = model.decode(nxt).predictions[key]
            err = ((pred - batch[key][:, t + 1].float()) ** 2).mean(-1)
            live = _alive(batch, t)
            errors.append((err * live).sum())
            weights.append(live.sum())
    return float(torch.stack(errors).sum() / torch.stack(weights).sum().clamp(min=1))


def copy_last_error(batch: Mapping[str, Any], *, key: str = "vector", warmup: int = 4) -> float:
    """The same error for the copy-the-last-observation baseline (predict ``o_{t+1} = o_t``)."""
    import torch

    obs = batch[key].float()
    total = int(obs.shape[1])
    errors, weights = [], []
    for t in range(warmup - 1, total - 1):
        err = ((obs[:, t + 1] - obs[:, t]) ** 2).mean(-1)
        live = _alive(batch, t)
        errors.append((err * live).sum())
        weights.append(live.sum())
    return float(torch.stack(errors).sum() / torch.stack(weights).sum().clamp(min=1))
