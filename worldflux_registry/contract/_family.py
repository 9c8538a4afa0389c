"""Torch-free declarations a plugin returns from its hooks: `FamilySpec` and `ExporterSpec`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import ConfigError, ContractError, PluginError, did_you_mean
from ._io import Capability, IOContract

__all__ = ["MAX_PARAMETERS", "ExporterSpec", "FamilySpec", "ImporterSpec"]

#: Parameter-count ceiling checked before a model is built (``FamilySpec.max_parameters``
#: overrides it per family): 2e9 parameters, 8 GB of float32 weights.
MAX_PARAMETERS: Final = 2_000_000_000

_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MATURITIES = ("experimental", "beta", "stable", "deprecated")


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"{kind} name {name!r} is invalid",
            hint="use lowercase letters, digits, '_', '-' or '.'; never ':' or '/'",
        )


def _check_target(what: str, target: object) -> None:
    if not isinstance(target, str) or not _TARGET.match(target):
        raise PluginError(
            f"{what} {target!r} is not of the form 'package.module:Attribute'",
            hint="name the object as a string so it is imported only when needed",
        )


@dataclass(frozen=True)
class FamilySpec:
    """A model family as a plugin declares it: torch-free data.

    Attributes:
        name: Family name used in refs (``"dreamerv3"``): lowercase, no ``:`` or ``/``.
        summary: One line shown by ``worldflux-registry list``.
        model: The model class as ``"package.module:Class"``; imported only when a model is
            built. The class is built with ``Class.from_config(config)``.
        defaults: Every config field with its default value; overrides are checked against it.
        presets: Preset name -> config overrides on top of ``defaults``.
        default_preset: Preset used when a ref names only the family.
        contract: ``contract(config) -> IOContract``, torch-free.
        capabilities: What every model of the family can do.
        aliases: Other names that resolve to this family.
        maturity: ``"experimental"``, ``"beta"``, ``"stable"`` or ``"deprecated"``.
        version: Family version; checkpoints from a newer major version are refused.
        param_count: Optional ``param_count(config) -> int``, torch-free, shown by ``info``
            and checked against ``max_parameters`` before a model is built.
        validate_config: Optional ``validate_config(config)``, torch-free, called before a
            model is built; raises `ConfigError` (any other exception becomes one) naming the
            field at fault. Types are already checked against ``defaults``.
        max_parameters: Parameter ceiling for this family (default 2e9, `MAX_PARAMETERS`).
        distribution: The distribution that provides the family (filled in by discovery).
        distribution_version: Its version (filled in by discovery).
    """

    name: str
    summary: str
    model: str
    defaults: Mapping[str, Any]
    presets: Mapping[str, Mapping[str, Any]]
    default_preset: str
    contract: Callable[[Mapping[str, Any]], IOContract]
    capabilities: frozenset[Capability] = frozenset()
    aliases: tuple[str, ...] = ()
    maturity: str = "experimental"
    version: str = "0.1.0"
    param_count: Callable[[Mapping[str, Any]], int] | None = None
    validate_config: Callable[[Mapping[str, Any]], None] | None = None
    max_parameters: int | None = None
    distribution: str | None = field(default=None, compare=False)
    distribution_version: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "capabilities", frozenset(Capability.parse(c) for c in self.capabilities)
        )
        object.__setattr__(self, "aliases", tuple(self.aliases))

    def __deepcopy__(self, memo: dict[int, Any]) -> FamilySpec:
        # Declared data, never mutated: a deep copy of a model (fp16 parity, benchmarks) shares
        # the spec it was built from, whose mappings may be read-only proxies deepcopy refuses.
        return self

    def validate(self) -> FamilySpec:
        """Raise `PluginError` naming the bad field; return self when valid."""
        _check_name("family", self.name)
        for alias in self.aliases:
            _check_name("alias", alias)
        _check_target(f"family {self.name!r} model", self.model)
        if not isinstance(self.summary, str):
            raise PluginError(f"family {self.name!r} summary must be a string")
        if not isinstance(self.defaults, Mapping):
            raise PluginError(f"family {self.name!r} defaults must be a mapping")
        if not isinstance(self.presets, Mapping) or not self.presets:
            raise PluginError(f"family {self.name!r} declares no presets")
        for preset, overrides in self.presets.items():
            _check_name(f"family {self.name!r} preset", preset)
            unknown = [k for k in overrides if k not in self.defaults]
            if unknown:
                raise PluginError(
                    f"family {self.name!r} preset {preset!r} sets unknown fields {unknown}",
                    hint="declare every config field in defaults",
                )
        if self.default_preset not in self.presets:
            raise PluginError(
                f"family {self.name!r} default_preset {self.default_preset!r} is not a preset",
                hint="presets: " + ", ".join(self.presets),
            )
        if self.maturity not in MATURITIES:
            raise PluginError(
                f"family {self.name!r} maturity {self.maturity!r} is unknown",
                hint="use one of " + ", ".join(MATURITIES),
            )
        if not callable(self.contract):
            raise PluginError(f"family {self.name!r} contract must be callable")
        if self.validate_config is not None and not callable(self.validate_config):
            raise PluginError(f"family {self.name!r} validate_config must be callable")
        if self.max_parameters is not None and (
            isinstance(self.max_parameters, bool)
            or not isinstance(self.max_parameters, int)
            or self.max_parameters < 1
        ):
            raise PluginError(f"family {self.name!r} max_parameters must be a positive int")
        return self

    def config(self, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Full config of ``preset`` (default preset when None) with ``overrides`` applied.

        Raises:
            ResolutionError: unknown preset (with the did-you-mean).
            ConfigError: an override names no config field (with the did-you-mean).
        """
        from ..errors import ResolutionError

        name = self.default_preset if preset is None else preset
        if name not in self.presets:
            raise ResolutionError(
                f"family {self.name!r} has no preset {name!r}.{did_you_mean(name, self.presets)}",
                hint="presets: " + ", ".join(self.presets),
                family=self.name,
            )
        config = dict(self.defaults)
        config.update(self.presets[name])
        for key, value in overrides.items():
            if key not in self.defaults:
                raise ConfigError(
                    f"family {self.name!r} has no config field {key!r}."
                    f"{did_you_mean(key, self.defaults)}",
                    hint="fields: " + ", ".join(sorted(self.defaults)),
                    family=self.name,
                )
            config[key] = value
        return config

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise `ConfigError` naming the field unless ``config`` may be built (torch-free).

        Checks, in order: every field is declared in ``defaults``; each value has its
        default's type (``bool`` for a bool, ``int`` for an int, ``int``/``float`` for a finite
        float, ``str``, a list for a list or tuple, a mapping for a mapping; a ``None`` default
        accepts anything); the family's ``validate_config``; and ``param_count(config)`` at most
        ``max_parameters`` (default 2e9), before anything is allocated.
        """
        for key, value in config.items():
            if key not in self.defaults:
                raise ConfigError(
                    f"family {self.name!r} has no config field {key!r}."
                    f"{did_you_mean(key, self.defaults)}",
                    hint="fields: " + ", ".join(sorted(self.defaults)),
                    family=self.name,
                    field=key,
                )
            expected = _type_problem(self.defaults[key], value)
            if expected:
                raise ConfigError(
                    f"family {self.name!r} config field {key!r} is {_shown(value)}; "
                    f"expected {expected}",
                    hint=f"the default is {_shown(self.defaults[key])}",
                    family=self.name,
                    field=key,
                )
        if self.validate_config is not None:
            try:
                self.validate_config(config)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"family {self.name!r} rejects its config: {str(exc)[:300]}",
                    hint="see the family's documentation for valid values",
                    family=self.name,
                ) from exc
        if self.param_count is None:
            return
        try:
            count = int(self.param_count(config))
        except Exception as exc:
            raise ConfigError(
                f"family {self.name!r} cannot count the parameters of its config: {str(exc)[:300]}",
                hint="a config field has a value the family does not support",
                family=self.name,
            ) from exc
        ceiling = self.max_parameters or MAX_PARAMETERS
        if count > ceiling:
            changed = [f"{k}={_shown(v)}" for k, v in config.items() if v != self.defaults.get(k)]
            raise ConfigError(
                f"family {self.name!r} config gives {count:,} parameters, over the ceiling of "
                f"{ceiling:,}" + (f" (fields set: {', '.join(changed[:8])})" if changed else ""),
                hint="use smaller sizes; the ceiling guards against allocating what the "
                "machine cannot hold (FamilySpec.max_parameters)",
                family=self.name,
            )

    def contract_for(self, config: Mapping[str, Any]) -> IOContract:
        """The family's contract for ``config``, validated; errors name the family."""
        try:
            contract = self.contract(config)
        except ContractError:
            raise
        except Exception as exc:
            raise PluginError(
                f"family {self.name!r} contract() raised {exc!r}",
                hint="report this to the family's authors",
                family=self.name,
                distribution=self.distribution,
            ) from exc
        if not isinstance(contract, IOContract):
            raise PluginError(
                f"family {self.name!r} contract() returned {type(contract).__name__}, "
                "not IOContract",
                family=self.name,
            )
        return contract.validate()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_problem(default: object, value: object) -> str | None:
    """What ``value`` should be, judging by ``default``; None when it fits."""
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    if isinstance(default, Mapping):
        return None if isinstance(value, Mapping) else "a mapping"
    return None


