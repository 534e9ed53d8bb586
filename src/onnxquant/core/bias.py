"""Int32 bias quantization (re-exported by :mod:`onnxquant.core.numerics`).

A quantized bias is stored as int32 with scale ``input_scale * weight_scale`` and zero point 0,
so that it can be added directly to the int32 accumulator of a quantized Conv/Gemm/MatMul.
When that product is very small compared with the bias, ``bias / scale`` does not fit in int32;
:func:`weight_scale_for_bias` enlarges the weight scale just enough to prevent that.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxquant.core.errors import NumericsError

__all__ = ["bias_scale", "weight_scale_for_bias", "quantize_bias"]

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_MARGIN = 1.0001  # head room so float32 rounding of the new scale cannot overflow again
_TINY = float(np.finfo(np.float32).tiny)


def _input_scale(input_scale: object) -> np.float32:
    arr = np.asarray(input_scale, dtype=np.float32)
    if arr.size != 1:
        raise NumericsError(
            f"the input scale must be a single value (per-tensor activation quantization), "
            f"got shape {arr.shape}"
        )
    value = np.float32(arr.reshape(()))
    if not np.isfinite(value) or value < 0:
        raise NumericsError(f"the input scale must be finite and >= 0, got {value}")
    return value


def _weight_scale(weight_scale: object) -> np.ndarray:
    arr = np.asarray(weight_scale, dtype=np.float32)
    if arr.ndim > 1:
        raise NumericsError(
            f"the weight scale must be a scalar or 1-D (per-channel), got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise NumericsError("the weight scale must be finite and >= 0")
    return arr


def _bias_values(bias: object, name: str) -> np.ndarray:
    arr = np.asarray(bias, dtype=np.float64)
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NumericsError(
            f"bias {name!r} contains {bad} non-finite value(s) (NaN/Inf); fix the model's "
            f"bias or exclude its node from quantization"
        )
    return arr


def _per_channel_abs(bias: np.ndarray, scale_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Return |bias| reduced to the scale's shape (max over all for a one-element scale)."""
    if int(np.prod(scale_shape)) == 1:
        peak = float(np.max(np.abs(bias))) if bias.size else 0.0
        return np.full(scale_shape, peak, dtype=np.float64)
    if bias.ndim != 1 or bias.shape[0] != scale_shape[0]:
        raise NumericsError(
            f"bias {name!r} has shape {bias.shape} but the weight scale has {scale_shape[0]} "
            f"channels; a per-channel bias must be 1-D with one value per output channel"
        )
    return np.abs(bias)


