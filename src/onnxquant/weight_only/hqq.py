"""Half-quadratic quantization (HQQ, Badri & Shaji 2023), calibration-free, in float32 numpy.

Per block of ``block_size`` rows, starting from the block's own min/max grid
(``s = maxq / (max - min)`` as an inverse scale, ``z = -min * s``):

1. **Proximal zero-point iterations** (the HQQ solver for ``min |W - Ŵ|_p``, ``p = 0.7``):
   ``W_q = clip(rint(W s + z))``, ``W_r = (W_q - z) / s``, ``W_e = shrink_p(W - W_r, beta)``,
   ``z <- mean(W_q - (W - W_e) s)``, ``beta <- kappa * beta``. Each block stops on its own as soon
   as its mean ``|W - W_r|`` stops decreasing and keeps its best zero point; stopped blocks are
   dropped from the working set, so most of the work is in the first few iterations.
2. **Least-squares refits** (``ls_refits`` rounds; 0 gives classic zero-only HQQ): with the codes
   ``q`` fixed, the ``(scale, zero)`` minimising ``|W - (q - zero) scale|^2`` is a line fit of ``W``
   on ``q``; then ``q`` is re-rounded. Each round can only lower the block's squared error.
3. Per block, the result is compared with the asymmetric RTN grid (range including 0) and the one
   with the lower squared error is kept, so HQQ is never worse than RTN on any block.

Two cheap rewrites keep this exact but fast: the iterations run in scaled units (``W s`` is
formed once; the residual ``(W - W_r) s`` is ``t - rint(t)`` for ``t = W s + z``), and the
shrinkage is evaluated only for blocks whose largest residual exceeds the shrink threshold
``beta**(-1 / (2 - p))`` (below it ``W_e`` is 0; for ordinary weights of magnitude << 1 this is
almost every block). Work is done in cache-sized chunks of whole blocks.

Differences from the baseline (onnxruntime's torch port of mobiusml/hqq): the initial zero point is
not rounded (measurably lower error), no ``2e4`` clamp on the inverse scale (that is an fp16
guard), per-block instead of whole-tensor early stopping, and steps 2-3.
"""

from __future__ import annotations

import numpy as np

from onnxquant.weight_only import _grid
from onnxquant.weight_only.blocks import BlockQuantized

__all__ = ["quantize_hqq"]

_CHUNK_ELEMENTS = 1 << 16