@dataclass(frozen=True)
class ExporterSpec:
    """An export format as a plugin declares it: torch-free data.

    Attributes:
        name: Format name used by ``export(model, name, out)`` (``"onnx"``).
        summary: One line for listings.
        exporter: ``"package.module:function"`` called as
            ``function(model, out_dir, **options) -> Path``.
        loader: ``"package.module:function"`` called as ``function(path, **options)`` returning
            a `WorldModel` for an artifact directory; None when artifacts are not loadable.
        artifact_format: The ``format`` value in the artifact's ``manifest.json`` that routes
            ``registry.load(dir)`` to ``loader``.
        distribution: Providing distribution (filled in by discovery).
        distribution_version: Its version (filled in by discovery).
    """

    name: str
    summary: str
    exporter: str
    loader: str | None = None
    artifact_format: str | None = None
    distribution: str | None = field(default=None, compare=False)
    distribution_version: str | None = field(default=None, compare=False)

    def validate(self) -> ExporterSpec:
        """Raise `PluginError` naming the bad field; return self when valid."""
        _check_name("exporter", self.name)
        _check_target(f"exporter {self.name!r} exporter", self.exporter)
        if self.loader is not None:
            _check_target(f"exporter {self.name!r} loader", self.loader)
            if not self.artifact_format:
                raise PluginError(f"exporter {self.name!r} has a loader but no artifact_format")
        return self


