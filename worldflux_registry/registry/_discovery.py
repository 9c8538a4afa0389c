"""Plugin discovery: entry points -> pluggy -> validated specs, each plugin isolated.

Torch-free. Every plugin (one entry point, or one object passed to ``Registry(plugins=...)``) is
imported, registered with pluggy, checked and called on its own, so that an import error, a hook
that raises, an invalid spec or a hook pluggy rejects marks only that plugin broken.

A plugin that calls ``sys.exit()`` or raises ``KeyboardInterrupt`` itself is broken like any
other; a real Ctrl-C still stops the program. The two are told apart by a SIGINT handler that
discovery installs (in the main thread) while plugin code runs: a ``KeyboardInterrupt`` that
follows a SIGINT is re-raised, one without is the plugin's. What a plugin prints to stdout while
it is imported or its hooks run goes to stderr, so that ``--json`` output stays clean. Each
plugin's import and hook time is recorded (``PluginRecord.seconds``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pluggy

from .. import hookspecs
from ..contract._family import ExporterSpec, FamilySpec, ImporterSpec
from ..errors import PluginConflictError, PluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "QUALIFIER",
    "ENV_BLOCK",
    "ENV_PLUGINS",
    "ENV_STRICT",
    "Discovery",
    "PluginRecord",
    "discover",
    "qualified_name",
]

#: Entry point group a plugin distribution declares its plugin modules in.
ENTRY_POINT_GROUP: Final = "worldflux_registry"
#: ``1`` makes discovery raise on the first broken or conflicting plugin (CI of plugin packages).
ENV_STRICT: Final = "WORLDFLUX_REGISTRY_STRICT"
#: Comma list of distributions whose entry points load; empty string: none; unset: all.
ENV_PLUGINS: Final = "WORLDFLUX_REGISTRY_PLUGINS"
#: Comma list of distributions whose entry points never load.
ENV_BLOCK: Final = "WORLDFLUX_REGISTRY_BLOCK"

STATUSES: Final = ("ok", "broken", "blocked", "conflict")


@dataclass(frozen=True)
class PluginRecord:
    """What discovery made of one plugin.

    Attributes:
        distribution: Providing distribution (None for a plugin object passed directly).
        version: Its version.
        entry_point: ``"name = module"`` as declared, or the plugin's name when passed directly.
        status: ``"ok"``, ``"broken"`` (import error, raising hook, invalid spec, hook rejected
            by pluggy), ``"blocked"`` (switched off by environment) or ``"conflict"`` (a family,
            alias or exporter name it provides is also claimed elsewhere).
        error: Why the plugin is not ``"ok"``.
        families: Family names it provides (or tried to provide).
        exporters: Exporter names it provides (or tried to provide).
        importers: Importer names (``family:source_format``) it provides (or tried to).
        seconds: Time its import and hooks took (None when it was not loaded).
    """

    distribution: str | None
    version: str | None
    entry_point: str
    status: str
    error: str | None = None
    families: tuple[str, ...] = ()
    exporters: tuple[str, ...] = ()
    importers: tuple[str, ...] = ()
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (``worldflux-registry plugins --json``)."""
        return {
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "status": self.status,
            "error": self.error,
            "families": list(self.families),
            "exporters": list(self.exporters),
            "importers": list(self.importers),
            "seconds": self.seconds,
        }


@dataclass
class Discovery:
    """Result of one discovery pass (the registry's index; treat as read-only)."""

    # family name -> spec, for names claimed exactly once
    families: dict[str, FamilySpec] = field(default_factory=dict)
    # alias -> family name, for aliases claimed exactly once
    aliases: dict[str, str] = field(default_factory=dict)
    # exporter name -> spec, for names claimed exactly once
    exporters: dict[str, ExporterSpec] = field(default_factory=dict)
    # importer name (family:source_format) -> spec, for names claimed exactly once
    importers: dict[str, ImporterSpec] = field(default_factory=dict)
    # family/alias/exporter/importer name claimed more than once -> the PluginConflictError to raise
    conflicts: dict[str, PluginConflictError] = field(default_factory=dict)
    # name a broken plugin provides (or its entry point name) -> the PluginError to raise
    broken: dict[str, PluginError] = field(default_factory=dict)
    # "distribution::family" -> spec, for every family of a distribution, conflicting or not
    qualified: dict[str, FamilySpec] = field(default_factory=dict)
    records: list[PluginRecord] = field(default_factory=list)
    plugin_manager: pluggy.PluginManager | None = None


