"""Calibration settings, and turning collected statistics into ranges.

Every method reads the same streaming observers: MinMax uses (min, max) pairs reduced inside
the graph; the histogram methods (Entropy, Percentile, Distribution, MSE) use exactly mergeable
power-of-two histograms of the tensors' values. Tensors inside Loop/Scan bodies only have pairs
(their per-iteration shapes may differ), so they get MinMax ranges with any method.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.methods import (
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
)
from onnxquant.calibration.observers import MinMaxObserver

__all__ = ["CalibrationMethod", "CalibrationSettings", "Observer", "tensor_range"]

Observer = MinMaxObserver | HistogramObserver


class CalibrationMethod(enum.Enum):
    """How activation ranges are derived from calibration data."""

    MINMAX = "minmax"  # observed extremes (optionally moving average, symmetric)
    ENTROPY = "entropy"  # TensorRT-style KL-divergence threshold on |x|
    PERCENTILE = "percentile"  # cut the tails at a percentile
    DISTRIBUTION = "distribution"  # mean/std statistics (float8); int ranges are min/max
    MSE = "mse"  # threshold minimising the expected quantization error


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """Everything that determines the collected statistics and the ranges derived from them.

    Attributes:
        method: The calibration method.
        symmetric: Report ranges symmetric around 0 (``CalibTensorRangeSymmetric``).
        moving_average: MinMax: exponential moving average of per-batch ranges.
        averaging_constant: Weight of the newest batch in the moving average.
        percentile: Percentile method: the percentage of values kept inside the range.
        bins: Histogram resolution: at most this many bins over the observed range.
        quantized_bins: Entropy: number of quantized levels the KL search compares against.
        levels: MSE: number of levels of the target integer grid (256 for 8 bits).
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    symmetric: bool = False
    moving_average: bool = False
    averaging_constant: float = 0.01
    percentile: float = 99.999
    bins: int = 2048
    quantized_bins: int = 128
    levels: int = 256

    @property
    def wants_values(self) -> bool:
        """Whether the method needs histograms of the tensors' values (not only min/max)."""
        return self.method is not CalibrationMethod.MINMAX

    def new_observer(self, kind: str) -> Observer:
        """A fresh observer for an exposed tensor of ``kind`` (``"pair"`` or ``"values"``)."""
        if kind == "values":
            return HistogramObserver(max_bins=self.bins,
                                     moments=self.method is CalibrationMethod.DISTRIBUTION)
        return MinMaxObserver(moving_average=self.moving_average,
                              averaging_constant=self.averaging_constant)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (recorded in calibration caches)."""
        data = dataclasses.asdict(self)
        data["method"] = self.method.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationSettings:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "method": CalibrationMethod(data["method"])})


def _symmetric(low: float, high: float) -> tuple[float, float]:
    m = max(abs(low), abs(high))
    return -m, m


def tensor_range(observer: Observer, settings: CalibrationSettings) -> tuple[float, float]:
    """The calibrated ``(low, high)`` of one tensor under ``settings``."""
    if isinstance(observer, MinMaxObserver):
        low, high = observer.result()
        return _symmetric(low, high) if settings.symmetric else (low, high)
    method, sym = settings.method, settings.symmetric
    if method is CalibrationMethod.PERCENTILE:
        return percentile_range(observer, settings.percentile, symmetric=sym)
    if method is CalibrationMethod.ENTROPY:
        # An asymmetric grid spends all its levels on a one-signed tensor's [0, t].
        one_signed = observer.low >= 0 or observer.high <= 0
        bins = settings.quantized_bins * (2 if one_signed and not sym else 1)
        return entropy_range(observer, bins, symmetric=sym)
    if method is CalibrationMethod.MSE:
        return mse_range(observer, settings.levels, symmetric=sym)
    return minmax_range(observer, symmetric=sym)
