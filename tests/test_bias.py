"""Tests of int32 bias quantization (onnxquant.core.bias through onnxquant.core.numerics):
the bias scale is the float32 product input scale x weight scale, rounding and overflow, and
the weight-scale enlargement that keeps every bias inside int32."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxquant.core.errors import NumericsError
from onnxquant.core.numerics import bias_scale, dequantize, quantize_bias, weight_scale_for_bias

INT32_MAX = 2**31 - 1
FAST = settings(max_examples=50, deadline=None)

# --------------------------------------------------------------------------- bias


def test_bias_scale_is_float32_product():
    s = bias_scale(0.1, np.array([0.2, 0.3]))
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, np.float32(0.1) * np.array([0.2, 0.3], np.float32))
    assert bias_scale(np.float32(0.5), np.float32(0.25)).shape == ()


def test_quantize_bias_values_and_ties():
    q, s = quantize_bias(np.array([1.0, -2.5, 0.375, 0.625]), 0.5, 0.5)
    assert s == np.float32(0.25) and q.dtype == np.int32
    np.testing.assert_array_equal(q, [4, -10, 2, 2])  # 1.5 -> 2, 2.5 -> 2
    q, s = quantize_bias(np.array([1.0, 2.0, 3.0]), 0.1, np.array([0.1, 0.2, 0.3]))
    np.testing.assert_array_equal(q, [100, 100, 100])
    assert s.shape == (3,)
    q, _ = quantize_bias(np.array([5.0, 1.0]), 1.0, np.array([0.0, 0.5]))
    np.testing.assert_array_equal(q, [0, 2])  # zero scale element -> 0


def test_quantize_bias_overflow_names_bias():
    with pytest.raises(NumericsError, match=r"'conv1\.bias'.*weight_scale_for_bias"):
        quantize_bias(np.array([1e6, 1.0]), 1e-3, 1e-4, name="conv1.bias")
    with pytest.raises(NumericsError, match="'b'.*non-finite"):
        quantize_bias(np.array([np.nan]), 1.0, 1.0, name="b")
    with pytest.raises(NumericsError, match="'b'.*3 channels"):
        quantize_bias(np.ones(2), 1.0, np.ones(3), name="b")


def test_weight_scale_for_bias_example():
    bias = np.array([1e6, 1.0])
    ws = np.array([1e-4, 1e-4], np.float32)
    new = weight_scale_for_bias(bias, 1e-3, ws)
    assert new.dtype == np.float32 and new[1] == ws[1]
    assert new[0] > ws[0] and new[0] <= 1e6 / (1e-3 * INT32_MAX) * 1.0002
    q, s = quantize_bias(bias, 1e-3, new)
    assert abs(int(q[0])) <= INT32_MAX
    per_tensor = weight_scale_for_bias(bias, 1e-3, np.float32(1e-4))
    assert per_tensor.shape == () and per_tensor == new[0]


def test_weight_scale_for_bias_with_zero_input_scale():
    ws = np.array([0.5, 0.25], np.float32)
    np.testing.assert_array_equal(weight_scale_for_bias(np.zeros(2), 0.0, ws), ws)
    with pytest.raises(NumericsError, match="input scale is 0"):
        weight_scale_for_bias(np.array([0.0, 1.0]), 0.0, ws)


@pytest.mark.parametrize(("bias", "in_scale"), [(1e-35, 1e-30), (3e-36, 1e-31), (5e-37, 1e-33)])
def test_weight_scale_for_bias_keeps_bias_scale_normal(bias, in_scale):
    # input_scale * weight_scale would be subnormal or 0 in float32 here
    new = weight_scale_for_bias(np.array([bias]), in_scale, np.float32(1e-20))
    q, s = quantize_bias(np.array([bias]), in_scale, new)
    assert s >= np.finfo(np.float32).tiny
    assert abs(int(q[0]) * float(s) - bias) <= float(s) / 2


@FAST
@given(
    st.lists(
        st.floats(-9, 9).map(lambda e: math.copysign(10 ** abs(e), e)), min_size=1, max_size=5
    ),
    st.floats(-6, 0).map(lambda e: 10**e),
    st.floats(-10, -1).map(lambda e: 10**e),
    st.booleans(),
)
def test_weight_scale_for_bias_makes_quantize_bias_succeed(bias, in_scale, w_scale, per_channel):
    bias = np.array(bias)
    ws = np.full(bias.shape, w_scale, np.float32) if per_channel else np.float32(w_scale)
    new = weight_scale_for_bias(bias, in_scale, ws)
    assert new.shape == np.shape(ws) and np.all(new >= ws)
    q, s = quantize_bias(bias, in_scale, new)
    assert np.all(np.abs(q.astype(np.int64)) <= INT32_MAX)
    err = np.abs(q * s.astype(np.float64) - bias)
    assert np.all(err <= s.astype(np.float64) / 2 * (1 + 1e-9))
    back = dequantize(q, s, np.zeros(s.shape, np.int32), axis=0 if s.ndim else None)
    np.testing.assert_allclose(back, bias, rtol=1e-6, atol=float(np.max(s)))
    # channels that were fine keep their exact scale
    fine = np.abs(bias) / (np.float32(in_scale) * np.asarray(ws, np.float64)) <= INT32_MAX / 1.001
    if per_channel:
        np.testing.assert_array_equal(new[fine], ws[fine])
    elif np.all(fine):
        assert new == ws