@dataclass
class _Candidate:
    """One plugin on its way through discovery."""

    name: str
    entry_point: str
    distribution: str | None
    version: str | None
    load: Any  # () -> plugin object
    families: list[FamilySpec] = field(default_factory=list)
    exporters: list[ExporterSpec] = field(default_factory=list)
    importers: list[ImporterSpec] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    claimed_families: tuple[str, ...] = ()
    claimed_exporters: tuple[str, ...] = ()
    claimed_importers: tuple[str, ...] = ()
    seconds: float = 0.0


#: Separator of a distribution-qualified family reference: ``worldflux-dreamerv3::dreamerv3``.
#: Neither family names nor presets may contain ``:``, and a ref without ``/`` or a leading
#: ``.`` is never a path, so the form cannot collide with either.
QUALIFIER: Final = "::"


def qualified_name(distribution: str, family: str) -> str:
    """``"<normalised distribution>::<family>"``, the reference that survives a conflict."""
    return f"{normalize(distribution)}{QUALIFIER}{family}"


class _Interrupted:
    """Whether a real SIGINT arrived while plugin code ran."""

    seen = False


@contextlib.contextmanager
def _plugin_code(cand: _Candidate, interrupted: type[_Interrupted]) -> Iterator[None]:
    """Run plugin code: stdout to stderr, SIGINT noted, time added to ``cand.seconds``."""
    start = time.perf_counter()
    previous = None
    main = threading.current_thread() is threading.main_thread()
    if main:

        def on_sigint(signum: int, frame: Any) -> None:
            interrupted.seen = True
            raise KeyboardInterrupt

        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except (ValueError, OSError):  # pragma: no cover - embedded interpreters
            main = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        cand.seconds += time.perf_counter() - start


def _is_real_interrupt(exc: BaseException, interrupted: type[_Interrupted]) -> bool:
    if not isinstance(exc, KeyboardInterrupt):
        return False
    # Outside the main thread no handler could be installed: treat it as real.
    return interrupted.seen or threading.current_thread() is not threading.main_thread()


def _plugin_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "raised KeyboardInterrupt itself (no Ctrl-C was pressed)"
    return _describe(exc)


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {normalize(p.strip()) for p in raw.split(",") if p.strip()}


def strict_from_env() -> bool:
    """True when ``WORLDFLUX_REGISTRY_STRICT`` asks for strict discovery."""
    return os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on")


def _entry_point_candidates() -> list[_Candidate]:
    from importlib.metadata import entry_points

    allowed = _env_list(ENV_PLUGINS)
    blocked = _env_list(ENV_BLOCK) or set()
    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        # One metadata parse per plugin: it is the bulk of discovery's cost.
        meta = dist.metadata if dist is not None else None
        dist_name = meta["Name"] if meta is not None else None
        cand = _Candidate(
            name=ep.name,
            entry_point=f"{ep.name} = {ep.value}",
            distribution=dist_name,
            version=meta["Version"] if meta is not None else None,
            load=ep.load,
        )
        key = normalize(dist_name or "")
        if key in blocked:
            cand.status, cand.error = "blocked", f"distribution is listed in {ENV_BLOCK}"
        elif allowed is not None and key not in allowed:
            cand.status, cand.error = "blocked", f"distribution is not listed in {ENV_PLUGINS}"
        out.append(cand)
    out.sort(key=lambda c: (normalize(c.distribution or ""), c.name))
    return out


def _object_candidates(plugins: Sequence[object]) -> list[_Candidate]:
    out = []
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}#{i}"
        out.append(
            _Candidate(
                name=name,
                entry_point=name,
                distribution=None,
                version=None,
                load=lambda p=plugin: p,
            )
        )
    return out


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, PluginError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _call_hook(
    pm: pluggy.PluginManager, hook: str, plugin: object, others: list[object]
) -> list[Any]:
    # A subset caller runs only this plugin's implementation, so an exception is its own.
    caller = pm.subset_hook_caller(hook, remove_plugins=others)
    results = caller()
    out: list[Any] = []
    for result in results:
        if not isinstance(result, (list, tuple)):
            raise PluginError(f"hook {hook}() returned {type(result).__name__}, not a list")
        out.extend(result)
    return out


