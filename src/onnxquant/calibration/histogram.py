"""A streaming histogram whose state does not depend on how the data was split.

:class:`HistogramObserver` bins a tensor's values with a power-of-two bin width ``w = 2**exponent``
on a grid anchored at zero: bin ``i`` covers ``[(origin + i) * w, (origin + i + 1) * w)``. The
exponent is always the smallest one (above a floor set by the data's magnitude) at which the bins
between the smallest and largest value seen fit in ``max_bins``. Because ``x / w`` is exact and
``floor(x / 2w) == floor(floor(x / w) / 2)``, coarsening is exact, so the whole state is a function
of the multiset of values seen: updating batch by batch, in any order, or merging observers of
separate shards gives identical counts. Nothing is re-binned approximately, unlike the baseline's
histogram collectors, and memory stays ``O(max_bins)`` per tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np

__all__ = ["HistogramObserver"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 15  # elements binned per step: keeps float64 temporaries in cache
_CHUNK32 = 1 << 16  # the same for the float32 path
_MIN_EXPONENT = -1074  # 2**-1074 is the smallest float64; all-zero tensors end here
_RESOLUTION_BITS = 52  # bins are never finer than max|x| / 2**52 (indices stay exact, < 2**52)


def _floor_pow2(x: float, exponent: int) -> int:
    """``floor(x / 2**exponent)`` exactly, also when the quotient underflows."""
    q = math.floor(math.ldexp(x, -exponent))
    if q == 0 and x < 0:  # a tiny negative x whose quotient rounded to -0.0
        return -1
    return q


def _exponent_floor(low: float, high: float) -> int:
    magnitude = max(abs(low), abs(high))
    if magnitude == 0:
        return _MIN_EXPONENT
    return max(_MIN_EXPONENT, math.frexp(magnitude)[1] - _RESOLUTION_BITS)


def _bins_needed(low: float, high: float, exponent: int) -> int:
    return _floor_pow2(high, exponent) - _floor_pow2(low, exponent) + 1


def _min_exponent(low: float, high: float, max_bins: int) -> int:
    """Smallest exponent (not below the magnitude floor) whose bins over [low, high] fit."""
    exponent = _exponent_floor(low, high)
    span = high * 0.5 - low * 0.5  # halved so that it cannot overflow
    if span / max_bins > 0:
        # The bin count exceeds 2 * span / w, so no exponent below this one can fit.
        exponent = max(exponent, math.frexp(span / max_bins)[1])
    while _bins_needed(low, high, exponent) > max_bins:
        exponent += 1
    return exponent


def _coarsen(counts: np.ndarray, origin: int, shift: int) -> tuple[np.ndarray, int]:
    """Merge aligned groups of ``2**shift`` bins exactly; returns ``(counts, origin)``."""
    if shift <= 0 or counts.size == 0:
        return counts, origin
    shift = min(shift, 63)  # beyond 63, every int64 index maps to 0 or -1 either way
    index = (np.arange(counts.size, dtype=np.int64) + origin) >> shift
    starts = np.flatnonzero(np.diff(index)) + 1
    merged = np.add.reduceat(counts, np.concatenate(([0], starts)))
    return merged.astype(np.int64, copy=False), origin >> shift


def _scale_pow2(chunk: np.ndarray, exponent: int) -> None:
    """``chunk /= 2**exponent`` in place, exactly (up to underflow)."""
    if -1022 <= exponent <= 1023:
        np.multiply(chunk, 2.0**-exponent, out=chunk)
    else:
        np.ldexp(chunk, -exponent, out=chunk)


def _float32_exact(flat: np.ndarray, vmin: float, vmax: float, exponent: int) -> bool:
    """Whether float32 arithmetic bins ``flat`` exactly: ``2**-exponent`` is a normal float32
    and every bin index is an integer below 2**23, which float32 represents exactly. (A
    product that underflows only matters for negative values: see :func:`_bin_float32`.)"""
    if flat.dtype != np.float32 or not -126 <= -exponent <= 127:
        return False
    return math.ldexp(max(abs(vmin), abs(vmax)), -exponent) < 2.0**23


def _bin_float32(flat: np.ndarray, exponent: int, origin: int, bins: int,
                 moments: bool) -> tuple[np.ndarray, float, float]:
    """Counts per bin (from ``origin``), sum and sum of squares of float32 values, in
    cache-sized chunks with float64 accumulation and no full-size temporaries."""
    part = np.zeros(bins, dtype=np.int64)
    size = min(flat.size, _CHUNK32)
    buffer, index = np.empty(size, np.float32), np.empty(size, np.int32)
    scale = np.float32(2.0**-exponent)
    fix_underflow = origin < 0 and exponent > 0
    total = total_sq = 0.0
    for start in range(0, flat.size, _CHUNK32):
        raw = flat[start : start + _CHUNK32]
        chunk, idx = buffer[: raw.size], index[: raw.size]
        if moments:
            total += float(raw.sum(dtype=np.float64))
            total_sq += float(np.einsum("i,i->", raw, raw, dtype=np.float64))
        np.multiply(raw, scale, out=chunk)
        np.floor(chunk, out=chunk)
        if fix_underflow:  # a tiny negative value whose product rounded to -0.0: bin -1
            chunk[(chunk == 0) & (raw < 0)] = -1.0
        np.copyto(idx, chunk, casting="unsafe")
        if origin:
            idx -= np.int32(origin)
        part += np.bincount(idx, minlength=bins)
    return part, total, total_sq


@dataclasses.dataclass(eq=False)
class HistogramObserver:
    """Exactly mergeable histogram of a tensor's finite values, plus exact range and moments.

    Attributes:
        max_bins: Upper bound on the number of bins (at least 2).
        exponent: Bin width is ``2**exponent``.
        origin: Index of the first bin on the global grid: it starts at ``origin * 2**exponent``.
        counts: Values per bin (int64, at most ``max_bins`` long; empty until observed).
        low: Smallest finite value seen (``+inf`` before any).
        high: Largest finite value seen (``-inf`` before any).
        count: Number of finite values seen.
        nonfinite: Number of NaN and ±Inf values seen; they are left out of everything else.
        total: Sum of the finite values (float64).
        total_sq: Sum of their squares (float64).
        moments: Keep ``total``/``total_sq`` (the Distribution method's mean/std); without
            them an update is about a third cheaper.
    """

    max_bins: int = 2048
    exponent: int = 0
    origin: int = 0
    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    low: float = math.inf
    high: float = -math.inf
    count: int = 0
    nonfinite: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    moments: bool = True

    def __post_init__(self) -> None:
        if int(self.max_bins) < 2:
            raise ValueError(f"HistogramObserver needs max_bins >= 2, got {self.max_bins}")
        self.max_bins = int(self.max_bins)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)

    @property
    def observed(self) -> bool:
        """Whether at least one finite value was seen."""
        return self.count > 0

    @property
    def width(self) -> float:
        """Bin width ``2**exponent``."""
        return math.ldexp(1.0, self.exponent)

    def update(self, values: np.ndarray) -> None:
        """Add a batch of raw tensor values (any shape; float16/32/64 or integer).

        Empty arrays change nothing; NaN and ±Inf are only counted in :attr:`nonfinite`.
        """
        flat = np.asarray(values)
        if flat.dtype.kind not in "fiub":
            raise TypeError(f"HistogramObserver.update needs real numbers, got dtype {flat.dtype}")
        if flat.dtype.kind != "f":
            flat = flat.astype(np.float64)
        flat = flat.reshape(-1)
        if flat.size == 0:
            return
        vmin, vmax = float(flat.min()), float(flat.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            finite = np.isfinite(flat)
            kept = int(np.count_nonzero(finite))
            self.nonfinite += flat.size - kept
            if kept == 0:
                return
            flat = flat[finite]
            vmin, vmax = float(flat.min()), float(flat.max())

        low, high = min(self.low, vmin), max(self.high, vmax)
        exponent = _min_exponent(low, high, self.max_bins)
        self._reshape(exponent, low, high)

        batch_origin = _floor_pow2(vmin, exponent)
        batch_bins = _floor_pow2(vmax, exponent) - batch_origin + 1
        if _float32_exact(flat, vmin, vmax, exponent):
            part, total, total_sq = _bin_float32(flat, exponent, batch_origin, batch_bins,
                                                self.moments)
            self._add(part, batch_origin, low, high, flat.size, total, total_sq)
            return
        fix_underflow = flat.dtype == np.float64 and exponent >= 1 and vmin < 0
        part = np.zeros(batch_bins, dtype=np.int64)
        buffer = np.empty(min(flat.size, _CHUNK), dtype=np.float64)
        squares = np.empty_like(buffer)
        index = np.empty(buffer.size, dtype=np.intp)
        total = total_sq = 0.0
        with np.errstate(over="ignore"):  # sums of squares of values near 1e308
            for start in range(0, flat.size, _CHUNK):
                raw = flat[start : start + _CHUNK]
                chunk, idx = buffer[: raw.size], index[: raw.size]
                np.copyto(chunk, raw)
                if self.moments:
                    total += float(chunk.sum())
                    # Not chunk @ chunk: a multithreaded BLAS call per chunk is slow when busy.
                    total_sq += float(np.square(chunk, out=squares[: raw.size]).sum())
                _scale_pow2(chunk, exponent)
                if fix_underflow:
                    chunk[(chunk == 0) & (raw < 0)] = -1.0
                np.floor(chunk, out=chunk)
                chunk -= batch_origin  # exact: both are integers below 2**53
                np.copyto(idx, chunk, casting="unsafe")
                part += np.bincount(idx, minlength=batch_bins)
        self._add(part, batch_origin, low, high, flat.size, total, total_sq)

    def _add(self, part: np.ndarray, batch_origin: int, low: float, high: float, size: int,
             total: float, total_sq: float) -> None:
        offset = batch_origin - self.origin
        self.counts[offset : offset + part.size] += part
        self.low, self.high = low, high
        self.count += size
        self.total += total
        self.total_sq += total_sq

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """Add another stream's histogram (same ``max_bins``); returns self.

        The result is identical to one observer that saw both streams, in any order.
        """
        if other.max_bins != self.max_bins:
            raise ValueError(
                f"cannot merge histograms with max_bins {self.max_bins} and {other.max_bins}; "
                "calibrate both with the same number of bins"
            )
        if other.moments != self.moments:
            raise ValueError("cannot merge histograms collected with and without moments")
        self.nonfinite += other.nonfinite
        if not other.observed:
            return self
        if not self.observed:
            self.exponent, self.origin = other.exponent, other.origin
            self.counts = other.counts.copy()
        else:
            low, high = min(self.low, other.low), max(self.high, other.high)
            exponent = _min_exponent(low, high, self.max_bins)
            self._reshape(exponent, low, high)
            counts, origin = _coarsen(other.counts, other.origin, exponent - other.exponent)
            offset = origin - self.origin
            self.counts[offset : offset + counts.size] += counts
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        return self

    def _reshape(self, exponent: int, low: float, high: float) -> None:
        """Coarsen to ``exponent`` and pad with empty bins so that [low, high] is covered."""
        origin = _floor_pow2(low, exponent)
        size = _floor_pow2(high, exponent) - origin + 1
        if not self.observed:
            self.exponent, self.origin = exponent, origin
            self.counts = np.zeros(size, dtype=np.int64)
            return
        counts, old_origin = _coarsen(self.counts, self.origin, exponent - self.exponent)
        padded = np.zeros(size, dtype=np.int64)
        padded[old_origin - origin : old_origin - origin + counts.size] = counts
        self.exponent, self.origin, self.counts = exponent, origin, padded

    def edges(self) -> np.ndarray:
        """Bin edges (float64, ``len(counts) + 1``)."""
        index = np.arange(self.counts.size + 1, dtype=np.float64) + self.origin
        with np.errstate(over="ignore"):
            return np.ldexp(index, self.exponent)

    def abs_histogram(
        self,
        *,
        max_bins: int | None = None,
        side: Literal["both", "positive", "negative"] = "both",
    ) -> tuple[np.ndarray, float]:
        """Histogram of ``|x|`` on bins ``[k*w, (k+1)*w)`` starting at 0; returns ``(counts, w)``.

        Zero is always a bin edge of the grid, so folding the negative bins onto the positive
        ones is exact. When the values lie far from zero the folded histogram would need more
        than ``max_bins`` (default: the observer's) bins; it is then coarsened exactly by a
        power of two first.

        Args:
            max_bins: Longest histogram to return.
            side: ``"positive"`` folds only ``x >= 0``, ``"negative"`` only ``x < 0``.
        """
        limit = self.max_bins if max_bins is None else int(max_bins)
        if limit < 1:
            raise ValueError(f"abs_histogram needs max_bins >= 1, got {max_bins}")
        if not self.observed:
            return np.zeros(0, dtype=np.int64), self.width
        counts, origin, exponent = self.counts, self.origin, self.exponent
        length = max(origin + counts.size, -origin)
        if length > limit:
            shift = max(0, (length - 1) // limit).bit_length()
            counts, origin = _coarsen(counts, origin, shift)
            exponent += shift
        end = origin + counts.size
        folded = np.zeros(max(end, -origin), dtype=np.int64)
        if side in ("both", "positive") and end > 0:
            first = max(origin, 0)
            folded[first:end] += counts[first - origin :]
        if side in ("both", "negative") and origin < 0:
            negative = counts[: min(end, 0) - origin]  # bins origin .. min(end, 0) - 1
            folded[-min(end, 0) : -origin] += negative[::-1]
        if side != "both":
            nonzero = np.flatnonzero(folded)
            folded = folded[: nonzero[-1] + 1] if nonzero.size else folded[:0]
        return folded, math.ldexp(1.0, exponent)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible state (ints, floats, lists; ``None`` for the unset range)."""
        return {
            "max_bins": self.max_bins,
            "exponent": self.exponent,
            "origin": self.origin,
            "counts": [int(c) for c in self.counts],
            "low": self.low if self.observed else None,
            "high": self.high if self.observed else None,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "total": self.total,
            "total_sq": self.total_sq,
            "moments": self.moments,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistogramObserver:
        """Rebuild an observer from :meth:`to_dict` output; raises ValueError if inconsistent."""
        try:
            observer = cls(
                max_bins=int(data["max_bins"]),
                exponent=int(data["exponent"]),
                origin=int(data["origin"]),
                counts=np.array(data["counts"], dtype=np.int64),
                low=math.inf if data["low"] is None else float(data["low"]),
                high=-math.inf if data["high"] is None else float(data["high"]),
                count=int(data["count"]),
                nonfinite=int(data["nonfinite"]),
                total=float(data["total"]),
                total_sq=float(data["total_sq"]),
                moments=bool(data.get("moments", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a saved HistogramObserver: {e}") from e
        if observer.counts.size > observer.max_bins or int(observer.counts.sum()) != observer.count:
            raise ValueError(
                "saved HistogramObserver is inconsistent: "
                f"{observer.counts.size} bins (max {observer.max_bins}), "
                f"{int(observer.counts.sum())} counted vs count {observer.count}"
            )
        return observer
