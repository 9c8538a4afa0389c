"""Import an official TD-MPC2 checkpoint (``nicklashansen/tdmpc2``, ``TDMPC2.save``) safely.

The file is read only with ``torch.load(path, weights_only=True, map_location="cpu")``: no
code from the file ever runs. The config is read off the tensor shapes (sizes, ensemble,
tasks, termination head, log-std range, action masks); what the weights cannot tell (the
task's episode length, hence the discount, and training hyperparameters) comes from ``config``
(``KEY=VALUE`` strings, the CLI's ``--config``). Every source tensor is either mapped into
the model or dropped with its reason; an unknown tensor is an error.

Supported layouts of the Q ensemble: the current one (tensordict ``from_modules``:
``_Qs.params.<layer>.<name>`` stacked over heads, ``_target_Qs_params.*``, the alias copy
``_detach_Qs_params.*`` and ``__batch_size`` / ``__device`` metadata; optionally
``_Qs.module.*`` templates), and the older functorch one (``_Qs.params.<n>`` and
``_target_Qs.params.<n>``, ``n`` enumerating weight, bias, ln.weight, ln.bias layer by
layer, as the official ``api_model_conversion`` converts).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from worldflux_registry import CheckpointError, ConfigError, ImportedCheckpoint

from . import spec
from .model import TDMPC2WorldModel

__all__ = ["OFFICIAL_COMMIT", "SOURCE_FORMAT", "import_checkpoint", "parse_config"]

SOURCE_FORMAT = "tdmpc2-official-pt"
#: The official commit whose computation the imported model reproduces.
OFFICIAL_COMMIT = "e9f5932"

_PARAM_NAMES = ("weight", "bias", "ln.weight", "ln.bias")
_MODULES = {
    "_encoder.state": "encoder",
    "_dynamics": "dynamics",
    "_reward": "reward_head",
    "_pi": "pi_head",
    "_termination": "termination_head",
}
#: Top-level entries besides ``model`` that training scripts save next to it.
_KNOWN_TOP_LEVEL = {
    "optim": "optimizer state (not needed to run the model)",
    "pi_optim": "policy optimizer state (not needed to run the model)",
    "optimizer": "optimizer state (not needed to run the model)",
    "step": "training step counter",
    "cfg": "training config (read what the model needs from --config instead)",
}
#: Config fields the weights cannot tell and that have an official default.
_OFFICIAL_DEFAULTS = ("simnorm_dim", "dropout", "vmin", "vmax")
_HINT_CONFIG = "pass --config KEY=VALUE (import_checkpoint(..., config={'KEY': 'VALUE'}))"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(
            f"official tdmpc2 checkpoint {str(path)!r} is not a file",
            hint="pass the checkpoint.pt written by the official TDMPC2.save",
        )
    with path.open("rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{str(path)!r} is not a torch checkpoint (not a zip or pickle file; starts with "
            f"{head!r})",
            hint="pass the checkpoint.pt written by the official TDMPC2.save",
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only" in text:
            found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
            what = f"the global {found.group(1)}" if found else "objects other than tensors"
            raise CheckpointError(
                f"{str(path)!r} was refused by torch.load(weights_only=True): it needs "
                f"{what}, which a plain state dict never does",
                hint="only the official torch.save({'model': state_dict}) files are imported; "
                "re-save the state dict alone if you trust the file",
            ) from exc
        raise CheckpointError(
            f"{str(path)!r} is not a torch checkpoint ({text[:200]})",
            hint="pass the checkpoint.pt written by the official TDMPC2.save",
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable torch checkpoint (not a zip/pickle file: "
            f"{type(exc).__name__}: {str(exc)[:200]})",
            hint="pass the checkpoint.pt written by the official TDMPC2.save",
        ) from exc


def _parse_value(key: str, raw: Any) -> Any:
    default = spec.DEFAULTS[key]
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if key in ("action_dims", "episode_lengths"):
            return [int(v) for v in text.strip("[]()").split(",") if v.strip()]
        if text.lower() in ("none", "null"):
            return None
        if isinstance(default, bool) or key == "episodic":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int) or key in ("task_dim", "model_size"):
            return int(text)
        if isinstance(default, float) or key == "discount":
            return float(text)
    except ValueError:
        kind = "bool" if isinstance(default, bool) else type(default).__name__
        raise ConfigError(
            f"tdmpc2 config {key}={raw!r} is not a valid {kind}",
            hint=_HINT_CONFIG,
            family=spec.FAMILY,
        ) from None
    return text


def parse_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (or typed values) as tdmpc2 config values of the fields' types.

    Lists (``action_dims``, ``episode_lengths``) are comma-separated ints; ``none`` is None.

    Raises:
        ConfigError: an unknown field (with the closest names) or an unparsable value.
    """
    from worldflux_registry.errors import did_you_mean

    out = {}
    for key, raw in config.items():
        if key not in spec.DEFAULTS:
            raise ConfigError(
                f"unknown tdmpc2 config field {key!r}.{did_you_mean(key, spec.DEFAULTS)}",
                hint="fields: " + ", ".join(sorted(spec.DEFAULTS)),
                family=spec.FAMILY,
            )
        out[key] = _parse_value(key, raw)
    return out


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = sd.get(key)
    if not isinstance(value, Tensor):
        raise CheckpointError(
            f"official tdmpc2 checkpoint has no tensor {key!r}",
            hint="is this a TD-MPC2 state-based checkpoint (official TDMPC2.save)?",
        )
    return tuple(value.shape)


