"""Weights whose block grids would be meaningless stay float.

A weight with values like ``1e30`` or ``3.4e38`` among ordinary ones: the block holding such a
value loses every other value, and a block holding both ``-3.4e38`` and ``3.4e38`` gets a
scale whose grid dequantizes to Inf in float32 (``inf * 0`` is NaN in the MatMul).

Before a target is emitted its weight is screened in one cheap pass, slab by slab (memory stays
at one slab): a value more than :data:`~onnxquant.core.weight_grid.EXTREME_RATIO` times the
bulk's magnitude (the :data:`~onnxquant.core.weight_grid.BULK_QUANTILE` of the nonzero
magnitudes, estimated from an evenly strided sample) loses its block whatever the rest is, and
a range wider than the weight's float type holds gives an Inf grid. Either keeps the node float,
and its decision says why. (Quantizing every weight once more with RTN to measure its SQNR
measured 2-3x the whole quantization time on a 1 GB model; the ratio is what decides for block
grids anyway: a 4-bit block of outlier-free values keeps ~20 dB.)
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxquant.core.weight_grid import (
    BULK_QUANTILE,
    EXTREME_RATIO,
    GridQuality,
    meaningless_reason,
)
from onnxquant.weight_only._weights import SLAB_BYTES, read_slabs, release

__all__ = ["grid_problem"]

_SAMPLE_PER_SLAB = 1 << 14  # magnitudes kept per slab for the bulk estimate


class _Screen:
    """Running min, max and a strided sample of the magnitudes over the slabs of a weight."""

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf
        self.samples: list[np.ndarray] = []

    def add(self, slab: np.ndarray) -> None:
        flat = slab.reshape(-1)
        if flat.size == 0:
            return
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        step = max(1, flat.size // _SAMPLE_PER_SLAB)
        self.samples.append(np.abs(flat[::step].astype(np.float64)))

    def quality(self, dtype: np.dtype) -> GridQuality:
        peak = max(abs(self.low), abs(self.high))
        with np.errstate(over="ignore"):
            span_fits = bool(np.isfinite(np.asarray(self.high - self.low, dtype=dtype)))
        if not span_fits:
            return GridQuality(-math.inf, -math.inf, finite=False)
        mags = np.concatenate(self.samples) if self.samples else np.zeros(0)
        mags = mags[mags > 0]
        if mags.size == 0 or peak == 0.0:
            return GridQuality(math.inf, math.inf)
        k = int(math.floor(BULK_QUANTILE * (mags.size - 1)))
        bulk = float(np.partition(mags, k)[k])
        ratio = peak / bulk if bulk > 0 else math.inf
        return GridQuality(math.inf, math.inf, outlier_ratio=ratio)


def grid_problem(weight: ir.Value, bits: int) -> str | None:
    """Why ``weight`` must stay float (None when its ``bits``-bit blocks mean something). The
    screen depends on the values only: an extreme value loses its block in any block layout,
    so ``bits`` only names the grid in the reason."""
    tensor = weight.const_value
    assert tensor is not None
    dtype = np.dtype(tensor.dtype.numpy())
    if dtype.kind != "f":
        return None
    screen = _Screen()
    try:
        dims = tuple(int(d) for d in tensor.shape.numpy())
        rows = max(1, SLAB_BYTES // (4 * max(1, math.prod(dims[1:]))))
        for slab in read_slabs(tensor, rows):
            if not np.isfinite(slab).all():
                return None  # NaN/Inf weights: the quantization itself reports them
            screen.add(slab)
    finally:
        release(tensor)
    quality = screen.quality(dtype)
    if quality.finite and quality.outlier_ratio <= EXTREME_RATIO:
        return None
    return meaningless_reason(weight.name or "", np.array([screen.low, screen.high]),
                              f"{bits}-bit block", quality)
