"""Shared scalar transforms: symlog/symexp round trips and two-hot encodings that decode back."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from worldflux_registry.functional import (  # noqa: E402
    symexp,
    symlog,
    two_hot,
    two_hot_mean,
    two_hot_uniform,
)

FLOATS = st.lists(
    st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=32
)
# DreamerV3's reward bins: 255 values in symlog space, exactly antisymmetric.
_LINEAR = torch.linspace(-20.0, 20.0, 255)
DREAMER_BINS = (_LINEAR - _LINEAR.flip(0)) / 2.0


@settings(max_examples=60, deadline=None)
@given(FLOATS)
def test_symexp_inverts_symlog(values):
    x = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-9, atol=1e-9)
    assert torch.equal(symlog(-x), -symlog(x))


def test_symlog_is_near_identity_at_zero_and_logarithmic_far_away():
    x = torch.tensor([0.0, 1e-4, 1e6])
    y = symlog(x)
    assert y[0] == 0.0
    assert y[1] == pytest.approx(1e-4, rel=1e-3)
    assert y[2] == pytest.approx(13.8155, rel=1e-4)


def _check_encoding(encoded, x, bins):
    assert encoded.shape == (*x.shape, bins.shape[0])
    assert (encoded >= 0).all()
    assert ((encoded > 0).sum(-1) <= 2).all()
    assert torch.allclose(encoded.sum(-1), torch.ones_like(x), atol=1e-6)
    # Decodes to the value clipped into the bin range.
    clipped = x.clamp(float(bins[0]), float(bins[-1]))
    assert torch.allclose(encoded @ bins, clipped, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(FLOATS)
def test_two_hot_rows_sum_to_one_and_decode_back(values):
    x = symlog(torch.tensor(values))
    _check_encoding(two_hot(x, DREAMER_BINS), x, DREAMER_BINS)


@settings(max_examples=60, deadline=None)
@given(FLOATS)
def test_two_hot_uniform_rows_sum_to_one_and_decode_back(values):
    x = symlog(torch.tensor(values))
    bins = torch.linspace(-10.0, 10.0, 101)
    _check_encoding(two_hot_uniform(x, 101, -10.0, 10.0), x, bins)


def test_values_outside_the_bins_clip_to_the_end_bins():
    bins = torch.linspace(-2.0, 2.0, 5)
    x = torch.tensor([-7.0, 3.5])
    for encoded in (two_hot(x, bins), two_hot_uniform(x, 5, -2.0, 2.0)):
        assert torch.equal(encoded, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]))


def test_both_encodings_weight_the_two_neighbouring_bins_by_closeness():
    bins = torch.linspace(-2.0, 2.0, 5)
    x = torch.tensor([0.25, -1.0])
    expected = torch.tensor([[0, 0, 0.75, 0.25, 0], [0, 1.0, 0, 0, 0]])
    assert torch.allclose(two_hot(x, bins), expected)
    assert torch.allclose(two_hot_uniform(x, 5, -2.0, 2.0), expected)


def test_two_hot_keeps_leading_shape():
    x = torch.zeros(3, 4, 2)
    assert two_hot(x, DREAMER_BINS).shape == (3, 4, 2, 255)
    assert two_hot_uniform(x, 7, -1.0, 1.0).shape == (3, 4, 2, 7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=255, max_size=255))
def test_two_hot_mean_is_the_expected_bin(logits):
    probs = torch.softmax(torch.tensor(logits), -1)
    assert torch.allclose(two_hot_mean(probs, DREAMER_BINS), probs @ DREAMER_BINS, atol=1e-5)


def test_two_hot_mean_of_uniform_probs_over_symmetric_bins_is_exactly_zero():
    probs = torch.softmax(torch.zeros(4, 255), -1)
    assert torch.equal(two_hot_mean(probs, DREAMER_BINS), torch.zeros(4))
    # An odd number of bins (a middle bin) and an even number both cancel.
    for n in (6, 7):
        line = torch.linspace(-3.0, 3.0, n)
        bins = (line - line.flip(0)) / 2.0
        assert torch.equal(two_hot_mean(torch.full((n,), 1.0 / n), bins), torch.tensor(0.0))


def test_two_hot_mean_inverts_two_hot():
    x = torch.tensor([-15.0, -0.3, 0.0, 2.7, 19.9])
    assert torch.allclose(two_hot_mean(two_hot(x, DREAMER_BINS), DREAMER_BINS), x, atol=1e-5)
