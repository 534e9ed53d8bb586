"""GPTQ (Frantar et al. 2022): quantize a weight row by row, feeding each row's rounding error back
into the rows not yet quantized through the inverse Hessian of the layer's calibration inputs.

Our weight is ``W[K, N]`` (K = input features), so the sweep runs over the K rows (the paper's
columns). The returned codes and ``(scale, zero point)`` grid are exactly the ones the sweep used:
``BlockQuantized.dequantize()`` reproduces, bit for bit, the values whose error was fed back (the
baseline instead re-quantizes GPTQ's fake-quantized output with RTN and loses part of the gain).

Numerics:

* ``H = 2/n Σ xᵀx`` in float64 (:class:`HessianAccumulator`, see ``_hessian``). Dead inputs
  (``H[k, k] == 0``) get ``H[k, k] = 1`` and their weight rows are zeroed: they never matter for
  the calibration outputs and quantize exactly to 0. Damping adds ``percdamp * mean(diag H)`` to
  the diagonal (raised 10x, up to 4 times, if the Cholesky factorisation still fails).
* ``U``, the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), comes from one float64 Cholesky
  of the reversed ``H`` and one blocked float32 triangular inverse: ``U = rev(inv(chol(rev(H))))``
  (about a third of the flops of the usual ``cholesky(inv(H))``), computed in place (``_factor``).
* The sweep is blocked twice: rank-1 error updates only inside 16-row inner blocks, one GEMM from
  each inner block to the rest of its ``column_block``-row outer block, and one lazy GEMM from each
  outer block to all later rows. Everything in the sweep is float32.
* Groups (blocks of ``block_size`` rows) take their grid from the RTN rules (see ``_grid``) on
  the group's current, error-updated rows at the moment the sweep reaches the group (outer blocks
  are aligned to groups, so those rows have received every earlier update). With ``act_order``
  (rows in order of decreasing ``H[k, k]``) every group's grid is computed up front from the
  original weight ("static groups"), so the grid stays block-aligned and no ``g_idx`` is needed.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onnxquant.weight_only import _grid
from onnxquant.weight_only._factor import GptqFactor, inverse_factor
from onnxquant.weight_only._hessian import HessianAccumulator
from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["GptqFactor", "HessianAccumulator", "inverse_factor", "quantize_gptq"]

logger = logging.getLogger(__name__)

_INNER_BLOCK = 16


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray | HessianAccumulator | GptqFactor,
    bits: int,
    block_size: int,
    symmetric: bool,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    column_block: int = 128,
) -> BlockQuantized:
    """Quantize ``w[K, N]`` with GPTQ against the input Hessian ``hessian[K, K]``.

    Args:
        w: float ``[K, N]`` weight (K = input features); K need not be a multiple of block_size.
        hessian: ``[K, K]`` Hessian of the inputs (``HessianAccumulator.hessian()``; not
            modified), or the accumulator itself: the Hessian is then formed here and freed
            as soon as it is factorised (one ``K x K`` float64 array fewer), or the result of
            :func:`inverse_factor` (computed before the weight is read, to keep the two
            apart in memory; its ``percdamp`` and ``act_order`` apply).
        bits: 2, 4 or 8.
        block_size: Rows per quantization group (``K`` for one group per column).
        symmetric: Symmetric grid (implied zero point) instead of an integer zero point.
        percdamp: Diagonal damping as a fraction of the mean diagonal of ``hessian``.
        act_order: Quantize rows in order of decreasing Hessian diagonal (static group grids).
        column_block: Rows per lazy-batch outer block.

    Returns:
        The quantized blocks; dequantizing them gives exactly the values GPTQ chose.

    Raises:
        ValueError: Bad arguments, NaN/Inf in the weight or Hessian, or a Hessian that stays
            singular after damping.
    """
    w = _grid.check_args(w, bits, block_size)
    k, n = w.shape
    if percdamp < 0 or column_block < 1:
        raise ValueError("percdamp must be >= 0 and column_block >= 1")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; clean it or exclude this node")
    if isinstance(hessian, GptqFactor):
        u, dead, perm = hessian
        if hessian.u.shape != (k, k) or (perm is not None) != act_order:
            raise ValueError("the precomputed GPTQ factor does not match this weight or "
                             "act_order")
    else:
        u, dead, perm = inverse_factor(hessian, k, percdamp, act_order)
    del hessian
    work = w.copy()
    work[dead] = 0
    k_blocks = -(-k // block_size)
    scales = np.empty((k_blocks, n), dtype=np.float32)
    zps = np.empty((k_blocks, n), dtype=np.float32)
    if perm is not None:
        lo, hi = _grid.block_minmax(work, block_size)
        scales[:], zps[:] = _grid.block_params(lo, hi, bits, symmetric)
        work = work[perm]
    q = _sweep(work, u, scales, zps, bits, block_size, symmetric, perm, column_block)
    if perm is not None:
        unperm = np.empty_like(q)
        unperm[perm] = q
        q = unperm
    _grid.check_finite(scales)
    return BlockQuantized(
        q=q,
        scales=scales,
        zero_points=None if symmetric else zps.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )


def _sweep(
    work: np.ndarray,
    u: np.ndarray,
    scales: np.ndarray,
    zps: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    perm: np.ndarray | None,
    column_block: int,
) -> np.ndarray:
    """The GPTQ row sweep over ``work`` (modified in place); fills dynamic group grids."""
    k, n = work.shape
    maxq = (1 << bits) - 1
    single_group = block_size >= k
    if single_group:
        outer, inner = column_block, _INNER_BLOCK
    else:  # align outer and inner blocks with group starts
        outer = block_size * max(1, -(-column_block // block_size))
        inner = math.gcd(block_size, _INNER_BLOCK)
    groups = (perm if perm is not None else np.arange(k)) // block_size
    q = np.empty((k, n), dtype=np.uint8)
    qrow = np.empty(n, dtype=np.float32)
    deq = np.empty(n, dtype=np.float32)
    # Left-looking: once row r is quantized, work[r] holds its scaled error (row - deq) / U[r, r],
    # and each outer block first receives the updates of all earlier rows in one GEMM.
    for i1 in range(0, k, outer):
        i2 = min(k, i1 + outer)
        if i1:
            work[i1:i2] -= u[:i1, i1:i2].T @ work[:i1]
        for j1 in range(i1, i2, inner):
            j2 = min(i2, j1 + inner)
            for r in range(j1, j2):
                if perm is None and r % block_size == 0:
                    g = r // block_size
                    grp = work[r : r + block_size]
                    scales[g], zps[g] = _grid.block_params(
                        grp.min(axis=0), grp.max(axis=0), bits, symmetric
                    )
                g = groups[r]
                sc, zp = scales[g], zps[g]
                row = work[r]
                np.divide(row, sc, out=qrow)
                qrow += zp
                np.rint(qrow, out=qrow)
                np.clip(qrow, 0, maxq, out=qrow)
                q[r] = qrow
                np.subtract(qrow, zp, out=deq)
                deq *= sc  # exactly BlockQuantized.dequantize's (q - zp) * scale
                row -= deq
                row /= u[r, r]
                if r + 1 < j2:
                    work[r + 1 : j2] -= np.outer(u[r, r + 1 : j2], row)
            if j2 < i2:
                work[j2:i2] -= u[j1:j2, j2:i2].T @ work[j1:j2]
    return q
