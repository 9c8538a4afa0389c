"""The contract: validation messages, canonical form, and the pinned fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worldflux_registry import (
    Capability,
    ContractError,
    IOContract,
    NoiseSpec,
    TensorSpec,
    contract_fingerprint,
)


def golden_contract() -> IOContract:
    return IOContract(
        observations=(TensorSpec("vector", "float32", ("batch", 5), low=-1.0, high=1.0),),
        state=(
            TensorSpec("deter", "float32", ("batch", 16)),
            TensorSpec("stoch", "float32", ("batch", 4, 3), kind="categorical", classes=3),
        ),
        predictions=(
            TensorSpec("vector", "float32", ("batch", 5)),
            TensorSpec("reward", "float32", ("batch",)),
        ),
        action=TensorSpec("action", "float32", ("batch", 2), low=-1.0, high=1.0),
        noise=(NoiseSpec("prior", ("batch", 4, 3), graphs=("transition",)),),
    )


GOLDEN_JSON = (
    '{"action":{"dtype":"float32","high":1,"low":-1,"name":"action","shape":["batch",2]},'
    '"noise":[{"graphs":["transition"],"name":"prior","shape":["batch",4,3]}],'
    '"observations":[{"dtype":"float32","high":1,"low":-1,"name":"vector","shape":["batch",5]}],'
    '"predictions":[{"dtype":"float32","name":"vector","shape":["batch",5]},'
    '{"dtype":"float32","name":"reward","shape":["batch"]}],'
    '"state":[{"dtype":"float32","name":"deter","shape":["batch",16]},'
    '{"classes":3,"dtype":"float32","kind":"categorical","name":"stoch","shape":["batch",4,3]}]}'
)


def test_golden_fingerprint_is_pinned():
    # Changing these values breaks every saved checkpoint and export: only on purpose.
    assert golden_contract().canonical_json() == GOLDEN_JSON
    assert golden_contract().fingerprint() == (
        "sha256:9d555bcdba84ab5ba2649ad7274e4d6ae2495c7c9688489a5d65da18d9577e9e"
    )
    assert (
        golden_contract().fingerprint()
        == "sha256:" + hashlib.sha256(GOLDEN_JSON.encode()).hexdigest()
    )


def test_canonical_json_is_sorted_compact_and_omits_defaults():
    text = golden_contract().canonical_json()
    assert " " not in text
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert "conditions" not in data and "api_version" not in data
    assert "kind" not in data["state"][0] and data["state"][1]["kind"] == "categorical"
    assert data["action"]["shape"] == ["batch", 2]


def test_adding_a_default_field_keeps_old_fingerprints():
    # An optional field at its default must not change the canonical form.
    c = golden_contract()
    same = dataclasses.replace(c, conditions=(), targets=(), api_version="v0.2")
    assert same.fingerprint() == c.fingerprint()
    changed = dataclasses.replace(c, api_version="v0.3")
    assert changed.fingerprint() != c.fingerprint()


def test_fingerprint_function_matches_method_and_has_64_hex():
    fp = contract_fingerprint(golden_contract())
    assert fp == golden_contract().fingerprint()
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    int(fp[7:], 16)


def test_round_trip_through_dict_and_json():
    c = golden_contract()
    again = IOContract.from_dict(json.loads(c.canonical_json()))
    assert again == c
    assert again.fingerprint() == c.fingerprint()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: dataclasses.replace(c, observations=()), "no observations"),
        (
            lambda c: dataclasses.replace(c, state=(TensorSpec("deter", "float33", ("batch", 1)),)),
            "'deter' has unknown dtype 'float33'",
        ),
        (
            lambda c: dataclasses.replace(c, state=(TensorSpec("h", "float32", (4, "batch")),)),
            "does not start with 'batch'",
        ),
        (
            lambda c: dataclasses.replace(c, state=(TensorSpec("h", "float32", ("batch", -2)),)),
            "invalid dim -2",
        ),
        (
            lambda c: dataclasses.replace(
                c, state=(TensorSpec("z", "float32", ("batch", 4), kind="categorical", classes=3),)
            ),
            "last dim 4 but classes=3",
        ),
        (
            lambda c: dataclasses.replace(c, state=(*c.state, c.state[0])),
            "'deter' is declared twice",
        ),
        (
            lambda c: dataclasses.replace(
                c, noise=(NoiseSpec("prior", ("batch", 2), graphs=("imagine",)),)
            ),
            "noise 'prior' has graphs",
        ),
        (
            lambda c: dataclasses.replace(
                c, action=TensorSpec("action", "float32", ("batch", 2), kind="binary")
            ),
            "action kind 'binary'",
        ),
    ],
)
def test_validate_names_the_bad_field(change, needle):
    with pytest.raises(ContractError, match=None) as info:
        change(golden_contract()).validate()
    assert needle in str(info.value)


def test_from_dict_rejects_a_broken_document():
    with pytest.raises(ContractError, match="invalid contract document"):
        IOContract.from_dict({"observations": []})


def test_capability_parse_suggests_the_closest_name():
    assert Capability.parse("encode") is Capability.ENCODE
    with pytest.raises(ContractError, match="Did you mean 'transition'"):
        Capability.parse("transtion")


def test_concrete_shape_binds_batch_and_reports_unbound_symbols():
    spec = TensorSpec("x", "float32", ("batch", 3, "time"))
    assert spec.concrete_shape(batch=2, time=5) == (2, 3, 5)
    with pytest.raises(ContractError, match="'time' is not bound"):
        spec.concrete_shape(batch=2)


dims = st.lists(st.integers(min_value=0, max_value=64), min_size=0, max_size=3)
names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
dtypes = st.sampled_from(["float32", "float16", "int64", "uint8", "bool"])


@given(
    state=st.dictionaries(names, st.tuples(dtypes, dims), min_size=1, max_size=4),
    obs_dim=st.integers(min_value=1, max_value=100),
)
def test_fingerprint_is_a_function_of_content(state, obs_dim):
    def build(order):
        return IOContract(
            observations=(TensorSpec("obs", "float32", ("batch", obs_dim)),),
            state=tuple(TensorSpec(k, state[k][0], ("batch", *state[k][1])) for k in order),
            predictions=(),
        ).validate()

    keys = list(state)
    a = build(keys)
    assert IOContract.from_dict(json.loads(a.canonical_json())).fingerprint() == a.fingerprint()
    b = dataclasses.replace(a, observations=(TensorSpec("obs", "float32", ("batch", obs_dim + 1)),))
    assert b.fingerprint() != a.fingerprint()
