"""State wire format properties: random round trips, and a mutation fuzz of deserialize."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldflux_registry import State, StateFormatError

HEADER = struct.Struct(">4sBI")
#: Written by the WorldFlux reference implementation; provenance in its README.md.
COMPAT_DIR = Path(__file__).resolve().parent / "data" / "compat" / "worldflux-state-v1"

DTYPES = [
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
FLOATS = {torch.float16, torch.float32, torch.float64, torch.bfloat16}


@st.composite
def tensors(draw):
    """A tensor of any wire dtype, 0 to 4 dims (empty dims included), any bit pattern."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0).byte()
    # torch bools must be 0 or 1; every other dtype takes any bit pattern (NaNs, -0.0, inf).
    tensor = (flat % 2).bool() if dtype == torch.bool else flat.view(dtype)
    tensor = tensor.reshape(shape)
    if dtype in FLOATS and draw(st.booleans()):
        tensor.requires_grad_(True)
    return tensor


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)

states = st.builds(
    State,
    st.dictionaries(st.text(min_size=1, max_size=8), tensors(), max_size=5),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states)
def test_any_state_round_trips_exactly_and_reencodes_to_the_same_bytes(state):
    payload = state.serialize()

    back = State.deserialize(payload)

    assert list(back.tensors) == list(state.tensors)
    assert back.meta == state.meta
    for key, tensor in state.tensors.items():
        assert back[key].dtype == tensor.dtype
        assert back[key].shape == tensor.shape
        assert back[key].requires_grad == tensor.requires_grad
        assert bits(back[key]) == bits(tensor)
    assert back.serialize() == payload


@settings(max_examples=100, deadline=None)
@given(states, st.data())
def test_any_cut_of_a_valid_payload_raises_state_format_error(state, data):
    payload = state.serialize()
    cut = data.draw(st.integers(0, len(payload) - 1))

    try:
        State.deserialize(payload[:cut])
    except StateFormatError:
        return
    raise AssertionError(f"a payload cut to {cut} of {len(payload)} bytes decoded")


# --- mutation fuzz ------------------------------------------------------------------------------

FUZZ_CASES = 25_000


def _seed_payloads() -> list[bytes]:
    payloads = sorted(p.read_bytes() for p in COMPAT_DIR.glob("*.bin"))
    generator = torch.Generator().manual_seed(1)
    mixed = State(
        {
            "bool": torch.rand(2, 3, generator=generator) > 0.5,
            "scalar": torch.tensor(3, dtype=torch.int64),
            "empty": torch.empty(0, 4, dtype=torch.bfloat16),
            "half": torch.randn(2, 2, generator=generator).half().requires_grad_(),
            "u8": torch.randint(0, 255, (2, 5), dtype=torch.uint8, generator=generator),
        },
        {"step": 3, "tags": ["a", None, 1.5], "nested": {"k": True}},
    )
    payloads.append(mixed.serialize())
    payloads.append(State({}, {}).serialize())
    return payloads


JUNK_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64 + 1,
    -(2**63),
    1.5,
    -0.0,
    "",
    "x",
    "float32",
    "bfloat16",
    "cuda:0",
    [],
    [0],
    [-1],
    [2**62, 2**62],
    [1.0],
    ["1"],
    [[1]],
    {},
    {"a": 1},
]
RECORD_KEYS = ["name", "dtype", "shape", "nbytes", "requires_grad", "source_device"]
TOP_KEYS = ["format", "version", "meta", "tensors"]


def _mutate_json(rng: random.Random, payload: bytes) -> bytes:
    """Decode the metadata, damage one field, re-pack with a correct length."""
    _, _, length = HEADER.unpack_from(payload)
    doc = json.loads(payload[9 : 9 + length])
    data = payload[9 + length :]
    records = doc["tensors"]
    choice = rng.random()
    if records and choice < 0.6:
        entry = rng.choice(records)
        key = rng.choice(RECORD_KEYS)
        if rng.random() < 0.15:
            entry.pop(key, None)
        elif key == "shape" and entry["shape"] and rng.random() < 0.5:
            entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(JUNK_VALUES)
        elif key in ("shape", "nbytes") and rng.random() < 0.5:
            # A consistent but forged size: shape and nbytes agree, the payload is too short.
            entry["shape"] = [rng.choice([1, 7, 2**20, 2**31]), rng.choice([0, 3, 2**20])]
            entry["nbytes"] = entry["shape"][0] * entry["shape"][1] * 4
            entry["dtype"] = "float32"
        else:
            entry[key] = rng.choice(JUNK_VALUES)
    elif choice < 0.75 and records:
        op = rng.random()
        if op < 0.4:
            records.append(dict(rng.choice(records)))
        elif op < 0.7:
            records.pop(rng.randrange(len(records)))
        else:
            rng.shuffle(records)
    elif choice < 0.9:
        key = rng.choice(TOP_KEYS)
        if rng.random() < 0.3:
            doc.pop(key, None)
        else:
            doc[key] = rng.choice(JUNK_VALUES)
    else:
        doc = rng.choice(JUNK_VALUES)
    meta = json.dumps(doc).encode()
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)] + bytes(rng.randrange(4))
    return HEADER.pack(b"WFST", 1, len(meta)) + meta + data


def _mutate_bytes(rng: random.Random, payload: bytes) -> bytes:
    buf = bytearray(payload)
    op = rng.random()
    if op < 0.35:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif op < 0.5:
        del buf[rng.randrange(len(buf) + 1) :]
    elif op < 0.6:
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op < 0.7:
        at = rng.randrange(len(buf))
        del buf[at : at + rng.randint(1, 8)]
    elif op < 0.85:
        struct.pack_into(">I", buf, 5, rng.choice([0, 1, 0xFFFFFFFF, rng.randrange(2**32)]))
    elif op < 0.92:
        buf[4] = rng.randrange(256)
    else:
        buf[rng.randrange(4)] = rng.randrange(256)
    return bytes(buf)


def test_mutation_fuzz_of_deserialize_only_ever_raises_state_format_error():
    seeds = _seed_payloads()
    rng = random.Random(20240601)
    outcomes = {"rejected": 0, "decoded": 0}

    for case in range(FUZZ_CASES):
        base = seeds[case % len(seeds)]
        payload = _mutate_json(rng, base) if case % 2 else _mutate_bytes(rng, base)
        try:
            state = State.deserialize(payload)
        except StateFormatError:
            outcomes["rejected"] += 1
            continue
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(
                f"case {case}: {type(exc).__name__}: {exc}\npayload={payload!r}"
            ) from exc
        outcomes["decoded"] += 1
        # Whatever decodes is a valid State: it serializes again and decodes to the same bits.
        again = State.deserialize(state.serialize())
        assert {k: bits(v) for k, v in again.tensors.items()} == {
            k: bits(v) for k, v in state.tensors.items()
        }

    assert sum(outcomes.values()) == FUZZ_CASES >= 10_000
    # The fuzz is only honest if it exercises both sides of the decoder.
    assert outcomes["rejected"] > FUZZ_CASES // 2
    assert outcomes["decoded"] > 100