def _collect(
    pm: pluggy.PluginManager, cand: _Candidate, plugin: object, others: list[object]
) -> None:
    families = _call_hook(pm, "worldflux_registry_families", plugin, others)
    exporters = _call_hook(pm, "worldflux_registry_exporters", plugin, others)
    importers = _call_hook(pm, "worldflux_registry_importers", plugin, others)
    # Record what it claims before validating, so a lookup of an invalid family names the plugin.
    cand.claimed_families = _names(families)
    cand.claimed_exporters = _names(exporters)
    cand.claimed_importers = _names(importers)
    for spec in families:
        if not isinstance(spec, FamilySpec):
            raise PluginError(f"families hook returned {type(spec).__name__}, not FamilySpec")
        spec.validate()
        cand.families.append(spec)
    for spec in exporters:
        if not isinstance(spec, ExporterSpec):
            raise PluginError(f"exporters hook returned {type(spec).__name__}, not ExporterSpec")
        spec.validate()
        cand.exporters.append(spec)
    for spec in importers:
        if not isinstance(spec, ImporterSpec):
            raise PluginError(f"importers hook returned {type(spec).__name__}, not ImporterSpec")
        spec.validate()
        cand.importers.append(spec)


def _names(specs: list[Any]) -> tuple[str, ...]:
    return tuple(n for n in (getattr(s, "name", None) for s in specs) if isinstance(n, str))


def discover(
    *,
    entry_points: bool = True,
    plugins: Sequence[object] = (),
    strict: bool | None = None,
) -> Discovery:
    """Find, load and index every plugin; broken ones are recorded, not raised.

    Args:
        entry_points: Load plugins declared in the ``worldflux_registry`` entry point group
            (filtered by ``WORLDFLUX_REGISTRY_PLUGINS`` / ``WORLDFLUX_REGISTRY_BLOCK``).
        plugins: Plugin modules or objects registered directly, after the entry points.
        strict: Raise `PluginError` on the first broken or conflicting plugin; None reads
            ``WORLDFLUX_REGISTRY_STRICT``.
    """
    strict = strict_from_env() if strict is None else strict
    _Interrupted.seen = False
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    candidates = (_entry_point_candidates() if entry_points else []) + _object_candidates(plugins)
    loaded: list[tuple[_Candidate, object]] = []
    for cand in candidates:
        if cand.status != "ok":
            continue
        plugin = _load_one(pm, cand)
        if plugin is not None:
            loaded.append((cand, plugin))
    objects = [p for _, p in loaded]
    for cand, plugin in loaded:
        try:
            with _plugin_code(cand, _Interrupted):
                _collect(pm, cand, plugin, [o for o in objects if o is not plugin])
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            if _is_real_interrupt(exc, _Interrupted):
                raise
            cand.status, cand.error = "broken", _plugin_failure(exc)
            cand.families.clear()
            cand.exporters.clear()
            cand.importers.clear()
    result = _index(candidates)
    result.plugin_manager = pm
    if strict:
        for record in result.records:
            if record.status in ("broken", "conflict"):
                raise PluginError(
                    f"plugin {record.entry_point!r} from {record.distribution or 'code'} is "
                    f"{record.status}: {record.error}",
                    hint=f"strict discovery is on ({ENV_STRICT}=1)",
                    distribution=record.distribution,
                )
        # A plugin module can load while its model module cannot: strict mode imports each
        # family's model class now (torch and the model code), as building a model would.
        for spec in result.families.values():
            check_model_target(spec)
    return result


def check_model_target(spec: Any) -> None:
    """Import the model class ``spec.model`` names; raise `PluginError` naming the family,
    the target and the import failure (what strict discovery and ``plugins --strict`` run)."""
    resolve_target(spec.model, what=f"family {spec.name!r} model", distribution=spec.distribution)


def _load_one(pm: pluggy.PluginManager, cand: _Candidate) -> object | None:
    try:
        with _plugin_code(cand, _Interrupted):
            plugin: object = cand.load()
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        if _is_real_interrupt(exc, _Interrupted):
            raise
        cand.status, cand.error = "broken", f"import failed: {_plugin_failure(exc)}"
        return None
    try:
        pm.register(plugin, name=f"{cand.distribution or '<code>'}:{cand.entry_point}")
    except pluggy.PluginValidationError as exc:
        cand.status, cand.error = "broken", f"rejected by pluggy: {exc}"
        return None
    except ValueError as exc:  # the same object registered twice
        cand.status, cand.error = "broken", f"rejected by pluggy: {exc}"
        return None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # Earlier plugins already passed check_pending, so the unknown hook is this one's.
        pm.unregister(plugin)
        cand.status, cand.error = "broken", f"rejected by pluggy: {exc}"
        return None
    return plugin


