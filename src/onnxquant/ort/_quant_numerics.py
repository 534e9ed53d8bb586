"""Numeric helpers of ``onnxruntime.quantization.quant_utils``, with its signatures and return
conventions (``[zero_point, scale]`` lists, ``TensorProto`` element types, numpy-typed grid
bounds), computed with :mod:`onnxquant.core.numerics`.

onnxruntime's grid tables are kept as they are, including the reduced signed grids
``int8 [-64, 64]`` and ``int16 [-16384, 16384]`` (one level more than onnxquant's own 7-bit
``[-64, 63]``), because callers of these helpers compare against them.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
from onnx import TensorProto

from onnxquant.core import numerics, qtypes

__all__ = [
    "FLOAT8_TYPES",
    "ONNX_TYPE_TO_NP_TYPE",
    "MODEL_SIZE_THRESHOLD",
    "get_qmin_qmax_for_qType",
    "get_qrange_for_qType",
    "compute_scale_zp",
    "compute_scale_zp_float8",
    "quantize_nparray",
    "quantize_data",
    "pack_bytes_to_4bit",
]

MODEL_SIZE_THRESHOLD = 2147483648  # protobuf's 2 GiB limit

FLOAT8_TYPES = (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
                TensorProto.FLOAT8E5M2FNUZ)

ONNX_TYPE_TO_NP_TYPE: dict[int, np.dtype] = {
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT4: np.dtype(np.int8),  # computed as int8, packed with pack_bytes_to_4bit
    TensorProto.UINT4: np.dtype(np.uint8),
    TensorProto.FLOAT8E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
}

_INT_QTYPES: dict[int, qtypes.QuantType] = {
    TensorProto.INT8: qtypes.INT8, TensorProto.UINT8: qtypes.UINT8,
    TensorProto.INT16: qtypes.INT16, TensorProto.UINT16: qtypes.UINT16,
    TensorProto.INT4: qtypes.INT4, TensorProto.UINT4: qtypes.UINT4,
}
_FLOAT8_VALUES: dict[int, np.ndarray] = {}


def get_qmin_qmax_for_qType(qType: int, reduce_range: bool = False,  # noqa: N802, N803
                            symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(qmin, qmax)`` of an integer ``TensorProto`` type as 0-d arrays of its numpy dtype.

    ``reduce_range`` takes precedence over ``symmetric``; ``symmetric`` narrows int8/int16 to
    ``[-127, 127]``/``[-32767, 32767]`` only.

    Raises:
        ValueError: A float8 or other non-integer type.
    """
    if qType == TensorProto.FLOAT8E4M3FN:
        raise ValueError("This function is not implemented for float 8 as not needed.")
    if qType not in _INT_QTYPES:
        raise ValueError(f"Unexpected data type {qType} requested. Only INT8, UINT8, INT16, "
                         "UINT16, INT4 and UINT4 are supported.")
    qtype = _INT_QTYPES[qType]
    if reduce_range:
        qmin, qmax = numerics.quant_range(qtype, reduce_range=True)
        if qtype in (qtypes.INT8, qtypes.INT16):
            qmax += 1  # onnxruntime's table: int8 [-64, 64], int16 [-16384, 16384]
    else:
        narrow = symmetric and qtype in (qtypes.INT8, qtypes.INT16)
        qmin, qmax = numerics.quant_range(qtype, symmetric=narrow)
    dtype = ONNX_TYPE_TO_NP_TYPE[qType]
    return np.array(qmin, dtype=dtype), np.array(qmax, dtype=dtype)


def get_qrange_for_qType(qType: int, reduce_range: bool = False,  # noqa: N802, N803
                         symmetric: bool = False) -> int:
    """``qmax - qmin`` of :func:`get_qmin_qmax_for_qType`."""
    qmin, qmax = get_qmin_qmax_for_qType(qType, reduce_range, symmetric=symmetric)
    return int(qmax) - int(qmin)


def compute_scale_zp(rmin: Any, rmax: Any, qmin: Any, qmax: Any, symmetric: bool = False,
                     min_real_range: float | None = None) -> list[np.ndarray]:
    """``[zero_point, scale]`` mapping ``[rmin, rmax]`` (widened to contain 0, to at least
    ``min_real_range``, and symmetric when asked) onto ``[qmin, qmax]``.

    The scale is computed in float64 and stored in the dtype of ``rmax`` (float32 for Python
    floats); a scale below that dtype's smallest positive value gives ``scale=1, zero_point=0``.
    The zero point (dtype of ``qmin``) is ``round((qmin + qmax) / 2)`` when symmetric, else
    ``round(qmin - rmin / scale)``, both half to even.

    Raises:
        ValueError: ``qmin > 0`` or ``qmax < 0``.
    """
    qmin, qmax = np.asarray(qmin), np.asarray(qmax)
    if qmin > 0 or qmax < 0:
        raise ValueError(f"qmin and qmax must meet the requirement: qmin <= 0 <= qmax while "
                         f"qmin:{qmin}, qmmax:{qmax}")
    given = np.asarray(rmax).dtype
    rdtype = given if given.kind == "f" else np.dtype(np.float32)
    rmin = np.minimum(np.asarray(rmin, dtype=rdtype), np.zeros((), rdtype))
    rmax = np.maximum(np.asarray(rmax, dtype=rdtype), np.zeros((), rdtype))
    if min_real_range is not None:
        rmax = np.maximum(rmax, rmin + np.asarray(min_real_range, dtype=rdtype))
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    span = np.asarray(rmax - rmin, dtype=np.float64)
    scale = np.asarray(span / (np.float64(qmax) - np.float64(qmin)))
    stored = scale.astype(rdtype)
    tiny = (np.finfo(np.float16).smallest_subnormal if rdtype == np.float16
            else np.finfo(rdtype).tiny)
    if (stored if rdtype == np.float16 else scale) < tiny:
        return [np.array(0, dtype=qmin.dtype), np.array(1.0, dtype=rdtype)]
    zero_point = (np.round((np.float64(qmin) + np.float64(qmax)) / 2.0) if symmetric
                  else np.round(np.float64(qmin) - np.asarray(rmin, np.float64) / scale))
    return [np.array(zero_point, dtype=qmin.dtype), stored]


