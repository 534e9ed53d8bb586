"""GPTQ input Hessians ``H = 2/n Σ xᵀx``: streamed from calibration rows, formed late, freed early.

A ``K x K`` float64 Hessian is 8 K² bytes; ``n`` calibration rows of K float32 values are 4 n K
bytes. For the large layers that dominate a model's memory, ``n`` is usually below K, so an
accumulator keeps the rows themselves (as float32) and forms ``H`` only when asked, in one BLAS
product, right before its weight is quantized. Once the buffered rows would take a quarter of
the Hessian's memory (``n >= K / 2``) they are folded into a float64 running sum instead, so the
memory per accumulator never exceeds about 1.25x the dense Hessian.

Each weight gets its input's accumulator (:class:`HessianStore`) and forms the Hessian only while
it is quantized (``gptq.quantize_gptq`` frees it as soon as it is factorised), so one Hessian is
alive at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

__all__ = ["HessianAccumulator", "HessianStore"]

_UPDATE_ELEMENTS = 1 << 22  # float64 values converted at a time when folding: 32 MB


class HessianAccumulator:
    """Streaming ``H = 2/n Σ xᵀx`` over all rows ``x`` of the inputs of one weight (float64)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._k = k
        self._sum: np.ndarray | None = None  # float64 Σ xᵀx of the folded rows
        self._rows: list[np.ndarray] = []  # float32 rows not folded yet
        self._pending = 0
        self._n = 0

    @property
    def k(self) -> int:
        return self._k

    @property
    def samples(self) -> int:
        """Number of rows (input vectors) seen so far."""
        return self._n

    def update(self, x: np.ndarray) -> None:
        """Add the rows of ``x[..., K]`` (any leading dimensions; copied)."""
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self._k:
            raise ValueError(f"expected inputs with last dimension {self._k}, got shape {x.shape}")
        rows = x.reshape(-1, self._k).astype(np.float32)
        if not np.isfinite(rows).all():
            raise ValueError("calibration inputs contain NaN or Inf")
        self._add_rows([rows], rows.shape[0])

    def merge(self, other: HessianAccumulator) -> None:
        """Add the rows another accumulator of the same K has seen."""
        if other.k != self._k:
            raise ValueError(f"cannot merge a Hessian of K={other.k} into one of K={self._k}")
        if other._sum is not None:
            self._dense()[...] += other._sum
        self._n += other._n - other._pending
        self._add_rows(list(other._rows), other._pending)

    def hessian(self) -> np.ndarray:
        """``2/n Σ xᵀx`` as float64 ``[K, K]`` (a new array the caller may modify)."""
        if self._n == 0:
            raise ValueError("no calibration inputs were accumulated for this weight")
        if self._sum is None:
            h = _gram(self._rows, self._k)
        else:
            self._fold()
            h = self._sum.copy()
        h *= 2.0 / self._n
        return h

    def _add_rows(self, rows: list[np.ndarray], count: int) -> None:
        self._rows.extend(rows)
        self._pending += count
        self._n += count
        if 2 * self._pending >= self._k:
            self._fold()

    def _dense(self) -> np.ndarray:
        if self._sum is None:
            self._sum = np.zeros((self._k, self._k), dtype=np.float64)
        return self._sum

    def _fold(self) -> None:
        if self._rows:
            self._dense()[...] += _gram(self._rows, self._k)
            self._rows, self._pending = [], 0


def _gram(parts: list[np.ndarray], k: int) -> np.ndarray:
    """``Σ xᵀx`` in float64 over the rows of ``parts`` (each ``[rows, K]`` float32)."""
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    step = max(1, _UPDATE_ELEMENTS // k)
    out = None
    for i in range(0, rows.shape[0], step):
        chunk = rows[i : i + step].astype(np.float64)
        if out is None:
            out = chunk.T @ chunk  # no K x K temporary for the first (often only) chunk
        else:
            out += chunk.T @ chunk
    assert out is not None
    return out


class HessianStore:
    """Accumulators by input name for a known sequence of users; each is dropped by the store
    at its last use, so its rows are freed once that weight is quantized.

    Args:
        accumulators: One accumulator per input name (taken over by the store).
        users: The input name of every weight that will ask, with repeats.
    """

    def __init__(self, accumulators: dict[str, HessianAccumulator], users: Iterable[str]) -> None:
        self._accumulators = dict(accumulators)
        self._left = Counter(name for name in users if name in self._accumulators)

    def take(self, name: str) -> HessianAccumulator | None:
        """The accumulator of ``name`` (None if there is none)."""
        accumulator = self._accumulators.get(name)
        if accumulator is not None:
            self._left[name] -= 1
            if self._left[name] <= 0:
                del self._accumulators[name]
        return accumulator

    def clear(self) -> None:
        self._accumulators.clear()
