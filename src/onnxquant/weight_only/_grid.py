"""Integer grids shared by RTN and GPTQ: per-block (scale, zero point) from a block's range,
round-to-nearest onto a grid, and cache-sized chunking of a ``[K, N]`` weight into whole blocks.

Grids (``maxq = 2**bits - 1``, ``W ≈ (q - zp) * scale``):

* asymmetric: the range is widened to include 0 (``lo = min(x, 0)``, ``hi = max(x, 0)``),
  ``scale = (hi - lo) / maxq``, integer ``zp = clip(rint(-lo / scale), 0, maxq)``. An integer zero
  point always puts 0 on the grid, so a range that excludes 0 would only be clipped; measured on
  Gaussian and Student-t blocks this is also lower error than refitting the scale so that nothing
  clips (the rounded zero point then wastes part of the grid).
* symmetric: ``m`` is the block's value of largest magnitude *with its sign*,
  ``scale = -m / 2**(bits-1)`` (negative when ``m > 0``) and the implied ``zp = 2**(bits-1)``, so
  ``m`` lands exactly on ``q = 0`` and all ``2**bits`` levels are usable; only values near ``-m``
  can clip (by at most one step).

A block whose range is 0 (all zeros) gets ``scale = 1``: every value quantizes to ``q = zp`` and
dequantizes to exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__: list[str] = []

# Elements per chunk: small enough for the chunk and two temporaries to stay in L2.
CHUNK_ELEMENTS = 1 << 16


def check_args(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Validate the common arguments; returns ``w`` as C-contiguous float32 ``[K, N]``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D weight [K, N], got shape {w.shape}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return np.ascontiguousarray(w, dtype=np.float32)


def check_finite(scales: np.ndarray) -> None:
    """Block ranges are NaN/Inf exactly when the block holds one: a cheap whole-weight check."""
    if not np.isfinite(scales).all():
        bad = np.argwhere(~np.isfinite(scales))[0]
        raise ValueError(
            f"weight contains NaN or Inf (block {bad[0]}, column {bad[1]}); "
            "clean the weight or exclude this node from quantization"
        )


def asym_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric (scale, integer-valued float32 zp) from block minima/maxima (any shape).

    The small parameter arrays are computed in float64 (no overflow for huge ranges) and rounded
    once to float32.
    """
    maxq = (1 << bits) - 1
    lo64 = np.minimum(lo, 0, dtype=np.float64)
    hi64 = np.maximum(hi, 0, dtype=np.float64)
    scale = ((hi64 - lo64) / maxq).astype(np.float32)
    scale[scale == 0] = 1  # all-zero block (or a range below float32's resolution)
    with np.errstate(invalid="ignore"):  # NaN/Inf blocks are reported by check_finite
        zp = np.rint(-lo64 / scale)
    np.clip(zp, 0, maxq, out=zp)
    return scale, zp.astype(np.float32)


def sym_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric (scale, zp = 2**(bits-1)) from block minima/maxima; ``scale = -m / 2**(bits-1)``
    with ``m`` the signed value of largest magnitude."""
    half = 1 << (bits - 1)
    m = np.where(hi >= -lo, hi, lo).astype(np.float64)
    scale = (-m / half).astype(np.float32)
    scale[scale == 0] = 1  # all-zero block
    return scale, np.full(scale.shape, half, dtype=np.float32)


def block_params(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zp) of the asymmetric or symmetric grid; zp is float32 holding integers."""
    return sym_params(lo, hi, bits) if symmetric else asym_params(lo, hi, bits)


def quantize_onto(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``clip(rint(x / scale + zp), 0, maxq)`` as float32 (broadcasting scale/zp)."""
    t = np.divide(x, scale, out=out)
    t += zp
    np.rint(t, out=t)
    np.maximum(t, 0, out=t)  # np.clip without its Python-level overhead (NaN stays NaN)
    np.minimum(t, (1 << bits) - 1, out=t)
    return t


def dequantize_rows(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """``(q - zp) * scale`` in float32, bit-identical to :meth:`BlockQuantized.dequantize`."""
    return (q.astype(np.float32) - zp.astype(np.float32)) * scale


def block_minmax(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block minima and maxima ``[k_blocks, N]`` of ``w[K, N]`` (last block may be short)."""
    k, n = w.shape
    full = k // block_size
    k_blocks = -(-k // block_size)
    lo = np.empty((k_blocks, n), dtype=np.float32)
    hi = np.empty((k_blocks, n), dtype=np.float32)
    if full:
        x = w[: full * block_size].reshape(full, block_size, n)
        x.min(axis=1, out=lo[:full])
        x.max(axis=1, out=hi[:full])
    if k_blocks > full:
        w[full * block_size :].min(axis=0, out=lo[full])
        w[full * block_size :].max(axis=0, out=hi[full])
    return lo, hi


def row_chunks(k: int, n: int, block_size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Cache-sized chunks of full rows that never straddle a block boundary.

    Yields ``(r0, r1, b0, nb, rows)``: rows ``r0:r1`` hold ``nb`` blocks from block ``b0`` on, each
    of ``rows`` rows (``nb == 1`` with ``rows = r1 - r0`` when a block is larger than a chunk), so
    ``w[r0:r1].reshape(nb, rows, n)`` lines up with per-block parameters ``p[b0:b0 + nb, None]``.
    """
    target = max(1, CHUNK_ELEMENTS // n)
    full = k // block_size
    if block_size <= target:
        per = target // block_size
        for b0 in range(0, full, per):
            b1 = min(full, b0 + per)
            yield b0 * block_size, b1 * block_size, b0, b1 - b0, block_size
        if k > full * block_size:
            yield full * block_size, k, full, 1, k - full * block_size
        return
    r0 = 0
    while r0 < k:
        b = r0 // block_size
        r1 = min(k, (b + 1) * block_size, r0 + target)
        yield r0, r1, b, 1, r1 - r0
        r0 = r1
