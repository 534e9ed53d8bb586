"""The one data structure shared by the weight-only algorithms and the emitters."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["BlockQuantized"]


@dataclasses.dataclass
class BlockQuantized:
    """A 2-D weight ``W[K, N]`` quantized in blocks of ``block_size`` consecutive rows (along K).

    ``W[k, n] ≈ (q[k, n] - zp[k // block_size, n]) * scales[k // block_size, n]``.

    Attributes:
        q: uint8 ``[K, N]``, unpacked values in ``[0, 2**bits - 1]`` (unsigned storage).
        scales: float32 ``[k_blocks, N]`` with ``k_blocks = ceil(K / block_size)``.
        zero_points: None for symmetric quantization (implied zero point ``2**(bits-1)``);
            uint8 ``[k_blocks, N]`` integer zero points in ``[0, 2**bits - 1]``; or float32
            ``[k_blocks, N]`` (HQQ's real-valued zero points; only MatMulNBits can store them).
        bits: 2, 4 or 8.
        block_size: Rows per block (a power of two >= 16, or K for channel-wise).
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def zero_point_array(self) -> np.ndarray:
        """Zero points as ``[k_blocks, N]`` (the implied midpoint when symmetric)."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        return self.zero_points

    def dequantize(self) -> np.ndarray:
        """The float32 ``[K, N]`` weight these blocks represent."""
        k = self.q.shape[0]
        rows = np.arange(k) // self.block_size
        zp = self.zero_point_array().astype(np.float32)[rows]
        return ((self.q.astype(np.float32) - zp) * self.scales[rows]).astype(np.float32)
