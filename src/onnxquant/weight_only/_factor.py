"""GPTQ's factor ``U`` (upper, ``(H + damp I)⁻¹ = UᵀU``) with one ``K x K`` float64 array alive.

``U = rev(inv(chol(rev(H))))``: one float64 Cholesky of the reversed ``H`` and one float32
triangular inverse (about a third of the flops of the usual ``cholesky(inv(H))``). Memory is
what makes this module: ``np.linalg.cholesky`` copies its input and returns a new array (three
float64 ``K x K`` arrays at once, 384 MB at K = 4096), so here ``H`` is reversed in place and
factorised by a blocked, left-looking Cholesky written over itself (BLAS products on
``K x 256`` panels; LAPACK only on the 256 x 256 diagonal blocks). The factor is converted to
float32, ``H`` is dropped, and the triangular inverse and the final reversal happen in place.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from onnxquant.weight_only._hessian import HessianAccumulator

__all__ = ["GptqFactor", "inverse_factor"]

logger = logging.getLogger(__name__)

_PANEL = 256  # columns per Cholesky panel
_LEAF = 128  # triangular inverse: LAPACK below this size


class GptqFactor(NamedTuple):
    """What GPTQ's sweep needs from the Hessian (see :func:`inverse_factor`)."""

    u: np.ndarray  # float32 [K, K] upper, rows in sweep order
    dead: np.ndarray  # bool [K]: inputs whose Hessian diagonal is 0
    perm: np.ndarray | None  # sweep order (act_order), or None for 0..K-1


def inverse_factor(hessian: np.ndarray | HessianAccumulator, k: int, percdamp: float,
                   act_order: bool) -> GptqFactor:
    """GPTQ's ``U``, dead-input mask and row order for ``hessian``.

    ``hessian`` is copied (an array, never modified) or formed here (an accumulator); either
    way its float64 memory is released before ``U`` is built. Dead inputs (``H[k, k] == 0``)
    get ``H[k, k] = 1``; with ``act_order`` rows are ordered by decreasing diagonal.
    """
    if isinstance(hessian, HessianAccumulator):
        h = hessian.hessian()
    else:
        h = np.array(hessian, dtype=np.float64, order="C", copy=True)
    del hessian
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's K={k}")
    if not np.isfinite(h).all():
        raise ValueError("Hessian contains NaN or Inf")
    diag = np.einsum("ii->i", h)  # a writable view of the diagonal
    dead = diag == 0
    diag[dead] = 1
    perm = np.argsort(-diag, kind="stable") if act_order else None
    del diag
    if perm is None:
        _reverse(h)
    else:  # permuted and reversed in one gather
        h = h[np.ix_(perm[::-1], perm[::-1])]
    _damped_cholesky(h, percdamp)
    u = h.astype(np.float32)  # its lower triangle: low = chol(rev(H))
    del h  # the float64 Hessian is freed here
    # H = R Rᵀ with R = rev(low) upper, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = rev(low⁻¹).
    # The inverse in float32 (2x faster, half the memory): its relative error is about
    # sqrt(cond(H)) * 6e-8, and damping bounds cond(H) by roughly K / percdamp.
    _invert_lower(u)
    _reverse(u)
    return GptqFactor(u, dead, perm)


def _reverse(a: np.ndarray, rows: int = 256) -> None:
    """``a[:] = a[::-1, ::-1]`` for a square C-contiguous ``a``, with row-strip temporaries."""
    k = a.shape[0]
    half = (k + 1) // 2
    for i0 in range(0, half, rows):
        i1 = min(half, i0 + rows)
        top = a[i0:i1, ::-1].copy()
        a[i0:i1] = a[k - i1 : k - i0][::-1, ::-1]
        a[k - i1 : k - i0] = top[::-1]


def _damped_cholesky(a: np.ndarray, percdamp: float) -> None:
    """Damp ``a``'s diagonal and factorise it in place (lower); more damping on failure."""
    diag = np.einsum("ii->i", a)
    damp = percdamp * float(diag.mean())
    diag += damp
    for attempt in range(5):
        if _cholesky_in_place(a):
            return
        if attempt == 4:
            raise ValueError(
                "the calibration Hessian is not positive definite even with damping "
                f"{damp:.3g}; use more calibration data or a larger percdamp")
        extra = max(damp, 1e-8 * max(1.0, float(diag.mean()))) * 9
        diag += extra
        damp += extra
        logger.warning("GPTQ: Hessian not positive definite; raising damping to %.3g", damp)


def _cholesky_in_place(a: np.ndarray) -> bool:
    """Write the lower Cholesky factor of symmetric ``a`` over its lower triangle.

    Only the lower triangle and the diagonal panels change, so when ``a`` is not positive
    definite it is restored (from the untouched upper triangle) and False is returned.
    """
    k = a.shape[0]
    saved = []
    for j in range(0, k, _PANEL):
        e = min(k, j + _PANEL)
        saved.append(a[j:e, j:e].copy())
        if j:
            a[j:, j:e] -= a[j:, :j] @ a[j:e, :j].T
        try:
            low = np.linalg.cholesky(a[j:e, j:e])
        except np.linalg.LinAlgError:
            for i, block in enumerate(saved):
                b0, b1 = i * _PANEL, min(k, (i + 1) * _PANEL)
                a[b0:b1, b0:b1] = block
                a[b1:, b0:b1] = a[b0:b1, b1:].T
            return False
        a[j:e, j:e] = low
        if e < k:
            a[e:, j:e] = a[e:, j:e] @ np.linalg.inv(low).T
    return True


def _invert_lower(a: np.ndarray) -> None:
    """``a = inv(tril(a))`` in place by recursive 2x2 blocking (matrix products only); the
    strict upper triangle of ``a`` is ignored on input and zero on output."""
    n = a.shape[0]
    if n <= _LEAF:
        a[...] = np.tril(np.linalg.inv(np.tril(a)))
        return
    h = n // 2
    _invert_lower(a[:h, :h])
    _invert_lower(a[h:, h:])
    a[:h, h:] = 0
    a[h:, :h] = -(a[h:, h:] @ (a[h:, :h] @ a[:h, :h]))
