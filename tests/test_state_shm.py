"""State shared memory: zero-copy attach (in and across processes), copies, lifetime, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from worldflux_registry import State, StateFormatError

SHM_DIR = Path("/dev/shm")


@pytest.fixture
def namespace():
    """A namespace unique to the test; afterwards no segment of it may be left in /dev/shm."""
    name = "wft" + uuid.uuid4().hex[:9]
    yield name
    if SHM_DIR.is_dir():
        left = sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(name))
        for leftover in left:
            State.unlink_shared_memory(
                {"format": "worldflux.state.shm", "version": "v1", "segment": leftover}
            )
        assert not left, f"segments left in /dev/shm: {left}"


def segments(namespace: str) -> list[str]:
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this platform")
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(namespace))


def sample_state() -> State:
    generator = torch.Generator().manual_seed(0)
    return State(
        {
            "deter": torch.randn(2, 8, generator=generator),
            "logits": torch.randn(2, 4, 3, generator=generator).to(torch.bfloat16),
            "mask": torch.tensor([True, False]),
            "step": torch.tensor(7, dtype=torch.int64),
            "empty": torch.empty(0, 5, dtype=torch.float16),
            "grad": torch.ones(2, 2, requires_grad=True),
        },
        {"latent_type": "categorical", "step": 7},
    )


def assert_same(state: State, expected: State) -> None:
    assert list(state.tensors) == list(expected.tensors)
    assert state.meta == expected.meta
    for key, tensor in expected.tensors.items():
        got = state[key]
        assert got.dtype == tensor.dtype, key
        assert got.shape == tensor.shape, key
        assert got.requires_grad == tensor.requires_grad, key
        assert torch.equal(got.detach(), tensor.detach()), key


def test_attach_reproduces_the_state_and_the_descriptor_is_json(namespace):
    state = sample_state()
    descriptor = state.to_shared_memory(namespace=namespace)
    try:
        assert segments(namespace) == [descriptor["segment"]]
        attached = State.from_shared_memory(json.loads(json.dumps(descriptor)))
        assert_same(attached, state)
        attached.close_shared_memory()
    finally:
        State.unlink_shared_memory(descriptor)
    assert segments(namespace) == []


def test_attached_views_share_memory_both_ways(namespace):
    descriptor = sample_state().to_shared_memory(namespace=namespace)
    try:
        first = State.from_shared_memory(descriptor)
        second = State.from_shared_memory(descriptor)

        first["deter"][0, 0] = 123.0
        second["step"].fill_(99)
        second["logits"][1].zero_()

        assert second["deter"][0, 0].item() == 123.0
        assert first["step"].item() == 99
        assert first["logits"][1].abs().sum().item() == 0
        assert first["deter"].data_ptr() != second["deter"].data_ptr()  # two mappings
        first.close_shared_memory()
        second.close_shared_memory()
    finally:
        State.unlink_shared_memory(descriptor)


def test_copy_true_gives_private_tensors(namespace):
    descriptor = sample_state().to_shared_memory(namespace=namespace)
    try:
        copied = State.from_shared_memory(descriptor, copy=True)
        view = State.from_shared_memory(descriptor)

        view["deter"].fill_(5.0)

        assert not torch.equal(copied["deter"], view["deter"])
        assert_same(copied, sample_state())
        copied.close_shared_memory()  # nothing attached: a no-op
        assert copied.tensors
        view.close_shared_memory()
    finally:
        State.unlink_shared_memory(descriptor)


def test_the_source_state_is_copied_into_the_segment_not_shared(namespace):
    state = sample_state()
    descriptor = state.to_shared_memory(namespace=namespace)
    try:
        state["deter"].fill_(-1.0)
        attached = State.from_shared_memory(descriptor, copy=True)
        assert torch.equal(attached["deter"], sample_state()["deter"])
    finally:
        State.unlink_shared_memory(descriptor)


CHILD = """
import json, sys
import torch
from worldflux_registry import State

