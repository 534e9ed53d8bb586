"""Whether an integer grid still means something for a constant tensor.

A few huge values (``1e30``, ``3.4e38``) stretch a grid so far that every other value rounds to
zero — and the SQNR of the whole tensor hides it, because those few values carry all the
energy and land on the grid exactly. So the SQNR here is measured over the *bulk* of the
tensor: every element except those above the :data:`BULK_QUANTILE` of the magnitudes (for a
tensor of up to 100 elements: except the largest one). Sums run in float64, so ``3.4e38``
squared does not overflow; a grid that dequantizes to Inf/NaN in float32 (a scale that
overflows) never passes.

Per channel, the total SQNR counts, and no channel may hold a value more than
:data:`EXTREME_RATIO` times its own bulk: such a channel loses all its other values (a lost
output feature) whatever the total says. A low SQNR of one channel alone is not a reason: real
convolutions have channels of small weights at 3-8 dB per channel that quantize fine in the
model (measured on rapidocr_rec_v4, where keeping them float cost 44 points of accuracy in
QOperator form). Channels whose values are negligible next to the tensor's
(``NEGLIGIBLE_CHANNEL`` of the mean energy per element, e.g. dead channels) are not counted.
Block-wise (4-bit) grids use the total only: one block of a column is not a whole output
feature, and 4-bit grids routinely lose the neighbours of large weights in real models.

Used by static (planner), dynamic and weight-only quantization alike.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxquant.core import numerics
from onnxquant.core.errors import NumericsError
from onnxquant.core.qtypes import QuantType

__all__ = ["MIN_GRID_SQNR_DB", "BULK_QUANTILE", "EXTREME_RATIO", "GridQuality", "bulk_limit",
           "bulk_energy", "outlier_ratio",
           "sqnr_db", "grid_quality", "weight_grid_quality", "min_grid_sqnr_db", "range_text",
           "meaningless_reason"]

MIN_GRID_SQNR_DB = 4.0
"""Below this SQNR (dB, over the bulk) a grid is meaningless for a tensor: the noise is as large
as the values. An 8-bit grid of an outlier-free tensor gives about 40 dB, a grid stretched by a
huge outlier about 0 dB. Real weights with ordinary outliers measure 5-15 dB per tensor (e.g. a
Gemm of ddddocr_common at 12.8 dB); the per-channel fallback of static and dynamic quantization
handles those, so the threshold sits well below them."""

BULK_QUANTILE = 0.99
"""Elements of magnitude above this quantile are left out of the bulk."""

EXTREME_RATIO = 2.0**16
"""Block-wise grids: a value more than this many times the :data:`BULK_QUANTILE` of the nonzero
magnitudes is extreme — no grid of up to 16 bits holds it and the bulk together, so its block
loses every other value. (Large weights of real models, e.g. the "super weights" of LLMs, stay
within about 1000 times.)"""

NEGLIGIBLE_CHANNEL = 1e-4
"""Per channel: channels whose mean energy per element is below this fraction of the tensor's
are not counted (their loss does not matter next to the other channels)."""


def min_grid_sqnr_db(bits: int) -> float:
    """The meaningless-grid threshold for ``bits``-bit grids: :data:`MIN_GRID_SQNR_DB`, and
    1.5 dB per bit below that (4-bit blocks of an outlier-free weight give ~20 dB, 2-bit ones
    ~7 dB; a grid stretched by an outlier gives ~0 dB whatever the bits)."""
    return min(MIN_GRID_SQNR_DB, 1.5 * bits)


@dataclasses.dataclass(frozen=True)
class GridQuality:
    """How well a grid reproduces a tensor.

    Attributes:
        sqnr_db: SQNR over the bulk of the tensor.
        worst_channel_db: Lowest SQNR of a counted channel (equal to ``sqnr_db`` per tensor).
        finite: Whether every dequantized value is finite in float32.
        outlier_ratio: Largest magnitude over the bulk's (see :func:`outlier_ratio`), where
            measured (1 otherwise).
        channel_ratio: Per channel: the largest magnitude of a counted channel over that
            channel's own bulk (1 per tensor).
    """

    sqnr_db: float
    worst_channel_db: float
    finite: bool = True
    outlier_ratio: float = 1.0
    channel_ratio: float = 1.0

    def passes(self, min_db: float, *, per_channel: bool = True,
               max_ratio: float | None = None) -> bool:
        """Whether the grid means something: finite, the SQNR at least ``min_db``, no value
        beyond ``max_ratio`` times the bulk when given, and (with ``per_channel``) no channel
        with a value beyond :data:`EXTREME_RATIO` times its own bulk."""
        if max_ratio is not None and self.outlier_ratio > max_ratio:
            return False
        if per_channel and self.channel_ratio > EXTREME_RATIO:
            return False
        return self.finite and self.sqnr_db >= min_db

    def text(self) -> str:
        """``"SQNR x dB"`` (with the worst channel when it is lower, and the outlier ratio
        when it was measured)."""
        if not self.finite:
            return "it dequantizes to Inf/NaN in float32"
        parts = []
        if math.isfinite(self.sqnr_db):  # not measured where a screen decided
            parts.append(f"SQNR {_db_text(self.sqnr_db)} dB")
        if self.worst_channel_db < self.sqnr_db:
            parts.append(f"worst channel {_db_text(self.worst_channel_db)} dB")
        if self.outlier_ratio > 1.0:
            parts.append(f"largest magnitude {self.outlier_ratio:.3g}x the bulk's")
        if self.channel_ratio > EXTREME_RATIO:
            parts.append(f"a channel holds a value {self.channel_ratio:.3g}x its own bulk")
        return ", ".join(parts) or f"SQNR {_db_text(self.sqnr_db)} dB"


def _db_text(db: float) -> str:
    return f"{db:.1f}" if math.isfinite(db) else ("inf" if db > 0 else "-inf")


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


_CHUNK = 1 << 20  # elements turned into float64 at once
_QUANTILE_SAMPLE = 1 << 20  # elements the bulk limit of a large tensor is estimated from


def _magnitudes(data: np.ndarray) -> np.ndarray:
    """``|data|`` flattened, in float32 for float32 data (exact) and float64 otherwise."""
    array = np.asarray(data)
    dtype = np.float32 if array.dtype in (np.float32, np.float16) else np.float64
    return np.abs(array.astype(dtype, copy=False)).reshape(-1)


def bulk_limit(data: np.ndarray) -> float:
    """The largest magnitude counted as bulk: the :data:`BULK_QUANTILE` of ``|data|``
    (rounded down to an element; estimated from an evenly strided sample of about
    :data:`_QUANTILE_SAMPLE` elements for larger tensors)."""
    array = np.asarray(data).reshape(-1)
    if array.size > 2 * _QUANTILE_SAMPLE:
        array = array[::array.size // _QUANTILE_SAMPLE]
    mags = _magnitudes(array)
    if mags.size == 0:
        return 0.0
    k = int(math.floor(BULK_QUANTILE * (mags.size - 1)))
    return float(np.partition(mags, k)[k])


def outlier_ratio(data: np.ndarray) -> float:
    """Largest magnitude over the :data:`BULK_QUANTILE` of the nonzero magnitudes (1 for an
    all-zero tensor)."""
    mags = _magnitudes(data)
    mags = mags[mags > 0]
    if mags.size == 0:
        return 1.0
    return float(mags.max()) / bulk_limit(mags)


def _channel_energy(data: np.ndarray, restored: np.ndarray,
                    limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of the 2-D ``data``: (bulk signal, bulk noise, bulk element count), summed in
    float64 a chunk of rows at a time."""
    rows, cols = data.shape
    signal, noise = np.zeros(rows), np.zeros(rows)
    counts = np.zeros(rows, dtype=np.int64)
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        w = data[r0:r0 + step].astype(np.float64)
        diff = w - restored[r0:r0 + step].astype(np.float64)
        bulk = np.abs(w) <= limit
        signal[r0:r0 + step] = np.where(bulk, w * w, 0.0).sum(axis=1)
        noise[r0:r0 + step] = np.where(bulk, diff * diff, 0.0).sum(axis=1)
        counts[r0:r0 + step] = bulk.sum(axis=1)
    return signal, noise, counts


