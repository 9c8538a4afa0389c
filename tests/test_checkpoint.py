"""save_pretrained / load round trips, atomic writes, and every corruption case."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worldflux_registry import CheckpointError, ConfigError, Registry, hookimpl
from worldflux_registry.protocol._inputs import make_actions, make_noise, make_observations


def _outputs(model, seed=0):
    contract = model.io_contract()
    g = torch.Generator().manual_seed(seed)
    obs = make_observations(contract, (3,), g)
    action = make_actions(contract, (3,), g)
    from worldflux_registry.protocol._inputs import encode_input, noise_conditions

    state = model.encode(encode_input(obs, make_noise(contract, "encode", (3,), g)))
    nxt = model.transition(
        state, action, noise_conditions(make_noise(contract, "transition", (3,), g))
    )
    return {**nxt.tensors, **model.decode(nxt).predictions}


def _save(model, path, registry):
    from worldflux_registry.checkpoint._format import save_pretrained

    return save_pretrained(model, path, registry=registry)


@pytest.fixture
def saved(toy_model, fixture_registry, tmp_path):
    return _save(toy_model, tmp_path / "ckpt", fixture_registry)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, data: dict) -> None:
    (path / "config.json").write_text(json.dumps(data))


def test_round_trip_gives_the_same_outputs(toy_model, saved, fixture_registry):
    loaded = fixture_registry.load(str(saved))
    assert not loaded.training and loaded.preset == "tiny"
    before, after = _outputs(toy_model), _outputs(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_files_carry_format_versions_fingerprint_and_hash(toy_model, saved):
    data = _config(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    assert (data["format"], data["format_version"]) == ("worldflux.checkpoint", 1)
    assert data["family"] == "toyfamily" and data["family_version"] == "1.2.0"
    assert data["fingerprint"] == toy_model.contract_fingerprint()
    assert data["contract"] == toy_model.io_contract().to_dict()
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["worldflux-registry"]
    import hashlib

    assert (
        data["weights"]["sha256"]
        == hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    )
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["fingerprint"] == data["fingerprint"] and meta["family"] == "toyfamily"


def test_distribution_is_recorded_for_an_entry_point_family(tmp_path):
    model = Registry().load("toyfamily")
    data = _config(model.save_pretrained(tmp_path / "c"))
    assert data["distribution"] == "wf-fixture-good"
    assert data["versions"]["wf-fixture-good"] == "1.2.0"


def test_tied_weights_are_written_once_and_tied_again_on_load(fixture_registry, tmp_path):
    model = fixture_registry.load("toyfamily:tiny-tied")
    path = _save(model, tmp_path / "tied", fixture_registry)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys & {"reward_head.weight", "continue_head.weight"}) == 1
    loaded = fixture_registry.load(str(path))
    assert loaded.continue_head.weight is loaded.reward_head.weight
    assert torch.equal(loaded.continue_head.weight, model.reward_head.weight)


def test_saving_over_a_checkpoint_replaces_it(fixture_registry, saved):
    torch.manual_seed(1)
    other = fixture_registry.load("toyfamily:small")
    _save(other, saved, fixture_registry)
    assert _config(saved)["preset"] == "small"
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(toy_model, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        toy_model.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_interrupted_save_leaves_the_old_checkpoint_and_no_partial_directory(
    fixture_registry, saved, monkeypatch
):
    before = (saved / "model.safetensors").read_bytes()
    model = fixture_registry.load("toyfamily:small")

    def broken_state_dict(*args, **kwargs):
        raise RuntimeError("disk pulled out mid-save")

    monkeypatch.setattr(model, "state_dict", broken_state_dict)
    with pytest.raises(RuntimeError, match="mid-save"):
        _save(model, saved, fixture_registry)
    with pytest.raises(RuntimeError, match="mid-save"):
        _save(model, saved.parent / "fresh", fixture_registry)
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]
    assert (saved / "model.safetensors").read_bytes() == before
    fixture_registry.load(str(saved))


def test_failure_writing_weights_leaves_no_partial_directory(fixture_registry, tmp_path):
    model = fixture_registry.load("toyfamily")
    # A real part failing for real: safetensors refuses a non-tensor value.
    model.register_buffer("bad", torch.zeros(2))
    model.bad = torch.zeros(2)
    original = model.state_dict

    def state_dict(*args, **kwargs):
        out = original(*args, **kwargs)
        out["bad"] = "not a tensor"
        return out

    model.state_dict = state_dict
    with pytest.raises(Exception):
        _save(model, tmp_path / "c", fixture_registry)
    assert list(tmp_path.iterdir()) == []


# -- corruption cases ------------------------------------------------------------------------
def _edit(path, **changes):
    data = _config(path)
    data.update(changes)
    _write_config(path, data)


def _rewrite_weights(path, tensors, metadata=None):
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(metadata or {})
    save_file(tensors, str(file), metadata=meta)
    import hashlib

    data = _config(path)
    data["weights"]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    _write_config(path, data)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "not readable JSON"),
        (lambda p: _edit(p, format="something.else"), "not a worldflux checkpoint"),
        (lambda p: _edit(p, format_version=7), "upgrade worldflux-registry"),
        (lambda p: _edit(p, format_version="1"), "invalid format_version"),
        (lambda p: _edit(p, family="nosuchfamily"), "'nosuchfamily', which is not installed"),
        (lambda p: _edit(p, family_version="2.0.0"), "newer than the installed 1.2.0"),
        (lambda p: _edit(p, config={**_config(p)["config"], "depth": 3}), r"\['depth'\]"),
        (lambda p: _edit(p, config={**_config(p)["config"], "latent": 9}), "contract"),
        (lambda p: _edit(p, fingerprint="sha256:" + "0" * 64), "was saved with contract"),
        (lambda p: (p / "model.safetensors").unlink(), "no weights file"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), "sha256"),
        (
            lambda p: _rewrite_weights(p, _tensors(p), {"fingerprint": "sha256:" + "1" * 64}),
            "metadata fingerprint",
        ),
        (
            lambda p: _rewrite_weights(
                p, {k: v for k, v in _tensors(p).items() if k != "decoder.bias"}
            ),
            r"missing tensors \['decoder.bias'\]",
        ),
        (
            lambda p: _rewrite_weights(p, {**_tensors(p), "extra.weight": torch.zeros(2)}),
            r"unexpected tensors \['extra.weight'\]",
        ),
        (
            lambda p: _rewrite_weights(p, {**_tensors(p), "decoder.bias": torch.zeros(5)}),
            r"mis-shaped tensors \[decoder.bias \(5,\) != \(4,\)\]",
        ),
    ],
    ids=[
        "no-config",
        "config-not-json",
        "wrong-format",
        "future-format-version",
        "bad-format-version",
        "family-not-installed",
        "newer-family-major",
        "unknown-config-field",
        "config-changes-contract",
        "fingerprint-mismatch",
        "no-weights",
        "weights-sha256",
        "metadata-disagrees",
        "missing-tensor",
        "unexpected-tensor",
        "misshaped-tensor",
    ],
)
def test_each_corruption_is_refused_with_a_clear_error(saved, fixture_registry, corrupt, message):
    corrupt(saved)
    with pytest.raises(CheckpointError, match=message) as info:
        fixture_registry.load(str(saved))
    assert info.value.hint  # every refusal says what to do next


def test_truncated_safetensors_with_matching_hash_is_refused(saved, fixture_registry):
    import hashlib

    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    _edit(
        saved,
        weights={
            "file": "model.safetensors",
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        },
    )
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fixture_registry.load(str(saved))


def test_loading_never_imports_code_named_by_the_file(saved, fixture_registry):
    # A checkpoint naming a module is ignored: the family is looked up among installed plugins.
    _edit(saved, model="os:system", family="os")
    with pytest.raises(CheckpointError, match="not installed"):
        fixture_registry.load(str(saved))


def test_config_overrides_do_not_apply_to_checkpoints(saved, fixture_registry):
    with pytest.raises(ConfigError, match="cannot apply to checkpoint"):
        fixture_registry.load(str(saved), hidden=3)


def test_older_family_minor_versions_still_load(saved, fixture_registry):
    from wf_fixture_good.plugin import TOYFAMILY

    newer = dataclasses.replace(TOYFAMILY, version="1.9.0")

    class Plugin:
        @hookimpl
        def worldflux_registry_families(self):
            return [newer]

    registry = Registry(entry_points=False, plugins=[Plugin()])
    assert registry.load(str(saved)).preset == "tiny"


def test_concurrent_loads_from_eight_threads(saved, toy_model, fixture_registry):
    barrier = threading.Barrier(8)
    results, errors = [None] * 8, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = fixture_registry.load(str(saved) if i % 2 else "toyfamily:small")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reference = _outputs(toy_model)
    for i, model in enumerate(results):
        if i % 2:
            out = _outputs(model)
            assert all(torch.equal(out[k], reference[k]) for k in reference)
        else:
            assert model.preset == "small"
    assert len({id(m) for m in results}) == 8
