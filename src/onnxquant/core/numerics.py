"""Quantization arithmetic: integer grids, ranges, scales/zero points, Quantize/DequantizeLinear.

Pure numpy + ml_dtypes; nothing here knows about graphs. :func:`quantize` and :func:`dequantize`
reproduce ONNX QuantizeLinear/DequantizeLinear bit for bit (float32 arithmetic, division by the
scale, round half to even, saturation to the full grid of the type).

Where we differ from onnxruntime.quantization on purpose:

* ``reduce_range`` drops exactly one bit (int8 ``[-64, 63]``, not the 129-level ``[-64, 64]``).
* Symmetric signed grids are ``[-qmax, qmax]`` and the scale is ``absmax / qmax``.
* After the float32 rounding of a scale, rmin and rmax are guaranteed to quantize inside the
  grid without saturating (the scale is nudged up by a few ulps where needed).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from onnxquant.core.bias import bias_scale, quantize_bias, weight_scale_for_bias
from onnxquant.core.errors import NumericsError
from onnxquant.core.qtypes import QuantType

__all__ = [
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
]

_TINY = np.finfo(np.float32).tiny
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_NUDGES = 16


def quant_range(
    qtype: QuantType, *, symmetric: bool = False, reduce_range: bool = False
) -> tuple[int, int]:
    """Return the ``(qmin, qmax)`` integer grid used to choose scales and zero points.

    ``reduce_range`` removes one bit (int8 ``[-64, 63]``, uint8 ``[0, 127]``). ``symmetric``
    makes a signed grid ``[-qmax, qmax]`` (int8 ``[-127, 127]``); an unsigned grid stays whole
    and gets its zero point at the midpoint ``(qmin + qmax + 1) // 2``.

    Raises:
        NumericsError: For float types, which have no integer grid.
    """
    if qtype.is_float:
        raise NumericsError(f"{qtype} is a float type and has no integer grid")
    bits = qtype.bits - 1 if reduce_range else qtype.bits
    if not qtype.signed:
        return 0, (1 << bits) - 1
    qmax = (1 << (bits - 1)) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise NumericsError(f"axis {axis} is out of range for {name!r} of rank {ndim}")
    return axis % ndim


def tensor_range(
    data: np.ndarray, axis: int | None = None, *, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(min, max)`` of ``data``, over the whole tensor or per slice along ``axis``.

    Args:
        data: The tensor (float, integer or ml_dtypes float).
        axis: None for one range (0-d results), else one range per index of this axis (1-D
            results of length ``data.shape[axis]``); negative values count from the end.
        name: Name of the tensor, used in error messages.

    Returns:
        ``(rmin, rmax)``, float64 for float64/integer data, else float32. An empty tensor
        (or empty slice) gives 0.

    Raises:
        NumericsError: If ``data`` has NaN/Inf (the message counts them) or ``axis`` is invalid.
    """
    data = np.asarray(data)
    if data.dtype.kind not in "fiub":
        data = data.astype(np.float32)  # ml_dtypes floats (bfloat16, float8)
    out_dtype = np.float64 if data.dtype == np.float64 or data.dtype.kind in "iub" else np.float32
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise NumericsError(
            f"tensor {name!r} contains {bad} non-finite value(s) (NaN/Inf) out of {data.size}; "
            f"fix the model or input data, or exclude this tensor from quantization"
        )
    if axis is None:
        if data.size == 0:
            return np.zeros((), out_dtype), np.zeros((), out_dtype)
        return np.asarray(data.min(), out_dtype), np.asarray(data.max(), out_dtype)
    axis = _normalize_axis(axis, data.ndim, name)
    if data.size == 0:
        return np.zeros(data.shape[axis], out_dtype), np.zeros(data.shape[axis], out_dtype)
    others = tuple(i for i in range(data.ndim) if i != axis)
    return data.min(axis=others).astype(out_dtype), data.max(axis=others).astype(out_dtype)


