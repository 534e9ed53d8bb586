"""How a candidate's outputs score against the float model's (see
:class:`onnxquant.target.spec.AccuracyTarget` for the metrics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxquant.core.errors import QuantizationError
from onnxquant.core.metrics import MAX_CLASS_RANK, ErrorAccumulator, cosine

__all__ = ["score", "Metric", "METRICS"]

Outputs = Sequence[dict[str, np.ndarray]]
Metric = Callable[[Outputs, Outputs], float]
METRICS = ("cosine", "argmax", "sqnr")


def _flat(sample: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(sample[n], np.float64).ravel() for n in names])


def score(metric: str | Metric, reference: Outputs, candidate: Outputs) -> float:
    """The candidate's score against the reference (higher is better)."""
    if callable(metric):
        return float(metric(reference, candidate))
    names = list(reference[0]) if reference else []
    if metric == "cosine":
        return float(np.mean([cosine(_flat(r, names), _flat(c, names))
                              for r, c in zip(reference, candidate, strict=True)]))
    if metric == "sqnr":
        acc = ErrorAccumulator(agreement=False)
        for r, c in zip(reference, candidate, strict=True):
            acc.update(_flat(r, names), _flat(c, names))
        return acc.sqnr_db
    agree = positions = 0
    for r, c in zip(reference, candidate, strict=True):
        for name in names:
            x, y = np.asarray(r[name]), np.asarray(c[name])
            if 1 <= x.ndim <= MAX_CLASS_RANK and x.shape[-1] > 1 and x.shape == y.shape:
                agree += int(np.sum(np.argmax(x, -1) == np.argmax(y, -1)))
                positions += x.size // x.shape[-1]
    if not positions:
        raise QuantizationError("the argmax metric needs an output whose last axis holds "
                                "classes (rank 1 to 3, more than one class)")
    return agree / positions
