"""Session setup shared by every test file.

The throwaway plugin distributions under ``tests/fixtures/`` are installed for real with
``pip install --no-deps --no-build-isolation --target`` (cached by a hash of their sources under
``build/test-fixtures/``), so entry points are found through ``importlib.metadata``:

- the *good* site (``wf-fixture-good``: family ``toyfamily``, alias ``toy``) is put on
  ``sys.path`` and ``PYTHONPATH`` for the whole session, before collection, so the process-wide
  ``registry`` and subprocesses see it;
- the *extra* site (broken, conflicting and exporter fixtures) is put on ``sys.path`` only by
  the ``extra_site`` fixture, for tests about discovery failures.

Fixtures for other test files: ``fixture_registry`` (an isolated `Registry` holding only the
toyfamily plugin), ``toy_model`` (a fresh tiny toyfamily model) and ``fixture_sites``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# The public conformance kit (worldflux_registry.testing), as a family's own conftest uses it.
pytest_plugins = ["worldflux_registry.testing"]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = ("wf-fixture-good",)
EXTRA = (
    "wf-fixture-importfail",
    "wf-fixture-hookraises",
    "wf-fixture-invalid",
    "wf-fixture-dupe-a",
    "wf-fixture-dupe-b",
    "wf-fixture-badhook",
    "wf-fixture-artifact",
)
_SKIP = {"build", "__pycache__"}


@dataclass(frozen=True)
class FixtureSites:
    """Directories holding the installed fixture distributions."""

    good: Path
    extra: Path


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for package in (*GOOD, *EXTRA):
        for file in sorted((FIXTURES / package).rglob("*")):
            rel = file.relative_to(FIXTURES)
            if file.is_dir() or _SKIP & set(rel.parts) or ".egg-info" in str(rel):
                continue
            digest.update(str(rel).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - no flock on Windows: builds may race, harmlessly
            pass
        yield


def _pip_target(packages: tuple[str, ...], target: Path, scratch: Path) -> None:
    sources = []
    for package in packages:
        # Build from a copy: pip writes build/ and *.egg-info into the source tree.
        copy = scratch / package
        shutil.copytree(
            FIXTURES / package, copy, ignore=shutil.ignore_patterns("build", "*.egg-info")
        )
        sources.append(str(copy))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--no-compile", "--disable-pip-version-check", "--target"]
    subprocess.run([*cmd, str(target), *sources], check=True, capture_output=True, text=True)


def install_fixture_sites() -> FixtureSites:
    """Install the fixture distributions once per source hash; return their directories."""
    base = REPO / "build" / "test-fixtures"
    root = base / _sources_hash()
    sites = FixtureSites(good=root / "good", extra=root / "extra")
    if (root / "done").exists():
        return sites
    with _locked(base / ".lock"):
        if (root / "done").exists():
            return sites
        tmp = base / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            _pip_target(GOOD, tmp / "good", tmp / "src")
            _pip_target(EXTRA, tmp / "extra", tmp / "src")
            shutil.rmtree(tmp / "src")
            (tmp / "done").write_text("ok\n")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"installing test fixtures failed:\n{exc.stderr}") from exc
    return sites


_SITES: FixtureSites | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _SITES
    _SITES = install_fixture_sites()
    good = str(_SITES.good)
    if good not in sys.path:
        sys.path.insert(0, good)
    existing = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = good + (os.pathsep + existing if existing else "")
    importlib.invalidate_caches()


@pytest.fixture(scope="session")
def fixture_sites() -> FixtureSites:
    """Directories of the installed fixture distributions (``good`` is already on sys.path)."""
    assert _SITES is not None
    return _SITES


@pytest.fixture(scope="session")
def fixture_registry():
    """An isolated `Registry` holding only the toyfamily plugin (a third-party family)."""
    from wf_fixture_good import plugin

    from worldflux_registry import Registry

    return Registry(entry_points=False, plugins=[plugin])


@pytest.fixture
def toy_model(fixture_registry):
    """A fresh ``toyfamily:tiny`` model (random weights, eval mode, CPU)."""
    import torch

    torch.manual_seed(0)
    return fixture_registry.load("toyfamily:tiny")


@pytest.fixture
def extra_site(fixture_sites, monkeypatch):
    """Put the broken/conflicting/exporter fixture distributions on sys.path for one test."""
    monkeypatch.syspath_prepend(str(fixture_sites.extra))
    for name in (
        "WORLDFLUX_REGISTRY_STRICT",
        "WORLDFLUX_REGISTRY_PLUGINS",
        "WORLDFLUX_REGISTRY_BLOCK",
    ):
        monkeypatch.delenv(name, raising=False)
    return fixture_sites.extra
