"""GPTQ (Frantar et al. 2022): quantize a weight row by row, feeding each row's rounding error back
into the rows not yet quantized through the inverse Hessian of the layer's calibration inputs.

Our weight is ``W[K, N]`` (K = input features), so the sweep runs over the K rows (the paper's
columns). The returned codes and ``(scale, zero point)`` grid are exactly the ones the sweep used:
``BlockQuantized.dequantize()`` reproduces, bit for bit, the values whose error was fed back (the
baseline instead re-quantizes GPTQ's fake-quantized output with RTN and loses part of the gain).

Numerics:

* ``H = 2/n Σ xᵀx`` accumulated in float64 (:class:`HessianAccumulator`). Dead inputs
  (``H[k, k] == 0``) get ``H[k, k] = 1`` and their weight rows are zeroed: they never matter for
  the calibration outputs and quantize exactly to 0. Damping adds ``percdamp * mean(diag H)`` to
  the diagonal (raised 10x, up to 4 times, if the Cholesky factorisation still fails).
* ``U``, the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), comes from one float64 Cholesky
  of the reversed ``H`` and one blocked float32 triangular inverse: ``U = rev(inv(chol(rev(H))))``
  (about a third of the flops of the usual ``cholesky(inv(H))``).
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
from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["HessianAccumulator", "quantize_gptq"]

logger = logging.getLogger(__name__)

_INNER_BLOCK = 16
_UPDATE_ELEMENTS = 1 << 22  # float64 rows converted at a time: 32 MB


class HessianAccumulator:
    """Streaming ``H = 2/n Σ xᵀx`` over all rows ``x`` of the inputs of one weight, in float64."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._k = k
        self._sum = np.zeros((k, k), dtype=np.float64)
        self._n = 0

    @property
    def k(self) -> int:
        return self._k

    @property
    def samples(self) -> int:
        """Number of rows (input vectors) seen so far."""
        return self._n

    def update(self, x: np.ndarray) -> None:
        """Add the rows of ``x[..., K]`` (any leading dimensions)."""
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self._k:
            raise ValueError(f"expected inputs with last dimension {self._k}, got shape {x.shape}")
        rows = x.reshape(-1, self._k)
        step = max(1, _UPDATE_ELEMENTS // self._k)
        for i in range(0, rows.shape[0], step):
            chunk = rows[i : i + step].astype(np.float64)
            if not np.isfinite(chunk).all():
                raise ValueError("calibration inputs contain NaN or Inf")
            self._sum += chunk.T @ chunk
        self._n += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add the rows another accumulator of the same K has seen."""
        if other.k != self._k:
            raise ValueError(f"cannot merge a Hessian of K={other.k} into one of K={self._k}")
        self._sum += other._sum
        self._n += other._n

    def hessian(self) -> np.ndarray:
        """``2/n Σ xᵀx`` as float64 ``[K, K]`` (a new array)."""
        if self._n == 0:
            raise ValueError("no calibration inputs were accumulated for this weight")
        return self._sum * (2.0 / self._n)


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
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
        hessian: ``[K, K]`` Hessian of the inputs (``HessianAccumulator.hessian()``); not modified.
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
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's K={k}")
    if not np.isfinite(h).all():
        raise ValueError("Hessian contains NaN or Inf")
    if percdamp < 0 or column_block < 1:
        raise ValueError("percdamp must be >= 0 and column_block >= 1")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; clean it or exclude this node")
    work = w.copy()
    diag = np.einsum("ii->i", h)  # a writable view of the diagonal
    dead = diag == 0
    diag[dead] = 1
    work[dead] = 0
    k_blocks = -(-k // block_size)
    scales = np.empty((k_blocks, n), dtype=np.float32)
    zps = np.empty((k_blocks, n), dtype=np.float32)
    perm = None
    if act_order:
        lo, hi = _grid.block_minmax(work, block_size)
        scales[:], zps[:] = _grid.block_params(lo, hi, bits, symmetric)
        perm = np.argsort(-diag, kind="stable")
        work = work[perm]
        h = h[perm][:, perm]
    u = _inverse_upper_cholesky(h, percdamp)
    del h
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


def _inverse_upper_cholesky(h: np.ndarray, percdamp: float) -> np.ndarray:
    """Upper ``U`` with ``(H + damp I)⁻¹ = UᵀU`` as float32 (``h`` is damped in place)."""
    k = h.shape[0]
    diag = np.einsum("ii->i", h)
    damp = percdamp * float(diag.mean())
    diag += damp
    for attempt in range(5):
        try:
            low = np.linalg.cholesky(h[::-1, ::-1])
            break
        except np.linalg.LinAlgError:
            if attempt == 4:
                raise ValueError(
                    "the calibration Hessian is not positive definite even with damping "
                    f"{damp:.3g}; use more calibration data or a larger percdamp"
                ) from None
            extra = max(damp, 1e-8 * max(1.0, float(diag.mean()))) * 9
            diag += extra
            damp += extra
            logger.warning("GPTQ: Hessian not positive definite; raising damping to %.3g", damp)
    # H = R Rᵀ with R = rev(low) upper, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = rev(low⁻¹).
    # The inverse in float32 (2x faster, half the memory): its relative error is about
    # sqrt(cond(H)) * 6e-8, and damping bounds cond(H) by roughly K / percdamp.
    low32 = low.astype(np.float32)
    del low
    inv = _inverse_lower(low32)
    del low32
    u = np.ascontiguousarray(inv[::-1, ::-1])
    assert u.shape == (k, k)
    return u


def _inverse_lower(low: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by recursive 2x2 blocking (matrix products only)."""
    n = low.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(low))
    h = n // 2
    a_inv = _inverse_lower(low[:h, :h])
    c_inv = _inverse_lower(low[h:, h:])
    out = np.zeros_like(low)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    out[h:, :h] = -(c_inv @ (low[h:, :h] @ a_inv))
    return out
