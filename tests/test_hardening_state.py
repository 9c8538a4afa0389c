"""State payloads under attack: any mutation is a StateFormatError with a bounded message."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldflux_registry import State, StateFormatError
from worldflux_registry._json import MAX_DEPTH, MAX_NUMBER_CHARS, loads

HEADER = struct.Struct(">4sBI")


def _pack(document: dict | str | bytes, data: bytes = b"") -> bytes:
    if isinstance(document, dict):
        raw = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    elif isinstance(document, str):
        raw = document.encode()
    else:
        raw = document
    return HEADER.pack(b"WFST", 1, len(raw)) + raw + data


def _document(**tensor) -> dict:
    record = {"name": "x", "dtype": "float32", "shape": [2], "nbytes": 8, **tensor}
    return {"format": "worldflux.state", "version": "v1", "meta": {}, "tensors": [record]}


def test_duplicate_keys_are_refused_not_last_wins():
    text = (
        '{"format":"worldflux.state","version":"v1","meta":{},'
        '"tensors":[{"name":"x","dtype":"int8","dtype":"float32","shape":[2],"nbytes":8}]}'
    )
    with pytest.raises(StateFormatError, match="duplicate key 'dtype'"):
        State.deserialize(_pack(text, b"\0" * 8))
    text = '{"format":"worldflux.state","version":"v1","meta":{},"tensors":[],"tensors":[]}'
    with pytest.raises(StateFormatError, match="duplicate key 'tensors'"):
        State.deserialize(_pack(text))


def test_deep_nesting_and_huge_numbers_are_state_format_errors():
    deep = (
        '{"format":"worldflux.state","version":"v1","tensors":[],"meta":{"a":'
        + ("[" * 10_000 + "]" * 10_000)
        + "}}"
    )
    with pytest.raises(StateFormatError, match="nested"):
        State.deserialize(_pack(deep))
    huge = (
        '{"format":"worldflux.state","version":"v1","tensors":[],"meta":{"n":' + "7" * 5000 + "}}"
    )
    with pytest.raises(StateFormatError, match="digits"):
        State.deserialize(_pack(huge))


def test_nan_meta_from_the_reference_still_reads():
    text = '{"format":"worldflux.state","meta":{"x":NaN},"tensors":[],"version":"v1"}'
    assert State.deserialize(_pack(text)).meta["x"] != State.deserialize(_pack(text)).meta["x"]


def test_a_shape_of_many_huge_dims_is_refused_fast_with_a_short_message():
    for n in (3, 1000, 100_000):
        start = time.perf_counter()
        with pytest.raises(StateFormatError) as info:
            State.deserialize(_pack(_document(shape=[2**62] * n, nbytes=0)))
        assert time.perf_counter() - start < 1.0
        assert len(str(info.value)) < 600


def test_bool_bytes_other_than_0_and_1_are_refused():
    payload = _pack(_document(dtype="bool", shape=[2], nbytes=2), b"\x01\x02")
    with pytest.raises(StateFormatError, match="bytes other than 0 and 1"):
        State.deserialize(payload)
    ok = State.deserialize(_pack(_document(dtype="bool", shape=[2], nbytes=2), b"\x01\x00"))
    assert ok["x"].tolist() == [True, False]


def test_a_strided_buffer_is_read_in_logical_order():
    payload = State({"x": torch.arange(4.0)}).serialize()
    spread = np.zeros(2 * len(payload), dtype=np.uint8)
    spread[::2] = np.frombuffer(payload, dtype=np.uint8)
    state = State.deserialize(spread[::2])
    assert torch.equal(state["x"], torch.arange(4.0))


def test_the_json_reader_bounds():
    with pytest.raises(StateFormatError, match="nested deeper"):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), what="x", error=StateFormatError)
    loads("[" * MAX_DEPTH + "]" * MAX_DEPTH, what="x", error=StateFormatError)
    with pytest.raises(StateFormatError, match="digits"):
        loads("1" * (MAX_NUMBER_CHARS + 1), what="x", error=StateFormatError)
    with pytest.raises(StateFormatError, match="overflows"):
        loads("1e999", what="x", error=StateFormatError)
    with pytest.raises(StateFormatError, match="not JSON"):
        loads("NaN", what="x", error=StateFormatError)


GOOD = State(
    {
        "deter": torch.arange(6.0).reshape(2, 3),
        "mask": torch.tensor([True, False]),
        "step": torch.tensor([1, 2], dtype=torch.int64),
    },
    {"k": [1, "two", None]},
).serialize()


@settings(max_examples=150, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(GOOD) - 1),
    replacement=st.binary(min_size=0, max_size=12),
    cut=st.integers(min_value=0, max_value=12),
)
def test_any_byte_mutation_raises_only_state_format_error(position, replacement, cut):
    payload = GOOD[:position] + replacement + GOOD[position + cut :]
    try:
        state = State.deserialize(payload)
    except StateFormatError as exc:
        assert len(str(exc)) < 2000
        return
    for tensor in state.tensors.values():
        if tensor.dtype == torch.bool:
            assert tensor.numel() == 0 or int(tensor.view(torch.uint8).max()) <= 1


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = st.sampled_from(["name", "dtype", "shape", "nbytes", "requires_grad", "source_device"])


@settings(max_examples=150, deadline=None)
@given(field=_FIELDS, value=_VALUES)
def test_any_record_field_mutation_raises_only_state_format_error(field, value):
    document = _document()
    document["tensors"][0][field] = value
    try:
        State.deserialize(_pack(document, b"\0" * 8))
    except StateFormatError as exc:
        assert len(str(exc)) < 2000