def _index(candidates: Sequence[_Candidate]) -> Discovery:
    result = Discovery()
    claims: dict[str, list[tuple[str, _Candidate, Any]]] = {}
    exporter_claims: dict[str, list[tuple[_Candidate, ExporterSpec]]] = {}
    importer_claims: dict[str, list[tuple[_Candidate, ImporterSpec]]] = {}
    for cand in candidates:
        if cand.status == "broken":
            broken = PluginError(
                f"plugin {cand.entry_point!r} from {cand.distribution or 'code'} "
                f"{cand.version or ''} is broken: {cand.error}".replace("  ", " "),
                hint="fix or uninstall the plugin, or block it with "
                f"{ENV_BLOCK}={cand.distribution or '<distribution>'}",
                distribution=cand.distribution,
            )
            claimed = (*cand.claimed_families, *cand.claimed_exporters, *cand.claimed_importers)
            for name in {cand.name, *claimed}:
                result.broken.setdefault(name, broken)
            continue
        for spec in cand.families:
            spec = _with_distribution(spec, cand)
            if cand.distribution:
                result.qualified.setdefault(qualified_name(cand.distribution, spec.name), spec)
            claims.setdefault(spec.name, []).append(("family", cand, spec))
            for alias in spec.aliases:
                claims.setdefault(alias, []).append(("alias", cand, spec))
        for exporter in cand.exporters:
            exporter = _with_distribution(exporter, cand)
            exporter_claims.setdefault(exporter.name, []).append((cand, exporter))
        for importer in cand.importers:
            importer = _with_distribution(importer, cand)
            importer_claims.setdefault(importer.name, []).append((cand, importer))

    conflicted: dict[int, list[str]] = {}
    for name, owners in claims.items():
        if len(owners) == 1:
            kind, _, spec = owners[0]
            if kind == "family":
                result.families[name] = spec
            else:
                result.aliases[name] = spec.name
            continue
        result.conflicts[name] = _conflict(name, [(c, f"{k} of {s.name!r}") for k, c, s in owners])
        for _, cand, _ in owners:
            conflicted.setdefault(id(cand), []).append(name)
    for name, exporter_owners in exporter_claims.items():
        if len(exporter_owners) == 1:
            result.exporters[name] = exporter_owners[0][1]
            continue
        result.conflicts[name] = _conflict(name, [(c, "exporter") for c, _ in exporter_owners])
        for cand, _ in exporter_owners:
            conflicted.setdefault(id(cand), []).append(name)
    for name, importer_owners in importer_claims.items():
        if len(importer_owners) == 1:
            result.importers[name] = importer_owners[0][1]
            continue
        result.conflicts[name] = _conflict(name, [(c, "importer") for c, _ in importer_owners])
        for cand, _ in importer_owners:
            conflicted.setdefault(id(cand), []).append(name)
    # An alias whose family lost a conflict points nowhere: it resolves to the conflict instead.
    for alias, family in list(result.aliases.items()):
        if family not in result.families and family in result.conflicts:
            result.conflicts[alias] = result.conflicts[family]
            del result.aliases[alias]

    for cand in candidates:
        status, error = cand.status, cand.error
        names = conflicted.get(id(cand))
        if status == "ok" and names:
            status = "conflict"
            error = "; ".join(str(result.conflicts[n].message) for n in sorted(set(names)))
        result.records.append(
            PluginRecord(
                distribution=cand.distribution,
                version=cand.version,
                entry_point=cand.entry_point,
                status=status,
                error=error,
                families=cand.claimed_families,
                exporters=cand.claimed_exporters,
                importers=cand.claimed_importers,
                seconds=round(cand.seconds, 4) if cand.status != "blocked" else None,
            )
        )
    return result


def _with_distribution(spec: Any, cand: _Candidate) -> Any:
    import dataclasses

    if cand.distribution is None or spec.distribution is not None:
        return spec
    return dataclasses.replace(
        spec, distribution=cand.distribution, distribution_version=cand.version
    )


def _conflict(name: str, owners: list[tuple[_Candidate, str]]) -> PluginConflictError:
    who = [f"{c.distribution or c.entry_point} ({what})" for c, what in owners]
    dists = [c.distribution or c.entry_point for c, _ in owners]
    refs = sorted({qualified_name(c.distribution, name) for c, _ in owners if c.distribution})
    reach = f"; or name one by distribution: {' or '.join(refs)}" if len(refs) > 1 else ""
    return PluginConflictError(
        f"name {name!r} is claimed by " + " and by ".join(who),
        hint="uninstall one of "
        + ", ".join(sorted(set(dists)))
        + f" or block it with {ENV_BLOCK}"
        + reach,
        distribution=dists[0],
        distributions=tuple(dists),
        family=name,
    )


def resolve_target(target: str, *, what: str, distribution: str | None = None) -> Any:
    """Import ``"package.module:attr"`` now; raise `PluginError` naming ``what`` on failure."""
    import importlib

    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginError(
            f"cannot import {what} {target!r}: {_describe(exc)}",
            hint=f"reinstall {distribution}" if distribution else "check the plugin's install",
            distribution=distribution,
        ) from exc
    return obj
