"""``worldflux-registry`` command line: list, info, resolve, plugins (and extensions).

Exit codes: 0 success, 1 a worldflux error (not found, broken plugin, bad checkpoint), 2 usage.
Tables are for people; ``--json`` prints one JSON document for scripts. Listing, info, resolve and
plugins never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from .._rich import fit_words
from ..errors import WorldFluxRegistryError

if TYPE_CHECKING:
    from rich.console import Console

    from ..contract._family import FamilySpec
    from ..contract._io import IOContract
    from ..registry._registry import Registry

__all__ = ["build_parser", "main"]

#: Modules that add subcommands: each defines ``register(subparsers)``; a missing one is skipped.
_CLI_EXTENSIONS: Final = (
    "worldflux_registry.cli._export",
    "worldflux_registry.cli._parity",
    "worldflux_registry.cli._bench",
    "worldflux_registry.cli._import",
    "worldflux_registry.cli._shm",
    "worldflux_registry.cli._optimize",
    "worldflux_serve_ray.cli",
)


def _registry() -> Registry:
    from ..registry._registry import registry

    return registry


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _fingerprint_prefix(contract: Any) -> str:
    return _short(contract.fingerprint(), 32) + "... (--json: all 64 digits)"


def _short(fingerprint: str | None, digits: int = 12) -> str:
    if not fingerprint:
        return "-"
    return fingerprint[: len("sha256:") + digits]


# -- list ------------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    reg = _registry()
    names = reg.list(args.pattern, capability=args.capability)
    specs = [reg.get(n) for n in names]
    if args.json:
        _print_json([_spec_summary(s) for s in specs])
        return 0
    from rich.table import Table

    console = _console()
    # Below 100 columns the summaries (shown by `info`) would wrap one word per line.
    wide = console.width >= 100
    table = Table(title="World model families", title_justify="left")
    columns = ("family", "presets", "maturity", "provided by", *(("summary",) if wide else ()))
    for column in columns:
        table.add_column(column, overflow="fold")
    for spec in specs:
        table.add_row(
            spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else ""),
            ", ".join(spec.presets),
            spec.maturity,
            f"{spec.distribution or '-'} {spec.distribution_version or ''}".strip(),
            *((spec.summary,) if wide else ()),
        )
    if specs:
        console.print(fit_words(table, console.width))
    else:
        console.print("no families match" if args.pattern or args.capability else "no families")
    broken = [r for r in reg.plugins() if r.status in ("broken", "conflict")]
    if broken:
        _console(stderr=True).print(
            f"{len(broken)} plugin(s) failed to load; see `worldflux-registry plugins`"
        )
    return 0


def _spec_summary(spec: FamilySpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "summary": spec.summary,
        "aliases": list(spec.aliases),
        "presets": list(spec.presets),
        "default_preset": spec.default_preset,
        "capabilities": sorted(c.value for c in spec.capabilities),
        "maturity": spec.maturity,
        "version": spec.version,
        "model": spec.model,
        "distribution": spec.distribution,
        "distribution_version": spec.distribution_version,
    }


# -- info ------------------------------------------------------------------------------------
def _param_count(spec: FamilySpec, config: dict[str, Any]) -> int | None:
    if spec.param_count is None:
        return None
    try:
        return int(spec.param_count(config))
    except Exception:
        return None


def _cmd_info(args: argparse.Namespace) -> int:
    reg = _registry()
    resolved = reg.resolve(args.ref)
    if resolved.kind == "artifact":
        return _info_artifact(args, resolved.to_dict())
    spec = reg.get(resolved.family or "")
    config = {**spec.defaults, **resolved.config}
    contract = spec.contract_for(config)
    presets: list[dict[str, Any]] = []
    for name in spec.presets:
        preset_config = spec.config(name)
        try:
            fingerprint: str | None = spec.contract_for(preset_config).fingerprint()
        except WorldFluxRegistryError:
            fingerprint = None
        presets.append(
            {
                "name": name,
                "default": name == spec.default_preset,
                "overrides": dict(spec.presets[name]),
                "param_count": _param_count(spec, preset_config),
                "fingerprint": fingerprint,
            }
        )
    if args.json:
        _print_json(
            {
                "family": _spec_summary(spec),
                "resolved": resolved.to_dict(),
                "presets": presets,
                "contract": contract.to_dict(),
                "fingerprint": contract.fingerprint(),
            }
        )
        return 0
    from rich.table import Table

    console = _console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    for key, value in (
        ("family", spec.name),
        ("summary", spec.summary),
        ("aliases", ", ".join(spec.aliases) or "-"),
        ("version", f"{spec.version} ({spec.maturity})"),
        ("provided by", f"{spec.distribution or '-'} {spec.distribution_version or ''}"),
        ("model", spec.model),
        ("capabilities", ", ".join(sorted(c.value for c in spec.capabilities)) or "-"),
        ("ref", f"{args.ref} -> {resolved.kind} {resolved.family}:{resolved.preset}"),
        # The full 64 hex digits where they fit; any unique prefix of 8 or more resolves.
        (
            "fingerprint",
            contract.fingerprint() if console.width >= 90 else _fingerprint_prefix(contract),
        ),
    ):
        head.add_row(key, str(value))
    console.print(fit_words(head, console.width))
    table = Table(title="Presets", title_justify="left")
    for column in ("preset", "parameters", "fingerprint", "overrides"):
        justify = "right" if column == "parameters" else "left"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    # 8 hex digits resolve (a unique prefix); 12 where the width allows.
    digits = 12 if console.width >= 100 else 8
    for p in presets:
        count = p["param_count"]
        table.add_row(
            p["name"] + (" (default)" if p["default"] else ""),
            f"{count:,}" if count is not None else "?",
            _short(p["fingerprint"], digits),
            escape_markup(" ".join(f"{k}={v}" for k, v in p["overrides"].items()) or "-"),
        )
    console.print(fit_words(table, console.width))
    contract_table = _contract_table(contract, f"Contract of {resolved.family}:{resolved.preset}")
    console.print(fit_words(contract_table, console.width))
    return 0


def _info_artifact(args: argparse.Namespace, resolved: dict[str, Any]) -> int:
    from ..registry._artifact import read_artifact_manifest

    manifest = read_artifact_manifest(resolved["path"])
    if args.json:
        _print_json({"resolved": resolved, "manifest": manifest})
        return 0
    from rich.table import Table

    console = _console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    for key in ("kind", "artifact_format", "family", "preset", "fingerprint", "path"):
        head.add_row(key, str(resolved[key]))
    for key in ("precision", "opset"):
        if key in manifest:
            head.add_row(key, str(manifest[key]))
    parity = manifest.get("parity")
    changed = _changed_files(resolved["path"], manifest)
    if changed:
        # The stored verdict was about other files: quoting it would vouch for these.
        head.add_row(
            "parity",
            f"[red]stale[/]: {', '.join(changed)} differ from the sha256 the manifest records "
            "(modified after export); re-export, or run `worldflux-registry parity` on it",
        )
    elif isinstance(parity, dict):
        verdict = (
            "passed"
            if parity.get("passed")
            else "FAILED: " + ", ".join(map(str, parity.get("failures") or []))
        )
        head.add_row(
            "parity",
            f"{verdict} (batches {parity.get('batch_sizes')}, "
            f"horizon {parity.get('horizon')}, {parity.get('created', '')})",
        )
    else:
        head.add_row("parity", "not checked")
    console.print(fit_words(head, console.width))
    graphs = manifest.get("graphs")
    if isinstance(graphs, dict) and graphs:
        table = Table(title="Graphs", title_justify="left")
        for column in ("graph", "file", "inputs", "outputs", "notes"):
            table.add_column(column, overflow="fold")
        for name, entry in graphs.items():
            entry = entry if isinstance(entry, dict) else {}
            notes = []
            if "horizon" in entry:
                notes.append(f"fused: {entry['horizon']} steps per call")
            if "mode_of" in entry:
                notes.append(f"deterministic {entry['mode_of']}")
            if "export_seconds" in entry:
                notes.append(f"exported in {entry['export_seconds']} s")
            table.add_row(
                name,
                str(entry.get("file", "?")),
                ", ".join(str(i.get("name")) for i in entry.get("inputs", [])),
                ", ".join(str(o.get("name")) for o in entry.get("outputs", [])),
                "; ".join(notes),
            )
        console.print(fit_words(table, console.width))
    return 0


def _changed_files(path: str, manifest: dict[str, Any]) -> list[str]:
    """Files of the export's graphs that are missing or whose sha256 is not the manifest's."""
    from .._files import ArtifactDir
    from ..errors import ExportError

    changed = []
    graphs = manifest.get("graphs")
    with ArtifactDir(path, ExportError) as adir:
        for graph, entry in (graphs if isinstance(graphs, dict) else {}).items():
            items = [entry, *entry.get("external_data", ())] if isinstance(entry, dict) else []
            for item in items:
                name, recorded = item.get("file"), item.get("sha256")
                if not isinstance(name, str) or not isinstance(recorded, str):
                    continue
                try:
                    digest = "sha256:" + adir.sha256(name, what=f"graph {graph!r} file")
                except WorldFluxRegistryError:
                    digest = None  # missing, or not a regular file
                if digest != recorded:
                    changed.append(name)
    return changed


def _contract_table(contract: IOContract, title: str) -> Any:
    from rich.table import Table

    from ..contract._io import iter_specs

    table = Table(title=title, title_justify="left")
    for column in ("group", "name", "type", "notes"):
        table.add_column(column)
    previous = None
    for group, spec in iter_specs(contract):
        # The kind only where it is not the plain continuous one, to keep four columns.
        notes = [] if spec.kind == "continuous" else [spec.kind]
        if spec.classes is not None:
            notes.append(f"{spec.classes} classes")
        if spec.low is not None and spec.high is not None:
            notes.append(f"in [{_num(spec.low)},{_num(spec.high)}]")
        elif spec.low is not None or spec.high is not None:
            notes.append(
                f">= {_num(spec.low)}" if spec.low is not None else f"<= {_num(spec.high)}"
            )
        if group == "noise":
            noise = next(n for n in contract.noise if n.name == spec.name)
            notes.append(f"{noise.distribution} noise of {', '.join(noise.graphs)}")
        # No spaces in a shape: it wraps as a whole, never between its dimensions.
        shape = "(" + ",".join(str(d) for d in spec.shape) + ")"
        table.add_row(
            "" if group == previous else group,
            spec.name,
            f"{spec.dtype} {shape}",
            escape_markup(", ".join(notes) or "-"),
        )
        previous = group
    return table


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


# -- resolve ---------------------------------------------------------------------------------
def _cmd_resolve(args: argparse.Namespace) -> int:
    resolved = _registry().resolve(args.ref)
    if args.json:
        _print_json(resolved.to_dict())
        return 0
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in resolved.to_dict().items():
        if value in (None, {}) or key == "ref":
            continue
        grid.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    _console().print(fit_words(grid, _console().width))
    return 0


# -- plugins ---------------------------------------------------------------------------------
def _cmd_plugins(args: argparse.Namespace) -> int:
    reg = _registry()
    records = reg.plugins()
    failed = any(r.status in ("broken", "conflict") for r in records)
    if getattr(args, "strict", False):
        # --strict: also import every family's model class (a broken model module fails here)
        from ..errors import WorldFluxRegistryError
        from ..registry._discovery import check_model_target

        for name in reg.list():
            try:
                check_model_target(reg.get(name))
            except WorldFluxRegistryError as exc:
                from rich.markup import escape

                failed = True
                _console(stderr=True).print(
                    f"[red]error:[/red] {escape(str(exc))}", highlight=False
                )
    if args.json:
        _print_json([r.to_dict() for r in records])
        return 1 if failed else 0
    from rich.table import Table

    styles = {"ok": "green", "broken": "red", "conflict": "red", "blocked": "yellow"}
    console = _console()
    # The entry point's module only where it fits; errors go under the table, one per line.
    wide = console.width >= 110
    table = Table(title="worldflux_registry plugins", title_justify="left")
    columns = ("distribution", *(("entry point",) if wide else ()), "status", "load", "provides")
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in records:
        style = styles.get(r.status, "")
        table.add_row(
            f"{r.distribution or '-'} {r.version or ''}".strip(),
            *((r.entry_point,) if wide else ()),
            f"[{style}]{r.status}[/{style}]" if style else r.status,
            _load_time(r.seconds),
            ", ".join([*r.families, *r.exporters, *r.importers]) or "-",
        )
    if records:
        console.print(fit_words(table, console.width))
        from rich.markup import escape

        for r in records:
            if r.error:
                console.print(
                    f"[red]{escape(r.distribution or r.entry_point)}[/red]: {escape(r.error)}"
                )
        slow = [r for r in records if (r.seconds or 0.0) >= SLOW_PLUGIN_SECONDS]
        if slow:
            names = ", ".join(
                f"{r.distribution or r.entry_point} ({r.seconds:.1f} s)" for r in slow
            )
            _console(stderr=True).print(
                f"slow plugins (every command pays their import time): {escape_markup(names)}; "
                f"block one with WORLDFLUX_REGISTRY_BLOCK=<distribution>"
            )
    else:
        console.print("no plugins installed (entry point group 'worldflux_registry')")
    return 1 if failed else 0


#: A plugin whose import and hooks take this long is reported as slow by ``plugins``.
SLOW_PLUGIN_SECONDS: Final = 1.0


def _load_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    text = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    return f"[red]{text} slow[/red]" if seconds >= SLOW_PLUGIN_SECONDS else text


def escape_markup(text: str) -> str:
    """``text`` with rich markup escaped."""
    from rich.markup import escape

    return escape(text)


# -- parser ----------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose to the terminal, keeps indented blocks (examples) as written, and shows
    each option's default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if "\n " in block or block.endswith(":") or block.split("\n")[0].endswith(":"):
                blocks.append(textwrap.indent(block, indent))  # a list or examples: as written
            else:
                blocks.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(blocks)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors raise instead of exiting, so main() returns 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise _UsageError(message)


class _UsageError(Exception):
    pass


class _VersionAction(argparse.Action):
    """``--version``: discovery runs only when asked, not for every parser built."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(f"{parser.prog} {_versions()}\n")
        parser.exit()