def quantize_hqq(
    w: np.ndarray,
    bits: int,
    block_size: int,
    *,
    iterations: int = 20,
    integer_zero_point: bool = False,
    ls_refits: int = 3,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> BlockQuantized:
    """Quantize ``w[K, N]`` asymmetrically in blocks of ``block_size`` rows with HQQ.

    Args:
        w: float ``[K, N]`` weight (K = input features); K need not be a multiple of block_size.
        bits: 2, 4 or 8.
        block_size: Rows per block (``K`` for one block per column).
        iterations: Most proximal zero-point iterations per block (each block stops early).
        integer_zero_point: Round the optimised zero points to integers in ``[0, 2**bits - 1]``
            and refit the scales for them (needed for DequantizeLinear / QDQ output); otherwise
            zero points are float32 (MatMulNBits only).
        ls_refits: Least-squares ``(scale, zero)`` refit rounds after the proximal iterations
            (with ``integer_zero_point`` only the scale is refitted, at least once).
        lp_norm: ``p`` of the ``l_p`` error the proximal step minimises, ``0 < p <= 1``.
        beta: Initial half-quadratic penalty.
        kappa: Growth factor of ``beta`` per iteration.

    Returns:
        The quantized blocks; ``zero_points`` is float32, or uint8 with ``integer_zero_point``.

    Raises:
        ValueError: Bad arguments, or the weight contains NaN/Inf.
    """
    w = _grid.check_args(w, bits, block_size)
    if not 0 < lp_norm <= 1:
        raise ValueError(f"lp_norm must be in (0, 1], got {lp_norm}")
    if iterations < 0 or ls_refits < 0:
        raise ValueError("iterations and ls_refits must be >= 0")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    q = np.empty((k, n), dtype=np.uint8)
    scales = np.empty((k_blocks, n), dtype=np.float32)
    zps = np.empty((k_blocks, n), dtype=np.float32)
    params = _Params(bits, iterations, integer_zero_point, ls_refits, lp_norm, beta, kappa)
    for r0, r1, c0, c1, rows in _block_column_chunks(k, n, block_size):
        nb, nc = (r1 - r0) // rows, c1 - c0
        # Working layout [rows, blocks]: one column per block, reductions along axis 0.
        x = np.ascontiguousarray(w[r0:r1, c0:c1].reshape(nb, rows, nc).transpose(1, 0, 2))
        x = x.reshape(rows, nb * nc)
        qc, sc, zc = _quantize_chunk(x, params)
        q[r0:r1, c0:c1] = qc.reshape(rows, nb, nc).transpose(1, 0, 2).reshape(r1 - r0, nc)
        b0 = r0 // block_size
        scales[b0 : b0 + nb, c0:c1] = sc.reshape(nb, nc)
        zps[b0 : b0 + nb, c0:c1] = zc.reshape(nb, nc)
    return BlockQuantized(
        q=q,
        scales=scales,
        zero_points=zps.astype(np.uint8) if integer_zero_point else zps,
        bits=bits,
        block_size=block_size,
    )


class _Params:
    def __init__(self, bits, iterations, integer_zp, ls_refits, lp_norm, beta, kappa):
        self.bits = bits
        self.maxq = np.float32((1 << bits) - 1)
        self.iterations = iterations
        self.integer_zp = integer_zp
        self.ls_refits = max(ls_refits, 1) if integer_zp else ls_refits
        self.p = lp_norm
        self.beta = beta
        self.kappa = kappa


def _block_column_chunks(k: int, n: int, block_size: int):
    """``(r0, r1, c0, c1, rows)``: whole blocks of ``rows`` rows, about _CHUNK_ELEMENTS each."""
    full = k // block_size
    groups = [(0, full, block_size)] if full else []
    if k > full * block_size:
        groups.append((full, full + 1, k - full * block_size))
    for b_start, b_end, rows in groups:
        cols = min(n, max(16, _CHUNK_ELEMENTS // rows))
        per = max(1, _CHUNK_ELEMENTS // (rows * cols))
        for b0 in range(b_start, b_end, per):
            b1 = min(b_end, b0 + per)
            r0 = b0 * block_size
            r1 = min(k, b1 * block_size)
            for c0 in range(0, n, cols):
                yield r0, r1, c0, min(n, c0 + cols), rows


def _quantize_chunk(x: np.ndarray, p: _Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ on ``x[rows, M]`` (M independent blocks): returns float32 codes, scales, zero points."""
    rows, m = x.shape
    lo = x.min(axis=0)
    hi = x.max(axis=0)
    _grid.check_finite(np.stack([lo, hi]))
    span = hi - lo
    flat = span <= 0
    s = (p.maxq / np.where(flat, 1, span)).astype(np.float32)
    s[flat] = 1  # constant block: q = 0 with zero = -lo reproduces it exactly
    s[~np.isfinite(s)] = 1
    z = _proximal_zero(x, s, -lo * s, p)
    scale = (1 / s).astype(np.float32)
    tmp = np.empty_like(x)
    q = np.empty_like(x)
    if p.integer_zp:
        z = np.clip(np.rint(z), 0, p.maxq).astype(np.float32)
    for r in range(p.ls_refits + 1):
        _grid.quantize_onto(x, scale, z, p.bits, out=q)
        if r == p.ls_refits:
            break
        scale, z = _ls_refit(x, q, scale, z, p.integer_zp, tmp)
    # Never worse than RTN's grid on any block (by squared error).
    r_scale, r_zp = _grid.asym_params(lo, hi, p.bits)
    q_rtn = _grid.quantize_onto(x, r_scale, r_zp, p.bits, out=tmp)
    unit = (1 / r_scale).astype(np.float32)  # errors in RTN steps: no float32 underflow
    use_rtn = _sse(x, q_rtn, r_scale, r_zp, unit) < _sse(x, q, scale, z, unit)
    if use_rtn.any():
        q[:, use_rtn] = q_rtn[:, use_rtn]
        scale = np.where(use_rtn, r_scale, scale)
        z = np.where(use_rtn, r_zp, z)
    return q, scale, z


def _sse(
    x: np.ndarray, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, unit: np.ndarray
) -> np.ndarray:
    e = (q - zp) * scale  # the same float32 expression BlockQuantized.dequantize evaluates
    e -= x
    e *= unit
    np.square(e, out=e)
    return e.sum(axis=0)


def _proximal_zero(x: np.ndarray, s: np.ndarray, z: np.ndarray, p: _Params) -> np.ndarray:
    """Per-block early-stopped HQQ zero-point iterations; returns each block's best zero point."""
    rows, m = x.shape
    best_z = z.astype(np.float32)
    if p.iterations == 0:
        return best_z
    best_e = np.full(m, np.inf, dtype=np.float32)
    idx = np.arange(m)
    ws = x * s  # scaled weights, formed once
    lo_s, hi_s = ws.min(axis=0), ws.max(axis=0)
    za, sa = best_z.copy(), s
    buf_t = np.empty(rows * m, dtype=np.float32)
    buf_q = np.empty(rows * m, dtype=np.float32)
    beta = p.beta
    for _ in range(p.iterations):
        cnt = idx.size
        t = buf_t[: rows * cnt].reshape(rows, cnt)
        qq = buf_q[: rows * cnt].reshape(rows, cnt)
        lo_t, hi_t = lo_s + za, hi_s + za  # exactly t's extremes (rounding is monotonic)
        np.add(ws, za, out=t)
        np.rint(t, out=qq)
        if lo_t.min() < -0.5 or hi_t.max() >= p.maxq + 0.5:  # else nothing needs clipping
            np.maximum(qq, 0, out=qq)  # np.clip, without its Python-level overhead
            np.minimum(qq, p.maxq, out=qq)
        np.subtract(t, qq, out=t)  # residual in quantization steps: (W - W_r) * s
        step = t.sum(axis=0)
        np.abs(t, out=qq)
        err = qq.sum(axis=0) / sa  # block's sum |W - W_r|
        # shrink_p(r) = sign(r) relu(|r| - |r|^(p-1) / beta) is 0 for |r| below the threshold;
        # |t - rint(t)| <= 1/2 unless clipped, and clipping is bounded by the block's extremes.
        bound = np.maximum(np.maximum(0.5, -lo_t), hi_t - p.maxq)
        active = bound > 0.999 * beta ** (-1 / (2 - p.p)) * sa
        if active.any():
            r = t[:, active] / sa[active]
            a = np.abs(r)
            we = np.sign(r) * np.maximum(a - (a + 1e-8) ** (p.p - 1) / beta, 0)
            step[active] -= (we * sa[active]).sum(axis=0)
        znew = za - step / rows
        improved = err < best_e[idx]
        best_e[idx[improved]] = err[improved]
        best_z[idx[improved]] = za[improved]
        beta *= p.kappa
        if not improved.all():
            idx = idx[improved]
            if idx.size == 0:
                break
            ws = ws[:, improved]
            sa, lo_s, hi_s = sa[improved], lo_s[improved], hi_s[improved]
            znew = znew[improved]
        za = znew.astype(np.float32)
    return best_z


def _ls_refit(
    x: np.ndarray,
    q: np.ndarray,
    scale: np.ndarray,
    z: np.ndarray,
    integer_zp: bool,
    tmp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (scale, zero) for fixed codes ``q``; degenerate fits keep the old values."""
    rows = x.shape[0]
    if integer_zp:  # scale only: argmin_a |x - (q - zp) a|^2
        np.subtract(q, z, out=tmp)
        num = np.multiply(tmp, x).sum(axis=0)
        den = np.square(tmp, out=tmp).sum(axis=0)
        ok = den > 0
        a = np.divide(num, den, out=scale.copy(), where=ok)
        ok &= a > 0
        return np.where(ok, a, scale).astype(np.float32), z
    qm = q.sum(axis=0) / rows
    xm = x.sum(axis=0) / rows
    np.subtract(q, qm, out=tmp)
    num = np.multiply(tmp, x).sum(axis=0)
    den = np.square(tmp, out=tmp).sum(axis=0)
    ok = den > 0
    a = np.divide(num, den, out=scale.copy(), where=ok)
    ok &= a > 0
    a = np.where(ok, a, 1)
    new_z = qm - xm / a
    ok &= np.isfinite(new_z)
    return np.where(ok, a, scale).astype(np.float32), np.where(ok, new_z, z).astype(np.float32)