def _float8_values(element_type: int) -> np.ndarray:
    if element_type not in _FLOAT8_VALUES:
        if element_type != TensorProto.FLOAT8E4M3FN:
            raise ValueError(f"Quantization to element_type={element_type} not implemented.")
        every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        _FLOAT8_VALUES[element_type] = every[np.isfinite(every)]
    return _FLOAT8_VALUES[element_type]


def compute_scale_zp_float8(element_type: int, std: Any) -> list[np.ndarray]:
    """``[zero_point, scale]`` for float8: zero point 0, ``scale = std / std(every finite
    float8 value)`` (in the dtype of ``std``).

    Raises:
        ValueError: A float8 type other than FLOAT8E4M3FN.
    """
    std = np.asarray(std)
    std_f8 = np.std(_float8_values(element_type))
    return [np.array(0, dtype=std.dtype), np.array(std / std_f8, dtype=std.dtype)]


def quantize_nparray(qType: int, arr: Any, scale: Any, zero_point: Any,  # noqa: N803
                     low: Any = None, high: Any = None) -> np.ndarray:
    """``clip(round_half_even(arr / scale) + zero_point)`` as the type's numpy dtype.

    Integer types are clipped to their full grid (and to ``[low, high]`` when given); int4/uint4
    values come back as int8/uint8 (pack them with :func:`pack_bytes_to_4bit`). FLOAT8E4M3FN
    saturates (zero point must be 0).

    Raises:
        ValueError: An unsupported type, or a non-zero float8 zero point.
    """
    if qType not in ONNX_TYPE_TO_NP_TYPE:
        raise ValueError(f"Unexpected data type {qType} requested. Only INT8, UINT8, INT16, "
                         "UINT16, INT4, UINT4 and FLOAT8E4M3FN are supported.")
    arr = np.asarray(arr).astype(np.float32)
    if qType == TensorProto.FLOAT8E4M3FN:
        if np.any(np.asarray(zero_point, dtype=np.float32) != 0):
            raise ValueError("float8 quantization needs zero_point == 0")
        return numerics.quantize(arr, np.float32(scale), np.float32(0), qtypes.FLOAT8E4M3FN)
    qtype = _INT_QTYPES[qType]
    q = numerics.quantize(arr, np.asarray(scale, np.float32),
                          np.asarray(zero_point).astype(np.int64), qtype)
    q = np.asarray(q).astype(np.int64)
    if low is not None or high is not None:
        q = np.clip(q, low if low is not None else q.min(initial=0),
                    high if high is not None else q.max(initial=0))
    return q.astype(ONNX_TYPE_TO_NP_TYPE[qType])


def quantize_data(data: Any, qType: int, symmetric: bool, reduce_range: bool = False,  # noqa: N803
                  min_real_range: float | None = None, rmin_override: Any = None,
                  rmax_override: Any = None) -> tuple[Any, Any, Any, Any, np.ndarray]:
    """Quantize a whole array with parameters from its own range.

    Returns:
        ``(rmin, rmax, zero_point, scale, quantized_data)`` as onnxruntime returns them.

    Raises:
        RuntimeError: float8 with ``reduce_range``, or float8 data that quantized to NaN.
        ValueError: An unsupported type.
    """
    data = np.asarray(data)
    rmin = rmin_override if rmin_override is not None else (data.min() if data.size else 0.0)
    rmax = rmax_override if rmax_override is not None else (data.max() if data.size else 0.0)
    rmin, rmax = np.array(rmin, dtype=data.dtype), np.array(rmax, dtype=data.dtype)
    if qType == TensorProto.FLOAT8E4M3FN:
        if reduce_range:
            raise RuntimeError("Unsupported option reduce_range=True for float 8.")
        zp8, scale8 = compute_scale_zp_float8(qType, np.std(data))
        quantized = quantize_nparray(qType, data, scale8, zp8)
        if np.any((quantized.view(np.uint8).ravel() & 127) == 127):
            raise RuntimeError(f"One of the quantized value is NaN data in [{rmin}, {rmax}], "
                               f"quantized_data in [{quantized.min()}, {quantized.max()}].")
        return rmin, rmax, zp8, scale8, quantized
    if qType not in _INT_QTYPES:
        raise ValueError(f"Unexpected value for qType={qType}.")
    zero_point: Any = 0
    scale: Any = np.array(1.0, dtype=data.dtype)
    if data.size:
        qmin, qmax = get_qmin_qmax_for_qType(qType, reduce_range, symmetric=symmetric)
        zero_point, scale = compute_scale_zp(rmin, rmax, qmin, qmax, symmetric, min_real_range)
    return rmin, rmax, zero_point, scale, quantize_nparray(qType, data, scale, zero_point)


def pack_bytes_to_4bit(src_8bit: bytes | bytearray | np.ndarray) -> bytearray:
    """Pack 4-bit values stored one per byte: element ``2i`` in the low nibble of byte ``i``,
    element ``2i + 1`` in the high nibble; an odd last element fills a low nibble."""
    src = np.frombuffer(bytes(src_8bit), dtype=np.uint8) & 0xF
    if src.size % 2:
        src = np.append(src, np.uint8(0))
    return bytearray((src[0::2] | (src[1::2] << 4)).astype(np.uint8).tobytes())
