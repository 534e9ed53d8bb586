"""onnxruntime's histogram calibrators (Entropy, Percentile, Distribution).

Statistics are onnxquant's streaming :class:`~onnxquant.calibration.histogram.HistogramObserver`
per tensor (tensors inside Loop/Scan bodies only have min/max pairs and get their observed
range). Successive :meth:`collect_data` calls add to the same histograms.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.methods import distribution_stats, entropy_range, percentile_range
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.core.errors import CalibrationError
from onnxquant.ort._calib_enum import CalibrationMethod
from onnxquant.ort._calibrators import CalibraterBase
from onnxquant.ort._tensors_data import TensorData, TensorsData

__all__ = [
    "HistogramCalibrater",
    "EntropyCalibrater",
    "PercentileCalibrater",
    "DistributionCalibrater",
]

_METHODS = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "distribution": CalibrationMethod.Distribution}
_F32 = np.float32


class HistogramCalibrater(CalibraterBase):
    """Ranges derived from a histogram of each tensor's values.

    Args:
        method: ``"entropy"``, ``"percentile"`` or ``"distribution"``.
        num_bins: Histogram resolution (at most this many bins).
        num_quantized_bins: Entropy: levels the KL search quantizes the kept range to.
        percentile: Percentile: share of the values kept, in (0, 100].
        scenario: Distribution: ``"same"`` (moments of the values) or ``"p3"`` (moments of
            ``sign(x) * |x|**(1/3)``, from the bin centres).
    """

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 use_external_data_format: bool = False, method: str = "percentile",
                 symmetric: bool = False, num_bins: int = 128, num_quantized_bins: int = 2048,
                 percentile: float = 99.999, scenario: str = "same") -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path, symmetric,
                         use_external_data_format)
        if method not in _METHODS:
            raise ValueError(f"Unknown method {method!r}; use one of {sorted(_METHODS)}")
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if scenario not in ("same", "p3"):
            raise ValueError(f"Unknown scenario {scenario!r}; use 'same' or 'p3'")
        self.method = method
        self.num_bins = int(num_bins)
        self.num_quantized_bins = int(num_quantized_bins)
        self.percentile = percentile
        self.scenario = scenario

    def _new_observer(self, kind: str) -> Any:
        if kind == "values":
            return HistogramObserver(max_bins=self.num_bins,
                                     moments=self.method == "distribution")
        return MinMaxObserver()

    def compute_data(self) -> TensorsData:
        """Statistics per tensor (``lowest``, ``highest``, ``hist``, ``bins``; Distribution
        also ``avg``, ``std``, ``hist_edges``).

        Raises:
            CalibrationError: Nothing was collected.
        """
        if not self._observers:
            raise CalibrationError("No data is collected: call collect_data(reader) first.")
        data = {}
        for name, obs in self._observers.items():
            if not obs.observed:
                continue
            if isinstance(obs, MinMaxObserver):
                low, high = obs.result()
                data[name] = TensorData(lowest=_F32(low), highest=_F32(high))
            else:
                data[name] = self._tensor_data(obs)
        return TensorsData(_METHODS[self.method], data)

    def _tensor_data(self, h: HistogramObserver) -> TensorData:
        hist, edges = h.counts.copy(), h.edges()
        if self.method == "distribution":
            avg, std = self._moments(h)
            return TensorData(avg=_F32(avg), std=_F32(std), hist=hist,
                              hist_edges=edges.astype(_F32), lowest=_F32(edges.min()),
                              highest=_F32(edges.max()))
        if self.method == "entropy":  # as in onnxruntime, `symmetric` does not apply
            low, high = entropy_range(h, self.num_quantized_bins, symmetric=True, min_kept=0)
        else:
            low, high = percentile_range(h, self.percentile, symmetric=self.symmetric)
        return TensorData(lowest=_F32(low), highest=_F32(high), hist=hist,
                          bins=edges.astype(_F32))

    def _moments(self, h: HistogramObserver) -> tuple[float, float]:
        if self.scenario == "same":
            return distribution_stats(h)
        edges = h.edges()
        centres = (edges[:-1] + edges[1:]) / 2
        values = np.sign(centres) * np.abs(centres) ** (1 / 3)
        weights = h.counts.astype(np.float64)
        avg = float(np.average(values, weights=weights))
        std = float(np.sqrt(np.average((values - avg) ** 2, weights=weights)))
        return avg, std


class EntropyCalibrater(HistogramCalibrater):
    """KL-divergence (TensorRT-style) thresholds, symmetric on ``|x|``, clipped to the observed
    range."""

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 use_external_data_format: bool = False, method: str = "entropy",
                 symmetric: bool = False, num_bins: int = 128,
                 num_quantized_bins: int = 128) -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path,
                         use_external_data_format, method=method, symmetric=symmetric,
                         num_bins=num_bins, num_quantized_bins=num_quantized_bins)


class PercentileCalibrater(HistogramCalibrater):
    """Ranges holding ``percentile`` % of the values (on ``|x|`` when symmetric)."""

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 use_external_data_format: bool = False, method: str = "percentile",
                 symmetric: bool = False, num_bins: int = 2048,
                 percentile: float = 99.999) -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path,
                         use_external_data_format, method=method, symmetric=symmetric,
                         num_bins=num_bins, percentile=percentile)


class DistributionCalibrater(HistogramCalibrater):
    """Mean and standard deviation per tensor (float8 scales)."""

    def __init__(self, model_path: Any, op_types_to_calibrate: Any = None,
                 augmented_model_path: str | os.PathLike = "augmented_model.onnx",
                 use_external_data_format: bool = False, method: str = "distribution",
                 num_bins: int = 128, scenario: str = "same") -> None:
        super().__init__(model_path, op_types_to_calibrate, augmented_model_path,
                         use_external_data_format, method=method, num_bins=num_bins,
                         scenario=scenario)