descriptor = json.loads(sys.stdin.read())
state = State.from_shared_memory(descriptor)
assert state["deter"][0, 0].item() == 42.0, state["deter"][0, 0]
state["deter"][1].fill_(7.0)
state["step"].fill_(1000)
kept = state["deter"][1]
state.close_shared_memory()
assert kept.sum().item() == 56.0

# A segment this process creates and still holds attached when it exits.
own = State({"x": torch.ones(3)}).to_shared_memory(namespace=sys.argv[1])
held = State.from_shared_memory(own)
print(json.dumps(own))
"""


def test_another_process_sees_writes_and_its_exit_neither_unlinks_nor_warns(namespace):
    descriptor = sample_state().to_shared_memory(namespace=namespace)
    own = None
    try:
        parent = State.from_shared_memory(descriptor)
        parent["deter"][0, 0] = 42.0

        child = subprocess.run(
            [sys.executable, "-c", CHILD, namespace],
            input=json.dumps(descriptor),
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert child.returncode == 0, child.stderr
        own = json.loads(child.stdout)
        # Zero-copy both ways: the child read the parent's write, the parent sees the child's.
        assert torch.equal(parent["deter"][1], torch.full((8,), 7.0))
        assert parent["step"].item() == 1000
        parent.close_shared_memory()
        # No resource_tracker "leaked shared_memory" warning, and nothing unlinked at exit:
        # segments live until someone unlinks them, even past their creator.
        assert child.stderr == ""
        assert segments(namespace) == sorted([descriptor["segment"], own["segment"]])
        assert torch.equal(State.from_shared_memory(own, copy=True)["x"], torch.ones(3))
    finally:
        State.unlink_shared_memory(descriptor)
        if own is not None:
            State.unlink_shared_memory(own)


def test_close_with_unlink_removes_the_segment_but_kept_tensors_stay_valid(namespace):
    descriptor = sample_state().to_shared_memory(namespace=namespace)
    attached = State.from_shared_memory(descriptor)
    kept = attached["deter"]

    attached.close_shared_memory(unlink=True)

    assert attached.tensors == {}
    assert segments(namespace) == []
    assert torch.equal(kept, sample_state()["deter"])  # still mapped: no dangling memory
    kept.add_(1.0)
    with pytest.raises(StateFormatError, match="no shared-memory segment"):
        State.from_shared_memory(descriptor)
    State.unlink_shared_memory(descriptor)  # idempotent


def test_the_mapping_is_closed_once_the_last_view_is_freed(namespace):
    descriptor = State({"x": torch.arange(1024.0)}).to_shared_memory(namespace=namespace)
    try:
        attached = State.from_shared_memory(descriptor)
        path = Path("/proc/self/maps")
        if not path.is_file():
            pytest.skip("needs /proc/self/maps")
        assert descriptor["segment"] in path.read_text()

        attached.close_shared_memory()

        assert descriptor["segment"] not in path.read_text()
    finally:
        State.unlink_shared_memory(descriptor)


def test_an_empty_state_round_trips(namespace):
    descriptor = State({}, {"a": 1}).to_shared_memory(namespace=namespace)
    try:
        attached = State.from_shared_memory(descriptor)
        assert attached.tensors == {} and attached.meta == {"a": 1}
    finally:
        State.unlink_shared_memory(descriptor)


def test_non_contiguous_tensors_are_packed(namespace):
    base = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    descriptor = State({"t": base.t(), "s": base[:, 1]}).to_shared_memory(namespace=namespace)
    try:
        attached = State.from_shared_memory(descriptor)
        assert torch.equal(attached["t"], base.t()) and torch.equal(attached["s"], base[:, 1])
        attached.close_shared_memory()
    finally:
        State.unlink_shared_memory(descriptor)


def test_non_json_meta_raises_and_creates_nothing(namespace):
    with pytest.raises(StateFormatError, match="not JSON"):
        State({"x": torch.zeros(1)}, {"bad": object()}).to_shared_memory(namespace=namespace)
    assert segments(namespace) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_need_allow_copy_from_cuda(namespace):
    state = State({"x": torch.arange(4.0, device="cuda")})
    with pytest.raises(StateFormatError, match="allow_copy_from_cuda=True"):
        state.to_shared_memory(namespace=namespace)
    assert segments(namespace) == []

    descriptor = state.to_shared_memory(namespace=namespace, allow_copy_from_cuda=True)
    try:
        attached = State.from_shared_memory(descriptor, copy=True)
        assert descriptor["tensors"][0]["source_device"] == "cuda:0"
        assert attached["x"].device.type == "cpu"
        assert torch.equal(attached["x"], torch.arange(4.0))
    finally:
        State.unlink_shared_memory(descriptor)


def _descriptor(**overrides):
    descriptor = {
        "format": "worldflux.state.shm",
        "version": "v1",
        "segment": "wfnosuchsegment",
        "size": 64,
        "meta": {},
        "tensors": [
            {
                "name": "x",
                "dtype": "float32",
                "shape": [4],
                "nbytes": 16,
                "offset": 0,
                "requires_grad": False,
                "source_device": "cpu",
            }
        ],
    }
    tensor_overrides = overrides.pop("tensor", {})
    descriptor["tensors"][0].update(tensor_overrides)
    descriptor.update(overrides)
    return descriptor


@pytest.mark.parametrize(
    ("descriptor", "expected"),
    [
        ("not a dict", "not a dict"),
        (_descriptor(format="other"), "format"),
        (_descriptor(version="v9"), "version 'v9'"),
        (_descriptor(segment="../../etc/passwd"), "invalid segment name"),
        (_descriptor(segment=""), "invalid segment name"),
        (_descriptor(segment=5), "invalid segment name"),
        (_descriptor(size=-1), "invalid size"),
        (_descriptor(meta=[]), "meta"),
        (_descriptor(tensors={}), "'tensors' list"),
        (_descriptor(tensor={"dtype": "complex64"}), "unknown dtype"),
        (_descriptor(tensor={"shape": [-4]}), "negative dim"),
        (_descriptor(tensor={"nbytes": 17}), "holds 16 bytes"),
        (_descriptor(tensor={"offset": -64}), "invalid offset"),
        (_descriptor(tensor={"offset": 4}), "not 64-byte aligned"),
        (_descriptor(tensor={"offset": 64}), "run past the segment size"),
        (_descriptor(), "no shared-memory segment"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_descriptors_raise_state_format_error(descriptor, expected):
    with pytest.raises(StateFormatError, match=None) as info:
        State.from_shared_memory(descriptor)
    assert expected in str(info.value)


def test_a_descriptor_asking_for_more_than_the_segment_holds_raises(namespace):
    descriptor = State({"x": torch.zeros(4)}).to_shared_memory(namespace=namespace)
    try:
        forged = dict(descriptor, size=1 << 30)
        forged["tensors"] = [dict(descriptor["tensors"][0], shape=[1 << 28], nbytes=1 << 30)]
        with pytest.raises(StateFormatError, match="holds"):
            State.from_shared_memory(forged)
    finally:
        State.unlink_shared_memory(descriptor)


def test_unlink_rejects_a_bad_descriptor():
    with pytest.raises(StateFormatError, match="invalid segment name"):
        State.unlink_shared_memory({"format": "worldflux.state.shm", "version": "v1"})


def test_default_namespace_names_the_segment():
    descriptor = State({"x": torch.zeros(1)}).to_shared_memory()
    try:
        assert descriptor["segment"].startswith("worldfluxsta-")
        assert len(descriptor["segment"]) <= 30
    finally:
        State.unlink_shared_memory(descriptor)
    if SHM_DIR.is_dir():
        assert not (SHM_DIR / descriptor["segment"]).exists()
