"""The registry: discover families, resolve refs, load models.

Discovery runs lazily on first use and is cached; every method is thread-safe. Listing, resolving
and fingerprinting never import torch or a family's model module.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..contract._family import ExporterSpec, FamilySpec, ImporterSpec
from ..contract._importing import ImportedCheckpoint
from ..contract._io import Capability, IOContract
from ..errors import (
    AmbiguousReferenceError,
    ConfigError,
    PluginConflictError,
    ResolutionError,
    WorldFluxRegistryError,
    did_you_mean,
)
from ._artifact import MANIFEST_FILE, read_artifact_manifest
from ._discovery import (
    QUALIFIER,
    Discovery,
    PluginRecord,
    discover,
    normalize,
    resolve_target,
)
from ._load import _place, load_checkpoint, recover

if TYPE_CHECKING:
    import torch

    from ..protocol._model import WorldModel

__all__ = ["Registry", "Resolved", "registry"]

FINGERPRINT_PREFIX: Final = "sha256:"
MIN_PREFIX: Final = 8
_HEX = re.compile(r"^[0-9a-f]+$")
KINDS: Final = ("preset", "checkpoint", "artifact")


@dataclass(frozen=True)
class Resolved:
    """What a ref names, found without importing torch.

    Attributes:
        kind: ``"preset"`` (a family preset), ``"checkpoint"`` (a `save_pretrained` directory) or
            ``"artifact"`` (an export directory with a ``manifest.json``).
        ref: The ref as given.
        family: Family name.
        preset: Preset name (as saved, for directories; may be None).
        config: Full config (a copy; empty for artifacts whose manifest carries none).
        fingerprint: Contract fingerprint (``"sha256:..."``), None when unknown.
        path: Directory, for checkpoints and artifacts.
        distribution: Distribution providing the family (or the artifact's exporter).
        artifact_format: The manifest's ``format``, for artifacts.
    """

    kind: str
    ref: str
    family: str | None
    preset: str | None
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)
    fingerprint: str | None = None
    path: str | None = None
    distribution: str | None = None
    artifact_format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (``worldflux-registry resolve --json``)."""
        return {
            "kind": self.kind,
            "ref": self.ref,
            "family": self.family,
            "preset": self.preset,
            "config": dict(self.config),
            "fingerprint": self.fingerprint,
            "path": self.path,
            "distribution": self.distribution,
            "artifact_format": self.artifact_format,
        }


def is_path_ref(ref: str | os.PathLike[str]) -> bool:
    """True when ``ref`` names a directory: a `Path`, or text containing ``/`` or starting ``.``."""
    if not isinstance(ref, str):
        return True
    return "/" in ref or "\\" in ref or ref.startswith(".")


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


class Registry:
    """Model families and exporters published by plugins, and how to load them.

    Args:
        entry_points: Discover plugins from the ``worldflux_registry`` entry point group.
        plugins: Plugin modules or objects (with ``@hookimpl`` functions) to register directly;
            ``Registry(entry_points=False, plugins=[my_plugin])`` is an isolated registry.
        strict: Raise at discovery on a broken or conflicting plugin; None reads
            ``WORLDFLUX_REGISTRY_STRICT``.

    Examples:
        >>> from worldflux_registry import registry
        >>> registry.list("dreamer*")  # doctest: +SKIP
        ['dreamerv3']
        >>> model = registry.load("dreamerv3:ci")  # doctest: +SKIP
    """

    def __init__(
        self,
        entry_points: bool = True,
        plugins: Sequence[object] | None = None,
        *,
        strict: bool | None = None,
    ) -> None:
        self._entry_points = entry_points
        self._plugins = list(plugins or ())
        self._strict = strict
        self._lock = threading.RLock()
        self._discovery: Discovery | None = None
        # fingerprint -> [(family, preset)] in listing order; built on the first sha256 ref
        self._fingerprints: dict[str, list[tuple[str, str]]] | None = None

    def __repr__(self) -> str:
        state = "discovered" if self._discovery is not None else "not yet discovered"
        return f"<Registry entry_points={self._entry_points} plugins={len(self._plugins)} {state}>"

    # -- discovery -------------------------------------------------------------------------
    def _index(self) -> Discovery:
        found = self._discovery
        if found is None:
            with self._lock:
                if self._discovery is None:
                    self._discovery = discover(
                        entry_points=self._entry_points, plugins=self._plugins, strict=self._strict
                    )
                found = self._discovery
        return found

    def refresh(self) -> None:
        """Forget what was discovered; the next call discovers again (after installs)."""
        with self._lock:
            self._discovery = None
            self._fingerprints = None

    def plugins(self) -> list[PluginRecord]:
        """One record per plugin: distribution, version, entry point, status and error."""
        return list(self._index().records)

    # -- families --------------------------------------------------------------------------
    def list(
        self, pattern: str | None = None, capability: Capability | str | None = None
    ) -> list[str]:
        """Sorted names of the families that can be loaded.

        Args:
            pattern: fnmatch pattern over family names (``"dreamer*"``).
            capability: Keep families that declare this capability.
        """
        index = self._index()
        cap = Capability.parse(capability) if capability is not None else None
        names = [
            name
            for name, spec in index.families.items()
            if (pattern is None or fnmatchcase(name, pattern))
            and (cap is None or cap in spec.capabilities)
        ]
        return sorted(names, key=_natural_key)

    def get(self, name: str) -> FamilySpec:
        """The `FamilySpec` of a family name or alias, or of ``distribution::family``.

        ``worldflux-dreamerv3::dreamerv3`` names the family of one distribution even when
        another distribution claims the same name (which makes the bare name a conflict).

        Raises:
            PluginConflictError: two distributions claim ``name`` (both are named).
            PluginError: the plugin that provides ``name`` is broken (the reason is given).
            ResolutionError: no plugin provides ``name`` (with the closest names).
        """
        index = self._index()
        if QUALIFIER in name:
            return self._get_qualified(index, name)
        spec = index.families.get(name)
        if spec is None and name in index.aliases:
            spec = index.families.get(index.aliases[name])
        if spec is not None:
            return spec  # frozen: safe to share
        if name in index.conflicts:
            raise index.conflicts[name]
        if name in index.broken:
            raise index.broken[name]
        known = [*index.families, *index.aliases]
        raise ResolutionError(
            f"no model family named {name!r}.{did_you_mean(name, known, index.aliases)}",
            hint="installed families: "
            + (", ".join(self.list()) or "none")
            + "; see `worldflux-registry plugins` for plugins that failed to load",
            family=name,
        )

    def _spec_of(self, resolved: Resolved) -> FamilySpec:
        """The spec a resolution names: by distribution when its bare name is a conflict."""
        try:
            return self.get(resolved.family or "")
        except PluginConflictError:
            if not resolved.distribution:
                raise
            return self.get(f"{resolved.distribution}{QUALIFIER}{resolved.family}")

    def _get_qualified(self, index: Discovery, name: str) -> FamilySpec:
        dist, _, family = name.partition(QUALIFIER)
        spec = index.qualified.get(f"{normalize(dist)}{QUALIFIER}{family}")
        if spec is not None:
            return spec
        known = sorted(index.qualified)
        raise ResolutionError(
            f"no distribution {dist!r} provides a family named {family!r}."
            f"{did_you_mean(name, known)}",
            hint="distribution-qualified refs: " + (", ".join(known) or "none"),
        )

    def exporters(self) -> builtins.list[ExporterSpec]:
        """Every exporter that can be used, sorted by name."""
        index = self._index()
        return [index.exporters[n] for n in sorted(index.exporters, key=_natural_key)]

    def get_exporter(self, name: str) -> ExporterSpec:
        """The `ExporterSpec` named ``name`` (errors as for `get`)."""
        index = self._index()
        if name in index.exporters:
            return index.exporters[name]
        if name in index.conflicts:
            raise index.conflicts[name]
        if name in index.broken:
            raise index.broken[name]
        raise ResolutionError(
            f"no exporter named {name!r}.{did_you_mean(name, index.exporters)}",
            hint="installed exporters: "
            + (", ".join(sorted(index.exporters)) or "none")
            + " (the ONNX exporter: pip install 'worldflux-registry[onnx]')",
        )

    def importers(self, family: str | None = None) -> builtins.list[ImporterSpec]:
        """Every usable importer of foreign checkpoints (of ``family`` when given), by name."""
        index = self._index()
        wanted = None if family is None else self.get(family).name
        return [
            index.importers[n]
            for n in sorted(index.importers, key=_natural_key)
            if wanted is None or index.importers[n].family == wanted
        ]

    def get_importer(self, family: str, source_format: str | None = None) -> ImporterSpec:
        """The importer of ``source_format`` into ``family`` (the only one when None).

        Raises:
            ResolutionError: the family has no importer, or none of that format.
            AmbiguousReferenceError: the family has several and ``source_format`` is None.
            PluginConflictError, PluginError: as for `get`.
        """
        name = self.get(family).name
        index = self._index()
        if source_format is not None:
            key = f"{name}:{source_format}"
            if key in index.conflicts:
                raise index.conflicts[key]
            if key in index.broken:
                raise index.broken[key]
        candidates = self.importers(name)
        if source_format is not None:
            found = [c for c in candidates if c.source_format == source_format]
        else:
            found = candidates
        formats = [c.source_format for c in candidates]
        if not found:
            what = f"no importer of {source_format!r} into" if source_format else "no importer for"
            raise ResolutionError(
                f"{what} family {name!r}.{did_you_mean(source_format or '', formats)}",
                hint=(
                    "formats it imports: " + ", ".join(formats)
                    if formats
                    else "install a plugin that ships one; "
                    "`worldflux-registry plugins` lists what each plugin provides"
                ),
                family=name,
            )
        if len(found) > 1:
            raise AmbiguousReferenceError(
                f"family {name!r} imports several formats: {', '.join(formats)}",
                hint="name one with --format (Python: source_format=...)",
                family=name,
            )
        return found[0]

    def import_checkpoint(
        self,
        family: str,
        source: str | os.PathLike[str],
        out: str | os.PathLike[str],
        *,
        config: Mapping[str, str] | None = None,
        source_format: str | None = None,
    ) -> ImportedCheckpoint:
        """Read a foreign checkpoint with the family's importer; save it as a checkpoint in ``out``.

        ``config`` gives, as strings, what the source does not record (the importer's error
        names each missing field). The saved ``config.json`` carries the import's provenance
        (source format and sha256, official commit, every tensor mapped or dropped, and why);
        ``registry.load(out)`` then loads it like any checkpoint.

        Raises:
            CheckpointError: the source cannot be read, holds an unknown tensor, or a field is
                missing; or the importer returned something other than an `ImportedCheckpoint`
                of ``family``.
            ResolutionError: no such family, or it has no importer of that format.
        """
        from ._import import run_importer

        spec = self.get(family)
        importer = self.get_importer(spec.name, source_format)
        return run_importer(spec, importer, source, out, dict(config or {}), registry=self)

    @property
    def plugin_manager(self) -> Any:
        """The `pluggy.PluginManager` holding the loaded plugins (read-only use)."""
        return self._index().plugin_manager

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, ref: str | os.PathLike[str]) -> Resolved:
        """What ``ref`` names: a family, alias, ``family:preset``, ``sha256:<prefix>`` or dir.

        A fingerprint prefix needs at least 8 hex digits. When several presets share the
        fingerprint it resolves only if they are one family with one config; otherwise
        `AmbiguousReferenceError` lists them (``.candidates``) and asks for ``family:preset``.
        `find` returns every match instead.

        Raises:
            ResolutionError: unknown name, preset, fingerprint or directory.
            AmbiguousReferenceError: a fingerprint prefix that matches several candidates.
            PluginError: the plugin providing the family is broken or in conflict.
        """
        if not isinstance(ref, str) or is_path_ref(ref):
            return self._resolve_path(Path(ref), os.fspath(ref))
        if ref.startswith(FINGERPRINT_PREFIX):
            matches = self.find(ref)
            return self._pick(ref, matches)
        qualifier = ""
        if QUALIFIER in ref:  # "distribution::family[:preset]": reachable despite a conflict
            dist, _, ref_tail = ref.partition(QUALIFIER)
            qualifier = dist + QUALIFIER
        else:
            ref_tail = ref
        name, sep, preset = ref_tail.partition(":")
        name = qualifier + name
        if sep and not preset:
            raise ResolutionError(
                f"ref {ref!r} names no preset after ':'", hint="use family:preset"
            )
        spec = self.get(name)
        preset_name = preset if sep else spec.default_preset
        config = spec.config(preset_name)
        return Resolved(
            kind="preset",
            ref=ref,
            family=spec.name,
            preset=preset_name,
            config=config,
            fingerprint=spec.contract_for(config).fingerprint(),
            distribution=spec.distribution,
        )

    def find(self, fingerprint: str) -> builtins.list[Resolved]:
        """Every family preset whose contract fingerprint starts with ``fingerprint``.

        ``fingerprint`` is ``"sha256:"`` followed by at least 8 hex digits (or all 64).
        Families whose ``contract()`` fails are left out (``get`` reports them).
        """
        digits = fingerprint[len(FINGERPRINT_PREFIX) :].lower()
        if not fingerprint.startswith(FINGERPRINT_PREFIX) or not _HEX.match(digits):
            raise ResolutionError(
                f"{fingerprint!r} is not a contract fingerprint",
                hint="write sha256: followed by hex digits, e.g. sha256:1a2b3c4d",
            )
        if len(digits) < MIN_PREFIX:
            raise ResolutionError(
                f"fingerprint prefix {fingerprint!r} is shorter than {MIN_PREFIX} hex digits",
                hint="give at least 8 hex digits after 'sha256:'",
            )
        table = self._fingerprint_table()
        out: builtins.list[Resolved] = []
        for full, owners in table.items():
            if full[len(FINGERPRINT_PREFIX) :].startswith(digits):
                for family, preset in owners:
                    spec = self._index().families[family]
                    out.append(
                        Resolved(
                            kind="preset",
                            ref=fingerprint,
                            family=family,
                            preset=preset,
                            config=spec.config(preset),
                            fingerprint=full,
                            distribution=spec.distribution,
                        )
                    )
        return out

    def _fingerprint_table(self) -> dict[str, builtins.list[tuple[str, str]]]:
        table = self._fingerprints
        if table is not None:
            return table
        with self._lock:
            if self._fingerprints is None:
                index = self._index()
                built: dict[str, builtins.list[tuple[str, str]]] = {}
                for family in sorted(index.families, key=_natural_key):
                    spec = index.families[family]
                    for preset in spec.presets:
                        try:
                            fp = spec.contract_for(spec.config(preset)).fingerprint()
                        except WorldFluxRegistryError:
                            continue
                        built.setdefault(fp, []).append((family, preset))
                self._fingerprints = built
            return self._fingerprints

    def _pick(self, ref: str, matches: builtins.list[Resolved]) -> Resolved:
        if not matches:
            raise ResolutionError(
                f"no installed family preset has a contract fingerprint starting {ref!r}",
                hint="`worldflux-registry info <family>` prints fingerprints; the family that "
                "produced it may not be installed",
            )
        if len(matches) == 1:
            return matches[0]
        fingerprints = {m.fingerprint for m in matches}
        families = {m.family for m in matches}
        configs = {json.dumps(dict(m.config), sort_keys=True, default=str) for m in matches}
        if len(fingerprints) == 1 and len(families) == 1 and len(configs) == 1:
            # Presets that are one config under several names: any of them builds the same model.
            spec = self.get(matches[0].family or "")
            for m in matches:
                if m.preset == spec.default_preset:
                    return m
            return matches[0]
        candidates = [f"{m.family}:{m.preset} ({m.fingerprint})" for m in matches]
        what = "fingerprint prefix" if len(fingerprints) > 1 else "fingerprint"
        raise AmbiguousReferenceError(
            f"{what} {ref!r} matches {len(matches)} presets: " + ", ".join(candidates),
            hint="use family:preset, or a longer prefix"
            if len(fingerprints) > 1
            else "these presets share one contract; name one as family:preset",
            candidates=tuple(f"{m.family}:{m.preset}" for m in matches),
        )

    def _resolve_path(self, path: Path, ref: str) -> Resolved:
        if not path.is_dir():
            recover(path)  # a checkpoint a killed writer left aside is put back first
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ResolutionError(
                f"{ref!r} {what}",
                hint="a ref containing '/' or starting with '.' is a checkpoint or export "
                "directory; family names never contain '/'",
            )
        from ..checkpoint._format import CONFIG_FILE, FORMAT, WEIGHTS_FILE, read_config

        config_file, manifest_file = path / CONFIG_FILE, path / MANIFEST_FILE
        is_checkpoint = (path / WEIGHTS_FILE).is_file() or _json_format(config_file) == FORMAT
        if is_checkpoint or (config_file.is_file() and not manifest_file.is_file()):
            # read_config raises CheckpointError naming exactly what is wrong with the directory.
            data = read_config(path)
            return Resolved(
                kind="checkpoint",
                ref=ref,
                family=_opt_str(data.get("family")),
                preset=_opt_str(data.get("preset")),
                config=dict(data["config"]),
                fingerprint=_opt_str(data.get("fingerprint")),
                path=str(path),
                distribution=_opt_str(data.get("distribution")),
            )
        if manifest_file.is_file():
            data = read_artifact_manifest(path)
            fmt = data["format"]
            index = self._index()
            for exporter in index.exporters.values():
                if exporter.artifact_format and exporter.artifact_format == fmt:
                    return Resolved(
                        kind="artifact",
                        ref=ref,
                        family=_opt_str(data.get("family")),
                        preset=_opt_str(data.get("preset")),
                        config=dict(data.get("config") or {}),
                        fingerprint=_opt_str(data.get("fingerprint")),
                        path=str(path),
                        distribution=exporter.distribution,
                        artifact_format=str(fmt),
                    )
            known = sorted(e.artifact_format for e in index.exporters.values() if e.artifact_format)
            raise ResolutionError(
                f"no installed exporter loads artifacts of format {fmt!r} ({manifest_file})",
                hint="install the exporter that wrote it (ONNX: pip install "
                "'worldflux-registry[onnx]'); loadable formats: " + (", ".join(known) or "none"),
            )
        raise ResolutionError(
            f"{ref!r} holds neither a worldflux checkpoint (config.json) nor an export "
            "(manifest.json)",
            hint="save with model.save_pretrained(dir) or export(model, 'onnx', dir)",
        )

    # -- loading ---------------------------------------------------------------------------
    def load(
        self,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        validate: bool | None = None,
        **config_overrides: Any,
    ) -> WorldModel:
        """Build the model ``ref`` names, in eval mode on ``device`` / ``dtype``.

        ``validate=True`` turns on the model's `WorldModel.validate_outputs` (every step's
        outputs checked against the contract; an ONNX export's too); None keeps the default
        (``WORLDFLUX_REGISTRY_VALIDATE``).

        Family and preset refs build fresh (randomly initialised) weights from the config with
        ``config_overrides`` applied (unknown fields raise `ConfigError` with the closest
        names). Checkpoint directories load their weights after the checks listed in
        `load_checkpoint`. Export directories go to the loader of the exporter whose
        ``artifact_format`` the manifest names, with ``device``, ``dtype`` and the overrides as
        options.
        """
        resolved = self.resolve(ref)
        if resolved.kind == "checkpoint":
            if config_overrides:
                raise ConfigError(
                    f"config overrides {sorted(config_overrides)} cannot apply to checkpoint "
                    f"{resolved.path!r}",
                    hint="a checkpoint's config is fixed by its weights; load a preset instead",
                )

            model = load_checkpoint(resolved.path or "", registry=self, device=device, dtype=dtype)
        elif resolved.kind == "artifact":
            model = self._load_artifact(resolved, device, dtype, config_overrides)
        else:
            spec = self._spec_of(resolved)
            config = spec.config(resolved.preset, **config_overrides)
            model = self.build(spec, config, preset=resolved.preset, device=device, dtype=dtype)
        if validate is not None:
            model.validate_outputs = bool(validate)
        return model

    def build(
        self,
        spec: FamilySpec,
        config: Mapping[str, Any],
        *,
        preset: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> WorldModel:
        """Import ``spec.model`` now and build it from a full ``config`` (no weights loaded).

        The model keeps ``spec`` as ``model.family_spec``, which its ``io_contract()`` reads.

        Raises:
            ConfigError: before anything is allocated, a field of the wrong type, a value the
                family's ``validate_config`` rejects, or more parameters than its ceiling
                (`FamilySpec.check_config`); and a constructor that fails on the config.
        """
        from ..protocol._model import WorldModel

        cls = resolve_target(
            spec.model, what=f"family {spec.name!r} model", distribution=spec.distribution
        )
        if not (isinstance(cls, type) and issubclass(cls, WorldModel)):
            from ..errors import PluginError

            raise PluginError(
                f"family {spec.name!r} model {spec.model!r} is not a WorldModel subclass",
                hint="report this to the family's authors",
                family=spec.name,
                distribution=spec.distribution,
            )
        spec.check_config(config)  # types, the family's rules, the parameter ceiling
        try:
            model = cls.from_config(dict(config))
        except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
            from ..errors import ConfigError

            raise ConfigError(
                f"family {spec.name!r} could not be built from its config: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
                hint="a config value is out of the range the family supports",
                family=spec.name,
            ) from exc
        model.preset = preset
        # The base io_contract() reads it, so a model built by an isolated registry (whose
        # family the process-wide one may not know) still has its contract.
        model.family_spec = spec
        # A family whose contract() is broken fails here, at load, not at first use.
        model.io_contract()
        return _place(model, device, dtype).eval()

    def _load_artifact(
        self,
        resolved: Resolved,
        device: Any,
        dtype: Any,
        options: dict[str, Any],
    ) -> WorldModel:
        exporter = next(
            e
            for e in self._index().exporters.values()
            if e.artifact_format == resolved.artifact_format
        )
        loader = resolve_target(
            exporter.loader or "",
            what=f"exporter {exporter.name!r} loader",
            distribution=exporter.distribution,
        )
        if device is not None:
            options["device"] = device
        if dtype is not None:
            options["dtype"] = dtype
        model: WorldModel = loader(resolved.path, **options)
        return model

    def contract(self, ref: str | os.PathLike[str]) -> IOContract:
        """The contract of the preset (or saved config) ``ref`` names, without importing torch."""
        resolved = self.resolve(ref)
        if resolved.kind == "artifact":
            raise ResolutionError(f"{ref!r} is an export artifact; read its manifest.json")
        spec = self.get(resolved.family or "")
        return spec.contract_for(dict(spec.defaults) | dict(resolved.config))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_format(path: Path) -> Any:
    """The ``format`` of a JSON file, read confined, bounded and strictly; None if unreadable."""
    from .._files import ArtifactDir
    from .._json import loads

    try:
        with ArtifactDir(path.parent, ResolutionError) as adir:
            data = loads(
                adir.read(path.name, what="JSON file"), what=str(path), error=ResolutionError
            )
    except ResolutionError:
        return None
    return data.get("format") if isinstance(data, dict) else None


#: The process-wide registry: entry-point plugins, discovered on first use.
registry: Final = Registry()
