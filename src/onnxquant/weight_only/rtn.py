"""Round-to-nearest (RTN) block-wise quantization: each block's grid comes from its own range.

Vectorised over whole blocks and processed in cache-sized chunks (see :mod:`._grid`), so a
``4096 x 4096`` float32 weight takes a few tens of milliseconds and needs no temporary larger than
one chunk besides the outputs.
"""

from __future__ import annotations

import numpy as np

from onnxquant.weight_only import _grid
from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["quantize_rtn"]


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """Quantize ``w[K, N]`` in blocks of ``block_size`` rows by rounding to the nearest level.

    Asymmetric: range ``[min(x, 0), max(x, 0)]`` over ``2**bits - 1`` steps with an integer zero
    point. Symmetric: ``scale = -m / 2**(bits-1)`` for the block's signed largest-magnitude value
    ``m`` (which maps exactly to ``q = 0``), implied zero point ``2**(bits-1)``; scales may be
    negative. All-zero blocks get scale 1 and dequantize to exactly 0. Values are rounded half to
    even.

    Args:
        w: float ``[K, N]`` weight (K = input features); K need not be a multiple of block_size.
        bits: 2, 4 or 8.
        block_size: Rows per block (``K`` or more for one block per column).
        symmetric: Symmetric grid without stored zero points.

    Returns:
        The quantized blocks; ``zero_points`` is None (symmetric) or uint8.

    Raises:
        ValueError: Bad arguments, or the weight contains NaN/Inf.
    """
    w = _grid.check_args(w, bits, block_size)
    k, n = w.shape
    lo, hi = _grid.block_minmax(w, block_size)
    scales, zps = _grid.block_params(lo, hi, bits, symmetric)
    del lo, hi
    _grid.check_finite(scales)
    q = np.empty((k, n), dtype=np.uint8)
    for r0, r1, b0, nb, rows in _grid.row_chunks(k, n, block_size):
        t = _grid.quantize_onto(
            w[r0:r1].reshape(nb, rows, n), scales[b0 : b0 + nb, None], zps[b0 : b0 + nb, None], bits
        )
        q[r0:r1] = t.reshape(r1 - r0, n)
    return BlockQuantized(
        q=q,
        scales=scales,
        zero_points=None if symmetric else zps.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )
