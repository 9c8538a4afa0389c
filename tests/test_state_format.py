"""State wire format v1: layout, reference compatibility vectors, and every bad-payload case."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worldflux_registry import State, StateFormatError

#: Written by the WorldFlux reference implementation; provenance in its README.md.
COMPAT_DIR = Path(__file__).resolve().parent / "data" / "compat" / "worldflux-state-v1"
HEADER = struct.Struct(">4sBI")

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
]


def _compat_index() -> dict:
    return json.loads((COMPAT_DIR / "index.json").read_text())


def _compat_names() -> list[str]:
    index = _compat_index()
    missing = [n for n in index if not (COMPAT_DIR / index[n]["file"]).is_file()]
    assert index and not missing, f"compatibility vectors missing in {COMPAT_DIR}: {missing}"
    return sorted(index)


def split(payload: bytes) -> tuple[dict, bytes]:
    magic, version, length = HEADER.unpack_from(payload)
    assert (magic, version) == (b"WFST", 1)
    return json.loads(payload[9 : 9 + length]), payload[9 + length :]


def pack(
    doc: object,
    data: bytes = b"",
    *,
    magic: bytes = b"WFST",
    version: int = 1,
    length: int | None = None,
    raw_meta: bytes | None = None,
) -> bytes:
    meta = raw_meta if raw_meta is not None else json.dumps(doc).encode()
    return HEADER.pack(magic, version, len(meta) if length is None else length) + meta + data


def record(**overrides) -> dict:
    entry = {
        "name": "x",
        "dtype": "float32",
        "shape": [2, 3],
        "nbytes": 24,
        "requires_grad": False,
        "source_device": "cpu",
    }
    entry.update(overrides)
    return entry


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def doc(*records: dict, **overrides) -> dict:
    document = {"format": "worldflux.state", "version": "v1", "meta": {}, "tensors": list(records)}
    document.update(overrides)
    return document


# --- layout ------------------------------------------------------------------------------------


def test_payload_layout_is_header_then_canonical_json_then_little_endian_bytes():
    state = State({"b": torch.tensor([1, 256], dtype=torch.int16)}, {"z": 1, "a": "é"})

    payload = state.serialize()

    meta_json = (
        b'{"format":"worldflux.state","meta":{"a":"\\u00e9","z":1},"tensors":[{"dtype":"int16",'
        b'"name":"b","nbytes":4,"requires_grad":false,"shape":[2],"source_device":"cpu"}],'
        b'"version":"v1"}'
    )
    header = b"WFST\x01" + struct.pack(">I", len(meta_json))
    assert payload == header + meta_json + b"\x01\x00\x00\x01"


def test_tensors_keep_insertion_order_in_payload_and_after_decoding():
    state = State({"zeta": torch.zeros(1), "alpha": torch.ones(1, dtype=torch.int8)})

    document, data = split(state.serialize())

    assert [entry["name"] for entry in document["tensors"]] == ["zeta", "alpha"]
    assert data == b"\x00\x00\x00\x00\x01"
    assert list(State.deserialize(state.serialize()).tensors) == ["zeta", "alpha"]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly_including_0_dim_and_empty(dtype):
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (48,), dtype=torch.uint8, generator=generator)
    full = (raw % 2).bool() if dtype == torch.bool else raw.view(dtype)
    state = State(
        {"full": full.reshape(2, -1), "scalar": full[0].clone(), "empty": full[:0].reshape(0, 3)}
    )

    back = State.deserialize(state.serialize())

    for key, tensor in state.tensors.items():
        assert back[key].dtype == dtype
        assert back[key].shape == tensor.shape
        assert torch.equal(raw_bytes(back[key]), raw_bytes(tensor))
    assert back["scalar"].dim() == 0


def test_non_contiguous_and_grad_tensors_serialize_as_their_values():
    base = torch.arange(12.0).reshape(3, 4)
    leaf = torch.ones(2, requires_grad=True)
    state = State({"t": base.t(), "g": leaf * 2, "leaf": leaf})

    back = State.deserialize(state.serialize())

    assert torch.equal(back["t"], base.t())
    assert back["t"].is_contiguous()
    assert back["g"].requires_grad and back["leaf"].requires_grad
    assert torch.equal(back["g"].detach(), torch.full((2,), 2.0))


def test_deserialized_tensors_are_copies_not_views_of_the_payload():
    payload = bytearray(State({"x": torch.zeros(4)}).serialize())

    state = State.deserialize(payload)
    payload[-4:] = b"\xff\xff\xff\xff"

    assert torch.equal(state["x"], torch.zeros(4))
    state["x"].add_(1)  # writable


def test_deserialize_accepts_bytearray_and_memoryview():
    payload = State({"x": torch.arange(3)}, {"k": [1]}).serialize()

    for form in (bytearray(payload), memoryview(payload)):
        back = State.deserialize(form)
        assert torch.equal(back["x"], torch.arange(3))
        assert back.meta == {"k": [1]}


def test_source_device_is_recorded():
    document, _ = split(State({"x": torch.zeros(1)}).serialize())
    assert document["tensors"][0]["source_device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_serialize_from_the_host_copy_and_record_their_device():
    state = State({"x": torch.arange(4.0, device="cuda")})

    document, _ = split(state.serialize())
    back = State.deserialize(state.serialize())

    assert document["tensors"][0]["source_device"] == "cuda:0"
    assert back["x"].device.type == "cpu"
    assert torch.equal(back["x"], torch.arange(4.0))


def test_importing_the_state_module_does_not_import_torch():
    code = (
        "import sys, worldflux_registry, worldflux_registry.state._state\n"
        "import worldflux_registry.state._shm\n"
        "from worldflux_registry import State\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- compatibility with the reference implementation ------------------------------------------


@pytest.mark.parametrize("name", _compat_names())
def test_reference_payload_decodes_to_its_index_and_reencodes_identically(name):
    entry = _compat_index()[name]
    payload = (COMPAT_DIR / entry["file"]).read_bytes()

    state = State.deserialize(payload)

    assert state.meta == entry["meta"]
    assert sorted(state.tensors) == sorted(entry["tensors"])
    for key, expected in entry["tensors"].items():
        tensor = state[key]
        assert tensor.dtype == getattr(torch, expected["dtype"]), key
        assert list(tensor.shape) == expected["shape"], key
        assert tensor.requires_grad == expected["requires_grad"], key
        values = tensor.detach().reshape(-1)
        values = values.double() if tensor.is_floating_point() else values.long()
        assert values.tolist() == expected["values"], key
    assert state.serialize() == payload


# --- bad payloads -------------------------------------------------------------------------------


GOOD_DATA = bytes(24)

BAD_PAYLOADS = {
    "empty": (b"", "shorter than the 9-byte header"),
    "short header": (b"WFST\x01\x00\x00", "shorter than the 9-byte header"),
    "bad magic": (pack(doc(record()), GOOD_DATA, magic=b"WFSX"), "magic"),
    "unknown version": (pack(doc(record()), GOOD_DATA, version=2), "unknown version id 2"),
    "length past end": (pack(doc(), length=10_000), "runs past the end"),
    "huge forged length": (pack(doc(), length=0xFFFFFFFF), "runs past the end"),
    "invalid json": (pack(None, raw_meta=b'{"format":'), "not valid JSON"),
    "invalid utf-8": (pack(None, raw_meta=b'{"a":"\xff"}'), "not UTF-8"),
    "json array": (pack([1, 2]), "not an object"),
    "json string": (pack("x"), "not an object"),
    "wrong format": (pack(doc(format="other")), "format"),
    "version mismatch": (pack(doc(version="v2")), "disagrees with the header"),
    "meta not object": (pack(doc(meta=[1])), "'meta' is a list"),
    "tensors missing": (pack({"format": "worldflux.state", "version": "v1"}), "'tensors' list"),
    "tensor entry not object": (pack(doc("x")), "not a JSON object"),
    "missing name": (pack(doc(record(name=""))), "non-empty string 'name'"),
    "duplicate name": (pack(doc(record(), record()), GOOD_DATA * 2), "twice"),
    "unknown dtype": (pack(doc(record(dtype="complex64")), GOOD_DATA), "unknown dtype"),
    "shape not list": (pack(doc(record(shape=6)), GOOD_DATA), "not a list"),
    "negative dim": (pack(doc(record(shape=[-2, -3])), GOOD_DATA), "negative dim -2"),
    "float dim": (pack(doc(record(shape=[2.0, 3])), GOOD_DATA), "non-integer dim 2.0"),
    "bool dim": (pack(doc(record(shape=[True, 6])), GOOD_DATA), "non-integer dim True"),
    "string dim": (pack(doc(record(shape=["2", 3])), GOOD_DATA), "non-integer dim '2'"),
    "int64 overflow dims": (
        pack(doc(record(shape=[0, 2**40, 2**40], nbytes=0))),
        "too large",
    ),
    "nbytes inconsistent": (pack(doc(record(nbytes=20)), bytes(20)), "holds 24 bytes"),
    "nbytes negative": (pack(doc(record(nbytes=-24)), GOOD_DATA), "invalid nbytes"),
    "nbytes not int": (pack(doc(record(nbytes="24")), GOOD_DATA), "invalid nbytes"),
    "requires_grad not bool": (pack(doc(record(requires_grad=1)), GOOD_DATA), "not a boolean"),
    "requires_grad on int": (
        pack(doc(record(dtype="int32", requires_grad=True)), GOOD_DATA),
        "cannot require grad",
    ),
    "source_device not str": (pack(doc(record(source_device=0)), GOOD_DATA), "not a string"),
    "truncated data": (pack(doc(record()), GOOD_DATA[:-1]), "truncated"),
    "forged huge tensor": (
        pack(doc(record(shape=[2**20, 2**20], nbytes=4 * 2**40)), GOOD_DATA),
        "truncated",
    ),
    "trailing bytes": (pack(doc(record()), GOOD_DATA + b"\x00"), "1 trailing bytes"),
    "trailing bytes no tensors": (pack(doc(), b"junk"), "4 trailing bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_bad_payload_raises_state_format_error_naming_the_problem(case):
    payload, expected = BAD_PAYLOADS[case]

    with pytest.raises(StateFormatError, match=None) as info:
        State.deserialize(payload)

    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_well_formed_base_of_the_bad_cases_decodes():
    state = State.deserialize(pack(doc(record()), GOOD_DATA))
    assert state["x"].shape == (2, 3)


def test_deserialize_rejects_non_bytes():
    with pytest.raises(StateFormatError, match="not bytes"):
        State.deserialize("WFST")  # type: ignore[arg-type]


# --- serialize errors ---------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"obj": Opaque()}, r"meta\['obj'\] is a Opaque"),
        ({"set": {1, 2}}, r"meta\['set'\] is a set"),
        ({"nested": {"t": torch.zeros(1)}}, r"meta\['nested'\]\['t'\] is a Tensor"),
        ({"list": [1, b"bytes"]}, r"meta\['list'\]\[1\] is a bytes"),
        ({1: "int key"}, "keys must be strings"),
    ],
    ids=["object", "set", "tensor", "bytes", "int-key"],
)
def test_non_json_meta_on_serialize_raises(meta, expected):
    with pytest.raises(StateFormatError, match=expected):
        State({"x": torch.zeros(1)}, meta).serialize()


def test_self_referencing_meta_raises():
    meta: dict = {}
    meta["self"] = meta
    with pytest.raises(StateFormatError, match="nested too deeply"):
        State({}, meta).serialize()


def test_non_finite_meta_floats_round_trip_like_the_reference():
    back = State.deserialize(State({}, {"nan": float("nan"), "inf": float("inf")}).serialize())
    assert back.meta["inf"] == float("inf") and back.meta["nan"] != back.meta["nan"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"version": "v2"}, "unsupported State version 'v2'"),
        ({"format": "json"}, "unsupported State format 'json'"),
    ],
)
def test_unsupported_version_or_format_raises(kwargs, expected):
    with pytest.raises(StateFormatError, match=expected):
        State({"x": torch.zeros(1)}).serialize(**kwargs)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"x": torch.zeros(1, dtype=torch.complex64)}, "cannot carry"),
        ({"x": [1.0, 2.0]}, "holds list, not a tensor"),
        ({"": torch.zeros(1)}, "not a non-empty string"),
        ({"x": torch.zeros(2, 2).to_sparse()}, "to_dense"),
        ({"x": torch.zeros(2, device="meta")}, "meta device"),
    ],
    ids=["complex", "list", "empty-name", "sparse", "meta-device"],
)
def test_unserializable_tensors_raise(tensors, expected):
    with pytest.raises(StateFormatError, match=expected):
        State(tensors).serialize()