def bulk_energy(data: np.ndarray, restored: np.ndarray, *,
                limit: float | None = None) -> tuple[float, float]:
    """``(signal, noise)`` energy over the bulk of ``data`` (float64 sums), for callers that
    add them up over the parts of a tensor; see :func:`grid_quality`."""
    w = np.asarray(data).reshape(-1)
    r = np.asarray(restored).reshape(-1)
    limit = bulk_limit(w) if limit is None else limit
    signal = noise = 0.0
    for i in range(0, w.size, _CHUNK):
        s, n, _ = _channel_energy(w[i:i + _CHUNK].reshape(1, -1),
                                  r[i:i + _CHUNK].reshape(1, -1), limit)
        signal, noise = signal + float(s[0]), noise + float(n[0])
    return signal, noise


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``; inf without noise, -inf without signal."""
    return _db(signal, noise)


def grid_quality(data: np.ndarray, restored: np.ndarray, *, axis: int | None = None,
                 limit: float | None = None) -> GridQuality:
    """The :class:`GridQuality` of ``restored`` (the dequantized grid values) against ``data``.

    Args:
        data: The float tensor.
        restored: Its dequantized values (float32, as the runtime computes them).
        axis: Channel axis for the worst-channel SQNR; None for the whole tensor only.
        limit: Largest magnitude counted as bulk (default :func:`bulk_limit` of ``data``).
    """
    restored = np.asarray(restored)
    if not np.all(np.isfinite(restored)):
        return GridQuality(-math.inf, -math.inf, finite=False)
    w = np.asarray(data)
    if axis is None or w.ndim == 0:
        total = _db(*bulk_energy(w, restored, limit=limit))
        return GridQuality(total, total)
    limit = bulk_limit(w) if limit is None else limit
    axis %= w.ndim
    channels = w.shape[axis]
    signal, noise, counts = _channel_energy(
        np.moveaxis(w, axis, 0).reshape(channels, -1),
        np.moveaxis(restored, axis, 0).reshape(channels, -1), limit)
    total = _db(float(signal.sum()), float(noise.sum()))
    mean = float(signal.sum()) / max(int(counts.sum()), 1)
    counted = signal / np.maximum(counts, 1) >= NEGLIGIBLE_CHANNEL * mean
    with np.errstate(divide="ignore", invalid="ignore"):
        dbs = 10.0 * np.log10(signal / noise)
    dbs = np.where(noise == 0.0, np.inf, dbs)[counted]
    worst = min(total, float(dbs.min())) if dbs.size else total
    ratios = _channel_ratios(np.moveaxis(w, axis, 0).reshape(channels, -1), limit)[counted]
    return GridQuality(total, worst, channel_ratio=float(ratios.max()) if ratios.size else 1.0)


def _channel_ratios(rows: np.ndarray, limit: float) -> np.ndarray:
    """Per row: largest magnitude over the row's :data:`BULK_QUANTILE` magnitude (floored at a
    thousandth of the tensor's bulk limit, so that mostly-zero rows do not divide by 0)."""
    mags = np.abs(rows.astype(np.float64))
    k = int(math.floor(BULK_QUANTILE * (mags.shape[1] - 1)))
    bulk = np.partition(mags, k, axis=1)[:, k]
    floor = max(limit * 1e-3, np.finfo(np.float64).tiny)
    return mags.max(axis=1) / np.maximum(bulk, floor)