def _versions() -> str:
    """This distribution's version, then each plugin distribution's (as discovery found them)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        core = version("worldflux-registry")
    except PackageNotFoundError:
        core = "unknown"
    plugins = sorted(
        {f"{r.distribution} {r.version}" for r in _registry().plugins() if r.distribution}
    )
    return core + (f" (plugins: {', '.join(plugins)})" if plugins else "")


#: ``--help`` examples of each subcommand (shown under its options), by command name.
_EXAMPLES: Final = {
    "list": (
        "worldflux-registry list",
        "worldflux-registry list 'dreamer*'",
        "worldflux-registry list --capability image_obs --json",
    ),
    "info": (
        "worldflux-registry info dreamerv3",
        "worldflux-registry info tdmpc2:ci --json",
        "worldflux-registry info ./my-export     # an export: graphs and last parity verdict",
    ),
    "resolve": (
        "worldflux-registry resolve dreamerv3:ci",
        "worldflux-registry resolve sha256:fa86fd76 --json",
    ),
    "plugins": (
        "worldflux-registry plugins",
        "worldflux-registry plugins --strict     # CI of a plugin package",
    ),
    "export": (
        "worldflux-registry export dreamerv3:ci --out d",
        "worldflux-registry export tdmpc2:ci --out t --graphs all,rollout --rollout-horizon 8",
        "worldflux-registry export ./checkpoint --out d --precision fp16",
    ),
    "parity": (
        "worldflux-registry parity d",
        "worldflux-registry parity d --reference ./checkpoint --json p.json --plot p.png",
        "worldflux-registry parity d --batch 1,32 --horizon 8 --mode step",
    ),
    "bench": (
        "worldflux-registry bench dreamerv3:ci",
        "worldflux-registry bench d --backends torch,ort-cpu,ort-cpu-fused --batch 1,64",
        "worldflux-registry bench tdmpc2:ci --json b.json --markdown b.md",
    ),
    "optimize": (
        "worldflux-registry optimize dreamerv3:ci --out fast",
        "worldflux-registry optimize ./checkpoint --out fast --max-flip-rate 0.05 --batch 64",
        "worldflux-registry optimize tdmpc2:ci --out t --candidates fp32,int8 --json",
    ),
    "import": (
        "worldflux-registry import tdmpc2 final.pt --out walker --config episode_length=500",
        "worldflux-registry import dreamerv3 logdir/ckpt --out dr --config action_kind=discrete",
    ),
    "shm": ("worldflux-registry shm list", "worldflux-registry shm clean --json"),
    "serve": ("worldflux-registry serve t --replicas 2 --max-batch-size 32 --port 8000",),
    "triton": ("worldflux-registry triton t --out triton-repo",),
}


def _add_examples(sub: Any) -> None:
    """Put each subcommand's examples under its ``--help`` (one given by its module stays)."""
    for name, parser in sub.choices.items():
        if name in _EXAMPLES and not parser.epilog:
            parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in _EXAMPLES[name])


