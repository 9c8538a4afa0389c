"""``worldflux-registry shm list|clean``: State shared-memory segments, and leaks of dead ones."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``shm`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "shm",
        help="list State shared-memory segments, or clean those whose creator died",
        description="State.to_shared_memory() segments live until they are unlinked; those of "
        "killed processes stay in /dev/shm. 'list' shows every State segment (only segments "
        "whose header proves they are State segments; other files are never touched), "
        "'clean' unlinks those whose creator pid is no longer running.",
    )
    p.add_argument(
        "action",
        choices=("list", "clean"),
        help="list: every State segment; clean: unlink those whose creator died",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_shm)


def _cmd_shm(args: argparse.Namespace) -> int:
    from ..state._shm import SHM_DIR, clean, segments

    if not SHM_DIR.is_dir():
        sys.stderr.write(f"error: no {SHM_DIR} on this platform (Linux only)\n")
        return 1
    if args.action == "clean":
        removed = clean()
        if args.json:
            sys.stdout.write(json.dumps({"removed": removed}) + "\n")
        else:
            print(
                f"removed {len(removed)} segment(s) of dead processes"
                + (": " + ", ".join(removed) if removed else "")
            )
        return 0
    found = segments()
    if args.json:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return 0
    if not found:
        print(f"no State segments in {SHM_DIR}")
        return 0
    for info in found:
        state = "alive" if info["alive"] else "DEAD (shm clean removes it)"
        print(
            f"{info['segment']}  {info['bytes']} bytes  pid {info['pid']} {state}  "
            f"{info['created']}"
        )
    return 0
