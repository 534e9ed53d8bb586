"""Tests of onnxquant.core.numerics: bit-exact against onnxruntime, properties, hand-checked
values."""

from __future__ import annotations

import functools
import inspect
import math

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxquant.core import numerics
from onnxquant.core.errors import NumericsError
from onnxquant.core.numerics import (
    QuantizedTensor,
    compute_scale_zero_point,
    dequantize,
    quant_range,
    quantize,
    quantize_weight,
    tensor_range,
)
from onnxquant.core.qtypes import FLOAT8E4M3FN, INT4, INT8, INT16, UINT4, UINT8, UINT16, QuantType

INT_TYPES = [INT4, UINT4, INT8, UINT8, INT16, UINT16]
INT32_MAX = 2**31 - 1
F32_EPS = float(np.finfo(np.float32).eps)
FAST = settings(max_examples=50, deadline=None)

# --------------------------------------------------------------------------- ORT reference


@functools.cache
def _ort_session(onnx_type: int, opset: int, axis: int | None) -> ort.InferenceSession:
    """x, s, z, qin -> (int32/float32 QuantizeLinear(x), DequantizeLinear(qin)).

    Zero point and quantized input are fed as int32 (float32 for float8) and cast inside the
    graph, because onnxruntime's Python API cannot take int4/float8 numpy arrays.
    """
    is_float = onnx_type == TensorProto.FLOAT8E4M3FN
    wide = TensorProto.FLOAT if is_float else TensorProto.INT32
    kw = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("Cast", ["z"], ["zq"], to=onnx_type),
        helper.make_node("QuantizeLinear", ["x", "s", "zq"], ["q"], **kw),
        helper.make_node("Cast", ["q"], ["q_wide"], to=wide),
        helper.make_node("Cast", ["qin"], ["qc"], to=onnx_type),
        helper.make_node("DequantizeLinear", ["qc", "s", "zq"], ["d"], **kw),
    ]

    def vi(name: str, elem: int) -> object:
        return helper.make_tensor_value_info(name, elem, None)

    graph = helper.make_graph(
        nodes,
        "qdq",
        [vi("x", TensorProto.FLOAT), vi("s", TensorProto.FLOAT), vi("z", wide), vi("qin", wide)],
        [vi("q_wide", wide), vi("d", TensorProto.FLOAT)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_qdq(
    qtype: QuantType, x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qin: np.ndarray, axis
) -> tuple[np.ndarray, np.ndarray]:
    opset = max(13, qtype.min_opset)  # 13 for 8-bit per-axis, 19 float8, 21 for int4/16-bit
    sess = _ort_session(int(qtype.onnx_dtype), opset, axis)
    wide = np.float32 if qtype.is_float else np.int32
    feeds = {
        "x": x.astype(np.float32),
        "s": scale.astype(np.float32),
        "z": zp.astype(np.float32).astype(wide),
        "qin": qin.astype(np.float32).astype(wide),
    }
    q_wide, d = sess.run(None, feeds)
    return q_wide, d


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a32.shape == b32.shape and np.array_equal(a32.view(np.uint32), b32.view(np.uint32))


# --------------------------------------------------------------------------- strategies

scales = st.one_of(
    st.integers(-12, 6).map(lambda e: 2.0**e),  # power of two: k + 0.5 multiples are exact ties
    st.floats(2.0**-16, 1024.0, width=32),
)
units = st.one_of(
    st.integers(-70000, 70000).map(lambda k: k + 0.5),
    st.integers(-70000, 70000).map(float),
    st.floats(-70000, 70000, width=32),
    st.floats(width=32, allow_nan=False),  # any magnitude, subnormals and +-inf
)


@st.composite
def quant_cases(draw, types=tuple(INT_TYPES)):
    qtype = draw(st.sampled_from(types))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    axis = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    n = 1 if axis is None else shape[axis]
    scale = np.array(draw(st.lists(scales, min_size=n, max_size=n)), np.float32)
    if qtype.is_float:
        zp = np.zeros(n, np.float32)
        qin_values = st.integers(0, 255).filter(lambda b: b & 0x7F != 0x7F)  # no NaN bytes
        qin = np.array(
            draw(st.lists(qin_values, min_size=math.prod(shape), max_size=math.prod(shape))),
            np.uint8,
        )
        qin = qin.view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(shape)
    else:
        ints = st.integers(qtype.qmin, qtype.qmax)
        zp = np.array(draw(st.lists(ints, min_size=n, max_size=n)), np.int64)
        qin = np.array(
            draw(st.lists(ints, min_size=math.prod(shape), max_size=math.prod(shape))), np.int64
        ).reshape(shape)
    u = np.array(draw(st.lists(units, min_size=math.prod(shape), max_size=math.prod(shape))))
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = n
    with np.errstate(over="ignore", invalid="ignore"):
        x = (u.astype(np.float32).reshape(shape) * scale.reshape(bshape)).astype(np.float32)
    x = np.nan_to_num(x, nan=0.0, posinf=np.inf, neginf=-np.inf)  # inf * 0 never happens; safety
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return qtype, x, scale, zp, qin, axis


# --------------------------------------------------------------------------- bit-exact vs ORT


@FAST
@given(quant_cases())
def test_quantize_dequantize_match_onnxruntime_bit_exactly(case):
    qtype, x, scale, zp, qin, axis = case
    ref_q, ref_d = ort_qdq(qtype, x, scale, zp, qin, axis)
    ours_q = quantize(x, scale, zp.astype(qtype.numpy_dtype), qtype, axis=axis)
    assert ours_q.dtype == qtype.numpy_dtype
    np.testing.assert_array_equal(ours_q.astype(np.int32), ref_q)
    ours_d = dequantize(
        qin.astype(qtype.numpy_dtype), scale, zp.astype(qtype.numpy_dtype), axis=axis
    )
    assert ours_d.dtype == np.float32
    assert _same_bits(ours_d, ref_d)


@FAST
@given(quant_cases(types=(FLOAT8E4M3FN,)))
def test_float8_quantize_dequantize_match_onnxruntime_bit_exactly(case):
    qtype, x, scale, zp, qin, axis = case
    ref_q, ref_d = ort_qdq(qtype, x, scale, zp, qin, axis)
    ours_q = quantize(x, scale, zp.astype(qtype.numpy_dtype), qtype, axis=axis)
    assert ours_q.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert _same_bits(ours_q.astype(np.float32), ref_q)
    ours_d = dequantize(
        qin.astype(qtype.numpy_dtype), scale, zp.astype(qtype.numpy_dtype), axis=axis
    )
    assert _same_bits(ours_d, ref_d)


def test_rounding_is_half_to_even_and_division_not_reciprocal():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    np.testing.assert_array_equal(quantize(x, 1.0, 0, INT8), [0, 2, 2, 0, -2, -2])
    q0 = quantize(np.float32(1.5), np.float32(1.0), np.uint8(3), UINT8)  # 0-d in, 0-d out
    assert q0.shape == () and q0.dtype == np.uint8 and int(q0) == 5
    # A case where float32 division and multiplication by the reciprocal round differently.
    x = np.array([24.468054], np.float32)
    s = np.float32(0.8294256)
    assert np.rint(x[0] * (np.float32(1) / s)) == 29.0
    ref_q, _ = ort_qdq(INT8, x, np.asarray(s), np.asarray(0), np.zeros(1), None)
    assert quantize(x, s, 0, INT8)[0] == ref_q[0] == 30


def test_quantize_saturates_to_full_grid_not_reduced_or_symmetric_grid():
    x = np.array([-1e9, -np.inf, 1e9, np.inf], np.float32)
    for qtype in INT_TYPES:
        q = quantize(x, 1.0, 0, qtype)
        np.testing.assert_array_equal(q.astype(np.int64), [qtype.qmin] * 2 + [qtype.qmax] * 2)
    # int4 symmetric params: -absmax -> -7, but -8 is still reachable by saturation
    np.testing.assert_array_equal(
        quantize(np.array([-7.6, 7.6], np.float32), 1.0, 0, INT4).astype(np.int8), [-8, 7]
    )


def test_quantize_rejects_nan_and_bad_parameters():
    with pytest.raises(NumericsError, match="NaN"):
        quantize(np.array([1.0, np.nan], np.float32), 1.0, 0, INT8)
    with pytest.raises(NumericsError, match="scale"):
        quantize(np.ones(3, np.float32), 0.0, 0, INT8)
    with pytest.raises(NumericsError, match=r"\[0, 255\]"):
        quantize(np.ones(3, np.float32), 1.0, 256, UINT8)
    with pytest.raises(NumericsError, match="axis"):
        quantize(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3), INT8)
    with pytest.raises(NumericsError, match=r"expected \(2,\)"):
        quantize(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.zeros(3), INT8, axis=0)


def test_float8_saturates_and_keeps_nan():
    x = np.array([1000.0, -1e30, np.inf, 17.0, np.nan], np.float32)
    q = quantize(x, 1.0, np.zeros((), ml_dtypes.float8_e4m3fn), FLOAT8E4M3FN).astype(np.float32)
    np.testing.assert_array_equal(q[:4], [448.0, -448.0, 448.0, 16.0])  # 17 ties to even 16
    assert np.isnan(q[4])


# --------------------------------------------------------------------------- quant_range


@pytest.mark.parametrize(
    ("qtype", "full", "reduced", "sym", "sym_reduced"),
    [
        (INT8, (-128, 127), (-64, 63), (-127, 127), (-63, 63)),
        (UINT8, (0, 255), (0, 127), (0, 255), (0, 127)),
        (INT16, (-32768, 32767), (-16384, 16383), (-32767, 32767), (-16383, 16383)),
        (UINT16, (0, 65535), (0, 32767), (0, 65535), (0, 32767)),
        (INT4, (-8, 7), (-4, 3), (-7, 7), (-3, 3)),
        (UINT4, (0, 15), (0, 7), (0, 15), (0, 7)),
    ],
)
def test_quant_range_table(qtype, full, reduced, sym, sym_reduced):
    assert quant_range(qtype) == full
    assert quant_range(qtype, reduce_range=True) == reduced
    assert quant_range(qtype, symmetric=True) == sym
    assert quant_range(qtype, symmetric=True, reduce_range=True) == sym_reduced


def test_quant_range_rejects_float_types():
    with pytest.raises(NumericsError, match="float8e4m3fn"):
        quant_range(FLOAT8E4M3FN)


# --------------------------------------------------------------------------- scale/zero point

_BIG = float(np.float32(1e30))
bounds = st.floats(-_BIG, _BIG, width=32)


@st.composite
def tie_ranges(draw):
    """Ranges whose exact ends sit on .5 ties of the grid (the off-by-one trap)."""
    qtype = draw(st.sampled_from(INT_TYPES))
    qmin, qmax = quant_range(qtype)
    s = 2.0 ** draw(st.integers(-8, 8))
    k = draw(st.integers(0, qmax - qmin - 1))
    return qtype, -(k + 0.5) * s, (qmax - qmin - k - 0.5) * s


@st.composite
def ranges(draw):
    lo, hi = sorted([draw(bounds), draw(bounds)])
    return draw(st.sampled_from(INT_TYPES)), lo, hi


def _check_params(qtype, rmin, rmax, symmetric, reduce_range):
    scale, zp = compute_scale_zero_point(
        rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range
    )
    assert scale.shape == () and zp.shape == ()
    assert scale.dtype == np.float32 and zp.dtype == qtype.numpy_dtype
    assert np.isfinite(scale) and scale >= np.finfo(np.float32).tiny
    qmin, qmax = quant_range(qtype, symmetric=symmetric, reduce_range=reduce_range)
    z = int(zp)
    assert int(quantize(np.zeros(1, np.float32), scale, zp, qtype)[0]) == z
    if symmetric:
        assert z == (0 if qtype.signed else (qmin + qmax + 1) // 2)
    for r in (rmin, rmax):
        r32 = np.float32(r)
        unsaturated = int(np.rint(r32 / scale)) + z
        assert qmin <= unsaturated <= qmax, (r, unsaturated)
        back = float(dequantize(quantize(np.array([r32]), scale, zp, qtype), scale, zp)[0])
        assert abs(back - float(r32)) <= float(scale) / 2 + 4 * F32_EPS * abs(float(r32))
    return scale, zp


@FAST
@given(st.one_of(ranges(), tie_ranges()), st.booleans(), st.booleans())
def test_scale_zero_point_properties(case, symmetric, reduce_range):
    qtype, rmin, rmax = case
    scale, _ = _check_params(qtype, rmin, rmax, symmetric, reduce_range)
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    qmin, qmax = quant_range(qtype, symmetric=symmetric, reduce_range=reduce_range)
    if symmetric:
        denom = qmax if qtype.signed else qmax - (qmin + qmax + 1) // 2
        ideal = max(-lo, hi) / denom
    else:
        ideal = (hi - lo) / (qmax - qmin)
    if np.float32(ideal) >= np.finfo(np.float32).tiny:  # not degenerate: not wasteful either
        assert ideal * (1 - 2**-23) <= float(scale) <= ideal * (1 + 2**-20)


@FAST
@given(tie_ranges())
def test_tie_ranges_do_not_saturate_by_one(case):
    qtype, rmin, rmax = case
    scale, zp = _check_params(qtype, rmin, rmax, False, False)
    qmin, qmax = quant_range(qtype)
    q = quantize(np.array([rmin, rmax], np.float32), scale, zp, qtype).astype(np.int64)
    # rmin lands exactly on qmin; the tie at rmax gives up half a step instead of saturating.
    assert q[0] == qmin and qmax - 1 <= q[1] <= qmax


def test_tie_range_example_is_nudged():
    # rmin = -11.5, rmax = 243.5 on uint8: exact scale 1 gives zp 12 and rint(243.5) + 12 = 256.
    scale, zp = compute_scale_zero_point(-11.5, 243.5, UINT8)
    assert float(scale) > 1.0 and float(scale) == float(np.nextafter(np.float32(1), 2))
    assert int(zp) == 11
    q = quantize(np.array([-11.5, 243.5], np.float32), scale, zp, UINT8)
    np.testing.assert_array_equal(q, [0, 254])
    back = dequantize(q, scale, zp)
    assert np.all(np.abs(back - np.array([-11.5, 243.5])) < 0.5)


@FAST
@given(st.sampled_from(INT_TYPES), st.booleans(), bounds, bounds, bounds)
def test_scale_is_monotonic_in_range_width(qtype, symmetric, a, b, c):
    rmin, r1, r2 = sorted([a, b, c])
    s1, _ = compute_scale_zero_point(rmin, r1, qtype, symmetric=symmetric)
    s2, _ = compute_scale_zero_point(rmin, r2, qtype, symmetric=symmetric)
    if float(s1) != 1.0 and float(s2) != 1.0:  # skip the degenerate fallback
        assert float(s2) >= float(s1) * (1 - 2**-20)  # nudges move a scale by a few ulps only


@FAST
@given(ranges(), st.booleans(), st.lists(bounds, min_size=2))
def test_quantize_is_monotonic(case, symmetric, xs):
    qtype, rmin, rmax = case
    scale, zp = compute_scale_zero_point(rmin, rmax, qtype, symmetric=symmetric)
    q = quantize(np.sort(np.array(xs, np.float32)), scale, zp, qtype).astype(np.int64)
    assert np.all(np.diff(q) >= 0)


@FAST
@given(
    st.sampled_from([*INT_TYPES, FLOAT8E4M3FN]),
    st.booleans(),
    st.lists(st.tuples(bounds, bounds), min_size=1, max_size=6),
)
def test_per_axis_equals_per_slice_calls(qtype, symmetric, pairs):
    lo = np.array([min(p) for p in pairs])
    hi = np.array([max(p) for p in pairs])
    scale, zp = compute_scale_zero_point(lo, hi, qtype, symmetric=symmetric)
    assert scale.shape == zp.shape == (len(pairs),)
    for i in range(len(pairs)):
        s_i, z_i = compute_scale_zero_point(lo[i], hi[i], qtype, symmetric=symmetric)
        assert scale[i] == s_i and zp[i] == z_i


@pytest.mark.parametrize(
    ("rmin", "rmax", "qtype", "symmetric", "reduce", "scale", "zp"),
    [
        (-1.0, 3.0, UINT8, False, False, 4 / 255, 64),
        (-1.0, 3.0, INT8, True, False, 3 / 127, 0),
        (-1.0, 3.0, INT8, True, True, 3 / 63, 0),  # baseline: 6/128 on [-64, 64]
        (-1.0, 3.0, UINT8, True, False, 3 / 127, 128),
        (0.5, 3.0, UINT8, False, False, 3 / 255, 0),
        (-3.0, -0.5, UINT8, False, False, 3 / 255, 255),
        (-1.0, 3.0, INT8, False, False, 4 / 255, -64),
        (-1.0, 3.0, UINT16, True, False, 3 / 32767, 32768),
        (-1.0, 3.0, UINT4, True, False, 3 / 7, 8),
        (-1.0, 3.0, UINT4, True, True, 3 / 3, 4),
        (0.0, 0.0, UINT8, False, False, 1.0, 0),
        (0.0, 0.0, INT8, True, False, 1.0, 0),
        (0.0, 0.0, UINT8, True, False, 1.0, 128),
        (-1e-30, 1e-30, INT8, True, False, 1e-30 / 127, 0),
        (0.0, 1e-40, UINT8, False, False, 1.0, 0),  # subnormal scale -> 1
    ],
)
def test_hand_checked_scales(rmin, rmax, qtype, symmetric, reduce, scale, zp):
    s, z = compute_scale_zero_point(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce)
    assert s == np.float32(scale)
    assert int(z) == zp


def test_min_real_range_widens_the_range():
    s, z = compute_scale_zero_point(0.0, 0.0, UINT8, min_real_range=0.0001)
    assert s == np.float32(0.0001 / 255) and int(z) == 0


def test_float8_params_are_symmetric_absmax_over_448():
    s, z = compute_scale_zero_point(-2.0, 1.0, FLOAT8E4M3FN)
    assert s == np.float32(2.0 / 448) and z.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert float(z) == 0.0
    assert float(quantize(np.float32(-2.0), s, z, FLOAT8E4M3FN).astype(np.float32)) == -448.0
    with pytest.raises(NumericsError, match="reduce_range"):
        compute_scale_zero_point(-2.0, 1.0, FLOAT8E4M3FN, reduce_range=True)


@pytest.mark.parametrize(
    ("rmin", "rmax", "match"),
    [
        (np.nan, 1.0, "NaN/Inf"),
        (0.0, np.inf, "NaN/Inf"),
        (2.0, 1.0, "rmin > rmax"),
        (-1e300, 1.0, "float32"),
    ],
)
def test_invalid_ranges_raise(rmin, rmax, match):
    with pytest.raises(NumericsError, match=match):
        compute_scale_zero_point(rmin, rmax, INT8)


# --------------------------------------------------------------------------- tensor_range


def test_tensor_range_per_tensor_and_per_axis():
    data = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]], np.float32)
    lo, hi = tensor_range(data)
    assert lo.shape == () and (float(lo), float(hi)) == (-6.0, 5.0)
    lo, hi = tensor_range(data, axis=0)
    np.testing.assert_array_equal(lo, [-2.0, -6.0])
    np.testing.assert_array_equal(hi, [3.0, 5.0])
    lo, hi = tensor_range(data, axis=-1)
    np.testing.assert_array_equal(lo, [1.0, -2.0, -6.0])
    np.testing.assert_array_equal(hi, [4.0, 5.0, 3.0])
    assert lo.dtype == np.float32
    assert tensor_range(np.arange(5), name="ints")[1].dtype == np.float64


