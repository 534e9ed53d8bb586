"""onnxquant.ort.quant_utils numeric helpers against onnxruntime's documented values and
independent numpy references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto as TP

from onnxquant.ort import quant_utils as qu


@pytest.mark.parametrize("qtype, reduce, sym, expected", [
    (TP.UINT8, False, False, (0, 255)), (TP.INT8, False, False, (-128, 127)),
    (TP.INT8, False, True, (-127, 127)), (TP.INT16, False, True, (-32767, 32767)),
    (TP.UINT8, False, True, (0, 255)), (TP.INT4, False, True, (-8, 7)),
    (TP.UINT8, True, False, (0, 127)), (TP.INT8, True, True, (-64, 64)),
    (TP.UINT16, True, False, (0, 32767)), (TP.INT16, True, False, (-16384, 16384)),
    (TP.UINT4, True, False, (0, 7)), (TP.INT4, True, False, (-4, 3)),
])
def test_qmin_qmax(qtype, reduce, sym, expected):
    qmin, qmax = qu.get_qmin_qmax_for_qType(qtype, reduce_range=reduce, symmetric=sym)
    assert (int(qmin), int(qmax)) == expected
    assert qu.get_qrange_for_qType(qtype, reduce, sym) == expected[1] - expected[0]


def test_qmin_qmax_float8_refused():
    with pytest.raises(ValueError, match="float 8"):
        qu.get_qmin_qmax_for_qType(TP.FLOAT8E4M3FN)


def _zp_scale(rmin, rmax, qtype, symmetric=False, reduce=False):
    qmin, qmax = qu.get_qmin_qmax_for_qType(qtype, reduce, symmetric)
    return qu.compute_scale_zp(np.float32(rmin), np.float32(rmax), qmin, qmax, symmetric)


def test_compute_scale_zp_documented_examples():
    zp, s = _zp_scale(-1, 3, TP.UINT8)
    assert zp == 64 and zp.dtype == np.uint8 and s.dtype == np.float32
    assert s == np.float32(4 / 255)
    zp, s = _zp_scale(-1, 3, TP.INT8, symmetric=True)
    assert zp == 0 and s == np.float32(3 / 127)
    zp, s = _zp_scale(-1, 3, TP.INT8, symmetric=True, reduce=True)
    assert zp == 0 and s == np.float32(6 / 128)
    zp, s = _zp_scale(0.5, 3, TP.UINT8)
    assert zp == 0 and s == np.float32(3 / 255)
    zp, s = _zp_scale(0, 0, TP.UINT8)
    assert zp == 0 and s == 1
    zp, _ = _zp_scale(-1, 1, TP.UINT8, symmetric=True)
    assert zp == 128
    zp, s = qu.compute_scale_zp(np.float32(0), np.float32(0.001), np.uint8(0), np.uint8(255),
                                min_real_range=1.0)
    assert s == np.float32(1 / 255)
    with pytest.raises(ValueError):
        qu.compute_scale_zp(np.float32(0), np.float32(1), np.int8(1), np.int8(5))


def test_compute_scale_zp_float16():
    zp, s = qu.compute_scale_zp(np.float16(-1), np.float16(3), np.uint8(0), np.uint8(255))
    assert s.dtype == np.float16 and zp == 64


def test_quantize_nparray_rounds_half_even_and_clips():
    x = np.array([0.5, 1.5, 2.5, -0.5, 1000, -1000], np.float32)
    q = qu.quantize_nparray(TP.INT8, x, np.float32(1), np.int8(0))
    np.testing.assert_array_equal(q, [0, 2, 2, 0, 127, -128])
    assert q.dtype == np.int8
    q = qu.quantize_nparray(TP.UINT8, x, np.float32(1), np.uint8(10), low=5, high=200)
    np.testing.assert_array_equal(q, [10, 12, 12, 10, 200, 5])
    q4 = qu.quantize_nparray(TP.INT4, np.array([7.5, -9], np.float32), np.float32(1), 0)
    np.testing.assert_array_equal(q4, [7, -8])


def test_quantize_data_matches_numpy():
    rng = np.random.default_rng(1)
    data = rng.normal(size=100).astype(np.float32)
    rmin, rmax, zp, scale, q = qu.quantize_data(data, TP.UINT8, symmetric=False)
    assert rmin == data.min() and rmax == data.max()
    ref_scale = np.float32((np.float64(rmax) - np.float64(rmin)) / 255)
    ref_zp = np.round(0 - np.float64(rmin) / ((np.float64(rmax) - np.float64(rmin)) / 255))
    assert scale == ref_scale and zp == ref_zp
    ref_q = np.clip(np.round(data / ref_scale) + ref_zp, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(q, ref_q)
    *_, zp0, s0, q0 = qu.quantize_data(np.zeros(4, np.float32), TP.INT8, symmetric=True)
    assert s0 == 1 and zp0 == 0 and not q0.any()


def test_quantize_data_float8():
    data = np.linspace(-3, 3, 50, dtype=np.float32)
    _, _, zp, scale, q = qu.quantize_data(data, TP.FLOAT8E4M3FN, symmetric=True)
    every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert zp == 0 and scale == np.float32(np.std(data) / np.std(every[np.isfinite(every)]))
    ref = (data / scale).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), ref.astype(np.float32))
    with pytest.raises(RuntimeError, match="reduce_range"):
        qu.quantize_data(data, TP.FLOAT8E4M3FN, True, reduce_range=True)


def test_pack_bytes_to_4bit():
    values = np.array([1, -2, 7, -8, 3], np.int8)
    packed = qu.pack_bytes_to_4bit(values.tobytes())
    assert isinstance(packed, bytearray)
    assert list(packed) == [0x1 | 0xE << 4, 0x7 | 0x8 << 4, 0x3]
    assert qu.pack_bytes_to_4bit(b"") == bytearray()


def test_constants():
    assert qu.MODEL_SIZE_THRESHOLD == 2**31
    assert TP.FLOAT8E4M3FN in qu.FLOAT8_TYPES and TP.INT8 not in qu.FLOAT8_TYPES
    assert qu.ONNX_TYPE_TO_NP_TYPE[TP.UINT16] == np.uint16
