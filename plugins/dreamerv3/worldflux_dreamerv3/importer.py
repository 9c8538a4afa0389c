"""Import an official DreamerV3 ``elements`` checkpoint (danijar/dreamerv3 @ e3f0224).

``import_checkpoint(folder, config)`` reads ``folder/latest`` (the name of the ``<stamp>/`` save
folder), checks that save is complete (``done``), unpickles ``agent.pkl`` with an allow-list
unpickler that admits only the numpy globals needed to rebuild arrays, infers the model config
from tensor shapes, builds a `DreamerV3WorldModel` and copies every network tensor into it.
Every source tensor is accounted for: ``mapped`` to a model parameter or ``dropped`` with a
reason; an unknown tensor is an error.

What the checkpoint cannot tell is taken from ``config`` (``KEY=VALUE`` strings, as
``--config KEY=VALUE`` on the command line): ``action_kind`` (``continuous`` or ``discrete``) is
required; ``stoch`` (default 32, the official value at every size) splits the latent width into
``stoch x classes``; ``unimix``, ``free_nats``, ``horizon``, ``contdisc``, ``minstd`` and
``maxstd`` default to the official values.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from worldflux_registry import CheckpointError, ImportedCheckpoint

from . import spec

__all__ = ["OFFICIAL_COMMIT", "SOURCE_FORMAT", "import_checkpoint", "read_agent_pickle"]

SOURCE_FORMAT: Final = "dreamerv3-elements"
#: The official commit whose computation the imported model reproduces.
OFFICIAL_COMMIT: Final = "e3f0224"

#: The only globals an ``agent.pkl`` may name: what numpy needs to rebuild its arrays.
ALLOWED_GLOBALS: Final = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)

#: Config fields the checkpoint's tensors cannot tell, which ``config`` may set.
_SETTABLE: Final = (
    "action_kind",
    "action_dim",
    "stoch",
    "unimix",
    "free_nats",
    "horizon",
    "contdisc",
    "minstd",
    "maxstd",
)
_OFFICIAL_STOCH: Final = 32
_STAMP: Final = re.compile(r"^[A-Za-z0-9_.-]+$")


def _numpy_global(module: str, name: str) -> Any:
    import numpy as np

    if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
        return getattr(np, name)
    # numpy >= 2 names the module numpy._core; numpy 1.x pickles it as numpy.core.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray._reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler admitting only `ALLOWED_GLOBALS`; any other global is a `CheckpointError`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise CheckpointError(
                f"agent.pkl refers to the global {module}.{name}, which is not allowed",
                hint="an official DreamerV3 agent.pkl holds only numpy arrays and ints; "
                "the file may be tampered with or not an elements checkpoint",
            )
        return _numpy_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            "agent.pkl uses pickle persistent ids, which an elements checkpoint never does"
        )


def _plain_file(path: Path, what: str) -> Path:
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(
            f"{what} {str(path)!r} is missing or not a regular file",
            hint="pass the elements checkpoint folder (with 'latest' and '<stamp>/agent.pkl')",
        )
    return path


def _save_folder(source: Path) -> Path:
    """The ``<stamp>/`` folder ``source/latest`` names, checked to be a plain child folder."""
    if not source.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(source)!r} does not exist or is not a folder",
            hint="pass the elements checkpoint folder (with 'latest' and '<stamp>/agent.pkl')",
        )
    latest = _plain_file(source / "latest", "checkpoint file")
    name = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not name or name in (".", "..") or not _STAMP.match(name):
        raise CheckpointError(
            f"{str(latest)!r} names {name!r}, not a plain folder name inside the checkpoint",
            hint="'latest' must hold the name of a <stamp> folder next to it",
        )
    folder = source / name
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{str(latest)!r} names {name!r}, which is not a folder there")
    if folder.resolve().parent != source.resolve():
        raise CheckpointError(f"{str(folder)!r} escapes the checkpoint folder {str(source)!r}")
    if not (folder / "done").is_file():
        raise CheckpointError(
            f"save {str(folder)!r} has no 'done' marker: it was not completely written",
            hint="wait for the save to finish or point 'latest' at a complete one",
        )
    return folder


def read_agent_pickle(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """``(data, "sha256:<hex>")`` of an ``agent.pkl``, unpickled with the numpy-only allow-list.

    Raises:
        CheckpointError: a global outside `ALLOWED_GLOBALS` (named ``module.name``), a corrupt
            file, or data that is not ``{"params": {name: ndarray}, ...}``.
    """
    import numpy as np

    data_bytes = _plain_file(Path(path), "agent file").read_bytes()
    digest = "sha256:" + hashlib.sha256(data_bytes).hexdigest()
    try:
        data = _NumpyOnlyUnpickler(io.BytesIO(data_bytes)).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"agent.pkl {str(path)!r} could not be read: {exc!r}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise CheckpointError(
            f"agent.pkl {str(path)!r} is not an agent save ({{'params': {{...}}, ...}})"
        )
    for key, value in data["params"].items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"agent.pkl entry params/{key!r} is not a named numpy array")
    return data, digest


# -- config ------------------------------------------------------------------------------------


def _parse(key: str, value: Any) -> Any:
    default = spec.DEFAULTS[key]
    text = str(value).strip()
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise CheckpointError(
            f"config {key}={text!r} is not a valid {type(default).__name__}",
            hint=f"pass --config {key}=<{type(default).__name__}>",
        ) from None
    return text


def _user_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(_SETTABLE))
    if unknown:
        raise CheckpointError(
            f"config fields {unknown} cannot be set when importing (they are read off the "
            "checkpoint's tensors)",
            hint="settable: " + ", ".join(_SETTABLE),
        )
    out = {k: _parse(k, v) for k, v in config.items()}
    if "action_kind" not in out:
        raise CheckpointError(
            "the checkpoint does not say whether actions are continuous or discrete: "
            "config field 'action_kind' is missing",
            hint="pass --config action_kind=continuous or --config action_kind=discrete",
        )
    if out["action_kind"] not in spec.ACTION_KINDS:
        raise CheckpointError(
            f"config action_kind={out['action_kind']!r} is not one of {spec.ACTION_KINDS}",
            hint="pass --config action_kind=continuous or --config action_kind=discrete",
        )
    return out


def _count(params: Mapping[str, Any], fmt: str) -> int:
    n = 0
    while fmt.format(n) in params:
        n += 1
    return n


def _shape(params: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in params:
        raise CheckpointError(
            f"agent.pkl has no tensor {key!r}, which every DreamerV3 agent save holds",
            hint="is this a danijar/dreamerv3 checkpoint with the 'rssm' dynamics?",
        )
    return tuple(int(d) for d in params[key].shape)


def _infer(
    params: Mapping[str, Any], user: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(model config, fields read off the tensor shapes, notes)``; ``user`` fills the rest."""
    notes: list[str] = []
    deter, hidden = _shape(params, "dyn/dynin0/kernel")
    stoch_flat = _shape(params, "dyn/dynin1/kernel")[0]
    action_width = _shape(params, "dyn/dynin2/kernel")[0]
    stoch = int(user.get("stoch", _OFFICIAL_STOCH))
    if stoch < 1 or stoch_flat % stoch:
        raise CheckpointError(
            f"latent width {stoch_flat} is not divisible by stoch={stoch}",
            hint="pass --config stoch=N with the official dyn.rssm.stoch",
        )
    if "stoch" not in user:
        notes.append(
            f"stoch={stoch} (official at every size) split the latent width {stoch_flat} into "
            f"{stoch} x {stoch_flat // stoch}; pass --config stoch=N if the run changed it"
        )
    inferred: dict[str, Any] = {
        "deter": deter,
        "hidden": hidden,
        "stoch": stoch,
        "classes": stoch_flat // stoch,
        "blocks": _shape(params, "dyn/dyngru/kernel")[0],
        "dynlayers": _count(params, "dyn/dynhid{}/kernel"),
        "obslayers": _count(params, "dyn/obs{}/kernel"),
        "imglayers": _count(params, "dyn/prior{}/kernel"),
        "units": _shape(params, "rew/mlp/linear0/kernel")[1],
        "head_layers": _count(params, "rew/mlp/linear{}/kernel"),
        "actor_layers": _count(params, "pol/mlp/linear{}/kernel"),
        "critic_layers": _count(params, "val/mlp/linear{}/kernel"),
        "bins": _shape(params, "rew/head/logits/kernel")[1],
        "action_dim": action_width,
    }
    problems = []
    if _count(params, "con/mlp/linear{}/kernel") != inferred["head_layers"]:
        problems.append("the reward and continue heads have different depths")
    if _count(params, "slowval/mlp/linear{}/kernel") != inferred["critic_layers"]:
        problems.append("val and slowval have different depths")
    if _shape(params, "val/head/logits/kernel")[1] != inferred["bins"]:
        problems.append("reward and value heads have different bin counts")
    # Observations: vector keys from the decoder's heads, images from the encoder CNN.
    vec_keys = sorted(
        {m.group(1) for k in params if (m := re.match(r"^dec/vec/([^/]+)/pred/kernel$", k))}
    )
    enc_vec = "enc/mlp0/kernel" in params
    if len(vec_keys) > 1:
        problems.append(f"several vector observations {vec_keys} (one is supported)")
    if bool(vec_keys) != enc_vec:
        problems.append("the encoder and decoder disagree about vector observations")
    obs_dim = 0
    if vec_keys and enc_vec:
        obs_dim = _shape(params, f"dec/vec/{vec_keys[0]}/pred/kernel")[1]
        if _shape(params, "enc/mlp0/kernel")[0] != obs_dim:
            problems.append("the vector encoder and decoder widths differ")
        inferred["enc_layers"] = _count(params, "enc/mlp{}/kernel")
        inferred["dec_layers"] = _count(params, "dec/mlp/linear{}/kernel")
        if vec_keys[0] != "vector":
            notes.append(f"the official vector observation {vec_keys[0]!r} is 'vector' here")
    inferred["obs_dim"] = obs_dim
    image = "enc/cnn0/kernel" in params
    inferred["image"] = image
    if image != ("dec/imgout/kernel" in params):
        problems.append("the encoder and decoder disagree about image observations")
    if image:
        depths = [
            _shape(params, f"enc/cnn{i}/kernel")[3]
            for i in range(_count(params, "enc/cnn{}/kernel"))
        ]
        kernel, _, channels, _ = _shape(params, "enc/cnn0/kernel")
        space = _shape(params, "dec/sp2/kernel")[1]
        if channels != spec.IMAGE_SHAPE[-1] or _shape(params, "dec/imgout/kernel")[3] != channels:
            problems.append(f"images with {channels} channels (3 are supported)")
        if len(depths) != 4 or space != 16 * depths[-1]:
            problems.append(f"an image CNN {depths} other than 4 stages down to 4x4 (64x64 images)")
        depth = math.gcd(*depths)
        official = [2, 3, 4, 4]
        if depths[0] % 2 == 0 and [d * 2 // depths[0] for d in depths] == official:
            depth = depths[0] // 2
        inferred.update(
            depth=depth,
            mults=[d // depth for d in depths],
            kernel=kernel,
            bspace=_shape(params, "dec/sp0/kernel")[0],
        )
    if problems:
        raise CheckpointError(
            "this DreamerV3 checkpoint has a layout the port does not support: "
            + "; ".join(problems)
        )
    if "action_dim" in user and int(user["action_dim"]) != action_width:
        raise CheckpointError(
            f"config action_dim={user['action_dim']} but the checkpoint's action input "
            f"dyn/dynin2/kernel is {action_width} wide",
            hint=f"drop action_dim or pass --config action_dim={action_width}",
        )
    kind = user["action_kind"]
    has_logits = "pol/head/action/logits/kernel" in params
    if (kind == "discrete") != has_logits:
        dist = "categorical logits" if has_logits else "bounded-normal mean and stddev"
        raise CheckpointError(
            f"config action_kind={kind!r} but the checkpoint's policy head has {dist}",
            hint="pass --config action_kind="
            + ("discrete" if has_logits else "continuous")
            + " (only a single 'action' key is supported)",
        )
    width = _shape(params, "pol/head/action/" + ("logits" if has_logits else "mean") + "/kernel")
    if width[1] != action_width:
        raise CheckpointError(
            f"the policy outputs {width[1]} actions but the core reads {action_width}",
            hint="several action keys are not supported",
        )
    for key in ("unimix", "free_nats", "horizon", "contdisc", "minstd", "maxstd"):
        if key not in user:
            notes.append(f"{key}={spec.DEFAULTS[key]} (official default; not in the checkpoint)")
    config = {**spec.DEFAULTS, **inferred}
    config.update({k: v for k, v in user.items() if k != "action_dim"})
    return config, inferred, notes


# -- mapping -----------------------------------------------------------------------------------

_MODULES: Final = {
    "enc": "encoder",
    "dec": "decoder",
    "dyn": "dyn",
    "rew": "rew",
    "con": "con",
    "pol": "pol",
    "val": "val",
    "slowval": "slowval",
}

_DROPPED: Final[tuple[tuple[str, str], ...]] = (
    (r"^opt/state/\d+/1/", "optimizer state (RMS second moment or momentum of a parameter)"),
    (r"^opt/", "optimizer step counters"),
    (r"^retnorm/", "return-normalisation statistics (actor training only)"),
    (r"^valnorm/", "value-normalisation statistics (actor training only)"),
    (r"^advnorm/", "advantage-normalisation statistics (actor training only)"),
    (r"^slowval_count/", "slow-critic update counter (training only)"),
)


def _model_key(key: str) -> str | None:
    head, _, rest = key.partition("/")
    module = _MODULES.get(head)
    if module is None:
        return None
    m = re.match(r"^vec/[^/]+/(pred/.*)$", rest) if head == "dec" else None
    if m:
        rest = "vec/vector/" + m.group(1)
    return module + "." + rest.replace("/", ".")


def _dropped_reason(key: str) -> str | None:
    for pattern, reason in _DROPPED:
        if re.match(pattern, key):
            return reason
    return None


def import_checkpoint(
    source: str | os.PathLike[str], config: Mapping[str, str]
) -> ImportedCheckpoint:
    """Import the official DreamerV3 checkpoint folder ``source`` as a `DreamerV3WorldModel`.

    Args:
        source: The ``elements`` checkpoint folder: ``latest`` names the ``<stamp>/`` folder
            holding ``agent.pkl`` and ``done``.
        config: ``KEY=VALUE`` settings the checkpoint cannot tell (values are strings):
            ``action_kind`` (required: ``continuous`` or ``discrete``), optionally
            ``action_dim`` (checked), ``stoch``, ``unimix``, ``free_nats``, ``horizon``,
            ``contdisc``, ``minstd``, ``maxstd``.

    Returns:
        The model with every network tensor (world model, ``pol``, ``val``, ``slowval``)
        copied, and the provenance: each source tensor in ``mapped`` or ``dropped``.

    Raises:
        CheckpointError: a malformed folder, a pickle global outside the numpy allow-list, an
            unknown or missing tensor, a layout the port does not support, or a missing or
            contradicting ``config`` field (the message says which ``--config KEY=VALUE``).
    """
    import torch

    from .model import DreamerV3WorldModel

    root = Path(source)
    user = _user_config(config)
    agent = _save_folder(root) / "agent.pkl"
    data, digest = read_agent_pickle(agent)
    extra = sorted(set(data) - {"params", "counters"})
    if extra:
        raise CheckpointError(f"agent.pkl has unknown entries {extra}")
    params: dict[str, Any] = data["params"]
    model_config, inferred, notes = _infer(params, user)
    model = DreamerV3WorldModel(**model_config)
    targets = model.state_dict()

    mapped: dict[str, str] = {}
    dropped: dict[str, str] = {}
    tensors: dict[str, Any] = {}
    for key in sorted(params):
        reason = _dropped_reason(key)
        if reason is not None:
            dropped[key] = reason
            continue
        name = _model_key(key)
        if name is None or name not in targets:
            raise CheckpointError(
                f"agent.pkl has the tensor {key!r}, which the DreamerV3 port does not know",
                hint="a newer or modified official agent? nothing was imported",
            )
        value = params[key]
        if tuple(value.shape) != tuple(targets[name].shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(targets[name].shape)} for {name!r}"
            )
        if value.dtype.kind != "f":
            raise CheckpointError(f"tensor {key!r} has dtype {value.dtype}, not floating point")
        tensors[name] = torch.from_numpy(value.astype("float32", copy=True))
        mapped[key] = name
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise CheckpointError(
            f"agent.pkl lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}",
            hint="is the checkpoint complete?",
        )
    model.load_state_dict(tensors, strict=True)
    model.eval()
    for key in sorted(data.get("counters") or {}):
        dropped[f"counters/{key}"] = "training counter (updates, batches or actions so far)"
    notes += [
        "float32 computation; the official default compute dtype is bfloat16",
        "the actor and critic losses (imagination, lambda returns) are not ported; the "
        "actor, critic and slow critic weights are kept for acting and evaluation",
    ]
    return ImportedCheckpoint(
        model=model,
        source_format=SOURCE_FORMAT,
        source_sha256=digest,
        official_commit=OFFICIAL_COMMIT,
        mapped=mapped,
        dropped=dropped,
        inferred=inferred,
        notes=tuple(notes),
    )
