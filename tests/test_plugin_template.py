"""The plugin template installs like any third-party distribution and passes the family checks."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import synthetic_env as se  # noqa: E402

from worldflux_registry import Capability, Registry  # noqa: E402
from worldflux_registry.testing import (  # noqa: E402
    Case,
    Steps,
    assert_outputs_follow_contract,
    trainable,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


@pytest.fixture(scope="module")
def template_site(tmp_path_factory):
    """The template pip-installed (no deps, no build isolation) into a fresh directory."""
    root = tmp_path_factory.mktemp("template")
    source = root / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--no-compile", "--disable-pip-version-check", "--target"]
    done = subprocess.run([*cmd, str(site), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m.split(".")[0] == "worldflux_mymlp"]:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def template_registry(template_site):
    """A registry discovering entry points after the install (the template among them)."""
    return Registry()


def test_installed_template_is_discovered_through_its_entry_point(template_registry):
    assert "mymlp" in template_registry.list()
    spec = template_registry.get("mymlp")
    assert spec.distribution == "worldflux-mymlp"
    assert spec.distribution_version == "0.1.0"
    assert set(spec.presets) == {"tiny", "base"}


def test_listing_the_template_does_not_import_torch(template_site):
    code = (
        "import sys\n"
        "from worldflux_registry import Registry\n"
        "r = Registry()\n"
        "assert 'mymlp' in r.list(), r.list()\n"
        "r.contract('mymlp:tiny')\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not leaked, leaked[:5]\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(template_site), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_template_passes_the_conformance_checks(template_registry, preset):
    case = Case("mymlp", preset, source=template_registry)
    model = case.small_model()
    assert type(model).__module__ == "worldflux_mymlp.model"
    assert type(model).capabilities == case.spec.capabilities
    assert model.io_contract() == case.contract
    assert case.spec.param_count(case.config) == trainable(model)
    assert_outputs_follow_contract(model, case.contract, "cpu")


def test_template_transition_noise_is_an_input(template_registry):
    model = template_registry.load("mymlp:tiny")
    steps = Steps(model, model.io_contract(), "cpu")
    assert model.supports(Capability.STOCHASTIC)
    with torch.no_grad():
        state = steps.encode(deterministic=True)
        a, b = steps.transition(state), steps.transition(state)
        assert torch.equal(a["latent"], b["latent"])
        sampled = model.transition(state, steps.action)  # noise from torch's generator
        mode = model.transition(state, steps.action, deterministic=True)
        assert not torch.equal(sampled["latent"], mode["latent"])


@pytest.fixture
def one_thread():
    # Tiny models train fastest on one thread; 2-core CI boxes thrash with more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_template_learns_and_round_trips_a_checkpoint(template_registry, tmp_path, one_thread):
    torch.manual_seed(0)
    model = template_registry.load("mymlp:tiny")
    data = se.collect_dataset(episodes=64, length=12, seed=0)
    held_out = se.to_torch(se.collect_dataset(episodes=32, length=12, seed=1))
    losses = se.fit(model, data, 150, batch_size=32, lr=3e-3)
    assert sum(losses[-10:]) / 10 <= 0.7 * sum(losses[:10]) / 10
    err = se.one_step_prediction_error(model, held_out)
    baseline = se.copy_last_error(held_out)
    assert err < baseline, (err, baseline)

    saved = model.save_pretrained(tmp_path / "mymlp")
    loaded = template_registry.load(saved)
    assert type(loaded) is type(model)
    obs = {"vector": held_out["vector"][:, 0]}
    with torch.no_grad():
        assert torch.equal(model.encode(obs)["latent"], loaded.encode(obs)["latent"])


def test_template_runs_the_conformance_kit_in_its_own_tests(template_site, tmp_path):
    """The template's own test suite (conftest + one import) runs the kit and passes."""
    source = tmp_path / "template"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(template_site), *sys.path])}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:xdist"]
    done = subprocess.run(cmd, cwd=source, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for check in (
        "test_outputs_have_the_declared_keys_shapes_and_dtypes[mymlp:base] PASSED",
        "test_checkpoint_round_trips[mymlp:tiny] PASSED",
        "test_export_passes_parity[mymlp:tiny] PASSED",
        "test_plugins_load_strictly PASSED",
    ):
        assert check in done.stdout, done.stdout[-4000:]
    assert "dreamerv3" not in done.stdout  # worldflux_families narrowed it to mymlp


def test_the_write_a_plugin_usage_snippets_run_as_printed(template_site, tmp_path):
    from test_docs_snippets import DOCS, expected_prints, python_blocks

    page = (DOCS / "write-a-plugin.md").read_text(encoding="utf-8")
    section = page[page.index("## 4. Install it and use it") : page.index("## 5.")]
    blocks = python_blocks(section)
    assert len(blocks) == 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(template_site), *sys.path])}
    for code in blocks:  # in order, in one directory: the second reads what the first wrote
        run = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.splitlines() == expected_prints(code)