def _layer_indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.weight$")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _q_layout(sd: Mapping[str, Any]) -> tuple[dict[str, tuple[str, int, str]], str]:
    """Source Q key -> (``qs``/``target_qs``, layer, param name), and the layout's name."""
    out: dict[str, tuple[str, int, str]] = {}
    new = re.compile(r"^(_Qs\.params|_target_Qs_params)\.(\d+)\.(weight|bias|ln\.weight|ln\.bias)$")
    old = re.compile(r"^(_Qs\.params|_target_Qs\.params)\.(\d+)$")
    layout = "current"
    for key in sd:
        if m := new.match(key):
            module = "qs" if m.group(1) == "_Qs.params" else "target_qs"
            out[key] = (module, int(m.group(2)), m.group(3))
        elif m := old.match(key):
            layout = "older (functorch combine_state_for_ensemble)"
            n = int(m.group(2))
            module = "qs" if m.group(1) == "_Qs.params" else "target_qs"
            out[key] = (module, n // 4, _PARAM_NAMES[n % 4])
    return out, layout


def _infer(sd: Mapping[str, Any], q_keys: Mapping[str, tuple[str, int, str]]) -> dict[str, Any]:
    if any(k.startswith("_encoder.rgb.") for k in sd):
        raise CheckpointError(
            "official tdmpc2 checkpoint has a pixel (rgb) encoder",
            hint="only state (vector) observations are supported",
        )
    inferred: dict[str, Any] = {}
    task_dim = 0
    if "_task_emb.weight" in sd:
        tasks, task_dim = _shape(sd, "_task_emb.weight")
        inferred.update(tasks=tasks, task_dim=task_dim)
    enc_layers = _layer_indices(sd, "_encoder.state")
    if len(enc_layers) < 2 or enc_layers != list(range(len(enc_layers))):
        raise CheckpointError(
            f"official tdmpc2 encoder layers {enc_layers} are not 0..n-1 with n >= 2",
            hint="is this a TD-MPC2 state-based checkpoint?",
        )
    enc_dim, enc_in = _shape(sd, "_encoder.state.0.weight")
    latent_dim, _ = _shape(sd, f"_encoder.state.{enc_layers[-1]}.weight")
    mlp_dim, dyn_in = _shape(sd, "_dynamics.0.weight")
    two_a, _ = _shape(sd, "_pi.2.weight")
    num_bins, _ = _shape(sd, "_reward.2.weight")
    q_weights = [k for k, (m, layer, name) in q_keys.items() if m == "qs" and layer == 0]
    if not q_weights:
        raise CheckpointError(
            "official tdmpc2 checkpoint has no Q ensemble (_Qs.params.*)",
            hint="is this a TD-MPC2 checkpoint?",
        )
    num_q = _shape(sd, next(k for k in q_weights if q_keys[k][2] == "weight"))[0]
    inferred.update(
        obs_dim=enc_in - task_dim,
        action_dim=two_a // 2,
        latent_dim=latent_dim,
        enc_dim=enc_dim,
        mlp_dim=mlp_dim,
        num_enc_layers=len(enc_layers),
        num_q=num_q,
        num_bins=num_bins,
        episodic="_termination.0.weight" in sd,
    )
    if dyn_in != latent_dim + two_a // 2 + task_dim:
        raise CheckpointError(
            f"official tdmpc2 _dynamics.0.weight takes {dyn_in} inputs, but latent {latent_dim} "
            f"+ action {two_a // 2} + task {task_dim} is {latent_dim + two_a // 2 + task_dim}",
            hint="the checkpoint is inconsistent (wrong shapes)",
        )
    for key in ("log_std_min", "log_std_dif"):
        value = sd.get(key)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise CheckpointError(
                f"official tdmpc2 checkpoint has no scalar {key!r}",
                hint="is this a TD-MPC2 checkpoint (official TDMPC2.save)?",
            )
    lo = float(sd["log_std_min"].item())
    inferred.update(log_std_min=lo, log_std_max=lo + float(sd["log_std_dif"].item()))
    masks = sd.get("_action_masks")
    if "tasks" in inferred and isinstance(masks, Tensor):
        dims = masks.sum(-1).round().long()
        prefix = torch.arange(masks.shape[-1])[None, :] < dims[:, None]
        if tuple(masks.shape) != (inferred["tasks"], inferred["action_dim"]) or not torch.equal(
            masks, prefix.to(masks.dtype)
        ):
            raise CheckpointError(
                f"official tdmpc2 _action_masks {tuple(masks.shape)} is not one leading-ones "
                f"row per task over action_dim {inferred['action_dim']}",
                hint="the checkpoint is inconsistent (wrong shapes)",
            )
        inferred["action_dims"] = [int(d) for d in dims]
    return inferred


def import_checkpoint(
    source: str | os.PathLike[str], config: Mapping[str, str]
) -> ImportedCheckpoint:
    """Import the official TD-MPC2 ``checkpoint.pt`` at ``source`` as a `TDMPC2WorldModel`.

    ``config`` holds ``KEY=VALUE`` strings for fields the weights cannot tell: required are
    ``episode_length`` (single-task) or ``episode_lengths`` (multi-task, comma-separated, one
    per task) for the official discount rule, unless ``discount`` is given; any other field
    (``rho``, ``horizon``, ...) may be set, and fields read off the shapes must agree with it.

    Raises:
        CheckpointError: the file is missing, not a torch zip/pickle, refused by
            ``weights_only``, has no ``model`` entry, has unknown or inconsistent tensors, or
            a required config field is missing (named, with the ``--config`` hint).
        ConfigError: an unknown config field or an unparsable value.
    """
    path = Path(source)
    given = parse_config(config)
    raw = _load(path)
    if not isinstance(raw, Mapping) or "model" not in raw:
        keys = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(
            f"{str(path)!r} has no 'model' entry (found {keys})",
            hint="the official TDMPC2.save writes {'model': state_dict}",
        )
    sd = raw["model"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(
            f"{str(path)!r} 'model' is a {type(sd).__name__}, not a state dict",
            hint="the official TDMPC2.save writes {'model': state_dict}",
        )
    mapped: dict[str, str] = {}
    dropped: dict[str, str] = {}
    notes: list[str] = []
    extra_state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key == "model":
            continue
        if key == "scale" and isinstance(value, Mapping) and isinstance(value.get("value"), Tensor):
            extra_state["q_scale"] = value["value"].reshape(())
            mapped["scale.value"] = "q_scale"
            for sub in value:
                if sub != "value":
                    dropped[f"scale.{sub}"] = "RunningScale percentiles (constant 5, 95)"
        elif key in _KNOWN_TOP_LEVEL:
            dropped[key] = _KNOWN_TOP_LEVEL[key]
        else:
            raise CheckpointError(
                f"official tdmpc2 checkpoint has an unknown top-level entry {key!r}",
                hint="only 'model' (and optimizer state) are expected; nothing is ignored silently",
            )

    q_keys, layout = _q_layout(sd)
    inferred = _infer(sd, q_keys)
    for key, value in given.items():
        if key in inferred and inferred[key] != value:
            raise CheckpointError(
                f"config {key}={value!r} disagrees with the checkpoint's shapes "
                f"({inferred[key]!r})",
                hint=f"drop {key} from --config; it is read from the weights",
            )
    cfg: dict[str, Any] = {**inferred, **given}
    multitask = bool(cfg.get("tasks"))
    if cfg.get("discount") is None:
        need = "episode_lengths" if multitask else "episode_length"
        if need not in given:
            raise CheckpointError(
                f"tdmpc2 import needs config field {need!r} (the task's episode length "
                "gives the official discount), which the weights cannot tell",
                hint=f"{_HINT_CONFIG}, e.g. --config {need}="
                + ("500,100,500" if multitask else "500")
                + " (or --config discount=0.99)",
            )
    for key in _OFFICIAL_DEFAULTS:
        if key not in given:
            notes.append(
                f"{key}={spec.DEFAULTS[key]!r} is the official config.yaml value (not in the "
                f"weights); pass --config {key}=... if the run used another"
            )
    if inferred["num_enc_layers"] == 2:
        notes.append("num_enc_layers=2 and =1 build the same 2-layer encoder; 2 is recorded")
    notes.append(f"Q ensemble layout: {layout}")
    try:
        model = TDMPC2WorldModel(**cfg)
    except ConfigError as exc:
        raise CheckpointError(
            f"the config read from {str(path)!r} is invalid: {exc}", hint=_HINT_CONFIG
        ) from exc

    target = model.state_dict()
    values: dict[str, Tensor] = dict(extra_state)
    for key, value in sd.items():
        if key.endswith(".__batch_size") or key.endswith(".__device"):
            if key.endswith("__batch_size") and tuple(value) != (cfg["num_q"],):
                raise CheckpointError(
                    f"{key} is {value}, but the ensemble has {cfg['num_q']} heads",
                    hint="the checkpoint is inconsistent (wrong shapes)",
                )
            dropped[key] = "tensordict TensorDictParams metadata (not a tensor)"
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"official tdmpc2 checkpoint entry {key!r} is a {type(value).__name__}, "
                "not a tensor",
                hint="unknown entries are never ignored silently",
            )
        if key in q_keys:
            module, layer, name = q_keys[key]
            if value.shape[0] != cfg["num_q"]:
                raise CheckpointError(
                    f"{key} has shape {tuple(value.shape)}: {value.shape[0]} heads, expected "
                    f"{cfg['num_q']}",
                    hint="the checkpoint is inconsistent (wrong shapes)",
                )
            names = [f"{module}.{i}.{layer}.{name}" for i in range(cfg["num_q"])]
            for i, name_i in enumerate(names):
                values[name_i] = value[i]
            mapped[key] = ",".join(names)
        elif key.startswith("_detach_Qs_params."):
            online = "_Qs.params." + key[len("_detach_Qs_params.") :]
            if online not in sd or not torch.equal(sd[online], value):
                raise CheckpointError(
                    f"{key} should be an equal copy of {online} (they share storage in the "
                    "official model), but it differs or is missing",
                    hint="the checkpoint is corrupt or was edited",
                )
            dropped[key] = f"alias of {online} (_detach_Qs_params: same storage when live); equal"
        elif key.startswith("_Qs.module.") or key.startswith("_target_Qs.module."):
            dropped[key] = "tensordict module template (weights are in the params entries)"
        elif key in ("log_std_min", "log_std_dif"):
            dropped[key] = "read into config log_std_min / log_std_max"
        elif key == "_action_masks":
            dropped[key] = "rebuilt from config action_dims (read from this tensor)"
        elif key == "_task_emb.weight":
            values["task_emb.weight"] = value
            mapped[key] = "task_emb.weight"
        else:
            m = re.match(r"^(.*)\.(\d+)\.(weight|bias|ln\.weight|ln\.bias)$", key)
            found = _MODULES.get(m.group(1)) if m else None
            if m is None or found is None:
                raise CheckpointError(
                    f"official tdmpc2 checkpoint has an unknown tensor {key!r} "
                    f"{tuple(value.shape)}",
                    hint="unknown tensors are never ignored silently; is this checkpoint from "
                    f"the official code near commit {OFFICIAL_COMMIT}?",
                )
            name = f"{found}.{m.group(2)}.{m.group(3)}"
            values[name] = value
            mapped[key] = name

    if "q_scale" not in values:
        notes.append("q_scale (official RunningScale) is not in the file; it starts at 1")
        values["q_scale"] = target["q_scale"]
    missing = sorted(k for k in target if k not in values)
    if missing:
        raise CheckpointError(
            f"official tdmpc2 checkpoint lacks tensors for {missing[:6]}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""),
            hint="is this a complete TD-MPC2 checkpoint (official TDMPC2.save)?",
        )
    for name, value in values.items():
        if name not in target:
            raise CheckpointError(
                f"official tdmpc2 tensor for {name!r} has no place in the model",
                hint="the checkpoint is inconsistent (wrong shapes)",
            )
        if tuple(value.shape) != tuple(target[name].shape):
            source = next((k for k, v in mapped.items() if name in v.split(",")), name)
            raise CheckpointError(
                f"official tdmpc2 tensor {source!r} has shape {tuple(value.shape)}, the model "
                f"needs {tuple(target[name].shape)} for {name!r}",
                hint="the checkpoint is inconsistent (wrong shapes)",
            )
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in values.items()}, strict=True)
    model.eval()
    return ImportedCheckpoint(
        model=model,
        source_format=SOURCE_FORMAT,
        source_sha256=_sha256(path),
        official_commit=OFFICIAL_COMMIT,
        mapped=mapped,
        dropped=dropped,
        inferred=inferred,
        notes=tuple(notes),
    )
