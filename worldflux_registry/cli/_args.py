"""Argument checks shared by the subcommands: each bad value is a one-line usage error."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Final

from ..errors import BackendError, ConfigError

__all__ = ["check_device", "check_output_dir", "check_output_file", "device", "positive_int"]

_DEVICE: Final = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (argparse ``type=``)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def check_device(name: str | None) -> None:
    """Raise `BackendError` when ``name`` is a CUDA or MPS device this torch build cannot use."""
    if not name or name in ("cpu", "auto"):
        return
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendError(
                f"--device {name}: this torch build sees no CUDA device "
                f"(torch {torch.__version__})",
                hint="use --device cpu, or install a CUDA build of torch on a GPU machine",
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BackendError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)",
                hint="use --device cuda:0",
            )
    elif name == "mps" and not torch.backends.mps.is_available():
        raise BackendError("--device mps: MPS is not available here", hint="use --device cpu")


def check_output_file(path: str | None, option: str) -> None:
    """Raise `ConfigError` unless ``path`` can be written as a file (before any work is done)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {path} is a directory", hint=f"give {option} a file name")
    parent = _existing_parent(target.parent)
    if not parent.is_dir():
        raise ConfigError(
            f"{option} {path}: {parent} is not a directory", hint="choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise ConfigError(f"{option} {path} is not writable", hint="choose a writable path")


def check_output_dir(path: str | None, option: str) -> None:
    """Raise `ConfigError` unless ``path`` can be created (or replaced) as a directory."""
    if not path:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(
            f"{option} {path} exists and is not a directory", hint="choose a directory path"
        )
    parent = _existing_parent(target.parent)
    if not parent.is_dir():
        raise ConfigError(
            f"{option} {path}: {parent} is not a directory", hint="choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path}: {parent} is not writable", hint="choose a writable path"
        )


def _existing_parent(path: Path) -> Path:
    path = path if str(path) else Path(".")
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
