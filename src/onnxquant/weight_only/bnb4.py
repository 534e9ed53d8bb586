"""The bitsandbytes 4-bit formats (FP4 and NF4) of onnxruntime's ``MatMulBnb4`` contrib operator.

A weight ``W[K, N]`` is stored transposed: ``W.T`` (``[N, K]``, row-major) is flattened and cut
into blocks of ``block_size`` values. Each block keeps its absolute maximum ``absmax`` (in the
weight's float type); each value ``x`` becomes the 4-bit code of the table entry nearest to
``x / absmax`` (ties go to the lower entry). Two codes share a byte: element ``2i`` in the high
nibble, ``2i + 1`` in the low nibble; an odd last element is paired with the code of 0.

FP4 is a 4-bit float with a sign bit (codes 8..15 are the negatives of 0..7); NF4 ("normal
float") has 16 levels at quantiles of a normal distribution, ascending with the code.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FP4", "NF4", "BNB4_TABLES", "quantize_bnb4", "dequantize_bnb4", "check_block_size"]

FP4 = 0
NF4 = 1

_FP4_MAGNITUDES = np.array([0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25], dtype=np.float32)
_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

BNB4_TABLES: dict[int, np.ndarray] = {
    FP4: np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]),
    NF4: _NF4,
}
"""Code -> value (in units of the block's absmax), per quant type."""


def _midpoints(levels: np.ndarray) -> np.ndarray:
    return ((levels[:-1].astype(np.float64) + levels[1:]) / 2).astype(np.float32)


_FP4_ORDER = np.argsort(_FP4_MAGNITUDES)  # codes 0..7 by ascending magnitude
_FP4_BOUNDS = _midpoints(_FP4_MAGNITUDES[_FP4_ORDER])
_NF4_BOUNDS = _midpoints(_NF4)


def _codes(scaled: np.ndarray, quant_type: int) -> np.ndarray:
    """Nearest-level codes of values in [-1, 1] (a value on a boundary takes the lower level)."""
    if quant_type == NF4:
        return np.searchsorted(_NF4_BOUNDS, scaled, side="left").astype(np.uint8)
    magnitude = _FP4_ORDER[np.searchsorted(_FP4_BOUNDS, np.abs(scaled), side="left")]
    return (magnitude + np.where(scaled < 0, 8, 0)).astype(np.uint8)


def check_block_size(block_size: int) -> None:
    """Raises ValueError unless ``block_size`` is a power of two of at least 16 (the sizes
    onnxruntime's ``MatMulBnb4`` kernels take)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"bnb4 block_size must be a power of two >= 16, got {block_size}")


def quantize_bnb4(weight: np.ndarray, quant_type: int, block_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight ``[K, N]`` to the bnb4 layout of ``MatMulBnb4``.

    Args:
        weight: Float weight, ``[K, N]``.
        quant_type: :data:`FP4` or :data:`NF4`.
        block_size: Values per absmax block (a power of two >= 16).

    Returns:
        ``(packed, absmax)``: ``uint8[(K*N + 1) // 2]`` codes and ``absmax[ceil(K*N /
        block_size)]`` in the weight's dtype.

    Raises:
        ValueError: A weight that is not 2-D or not float, a bad quant type or block size.
    """
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype.kind != "f":
        raise ValueError(f"bnb4 needs a 2-D float weight, got {weight.dtype} {weight.shape}")
    if quant_type not in BNB4_TABLES:
        raise ValueError(f"bnb4 quant_type must be 0 (FP4) or 1 (NF4), got {quant_type}")
    check_block_size(block_size)
    flat = np.ascontiguousarray(weight.T).reshape(-1).astype(np.float32)
    blocks = -(-flat.size // block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[:flat.size] = flat
    absmax = np.abs(padded.reshape(blocks, block_size)).max(axis=1)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0))
    scaled = (padded.reshape(blocks, block_size) * reciprocal[:, None]).reshape(-1)
    codes = _codes(scaled[:flat.size + flat.size % 2], quant_type)  # an odd tail pairs with 0
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8), absmax.astype(weight.dtype)


def dequantize_bnb4(packed: np.ndarray, absmax: np.ndarray, quant_type: int, block_size: int,
                    k: int, n: int) -> np.ndarray:
    """The float weight ``[K, N]`` that ``MatMulBnb4`` computes with (inverse layout of
    :func:`quantize_bnb4`)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)[:k * n]
    values = BNB4_TABLES[quant_type][codes]
    scales = np.repeat(np.asarray(absmax, dtype=np.float32), block_size)[:k * n]
    return (values * scales).reshape(n, k).T.astype(np.asarray(absmax).dtype)