def test_tensor_range_empty_is_zero():
    lo, hi = tensor_range(np.zeros((0, 3), np.float32))
    assert (float(lo), float(hi)) == (0.0, 0.0)
    lo, hi = tensor_range(np.zeros((0, 3), np.float32), axis=1)
    np.testing.assert_array_equal(lo, [0.0, 0.0, 0.0])
    assert tensor_range(np.zeros((0, 3), np.float32), axis=0)[0].shape == (0,)


def test_tensor_range_non_finite_names_tensor_and_counts():
    data = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    with pytest.raises(NumericsError, match=r"'conv1\.weight' contains 3 non-finite"):
        tensor_range(data, name="conv1.weight")
    with pytest.raises(NumericsError, match="out of range"):
        tensor_range(np.ones((2, 2)), axis=2, name="w")


# --------------------------------------------------------------------------- quantize_weight


def test_quantize_weight_all_zero_and_constant_tensors():
    qt = quantize_weight(np.zeros((2, 3), np.float32), INT8)
    assert float(qt.scale) == 1.0 and int(qt.zero_point) == 0
    np.testing.assert_array_equal(qt.data, np.zeros((2, 3), np.int8))

    qt = quantize_weight(np.full((4,), 2.5, np.float32), UINT8, symmetric=False)
    assert qt.scale == np.float32(2.5 / 255) and int(qt.zero_point) == 0
    np.testing.assert_array_equal(qt.data, [255] * 4)
    np.testing.assert_allclose(qt.dequantize(), 2.5, atol=float(qt.scale) / 2)

    qt = quantize_weight(np.full((3,), -3.0, np.float32), INT8)
    assert qt.scale == np.float32(3 / 127)
    np.testing.assert_array_equal(qt.data, [-127] * 3)

    qt = quantize_weight(np.zeros((0, 4), np.float32), INT8, axis=1)
    assert qt.data.shape == (0, 4) and qt.scale.tolist() == [1.0] * 4