@dataclass(frozen=True)
class ImporterSpec:
    """An importer of foreign checkpoints (an official code base's files) into a family.

    Torch-free data, returned by a plugin's ``worldflux_registry_importers`` hook. The importer
    function is imported only when someone imports a checkpoint of ``source_format``.

    Attributes:
        family: The family the imported checkpoint belongs to (its name, not an alias).
        source_format: Name of the foreign format (``"tdmpc2-official-pt"``); unique per family.
        summary: One line for listings: what the source is and which official code wrote it.
        importer: ``"package.module:function"`` called as
            ``function(source: Path, config: Mapping[str, str]) -> ImportedCheckpoint``.
            ``config`` holds the ``--config KEY=VALUE`` pairs as strings, for what the source
            does not record; the importer raises `CheckpointError` naming a field it needs.
        distribution: Providing distribution (filled in by discovery).
        distribution_version: Its version (filled in by discovery).
    """

    family: str
    source_format: str
    summary: str
    importer: str
    distribution: str | None = field(default=None, compare=False)
    distribution_version: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """``"family:source_format"``, the importer's name in listings and conflicts."""
        return f"{self.family}:{self.source_format}"

    def validate(self) -> ImporterSpec:
        """Raise `PluginError` naming the bad field; return self when valid."""
        _check_name("importer family", self.family)
        _check_name("importer source_format", self.source_format)
        _check_target(f"importer {self.name!r} importer", self.importer)
        if not isinstance(self.summary, str):
            raise PluginError(f"importer {self.name!r} summary must be a string")
        return self
