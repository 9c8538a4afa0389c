"""Shared memory under attack: only State segments are attached or unlinked, a full /dev/shm is
a typed error that leaks nothing, odd names are refused typed, dead creators' segments are
cleaned, and WorldFlux's per-tensor descriptors attach."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import torch

from worldflux_registry import State, StateFormatError
from worldflux_registry.cli import main
from worldflux_registry.state import _shm

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm (Linux)")


@pytest.fixture
def ns():
    name = "wfh" + uuid.uuid4().hex[:9]
    yield name
    for p in SHM.iterdir():
        if p.name.startswith(name):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()


def _descriptor(name: str, size: int = 16) -> dict:
    return {
        "format": "worldflux.state.shm",
        "version": "v1",
        "segment": name,
        "size": size,
        "meta": {},
        "tensors": [{"name": "x", "dtype": "float32", "shape": [4], "nbytes": 16, "offset": 0}],
    }


def test_a_segment_without_the_header_is_neither_attached_nor_unlinked(ns):
    other = SHM / f"{ns}-foreign"
    other.write_bytes(b"\x07" * 4096)  # another program's segment
    descriptor = _descriptor(other.name)
    with pytest.raises(StateFormatError, match="not a worldflux State segment"):
        State.from_shared_memory(descriptor)
    with pytest.raises(StateFormatError, match="not unlinked"):
        State.unlink_shared_memory(descriptor)
    assert other.read_bytes() == b"\x07" * 4096


def test_a_forged_size_or_token_is_refused(ns):
    descriptor = State({"x": torch.arange(4.0)}).to_shared_memory(namespace=ns)
    try:
        with pytest.raises(StateFormatError, match="holds 16 bytes of State data"):
            State.from_shared_memory({**descriptor, "size": 64})
        with pytest.raises(StateFormatError, match="token"):
            State.from_shared_memory({**descriptor, "token": "00" * 16})
        assert torch.equal(State.from_shared_memory(descriptor, copy=True)["x"], torch.arange(4.0))
    finally:
        State.unlink_shared_memory(descriptor)


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_a_name_taken_by_a_directory_symlink_or_fifo_is_a_typed_error(ns, kind, tmp_path):
    path = SHM / f"{ns}-odd"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        target = tmp_path / "t"
        target.write_bytes(b"\0" * 128)
        path.symlink_to(target)
    else:
        os.mkfifo(path)
    with pytest.raises(StateFormatError):
        State.from_shared_memory(_descriptor(path.name))
    with pytest.raises(StateFormatError):
        State.unlink_shared_memory(_descriptor(path.name))


def test_an_empty_segment_left_by_a_killed_creator_can_be_unlinked(ns):
    empty = SHM / f"{ns}-empty"
    empty.write_bytes(b"")
    State.unlink_shared_memory(_descriptor(empty.name))
    assert not empty.exists()


def test_a_non_ascii_namespace_works_and_leaves_nothing(ns):
    descriptor = State({"x": torch.ones(2)}).to_shared_memory(namespace=ns + "ünïcødé✓")
    assert descriptor["segment"].isascii()
    State.unlink_shared_memory(descriptor)
    assert not (SHM / descriptor["segment"]).exists()


def test_a_full_dev_shm_is_a_typed_error_and_leaks_no_segment(ns, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StateFormatError, match="not enough shared memory") as info:
        State({"x": torch.zeros(1 << 16)}).to_shared_memory(namespace=ns)
    assert "--shm-size" in str(info.value)
    assert [p for p in SHM.iterdir() if p.name.startswith(ns)] == []


def test_a_state_larger_than_a_small_tmpfs_fails_typed_in_a_real_process(tmp_path):
    # A real small tmpfs is not mountable here; a State larger than what is free in /dev/shm
    # is the same case. Only run when /dev/shm is small enough to fill cheaply.
    st = os.statvfs(SHM)
    free = st.f_bavail * st.f_frsize
    if free > 256 * 1024 * 1024:
        pytest.skip(f"/dev/shm has {free} bytes free; too large to fill in a test")
    with pytest.raises(StateFormatError, match="not enough shared memory"):
        State({"x": torch.zeros(free // 4 + 1024)}).to_shared_memory(namespace="wfhbig")


def test_shm_list_and_clean_remove_only_segments_of_dead_creators(ns, capsys):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    mine = State({"x": torch.ones(2)}).to_shared_memory(namespace=ns)
    orphan = State({"x": torch.ones(2)}).to_shared_memory(namespace=ns)
    with open(SHM / orphan["segment"], "r+b") as f:  # as if a process that died wrote it
        f.seek(16)
        f.write(dead_pid.to_bytes(8, "little"))
    foreign = SHM / f"{ns}-foreign"
    foreign.write_bytes(b"\0" * 128)
    assert main(["shm", "list"]) == 0
    listed = capsys.readouterr().out
    assert mine["segment"] in listed and orphan["segment"] in listed
    assert foreign.name not in listed
    assert main(["shm", "clean"]) == 0
    assert orphan["segment"] in capsys.readouterr().out
    assert not (SHM / orphan["segment"]).exists()
    assert (SHM / mine["segment"]).exists() and foreign.exists()
    State.unlink_shared_memory(mine)


def _worldflux_descriptor(ns: str, tensors: dict[str, torch.Tensor]) -> dict:
    """What WorldFlux's State.to_shared_memory writes: one header-less segment per tensor."""
    records = []
    for i, (name, tensor) in enumerate(tensors.items()):
        nbytes = tensor.numel() * tensor.element_size()
        seg = shared_memory.SharedMemory(create=True, size=max(1, nbytes), name=f"{ns}-{i:012x}")
        if nbytes:
            torch.frombuffer(seg.buf, dtype=tensor.dtype, count=tensor.numel()).copy_(
                tensor.reshape(-1)
            )
        seg.close()
        records.append(
            {
                "name": name,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "numel": tensor.numel(),
                "nbytes": nbytes,
                "requires_grad": False,
                "source_device": "cpu",
                "shm_name": seg.name,
            }
        )
    return {"magic": "WFST-SHM", "version": "v1", "meta": {"from": "worldflux"}, "tensors": records}


