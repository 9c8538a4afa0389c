"""Checkpoints under attack: user files kept, paths confined, odd files refused, writers
serialised, and a reader that always sees the old or the new checkpoint, even across kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worldflux_registry import CheckpointError
from worldflux_registry._files import stale_siblings, writer_lock


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, data: dict) -> None:
    (path / "config.json").write_text(json.dumps(data))


@pytest.fixture
def saved(toy_model, fixture_registry, tmp_path):
    path = tmp_path / "ckpt"
    toy_model.save_pretrained(path)
    return path


def test_resaving_keeps_files_that_are_not_the_checkpoints(saved, fixture_registry):
    (saved / "README.md").write_text("my notes")
    (saved / "runs").mkdir()
    (saved / "runs" / "log.txt").write_text("epoch 1")
    torch.manual_seed(3)
    fixture_registry.load("toyfamily:small").save_pretrained(saved)
    assert (saved / "README.md").read_text() == "my notes"
    assert (saved / "runs" / "log.txt").read_text() == "epoch 1"
    assert _config(saved)["preset"] == "small"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no temporaries, no lock


def test_saved_files_get_the_umasks_permissions(saved):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "model.safetensors"):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", "", ".."]
)
def test_a_weights_file_outside_the_directory_is_never_opened(saved, fixture_registry, name):
    outside = saved.parent / "outside.safetensors"
    outside.write_bytes((saved / "model.safetensors").read_bytes())
    data = _config(saved)
    data["weights"]["file"] = name
    _write_config(saved, data)
    with pytest.raises(CheckpointError, match=r"plain file name|no weights file") as info:
        fixture_registry.load(str(saved))
    assert hashlib.sha256(outside.read_bytes()).hexdigest() not in str(info.value)


def test_a_symlink_leaving_the_directory_is_refused_before_hashing(saved, fixture_registry):
    secret = saved.parent / "secret"
    secret.write_bytes(b"not yours")
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink leading outside") as info:
        fixture_registry.load(str(saved))
    assert hashlib.sha256(b"not yours").hexdigest() not in str(info.value)


def test_a_symlink_inside_the_directory_is_followed(saved, fixture_registry):
    (saved / "model.safetensors").rename(saved / "real.safetensors")
    (saved / "model.safetensors").symlink_to("real.safetensors")
    fixture_registry.load(str(saved))


@pytest.mark.parametrize("which", ["config.json", "model.safetensors"])
def test_a_fifo_or_device_is_refused_at_once_not_read(saved, fixture_registry, which):
    (saved / which).unlink()
    os.mkfifo(saved / which)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not a regular file"):
        fixture_registry.load(str(saved))
    assert time.perf_counter() - start < 5


def test_proc_and_dev_zero_behind_symlinks_are_refused(saved, fixture_registry):
    (saved / "config.json").unlink()
    (saved / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="outside"):
        fixture_registry.load(str(saved))


def test_weights_cast_to_another_dtype_are_refused(saved, fixture_registry):
    file = saved / "model.safetensors"
    tensors = {k: v.double() for k, v in load_file(str(file)).items()}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(tensors, str(file), metadata=meta)
    data = _config(saved)
    data["weights"]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    _write_config(saved, data)
    with pytest.raises(CheckpointError, match="another dtype"):
        fixture_registry.load(str(saved))


def test_an_alias_cannot_overwrite_a_stored_tensor(saved, fixture_registry):
    data = _config(saved)
    data["weights"]["aliases"] = {"decoder.bias": "encoder.bias"}
    _write_config(saved, data)
    with pytest.raises(CheckpointError, match="would overwrite a stored tensor"):
        fixture_registry.load(str(saved))


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "worldflux.checkpoint", "format": "x"}',
        "[" * 5000 + "]" * 5000,
        '{"format": "worldflux.checkpoint", "n": ' + "9" * 5000 + "}",
    ],
    ids=["duplicate-key", "deep", "huge-number"],
)
def test_hostile_config_json_is_a_checkpoint_error(saved, fixture_registry, text):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as info:
        fixture_registry.load(str(saved))
    assert len(str(info.value)) < 600


def test_a_second_writer_gets_a_typed_error_while_the_first_holds_the_lock(saved, toy_model):
    with writer_lock(saved, CheckpointError, "checkpoint"):
        with pytest.raises(CheckpointError, match="another process is writing"):
            toy_model.save_pretrained(saved)
    toy_model.save_pretrained(saved)  # released


def test_concurrent_savers_in_threads_never_raise_untyped_errors(saved, toy_model):
    errors: list[BaseException] = []

    def save():
        for _ in range(5):
            try:
                toy_model.save_pretrained(saved)
            except CheckpointError:
                pass
            except BaseException as exc:  # what is tested: nothing untyped escapes
                errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_stale_temporaries_are_cleaned_and_a_lost_checkpoint_restored(
    saved, toy_model, fixture_registry
):
    # what a writer killed between two renames leaves: no ckpt, only .ckpt.old-*
    old = saved.parent / ".ckpt.old-0123456789ab"
    saved.rename(old)
    (saved.parent / ".ckpt.tmp-abcdef012345").mkdir()
    (saved.parent / ".ckpt.tmp-abcdef012345" / "model.safetensors").write_bytes(b"half")
    fixture_registry.load(str(saved))  # recovered on load
    toy_model.save_pretrained(saved)
    assert stale_siblings(saved) == []


KILL_WRITER = r"""
import sys, torch
from wf_fixture_good import plugin
from worldflux_registry import Registry
reg = Registry(entry_points=False, plugins=[plugin])
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    models.append(reg.load("toyfamily:tiny"))
sums = [sum(float(t.double().sum()) for t in m.state_dict().values()) for m in models]
print("ready", *sums, flush=True)
i = 0
while True:
    models[i % 2].save_pretrained(sys.argv[1])
    i += 1
"""


def test_a_reader_sees_the_old_or_the_new_checkpoint_across_kill_9(tmp_path, fixture_registry):
    path = tmp_path / "ckpt"
    torch.manual_seed(0)
    fixture_registry.load("toyfamily:tiny").save_pretrained(path)

    reads = 0
    for cycle in range(2):
        writer = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready, *sums = writer.stdout.readline().split()
            assert ready == "ready", writer.stderr.read()
            deadline = time.perf_counter() + 0.6 + 0.3 * cycle
            while time.perf_counter() < deadline:
                model = fixture_registry.load(str(path))  # raises if it saw none or a mix
                got = sum(float(t.double().sum()) for t in model.state_dict().values())
                assert min(abs(got - float(x)) for x in sums) < 1e-9, (got, sums)
                reads += 1
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(30)
            writer.stdout.close()
            writer.stderr.close()
        fixture_registry.load(str(path))  # right after the kill: still a whole checkpoint
    assert reads > 10
    # the next save cleans whatever the killed writer left
    fixture_registry.load("toyfamily:tiny").save_pretrained(path)
    assert stale_siblings(path) == []
    assert not (tmp_path / ".ckpt.lock").exists()
