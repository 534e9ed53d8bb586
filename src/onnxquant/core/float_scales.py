"""Scales for float element types: float8 grids chosen from a standard deviation, and scales
stored as float16.

* **Float8 from a standard deviation** (onnxruntime's rule for ``QFLOAT8E4M3FN`` with the
  Distribution calibration): ``scale = std(data) / std(grid)``, where ``grid`` holds every
  finite value of the float8 type (E4M3FN: 254 values, std ≈ 100.06), so the data's spread
  matches the spread of the float8 values. :func:`std_range` returns the symmetric range whose
  float8 scale (``absmax / max``, :func:`onnxquant.core.numerics.compute_scale_zero_point`)
  is exactly that.
* **float16 scales**: QuantizeLinear/DequantizeLinear (opset 19+) take the scale in the type of
  the float tensor, and DequantizeLinear's output type follows the scale's. A float16 model
  therefore gets float16 scales. :func:`half_params` rounds a float32 scale *up* to the next
  float16 value (so the range still fits the grid) and recomputes the zero point for it.
"""

from __future__ import annotations

import functools

import numpy as np

from onnxquant.core import numerics
from onnxquant.core.errors import NumericsError
from onnxquant.core.qtypes import QuantType

__all__ = ["float_grid_std", "std_range", "tensor_std", "half_params", "half_bias_scale",
           "HALF_TINY"]

HALF_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16 (6.1e-5)
_HALF_MAX = float(np.finfo(np.float16).max)


@functools.cache
def float_grid_std(qtype: QuantType) -> float:
    """Standard deviation of all finite values of the float8 type ``qtype``.

    Raises:
        NumericsError: For integer types.
    """
    if not qtype.is_float:
        raise NumericsError(f"{qtype} is not a float type")
    codes = np.arange(1 << qtype.bits, dtype=np.uint8).view(qtype.numpy_dtype)
    values = codes.astype(np.float64)
    return float(np.std(values[np.isfinite(values)]))


def std_range(std: object, qtype: QuantType) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric range ``±std · max / std(grid)`` whose float8 scale is ``std / std(grid)``.

    Args:
        std: Standard deviation of the data: a scalar, or 1-D (one per channel).
        qtype: The float8 type.

    Returns:
        ``(rmin, rmax)`` as float64 arrays shaped like ``std``.

    Raises:
        NumericsError: For integer types, or a negative or non-finite std.
    """
    sigma = np.asarray(std, dtype=np.float64)
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise NumericsError(f"standard deviation must be finite and >= 0, got {sigma.tolist()}")
    fmax = float(np.asarray(np.finfo(qtype.numpy_dtype).max, dtype=np.float64))
    high = sigma * (fmax / float_grid_std(qtype))
    return -high, high


def tensor_std(data: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Standard deviation (float64) of ``data``, over the whole tensor or per slice along
    ``axis``; 0 for an empty tensor."""
    data = np.asarray(data, dtype=np.float64)
    if axis is None:
        return np.asarray(np.std(data) if data.size else 0.0)
    axis %= data.ndim
    if data.size == 0:
        return np.zeros(data.shape[axis])
    others = tuple(i for i in range(data.ndim) if i != axis)
    return np.std(data, axis=others)


def _round_up_half(scale: np.ndarray) -> np.ndarray:
    """float32 values of the smallest float16 scales >= ``scale`` (1 where that underflows)."""
    if np.any(scale > _HALF_MAX):
        raise NumericsError(f"scale {float(np.max(scale))} exceeds the float16 range; the "
                            "tensor's range is too wide for a float16 model's grid")
    half = scale.astype(np.float16)
    low = half.astype(np.float32) < scale
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    half[half < np.float16(HALF_TINY)] = np.float16(1.0)
    return half.astype(np.float32)


def half_params(
    rmin: object,
    rmax: object,
    qtype: QuantType,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    min_real_range: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`onnxquant.core.numerics.compute_scale_zero_point`, with every scale a
    float16 value (returned as float32, exactly representable in float16).

    The float32 scale is rounded up to the next float16 value, and an asymmetric zero point is
    recomputed for it (``qmin - round(rmin / scale)``), so ``rmin`` still quantizes to
    ``qmin``; a scale below the smallest normal float16 becomes 1.
    """
    scale, zp = numerics.compute_scale_zero_point(
        rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range,
        min_real_range=min_real_range)
    scale16 = _round_up_half(np.atleast_1d(scale).astype(np.float32))
    zp = np.atleast_1d(zp).copy()
    if not qtype.is_float and not symmetric:
        qmin, qmax = numerics.quant_range(qtype, reduce_range=reduce_range)
        lo = np.minimum(np.broadcast_to(np.asarray(rmin, np.float64), scale16.shape), 0.0)
        fresh = np.float32(qmin) - np.rint(lo.astype(np.float32) / scale16)
        zp = np.clip(fresh, qmin, qmax).astype(zp.dtype)
    if np.ndim(scale) == 0:
        return scale16.reshape(()), zp.reshape(())
    return scale16, zp


def half_bias_scale(scale: np.ndarray) -> np.ndarray | None:
    """The float16 bias scale (as float32 values) when every element is a normal float16
    value, else None (the bias then needs a float32 scale and a Cast)."""
    scale = np.asarray(scale, dtype=np.float32)
    half = scale.astype(np.float16)
    if np.any(~np.isfinite(half)) or np.any(half < np.float16(HALF_TINY)):
        return None
    return half.astype(np.float32)
