"""Streaming error measures between a reference tensor and a candidate.

One :class:`ErrorAccumulator` per tensor takes one sample at a time and keeps a few float64
sums, so memory does not grow with the number of samples:

- **SQNR** (dB) over all samples together: ``10·log10(Σ x² / Σ (x − y)²)``, which is
  ``20·log10(‖x‖ / ‖x − y‖)`` of the concatenated samples (onnxruntime's
  ``compute_signal_to_quantization_noice_ratio``, same epsilon guard);
- **cosine**: the mean over samples of the cosine similarity of the flattened tensors;
- **argmax agreement**: the fraction of positions whose argmax over the last axis agrees (float
  tensors of rank 1 to 3 whose last axis is longer than 1); for integer or boolean tensors
  (class ids, masks), the fraction of equal elements.

Candidate values that are NaN or infinite where the reference is finite count as unbounded
error: the SQNR is ``-inf`` and :attr:`ErrorAccumulator.nonfinite` counts them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EPS", "MAX_CLASS_RANK", "ErrorAccumulator", "sqnr_db", "cosine"]

MAX_CLASS_RANK = 3
"""Argmax agreement is measured for float tensors of rank 1 to 3 (scores ``[C]``, ``[N, C]``,
``[N, T, C]``): the last axis of a rank-4 map (``[N, C, H, W]``) is a width, not classes."""

EPS = float(np.finfo(np.float64).eps)
"""Norms below this count as this (onnxruntime's guard against log of zero)."""


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """``20·log10(max(‖x‖, eps) / max(‖x − y‖, eps))`` of the flattened arrays, in float64."""
    acc = ErrorAccumulator(agreement=False)
    acc.update(np.asarray(reference, np.float64), np.asarray(candidate, np.float64))
    return acc.sqnr_db


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (1.0 when both are zero)."""
    x = np.asarray(reference, dtype=np.float64).ravel()
    y = np.asarray(candidate, dtype=np.float64).ravel()
    return _cosine_from(float(np.dot(x, y)), float(np.dot(x, x)), float(np.dot(y, y)))


def _cosine_from(xy: float, xx: float, yy: float) -> float:
    nx, ny = math.sqrt(xx), math.sqrt(yy)
    if nx < EPS and ny < EPS:
        return 1.0
    if nx < EPS or ny < EPS:
        return 0.0
    return max(-1.0, min(1.0, xy / (nx * ny)))


def _sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """``(x·x, y·y, x·y, (x−y)·(x−y))``; a float32 sum that overflows is redone in float64."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: handled by the caller
        diff = x - y
    sums = (float(np.dot(x, x)), float(np.dot(y, y)), float(np.dot(x, y)),
            float(np.dot(diff, diff)))
    if x.dtype != np.float64 and not all(math.isfinite(v) for v in sums) and \
            np.isfinite(x).all() and np.isfinite(y).all():
        return _sums(x.astype(np.float64), y.astype(np.float64))
    return sums


def _flat_float(a: np.ndarray) -> np.ndarray:
    """A flat float view: float32/float64 kept, everything else (ints, float16) as float64."""
    if a.dtype in (np.float32, np.float64):
        return a.ravel()
    return a.astype(np.float64).ravel()


class ErrorAccumulator:
    """SQNR, cosine and argmax agreement of a candidate against a reference, one sample at a
    time (see the module docstring)."""

    def __init__(self, *, agreement: bool = True) -> None:
        self.agreement = agreement
        self.signal = 0.0
        self.noise = 0.0
        self.cosine_sum = 0.0
        self.samples = 0
        self.agree = 0
        self.positions = 0
        self.nonfinite = 0
        self.elements = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one sample (the arrays must hold the same number of elements).

        Sums are taken with BLAS dot products on the arrays' own float type (float32 for
        float32 tensors) and accumulated in float64; non-finite positions are dropped.
        """
        ref = np.asarray(reference)
        cand = np.asarray(candidate)
        x, y = _flat_float(ref), _flat_float(cand)
        if x.size != y.size:
            raise ValueError(f"reference has {x.size} elements, candidate {y.size}")
        self.elements += x.size
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        sums = _sums(x, y)
        if not all(math.isfinite(v) for v in sums):  # rare: drop non-finite positions
            bad = ~np.isfinite(y) & np.isfinite(x)
            self.nonfinite += int(bad.sum())
            keep = np.isfinite(x) & np.isfinite(y)
            sums = _sums(x[keep].astype(np.float64), y[keep].astype(np.float64))
        xx, yy, xy, dd = sums
        self.signal += xx
        self.noise += dd
        self.cosine_sum += _cosine_from(xy, xx, yy)
        self.samples += 1
        if self.agreement:
            self._update_agreement(ref, cand)

    def _update_agreement(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.dtype.kind in "iub":
            self.agree += int(np.sum(ref == cand))
            self.positions += ref.size
        elif 1 <= ref.ndim <= MAX_CLASS_RANK and ref.shape[-1] > 1 and ref.shape == cand.shape:
            self.agree += int(np.sum(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
            self.positions += ref.size // ref.shape[-1]

    def merge(self, other: ErrorAccumulator) -> None:
        """Fold another accumulator of the same tensor into this one."""
        for field in ("signal", "noise", "cosine_sum", "samples", "agree", "positions",
                      "nonfinite", "elements"):
            setattr(self, field, getattr(self, field) + getattr(other, field))

    @property
    def sqnr_db(self) -> float:
        """SQNR over all samples (``-inf`` when the candidate has non-finite values)."""
        if self.nonfinite:
            return -math.inf
        signal = max(math.sqrt(self.signal), EPS)
        noise = max(math.sqrt(self.noise), EPS)
        return 20.0 * math.log10(signal / noise)

    @property
    def cosine(self) -> float:
        """Mean per-sample cosine similarity (NaN before the first sample)."""
        return self.cosine_sum / self.samples if self.samples else math.nan

    @property
    def argmax_agreement(self) -> float | None:
        """Fraction of agreeing argmax positions (or equal elements for integer tensors);
        None when the tensor has no class axis."""
        return self.agree / self.positions if self.positions else None