def _unsaturated(r: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """``round(r / scale) + zp`` exactly as QuantizeLinear computes it, before saturation."""
    return np.rint(r.astype(np.float32) / scale) + zp


def _int_params(
    lo: np.ndarray, hi: np.ndarray, qtype: QuantType, symmetric: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = quant_range(qtype, symmetric=symmetric, reduce_range=reduce_range)
    mid = (qmin + qmax + 1) // 2
    if symmetric:
        absmax = np.maximum(-lo, hi)
        lo, hi = -absmax, absmax
        zp0 = 0 if qtype.signed else mid
        scale = (absmax / (qmax - zp0)).astype(np.float32)
    else:
        zp0 = 0
        scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
    degenerate = scale < _TINY
    scale[degenerate] = 1.0

    def zero_points(s: np.ndarray) -> np.ndarray:
        if symmetric:
            return np.full(s.shape, zp0, dtype=np.float32)
        # qmin - round(rmin / scale), in the float32 arithmetic QuantizeLinear uses, so that
        # rmin quantizes to exactly qmin (qmin is even, so this equals round(qmin - rmin/scale)).
        zp = np.float32(qmin) - np.rint(lo.astype(np.float32) / s)
        return np.clip(zp, qmin, qmax)

    zp = zero_points(scale)
    for _ in range(_MAX_NUDGES):
        outside = (_unsaturated(lo, scale, zp) < qmin) | (_unsaturated(hi, scale, zp) > qmax)
        outside &= ~degenerate
        if not np.any(outside):
            break
        scale = np.where(outside, np.nextafter(scale, np.float32(np.inf)), scale)
        zp = zero_points(scale)
    else:  # pragma: no cover - a float32 scale needs at most a couple of ulps
        raise NumericsError(f"could not find a {qtype} scale that keeps the range inside the grid")
    zp[degenerate] = zp0
    return scale, zp.astype(qtype.numpy_dtype)


def _float_params(
    lo: np.ndarray, hi: np.ndarray, qtype: QuantType, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray]:
    if reduce_range:
        raise NumericsError(f"reduce_range is not defined for {qtype}; quantize without it")
    fmax = float(ml_dtypes.finfo(qtype.numpy_dtype).max)
    scale = (np.maximum(-lo, hi) / fmax).astype(np.float32)
    scale[scale < _TINY] = 1.0
    return scale, np.zeros(scale.shape, dtype=qtype.numpy_dtype)


def compute_scale_zero_point(
    rmin: object,
    rmax: object,
    qtype: QuantType,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    min_real_range: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose scale and zero point so that ``[rmin, rmax]`` maps onto the grid of ``qtype``.

    The range is first widened to contain 0 (so 0 quantizes exactly to the zero point) and, with
    ``min_real_range``, to at least that width. Asymmetric: ``scale = (rmax - rmin) / (qmax -
    qmin)``, ``zp = round(qmin - rmin / scale)``. Symmetric signed: ``scale = absmax / qmax``,
    ``zp = 0``; symmetric unsigned: ``zp`` = grid midpoint, ``scale = absmax / (qmax - zp)``.
    A scale that would be 0 or subnormal in float32 becomes 1 (zero point 0, or the midpoint for
    symmetric unsigned). Float8 types are always symmetric: ``zp = 0``, ``scale = absmax / max``.

    Args:
        rmin: Range minimum, a scalar or 1-D array (one per channel).
        rmax: Range maximum, broadcast with ``rmin``.
        qtype: The quantized type.
        symmetric: Use a symmetric grid (see :func:`quant_range`).
        reduce_range: Use one bit less (integer types only).
        min_real_range: If given, the smallest allowed ``rmax - rmin``.

    Returns:
        ``(scale, zero_point)``: float32 scale and a zero point of ``qtype.numpy_dtype``; 0-d
        arrays for scalar input, 1-D otherwise.

    Raises:
        NumericsError: If a bound is NaN/Inf or beyond float32, ``rmin > rmax``, or the
            arguments have unusable shapes.
    """
    lo = np.asarray(rmin, dtype=np.float64)
    hi = np.asarray(rmax, dtype=np.float64)
    if lo.ndim > 1 or hi.ndim > 1:
        raise NumericsError(f"rmin/rmax must be scalars or 1-D, got shapes {lo.shape}, {hi.shape}")
    try:
        lo, hi = np.broadcast_arrays(lo, hi)
    except ValueError as err:
        raise NumericsError(f"rmin/rmax shapes {lo.shape} and {hi.shape} differ") from err
    scalar = lo.ndim == 0
    lo, hi = np.atleast_1d(lo).copy(), np.atleast_1d(hi).copy()
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise NumericsError(
            f"range has NaN/Inf bounds (rmin={lo.tolist()}, rmax={hi.tolist()}); check the "
            f"calibration data or weights for non-finite values"
        )
    if np.any(lo > hi):
        raise NumericsError(f"rmin > rmax in range (rmin={lo.tolist()}, rmax={hi.tolist()})")
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if min_real_range:
        if not np.isfinite(min_real_range) or min_real_range < 0:
            raise NumericsError(f"min_real_range must be finite and >= 0, got {min_real_range}")
        hi = np.maximum(hi, lo + min_real_range)
    if np.any(lo < -_F32_MAX) or np.any(hi > _F32_MAX):
        raise NumericsError("range bounds exceed the float32 range and cannot be quantized")
    if qtype.is_float:
        scale, zp = _float_params(lo, hi, qtype, reduce_range)
    else:
        scale, zp = _int_params(lo, hi, qtype, symmetric, reduce_range)
    if scalar:
        return scale.reshape(()), zp.reshape(())
    return scale, zp


def _param(
    value: object, what: str, dtype: type | np.dtype, ndim: int, axis: int | None, length: int
) -> np.ndarray:
    """Convert a scale/zero point to ``dtype`` shaped to broadcast against a rank-``ndim`` x."""
    arr = np.asarray(value)
    arr = arr.astype(dtype) if arr.dtype != dtype else arr
    if arr.size == 1 and (axis is None or arr.ndim == 0):
        return arr.reshape(())
    if axis is None:
        raise NumericsError(f"{what} has {arr.size} values; pass axis= for per-axis quantization")
    if arr.ndim != 1 or arr.shape[0] != length:
        raise NumericsError(f"{what} has shape {arr.shape}, expected ({length},) along axis {axis}")
    shape = [1] * ndim
    shape[axis] = length
    return arr.reshape(shape)


def _shape_args(x: np.ndarray, axis: int | None) -> tuple[int | None, int]:
    if axis is None:
        return None, 1
    axis = _normalize_axis(axis, x.ndim, "input")
    return axis, x.shape[axis]


def quantize(
    x: np.ndarray, scale: object, zero_point: object, qtype: QuantType, *, axis: int | None = None
) -> np.ndarray:
    """Quantize like ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    Computed in float32 and saturated to the full grid of ``qtype`` (``[-128, 127]`` for int8,
    whatever range the parameters were chosen for). Float8: ``x / scale`` clipped to the largest
    finite value, then rounded to nearest even; NaN stays NaN.

    Args:
        x: Float input.
        scale: Positive float32 scale; 0-d, or 1-D along ``axis``.
        zero_point: Zero point (integer within the grid; 0 for float8), shaped like ``scale``.
        qtype: The quantized type.
        axis: Axis of per-axis parameters (negative allowed); None for per-tensor.

    Returns:
        Array of ``qtype.numpy_dtype`` (ml_dtypes int4/uint4/float8 where applicable).

    Raises:
        NumericsError: For non-positive/non-finite scales, out-of-grid zero points, bad shapes,
            or NaN input to an integer type.
    """
    x32 = np.asarray(x, dtype=np.float32)
    axis, length = _shape_args(x32, axis)
    s = _param(scale, "scale", np.float32, x32.ndim, axis, length)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise NumericsError("scale must be finite and > 0 to quantize")
    z = _param(zero_point, "zero point", np.float32, x32.ndim, axis, length)
    y = np.empty(x32.shape, np.float32)
    with np.errstate(over="ignore"):
        np.divide(x32, s, out=y)
    if qtype.is_float:
        if np.any(z != 0):
            raise NumericsError(f"{qtype} quantization needs zero point 0")
        fmax = np.float32(ml_dtypes.finfo(qtype.numpy_dtype).max)
        return np.clip(y, -fmax, fmax).astype(qtype.numpy_dtype)
    qmin, qmax = qtype.qmin, qtype.qmax
    if np.any(z != np.rint(z)) or np.any(z < qmin) or np.any(z > qmax):
        raise NumericsError(f"zero point must be an integer in [{qmin}, {qmax}] for {qtype}")
    np.rint(y, out=y)
    y += z  # in place: one float32 temporary for large weights
    if np.any(np.isnan(y)):
        raise NumericsError(f"input has NaN values, which cannot be quantized to {qtype}")
    np.clip(y, qmin, qmax, out=y)
    return y.astype(np.int32).astype(qtype.numpy_dtype)


def dequantize(
    q: np.ndarray, scale: object, zero_point: object, *, axis: int | None = None
) -> np.ndarray:
    """Dequantize like ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32.

    Integer differences are exact (also for int32 biases) and then rounded to float32.

    Args:
        q: Quantized data (integer, ml_dtypes int4/uint4 or float8).
        scale: float32 scale; 0-d, or 1-D along ``axis``.
        zero_point: Zero point shaped like ``scale``.
        axis: Axis of per-axis parameters (negative allowed); None for per-tensor.

    Returns:
        float32 array shaped like ``q``.

    Raises:
        NumericsError: For non-finite scales or bad shapes.
    """
    q = np.asarray(q)
    axis, length = _shape_args(q, axis)
    s = _param(scale, "scale", np.float32, q.ndim, axis, length)
    if not np.all(np.isfinite(s)):
        raise NumericsError("scale must be finite to dequantize")
    is_int = q.dtype.kind in "iub" or q.dtype in (ml_dtypes.int4, ml_dtypes.uint4)
    work = np.int64 if is_int else np.float32
    z = _param(zero_point, "zero point", work, q.ndim, axis, length)
    return ((q.astype(work) - z).astype(np.float32) * s).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor with its parameters.

    Attributes:
        data: Quantized values, ``qtype.numpy_dtype``.
        scale: float32 scale, 0-d (per-tensor) or 1-D (per-axis).
        zero_point: Zero point of ``qtype.numpy_dtype``, shaped like ``scale``.
        qtype: The quantized type.
        axis: Non-negative axis of per-axis parameters, None for per-tensor.
    """

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QuantType
    axis: int | None

    def dequantize(self) -> np.ndarray:
        """Return the float32 values this tensor stands for."""
        return dequantize(self.data, self.scale, self.zero_point, axis=self.axis)


def quantize_weight(
    w: np.ndarray,
    qtype: QuantType,
    *,
    axis: int | None = None,
    symmetric: bool = True,
    reduce_range: bool = False,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize a weight per tensor or per axis: range, then parameters, then QuantizeLinear.

    Args:
        w: Float weight.
        qtype: The quantized type.
        axis: None for per-tensor, else the channel axis (negative allowed).
        symmetric: Use a symmetric grid (default, so signed weights get zero point 0).
        reduce_range: Use one bit less.
        name: Name of the weight, used in error messages.

    Returns:
        The :class:`QuantizedTensor` (axis normalized to be non-negative).

    Raises:
        NumericsError: If the weight has NaN/Inf or cannot be quantized; names the weight.
    """
    w = np.asarray(w)
    if axis is not None:
        axis = _normalize_axis(axis, w.ndim, name)
    rmin, rmax = tensor_range(w, axis, name=name)
    try:
        scale, zp = compute_scale_zero_point(
            rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range
        )
    except NumericsError as err:
        raise NumericsError(f"cannot quantize weight {name!r} to {qtype}: {err}") from err
    return QuantizedTensor(quantize(w, scale, zp, qtype, axis=axis), scale, zp, qtype, axis)


def restricted_scale_zero_point(
    rmin: float, rmax: float, qtype: QuantType, *, min_real_range: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric parameters whose zero point is restricted to the grid's minimum (a range
    with no negative value) or its middle (128 for uint8), for accelerators that support only
    those two zero points (onnxruntime's ``ActivationRestrictedAsymmetric``).

    The range is widened to contain 0 (and to ``min_real_range``); the scale is the smallest
    that holds both sides around the chosen zero point; a zero scale becomes 1.

    Returns:
        ``(scale, zero_point)`` as 0-d float32 and ``qtype`` arrays.
    """
    if qtype.is_float:
        raise NumericsError(f"restricted zero points are for integer types, not {qtype}")
    scale, zero_point = restricted_grid(rmin, rmax, qtype.qmin, qtype.qmax, min_real_range)
    return (np.asarray(scale, dtype=np.float32),
            np.asarray(zero_point).astype(qtype.numpy_dtype))


def restricted_grid(rmin: float, rmax: float, qmin: int, qmax: int,
                    min_real_range: float | None = None) -> tuple[float, int]:
    """``(scale, zero_point)`` of :func:`restricted_scale_zero_point` on the integer grid
    ``[qmin, qmax]``."""
    lo, hi = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if lo >= 0.0:
        zero_point, scale = qmin, hi / (qmax - qmin)
    else:
        zero_point = (qmin + qmax + 1) // 2
        scale = max(-lo / (zero_point - qmin), hi / max(qmax - zero_point, 1))
    if min_real_range is not None:
        scale = max(scale, float(min_real_range) / (qmax - qmin))
    if np.float32(scale) < np.finfo(np.float32).tiny:
        scale = 1.0
    return scale, zero_point

