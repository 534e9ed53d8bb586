"""Streaming, mergeable range observers.

An observer keeps fixed-size state per tensor, updated batch by batch (``update``), combined
across shards (``merge``) and turned into a float range (``result``). Memory does not depend on
the number of calibration samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["MinMaxObserver"]


@dataclasses.dataclass
class MinMaxObserver:
    """Running minimum and maximum of a tensor.

    ``update`` takes the ``(min, max)`` pairs the augmented model produces for one batch (any
    shape ending in 2; empty arrays and ``(+inf, -inf)`` rows — an untaken If branch, an
    empty tensor — carry no data). Batches whose range is NaN or ±Inf are counted in
    ``nonfinite_batches`` and left out of the range.

    Attributes:
        symmetric: Report ``(-m, m)`` with ``m = max(|min|, |max|)``.
        moving_average: Track an exponential moving average of the per-batch ranges instead of
            the global extremes.
        averaging_constant: Weight of the newest batch in the moving average.
    """

    symmetric: bool = False
    moving_average: bool = False
    averaging_constant: float = 0.01
    low: float = np.inf
    high: float = -np.inf
    batches: int = 0
    nonfinite_batches: int = 0

    def update(self, pairs: np.ndarray) -> None:
        """Fold one batch's ``(min, max)`` pairs into the running range."""
        pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        no_data = (pairs[:, 0] == np.inf) & (pairs[:, 1] == -np.inf)  # untaken branch, empty
        pairs = pairs[~no_data]
        if pairs.size == 0:
            return
        low, high = float(pairs[:, 0].min()), float(pairs[:, 1].max())
        if not (np.isfinite(low) and np.isfinite(high)):
            self.nonfinite_batches += 1
            return
        if self.moving_average and self.batches:
            c = self.averaging_constant
            self.low = (1 - c) * self.low + c * low
            self.high = (1 - c) * self.high + c * high
        else:
            self.low, self.high = min(self.low, low), max(self.high, high)
        self.batches += 1

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """Combine with an observer of another stream (same settings); returns self."""
        if other.batches:
            if self.moving_average and self.batches:
                total = self.batches + other.batches
                self.low = (self.low * self.batches + other.low * other.batches) / total
                self.high = (self.high * self.batches + other.high * other.batches) / total
            else:
                self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.batches += other.batches
        self.nonfinite_batches += other.nonfinite_batches
        return self

    def to_dict(self) -> dict:
        """JSON-compatible state (for calibration caches)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MinMaxObserver:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    @property
    def observed(self) -> bool:
        """Whether at least one finite batch was seen."""
        return self.batches > 0

    def result(self) -> tuple[float, float]:
        """The calibrated ``(min, max)``; raises ValueError when nothing was observed."""
        if not self.observed:
            raise ValueError("no finite values were observed")
        if self.symmetric:
            m = max(abs(self.low), abs(self.high))
            return -m, m
        return self.low, self.high