def weight_grid_quality(data: np.ndarray, qtype: QuantType, *, axis: int | None,
                        symmetric: bool, reduce_range: bool = False) -> GridQuality | None:
    """The :class:`GridQuality` of ``data`` quantized to ``qtype`` per tensor (``axis`` None)
    or per channel along ``axis``; None when it cannot be quantized at all (NaN/Inf values,
    reported by the quantization itself)."""
    if axis is None:
        bound = _sqnr_lower_bound(data, qtype, reduce_range)
        if bound is not None and bound >= MIN_GRID_SQNR_DB + 3.0:  # margin: sampled energy
            return GridQuality(bound, bound)  # clearly meaningful: no need to quantize
    try:
        quantized = numerics.quantize_weight(data, qtype, axis=axis, symmetric=symmetric,
                                             reduce_range=reduce_range)
        with np.errstate(over="ignore", invalid="ignore"):
            restored = quantized.dequantize()
    except NumericsError:
        return None
    return grid_quality(data, restored, axis=quantized.axis)


def _sqnr_lower_bound(data: np.ndarray, qtype: QuantType, reduce_range: bool) -> float | None:
    """A cheap lower bound of the per-tensor bulk SQNR (None when it cannot be given): a grid
    over the tensor's range with ``2**bits - 1`` steps (one bit fewer with ``reduce_range``)
    rounds every value by at most half a step, so the noise per element is at most
    ``step**2 / 4``; the bulk's mean energy comes from an evenly strided sample."""
    w = np.asarray(data)
    if w.size == 0 or w.dtype.kind != "f":
        return None
    low, high = float(np.min(w)), float(np.max(w))
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    sample = w.reshape(-1)
    if sample.size > 2 * _QUANTILE_SAMPLE:
        sample = sample[::sample.size // _QUANTILE_SAMPLE]
    mags = _magnitudes(sample).astype(np.float64)
    k = int(math.floor(BULK_QUANTILE * (mags.size - 1)))
    bulk = mags[mags <= np.partition(mags, k)[k]]  # the bulk_limit() of the sample
    levels = 2 ** (qtype.bits - (1 if reduce_range else 0)) - 1
    step = (max(high, 0.0) - min(low, 0.0)) / levels  # the grid always holds 0
    if bulk.size == 0 or step == 0.0 or not math.isfinite(step):
        return None
    return _db(float(np.mean(bulk * bulk)), step * step / 4.0)


def range_text(data: np.ndarray) -> str:
    """``"[min, max]"`` of ``data`` in 3 significant digits."""
    array = np.asarray(data)
    if array.size == 0:
        return "[]"
    return f"[{float(np.min(array)):.3g}, {float(np.max(array)):.3g}]"


def meaningless_reason(name: str, data: np.ndarray, grid: str, quality: GridQuality,
                       outcome: str = "kept float") -> str:
    """The decision text: ``weight 'w' range [a, b] makes the <grid> grid meaningless
    (SQNR x dB); <outcome>``."""
    return (f"weight '{name}' range {range_text(data)} makes the {grid} grid meaningless "
            f"({quality.text()}); {outcome}")