def build_parser() -> argparse.ArgumentParser:
    """The full parser, core subcommands plus every installed extension's."""
    parser = _Parser(
        prog="worldflux-registry",
        description="Find, inspect and load world model families published by plugins.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show this and the plugins' versions"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", help="list installed model families")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern over family names, e.g. 'dream*'")
    p.add_argument("--capability", "-c", help="only families declaring this capability")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a family: presets, parameter counts, contract")
    p.add_argument("ref", help="family, alias, family:preset, sha256:<prefix> or directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("resolve", help="show what a ref names, without loading it")
    p.add_argument("ref", help="family, alias, family:preset, sha256:<prefix> or directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_resolve)

    p = sub.add_parser("plugins", help="show every plugin and whether it loaded (exit 1 if not)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also import each family's model class (imports torch); exit 1 if one fails",
    )
    p.set_defaults(func=_cmd_plugins)

    for name in _CLI_EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name + ".").startswith(exc.name + "."):
                continue  # that extension is not part of this install
            raise
        module.register(sub)
    _add_examples(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 error, 2 usage)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except _UsageError:
        return 2
    except SystemExit as exc:  # --help and --version exit 0
        return int(exc.code or 0)
    try:
        # Checks of the arguments alone (names, output paths) run before any model or torch
        # is loaded: what they refuse is a usage error.
        preflight = getattr(args, "preflight", None)
        if preflight is not None:
            preflight(args)
    except WorldFluxRegistryError as exc:
        _error(str(exc))
        return 2
    try:
        return int(args.func(args))
    except WorldFluxRegistryError as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # A path the command was given cannot be read or written: say which, no traceback.
        where = f" {exc.filename}" if exc.filename else ""
        _error(
            f"{exc.strerror or exc}:{where} (check that the path exists and is writable, "
            "or choose another one)"
        )
        return 1
    except Exception as exc:  # a bug: one line, and the way to see the traceback
        if os.environ.get(ENV_DEBUG):
            raise
        _error(
            f"unexpected {type(exc).__name__}: {str(exc)[:300]} (this is a bug in "
            f"worldflux-registry or a plugin; rerun with {ENV_DEBUG}=1 for the traceback)"
        )
        return 1


#: Set to 1 to let unexpected exceptions print their traceback.
ENV_DEBUG: Final = "WORLDFLUX_REGISTRY_DEBUG"


def _error(message: str) -> None:
    # Messages carry literal brackets (pip extras, shapes): never read them as markup.
    from rich.console import Console
    from rich.markup import escape

    text = " ".join(message.split("\n"))
    # soft_wrap: one line however narrow the terminal, so scripts can grep it.
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[red]error:[/red] {escape(text)}", highlight=False)
