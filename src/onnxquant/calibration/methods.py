"""Range selection from a :class:`~onnxquant.calibration.histogram.HistogramObserver`.

Every ``*_range`` function returns ``(low, high)`` as floats inside the observed ``[low, high]``
(a symmetric threshold ``t`` becomes ``(max(-t, low), min(t, high))``, so an all-positive tensor
keeps its minimum); making the range symmetric or adding zero is the quantization-parameter
stage's job. All raise ValueError on a histogram that saw no finite value.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onnxquant.calibration.histogram import HistogramObserver

__all__ = [
    "distribution_stats",
    "entropy_range",
    "kl_divergences",
    "minmax_range",
    "mse_range",
    "percentile_range",
]

logger = logging.getLogger(__name__)

_KL_EPSILON = 1e-4  # count given to an empty quantized bin that must hold clipped outliers
_KL_BLOCK = 1 << 18  # elements per (thresholds × groups) array in the KL search
_COARSE_CANDIDATES = 192  # thresholds in the first, coarse pass of the KL search
_MSE_BLOCK = 1 << 18  # elements per (negative × positive thresholds) array in the MSE search


def _require(h: HistogramObserver, method: str) -> None:
    if not h.observed:
        raise ValueError(f"{method}: the histogram saw no finite values; nothing to calibrate")


def _clip(h: HistogramObserver, low: float, high: float) -> tuple[float, float]:
    """Intersect with the observed range; a one-signed tensor wholly beyond a threshold keeps
    its value nearest zero (a constant 7 stays ``(7, 7)``)."""
    low, high = max(float(low), h.low), min(float(high), h.high)
    if low > high:
        nearest = h.low if h.low > 0 else h.high
        return nearest, nearest
    return low, high


def _magnitude(h: HistogramObserver) -> float:
    return max(abs(h.low), abs(h.high))


def minmax_range(h: HistogramObserver, *, symmetric: bool = False) -> tuple[float, float]:
    """The observed ``(min, max)``.

    ``symmetric`` is accepted for a uniform signature: ``(-m, m)`` clipped to the observed
    range is the observed range.
    """
    _require(h, "minmax")
    return h.low, h.high


def distribution_stats(h: HistogramObserver) -> tuple[float, float]:
    """``(mean, std)`` of the finite values, from the exact float64 sums."""
    _require(h, "distribution")
    if not h.moments:
        raise ValueError("this histogram was collected without moments (moments=False)")
    mean = h.total / h.count
    variance = max(h.total_sq / h.count - mean * mean, 0.0)
    return mean, math.sqrt(variance)


def _quantile(counts: np.ndarray, start: float, width: float, mass: float) -> float:
    """Value below which ``mass`` values lie, interpolating linearly inside the bin."""
    cumulative = np.cumsum(counts)
    i = min(int(np.searchsorted(cumulative, mass, side="left")), counts.size - 1)
    before = float(cumulative[i - 1]) if i else 0.0
    fraction = (mass - before) / counts[i] if counts[i] else 0.0
    return start + (i + min(max(fraction, 0.0), 1.0)) * width


def percentile_range(
    h: HistogramObserver, percentile: float = 99.999, *, symmetric: bool = False
) -> tuple[float, float]:
    """Range holding ``percentile`` % of the values.

    Args:
        h: The tensor's histogram.
        percentile: Share of the values kept, in (0, 100].
        symmetric: Cut ``(100 - percentile)`` % off the largest ``|x|`` and return ``(-t, t)``
            (clipped); otherwise cut half of it from each tail of the signed distribution.
    """
    _require(h, "percentile")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if percentile == 100:
        return minmax_range(h)
    if symmetric:
        counts, width = h.abs_histogram()
        t = _quantile(counts, 0.0, width, h.count * percentile / 100)
        return _clip(h, -t, t)
    tail = h.count * (100 - percentile) / 200
    start = h.origin * h.width
    low = _quantile(h.counts, start, h.width, tail)
    high = _quantile(h.counts, start, h.width, h.count - tail)
    return _clip(h, low, high)


def _xlogx(x: np.ndarray) -> np.ndarray:
    positive = x > 0
    return np.where(positive, x * np.log(np.where(positive, x, 1.0)), 0.0)


def kl_divergences(counts: np.ndarray, quantized_bins: int) -> np.ndarray:
    """KL(p‖q) for every threshold index ``i`` in ``quantized_bins .. len(counts)``.

    For threshold ``i`` (TensorRT's calibration): ``p = counts[:i]`` with the clipped mass
    ``counts[i:]`` added to its last bin; ``q`` merges ``counts[:i]`` (without the outliers)
    into ``quantized_bins`` groups (boundaries ``j * i // quantized_bins``) and spreads each
    group's sum evenly over the bins where ``p`` is nonzero (zero elsewhere). Both are
    normalised; only an empty last group that must hold outliers gets a small count. Computed
    from prefix sums, vectorised over blocks of thresholds (no loop over bins or thresholds).

    Returns:
        float64 array of ``len(counts) - quantized_bins + 1`` divergences (``inf`` where ``q``
        has no mass).
    """
    n = np.asarray(counts).size
    if n < quantized_bins:
        return np.zeros(0)
    return _kl_at(counts, np.arange(quantized_bins, n + 1), quantized_bins)


def _kl_at(counts: np.ndarray, candidates: np.ndarray, quantized_bins: int) -> np.ndarray:
    """KL(p‖q) at the given threshold indices (see :func:`kl_divergences`)."""
    a = np.asarray(counts, dtype=np.float64)
    if not a.any():
        return np.full(candidates.size, np.inf)
    total = np.concatenate(([0.0], np.cumsum(a)))
    nonzero = np.concatenate(([0], np.cumsum(a > 0)))
    entropy = np.concatenate(([0.0], np.cumsum(_xlogx(a))))
    rows = max(1, _KL_BLOCK // (quantized_bins + 1))  # bound the (thresholds × groups) arrays
    return np.concatenate(
        [
            _kl_block(a, total, nonzero, entropy, candidates[s : s + rows], quantized_bins)
            for s in range(0, candidates.size, rows)
        ]
    )


def _best_threshold_index(counts: np.ndarray, quantized_bins: int) -> int:
    """Index ``i`` minimising KL: every ``stride``-th candidate first, then every candidate
    within one stride of the best (the divergence varies smoothly with the threshold)."""
    last = counts.size
    stride = max(1, (last - quantized_bins + 1) // _COARSE_CANDIDATES)
    coarse = np.arange(quantized_bins, last + 1, stride)
    best = int(coarse[np.argmin(_kl_at(counts, coarse, quantized_bins))])
    if stride == 1:
        return best
    fine = np.arange(max(quantized_bins, best - stride + 1), min(last, best + stride - 1) + 1)
    return int(fine[np.argmin(_kl_at(counts, fine, quantized_bins))])


def _kl_block(
    a: np.ndarray,
    total: np.ndarray,
    nonzero: np.ndarray,
    entropy: np.ndarray,
    i: np.ndarray,
    quantized_bins: int,
) -> np.ndarray:
    size = total[-1]
    outliers = size - total[i]
    last = a[i - 1] + outliers
    plogp = entropy[i - 1] + _xlogx(last)

    bounds = (np.arange(quantized_bins + 1)[None, :] * i[:, None]) // quantized_bins
    q_mass = total[bounds[:, 1:]] - total[bounds[:, :-1]]
    p_mass = q_mass.copy()
    p_mass[:, -1] += outliers
    support = (nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]).astype(np.float64)
    support[:, -1] += (last > 0) & (a[i - 1] == 0)
    empty = (q_mass[:, -1] == 0) & (outliers > 0)
    q_mass[empty, -1] = _KL_EPSILON
    q_total = total[i] + empty * _KL_EPSILON  # q's mass, not the original counts

    # KL = sum p/N log((p/N) / (q/Q)); within group j every nonzero p_k has q_k = G_j / nz_j.
    used = p_mass > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(used, q_mass / np.where(used, support, 1.0), 1.0)
        plogq = np.where(used, p_mass * np.log(ratio), 0.0).sum(axis=1)
        kl = (plogp - plogq) / size - math.log(size) + np.log(q_total)
    kl[total[i] <= 0] = np.inf  # everything clipped: q holds nothing but the smoothing count
    return kl


def _entropy_threshold(counts: np.ndarray, width: float, quantized_bins: int) -> float | None:
    """KL-optimal threshold for a histogram of ``|x|``; None when it has too few bins.

    The first bin is flattened to its neighbour's count before the search: a spike of exact
    zeros (ReLU outputs, padding) otherwise dominates the divergence and drives the threshold
    far into the distribution (ReLU of a Gaussian: 1.5σ).
    """
    if counts.size < quantized_bins or not counts.any():
        return None
    if counts.size > 1:
        counts = counts.copy()
        counts[0] = min(counts[0], counts[1])
        if not counts.any():
            return None
    return _best_threshold_index(counts, quantized_bins) * width


def entropy_range(
    h: HistogramObserver, quantized_bins: int = 128, *, symmetric: bool = True,
    min_kept: float = 99.9,
) -> tuple[float, float]:
    """Range whose quantization loses the least information (KL divergence, TensorRT-style).

    Args:
        h: The tensor's histogram.
        quantized_bins: Levels the kept range is quantized to in the search (128: one side of
            a symmetric int8 grid).
        symmetric: Search one threshold on ``|x|`` and return ``(-t, t)`` clipped. When False
            and the tensor has both signs, the negative and positive tails are thresholded
            separately.
        min_kept: The range always holds at least this percentage of the values. KL
            thresholds over-clip some distributions (a tensor away from 0 would otherwise
            collapse onto one level; sparse post-ReLU maps lose most of their peaks); 0 turns
            the floor off.
    """
    _require(h, "entropy")
    if quantized_bins < 1:
        raise ValueError(f"quantized_bins must be >= 1, got {quantized_bins}")
    if symmetric or h.low >= 0 or h.high <= 0:
        counts, width = h.abs_histogram()
        t = _entropy_threshold(counts, width, quantized_bins)
        if t is None:
            logger.debug("entropy: %d bins < %d quantized bins", counts.size, quantized_bins)
            t = _magnitude(h)
        return _widen(_clip(h, -t, t), h, min_kept)
    positive, width = h.abs_histogram(side="positive")
    negative, _ = h.abs_histogram(side="negative")
    t_pos = _entropy_threshold(positive, width, quantized_bins)
    t_neg = _entropy_threshold(negative, width, quantized_bins)
    low = -(-h.low if t_neg is None else t_neg)
    return _widen(_clip(h, low, h.high if t_pos is None else t_pos), h, min_kept)


def _widen(rng: tuple[float, float], h: HistogramObserver, kept: float) -> tuple[float, float]:
    """Widen ``rng`` to hold at least ``kept`` % of the values (half the rest cut per tail)."""
    if kept <= 0:
        return rng
    low, high = percentile_range(h, kept)
    return min(rng[0], low), max(rng[1], high)


def _mse_terms(counts: np.ndarray, magnitude: float, width: float) -> tuple[np.ndarray, ...]:
    """Per candidate threshold of a ``|x|`` histogram: ``(t, kept, clipping error)``.

    Candidates are the bin edges ``k * w`` below ``magnitude`` and ``magnitude`` itself (no
    clipping). Everything is in units of ``w``; the clipping error uses bin centres.
    """
    a = counts.astype(np.float64)
    n = a.size
    centres = np.arange(n) + 0.5
    s0 = np.cumsum(a[::-1])[::-1]  # suffix sums over bins b >= k of a, a*c, a*c**2
    s1 = np.cumsum((a * centres)[::-1])[::-1]
    s2 = np.cumsum((a * centres**2)[::-1])[::-1]
    k = np.arange(1, n, dtype=np.float64)
    t = np.append(k, magnitude / width)
    kept = np.append(s0[0] - s0[1:], s0[0])
    clipped = np.append(np.maximum(s2[1:] - 2 * k * s1[1:] + k * k * s0[1:], 0.0), 0.0)
    return t, kept, clipped


def mse_range(
    h: HistogramObserver, levels: int = 256, *, symmetric: bool = False
) -> tuple[float, float]:
    """Clipping range with the least expected squared quantization error.

    The error is estimated from the histogram (bin centres × counts): ``step**2 / 12`` per
    value inside the range, ``(|x| - t)**2`` per value beyond a threshold ``t``. The step is
    that of the grid the result will be quantized on, with ``levels`` levels: ``[0, t]`` for a
    one-signed tensor; ``[-t, t]`` when ``symmetric``; otherwise ``[-t_neg, t_pos]`` with the
    two thresholds searched jointly (a tensor's tails are seldom alike). Candidates are every
    bin edge below the largest ``|x|`` (of that sign), and that largest value itself.

    Args:
        h: The tensor's histogram.
        levels: Number of quantization levels (256 for 8 bits).
        symmetric: One threshold on ``|x|`` priced on the symmetric grid ``[-t, t]``, also for
            one-signed tensors (for symmetric quantization).
    """
    _require(h, "mse")
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    one_signed = h.low >= 0 or h.high <= 0
    if symmetric or one_signed:
        counts, width = h.abs_histogram()
        t, kept, clipped = _mse_terms(counts, _magnitude(h), width)
        span = 2 * t if symmetric else t
        errors = kept * (span / (levels - 1)) ** 2 / 12 + clipped
        best = t[int(np.argmin(errors))] * width
        return _clip(h, -best, best)
    positive, width = h.abs_histogram(side="positive")
    negative, _ = h.abs_histogram(side="negative")
    t_pos, kept_pos, clipped_pos = _mse_terms(positive, h.high, width)
    t_neg, kept_neg, clipped_neg = _mse_terms(negative, -h.low, width)
    best_pos = best_neg = 0.0
    best_error = np.inf
    rows = max(1, _MSE_BLOCK // t_pos.size)
    for s in range(0, t_neg.size, rows):  # (negative × positive) candidates, block by block
        neg = slice(s, s + rows)
        step = (t_neg[neg, None] + t_pos[None, :]) / (levels - 1)
        kept = kept_neg[neg, None] + kept_pos[None, :]
        errors = kept * step**2 / 12 + clipped_neg[neg, None] + clipped_pos[None, :]
        i, j = np.unravel_index(int(np.argmin(errors)), errors.shape)
        if errors[i, j] < best_error:
            best_error, best_neg, best_pos = errors[i, j], t_neg[s + i], t_pos[j]
    return _clip(h, -best_neg * width, best_pos * width)