def _divide(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``values / scale`` in float64, 0 where the scale is 0."""
    scale64 = np.broadcast_to(scale.astype(np.float64), values.shape)
    out = np.zeros(values.shape, dtype=np.float64)
    np.divide(values, scale64, out=out, where=scale64 != 0)
    return out


def bias_scale(input_scale: object, weight_scale: object) -> np.ndarray:
    """Scale of an int32 bias: ``float32(input_scale) * float32(weight_scale)``.

    The product is taken in float32 because that is the value DequantizeLinear will use.

    Args:
        input_scale: Scale of the activation input (one value).
        weight_scale: Scale of the weight, a scalar or 1-D per output channel.

    Returns:
        float32 array with the shape of ``weight_scale`` (0-d or 1-D).

    Raises:
        NumericsError: If a scale is not finite, negative, or has the wrong shape.
    """
    return np.asarray(_input_scale(input_scale) * _weight_scale(weight_scale), dtype=np.float32)


def weight_scale_for_bias(
    bias: np.ndarray, input_scale: object, weight_scale: object
) -> np.ndarray:
    """Return a weight scale large enough for ``bias`` to fit in int32.

    Per channel (or over the whole bias for a one-element weight scale) the smallest allowed
    weight scale is ``|bias| / (input_scale * (2**31 - 1)) * 1.0001`` (and, for a non-zero
    bias, at least what makes the bias scale a normal float32); the result is the elementwise
    maximum of ``weight_scale`` and that bound, in float32. Channels that need no
    change keep their exact value, so ``np.array_equal(result, weight_scale)`` tells whether the
    weight must be re-quantized. Enlarging the scale is only meaningful for weights with zero
    point 0 (symmetric signed); for other weights the zero point must be recomputed.

    Args:
        bias: The float bias (1-D per output channel for a per-channel weight scale).
        input_scale: Scale of the activation input (one value, > 0).
        weight_scale: Current weight scale, a scalar or 1-D per output channel.

    Returns:
        float32 array with the shape of ``weight_scale``, elementwise ``>= weight_scale``.

    Raises:
        NumericsError: If the bias has NaN/Inf, a scale is invalid, or the input scale is 0
            while the bias is not (no weight scale can help then).
    """
    in_scale = _input_scale(input_scale)
    w_scale = _weight_scale(weight_scale)
    abs_bias = _per_channel_abs(_bias_values(bias, "bias"), w_scale.shape, "bias")
    if in_scale == 0:
        if np.any(abs_bias > 0):
            raise NumericsError(
                "the input scale is 0, so a non-zero bias cannot be quantized; give the "
                "activation a non-degenerate range or keep the bias in float"
            )
        return w_scale.copy()
    needed = abs_bias / (float(in_scale) * _INT32_MAX) * _MARGIN
    # A non-zero bias also needs a normal (not subnormal, not 0) float32 bias scale; with that,
    # the float32 roundings of the new scale and of input_scale * weight_scale (2**-24
    # relative each) stay far inside the 1e-4 margin, so the bias cannot overflow int32.
    needed = np.where(abs_bias > 0, np.maximum(needed, _TINY / float(in_scale)), 0.0)
    result = np.maximum(w_scale, needed.astype(np.float32)).astype(np.float32)
    if not np.all(np.isfinite(result)):
        raise NumericsError("the bias is too large for any float32 weight scale; keep it in float")
    if not np.array_equal(result, w_scale):
        logger.debug("weight scale enlarged for int32 bias: %s -> %s", w_scale, result)
    return result


def quantize_bias(
    bias: np.ndarray, input_scale: object, weight_scale: object, *, name: str = "bias"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a bias to int32 with scale ``bias_scale(input_scale, weight_scale)``, zero point 0.

    ``q = round_half_even(bias / scale)`` in float64, per channel when ``weight_scale`` is 1-D.
    Elements whose scale is 0 quantize to 0.

    Args:
        bias: The float bias (1-D with one value per channel for a per-channel weight scale).
        input_scale: Scale of the activation input (one value).
        weight_scale: Scale of the weight, a scalar or 1-D per output channel.
        name: Name of the bias, used in error messages.

    Returns:
        ``(data, scale)``: int32 data with the bias's shape and the float32 bias scale.

    Raises:
        NumericsError: If the bias has NaN/Inf, the shapes disagree, or a value would not fit
            in int32 (call :func:`weight_scale_for_bias` first to avoid that).
    """
    values = _bias_values(bias, name)
    scale = bias_scale(input_scale, weight_scale)
    if scale.size != 1 and (values.ndim != 1 or values.shape[0] != scale.size):
        raise NumericsError(
            f"bias {name!r} has shape {values.shape} but the weight scale has {scale.size} "
            f"channels; a per-channel bias must be 1-D with one value per output channel"
        )
    scale_b = scale.reshape(()) if scale.size == 1 else scale
    ratio = _divide(values, scale_b)
    q = np.rint(ratio)
    if q.size and np.max(np.abs(q)) > _INT32_MAX:
        worst = int(np.argmax(np.abs(ratio)))
        raise NumericsError(
            f"bias {name!r} does not fit in int32: |bias| / (input_scale * weight_scale) reaches "
            f"{abs(ratio.flat[worst]):.4g} at element {worst} (limit {_INT32_MAX}); enlarge the "
            f"weight scale with weight_scale_for_bias() and re-quantize the weight, or keep "
            f"this bias in float"
        )
    return q.astype(np.int32), scale
