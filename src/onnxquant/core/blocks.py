"""Block-wise weight quantization: ``block_size`` consecutive elements along one axis share a
scale and zero point (ONNX QuantizeLinear/DequantizeLinear ``block_size``, opset 21)."""

from __future__ import annotations

import numpy as np

from onnxquant.core.errors import NumericsError
from onnxquant.core.numerics import compute_scale_zero_point
from onnxquant.core.qtypes import QuantType

__all__ = ["block_params", "quantize_blocked", "expand_blocks"]


def _blocks_first(data: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``data`` (rank 2) with ``axis`` first, zero-padded to whole blocks: ``[blocks, size,
    other]``. Padding with zeros keeps every block's range containing 0, as the range of a
    whole tensor always does."""
    moved = np.moveaxis(np.asarray(data, dtype=np.float64), axis, 0)
    blocks = -(-moved.shape[0] // block_size)
    padded = np.zeros((blocks * block_size, moved.shape[1]), dtype=np.float64)
    padded[: moved.shape[0]] = moved
    return padded.reshape(blocks, block_size, moved.shape[1])


def block_params(data: np.ndarray, axis: int, block_size: int, qtype: QuantType, *,
                 symmetric: bool, reduce_range: bool = False,
                 min_real_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of every block of a rank-2 weight.

    Returns:
        ``(scale, zero_point)`` shaped like ``data`` with ``ceil(K / block_size)`` along
        ``axis`` (float32 and ``qtype``'s dtype).

    Raises:
        NumericsError: For a weight that is not rank 2, a block size below 1, or a float type.
    """
    if data.ndim != 2:
        raise NumericsError(f"block-wise quantization needs a rank-2 weight, got rank {data.ndim}")
    if block_size < 1:
        raise NumericsError(f"block_size must be at least 1, got {block_size}")
    if qtype.is_float:
        raise NumericsError(f"block-wise quantization is for integer types, not {qtype}")
    blocks = _blocks_first(data, axis % 2, block_size)
    low, high = blocks.min(axis=1).ravel(), blocks.max(axis=1).ravel()
    scale, zero_point = compute_scale_zero_point(
        low, high, qtype, symmetric=symmetric, reduce_range=reduce_range,
        min_real_range=min_real_range)
    shape = (blocks.shape[0], blocks.shape[2])
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if axis % 2 == 1:
        scale, zero_point = scale.T.copy(), zero_point.T.copy()
    return scale, zero_point


def expand_blocks(params: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    """Block parameters repeated to the weight's shape (``length`` elements along ``axis``)."""
    repeated = np.repeat(params, block_size, axis=axis)
    return np.take(repeated, np.arange(length), axis=axis)


def quantize_blocked(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                     qtype: QuantType, axis: int, block_size: int) -> np.ndarray:
    """``saturate(round_half_even(x / scale) + zero_point)`` with each element's block
    parameters, in float32 as QuantizeLinear computes it."""
    x = np.asarray(data, dtype=np.float32)
    length = x.shape[axis]
    s = expand_blocks(np.asarray(scale, np.float32), axis, block_size, length)
    z = expand_blocks(np.asarray(zero_point).astype(np.float32), axis, block_size, length)
    q = np.rint(x / s) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.numpy_dtype)