def test_worldflux_descriptors_attach_zero_copy_and_unlink(ns):
    tensors = {"deter": torch.arange(6.0).reshape(2, 3), "mask": torch.tensor([True, False])}
    try:
        descriptor = _worldflux_descriptor(ns, tensors)
    finally:
        from multiprocessing import resource_tracker

        for p in SHM.iterdir():  # we unlink explicitly; keep the tracker out of it
            if p.name.startswith(ns):
                resource_tracker.unregister("/" + p.name, "shared_memory")
    state = State.from_shared_memory(descriptor)
    assert torch.equal(state["deter"], tensors["deter"]) and state.meta == {"from": "worldflux"}
    copied = State.from_shared_memory(descriptor, copy=True)
    state["deter"][0, 0] = 42.0  # a view: seen by the next attach, not by the copy
    assert State.from_shared_memory(descriptor, copy=True)["deter"][0, 0] == 42.0
    assert copied["deter"][0, 0] == 0.0
    state.close_shared_memory(unlink=True)
    assert [p for p in SHM.iterdir() if p.name.startswith(ns)] == []


def test_a_worldflux_descriptor_with_a_path_as_shm_name_is_refused():
    descriptor = {
        "magic": "WFST-SHM",
        "version": "v1",
        "tensors": [
            {"name": "x", "dtype": "float32", "shape": [1], "nbytes": 4, "shm_name": "../etc/x"}
        ],
    }
    with pytest.raises(StateFormatError, match="invalid shm_name"):
        State.from_shared_memory(descriptor)
    with pytest.raises(StateFormatError, match="invalid shm_name"):
        State.unlink_shared_memory(descriptor)


def test_the_header_is_64_bytes_and_offsets_stay_aligned():
    assert _shm.HEADER.size <= _shm.HEADER_SIZE == _shm.ALIGN