def test_quantize_weight_int4_limits():
    w = np.array([[-0.7, 0.35, 0.7], [0.0, 0.1, -0.2]], np.float32)
    qt = quantize_weight(w, INT4, axis=0)
    assert qt.data.dtype == np.dtype(ml_dtypes.int4) and qt.axis == 0
    assert qt.scale[0] == np.float32(0.7 / 7) and qt.scale[1] == np.float32(0.2 / 7)
    np.testing.assert_array_equal(qt.data.astype(np.int8), [[-7, 4, 7], [0, 4, -7]])
    qt = quantize_weight(np.array([-1.5, 0.0, 6.0], np.float32), INT4, symmetric=False)
    assert qt.scale == np.float32(0.5) and int(qt.zero_point) == -5  # asymmetric uses -8 too
    np.testing.assert_array_equal(qt.data.astype(np.int8), [-8, -5, 7])
    qt = quantize_weight(w, UINT4, axis=-2, reduce_range=True)
    assert qt.axis == 0 and int(qt.data.astype(np.uint8).max()) <= 7
    assert qt.zero_point.tolist() == [4, 4]


def test_quantize_weight_per_axis_matches_slices_and_is_close():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 2)).astype(np.float32) * np.array([1e-3, 1, 10, 100])[:, None, None]
    qt = quantize_weight(w, INT8, axis=0)
    assert isinstance(qt, QuantizedTensor) and qt.scale.shape == (4,)
    for c in range(4):
        ref = quantize_weight(w[c], INT8)
        np.testing.assert_array_equal(qt.data[c], ref.data)
        assert qt.scale[c] == ref.scale
    err = np.abs(qt.dequantize() - w)
    assert np.all(err <= qt.scale[:, None, None] / 2 * (1 + 1e-5))


def test_quantize_weight_nan_names_the_weight():
    w = np.array([1.0, np.nan], np.float32)
    with pytest.raises(NumericsError, match="'fc.weight' contains 1 non-finite"):
        quantize_weight(w, INT8, name="fc.weight")


# --------------------------------------------------------------------------- public API


def test_public_api():
    assert set(numerics.__all__) == {
        "quant_range",
        "tensor_range",
        "compute_scale_zero_point",
        "quantize",
        "dequantize",
        "QuantizedTensor",
        "quantize_weight",
        "bias_scale",
        "weight_scale_for_bias",
        "quantize_bias",
    }
    for name in numerics.__all__:
        assert hasattr(numerics, name)
    kw_only = inspect.Parameter.KEYWORD_ONLY
    params = inspect.signature(compute_scale_zero_point).parameters
    assert [p for p in params if params[p].kind == kw_only] == [
        "symmetric",
        "reduce_range",
        "min_real_range",
    ]
    params = inspect.signature(quantize_weight).parameters
    assert params["symmetric"].default is True and params["axis"].kind == kw_only
    assert dataclass_fields(QuantizedTensor) == ["data", "scale", "zero_point", "qtype", "axis"]


def dataclass_fields(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]
