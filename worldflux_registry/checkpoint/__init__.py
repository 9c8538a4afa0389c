"""The checkpoint directory format: ``config.json`` + ``model.safetensors``, written atomically.

Layer 3 (imports state, contract and the base). It writes a model's checkpoint and reads and checks
the files of one; building a model from a checkpoint needs the registry and lives there
(``registry._load``). Torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

from ._format import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, read_config, save_pretrained

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "read_config",
    "save_pretrained",
]
