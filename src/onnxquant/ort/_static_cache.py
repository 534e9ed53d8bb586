"""``quantize_static(..., calibration_cache_path=...)`` with onnxruntime's cache semantics.

The cache is onnxruntime's JSON file (:func:`~onnxquant.ort._calib_cache.save_tensors_data`):
the final range of every calibrated tensor, the calibration method and the ``smooth_quant``
flag. onnxquant's native quantizer keeps its own statistics cache, so this module translates:

* **Hit** (the file exists and its ``smooth_quant`` flag matches): the cached ranges become a
  native MinMax statistics cache in a temporary folder, and the model is quantized with exactly
  those ranges; the reader is not used for calibration. A cache made with another calibration
  method is refused (:class:`CalibrationCacheError`, a ``ValueError``).
* **Miss** (no file, or made with the other ``smooth_quant`` setting — a warning says so): the
  native quantizer calibrates, keeping its statistics in a temporary native cache; the ranges
  it derived from them are written to ``calibration_cache_path`` (also when quantization fails
  after calibration, as onnxruntime saves the cache before quantizing).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxquant.calibration.cache import load_cache, save_cache
from onnxquant.calibration.histogram import HistogramObserver
from onnxquant.calibration.methods import distribution_stats
from onnxquant.calibration.observers import MinMaxObserver
from onnxquant.calibration.settings import CalibrationMethod as NativeMethod
from onnxquant.calibration.settings import CalibrationSettings, Observer, tensor_range
from onnxquant.core.errors import CalibrationError
from onnxquant.ort._calib_cache import cached_smooth_quant, load_tensors_data, save_tensors_data
from onnxquant.ort._calib_enum import CalibrationMethod
from onnxquant.ort._tensors_data import TensorData, TensorsData
from onnxquant.static import api
from onnxquant.static.config import StaticQuantConfig

__all__ = ["CalibrationCacheError", "check_calibration_source", "quantize_with_cache"]

logger = logging.getLogger(__name__)

_F32 = np.float32
_NATIVE_FILE = "statistics.json"


class CalibrationCacheError(CalibrationError, ValueError):
    """No calibration data and no usable cache, or a cache made with another method
    (a ``ValueError``, as onnxruntime raises)."""


def check_calibration_source(reader: Any, *, smooth_quant: bool) -> None:
    """Refuse a run without calibration data (a cache cannot stand in for it when it is
    missing or stale, nor ever with SmoothQuant, which needs the data to smooth the model).

    Raises:
        CalibrationCacheError: ``reader`` is None.
    """
    if reader is None and smooth_quant:
        raise CalibrationCacheError(
            "SmoothQuant needs a calibration_data_reader: the calibration cache stores ranges "
            "only and cannot drive the smoothing")
    if reader is None:
        raise CalibrationCacheError(
            "no calibration data was given: either calibration_data_reader or an existing "
            "calibration_cache_path must be provided")


def quantize_with_cache(model_input: Any, model_output: str | os.PathLike, reader: Any,
                        config: StaticQuantConfig, cache_path: str | os.PathLike,
                        method: CalibrationMethod) -> api.QuantizationResult:
    """Quantize with ``config``, reusing or writing onnxruntime's cache at ``cache_path``.

    Args:
        model_input: Path or ``onnx.ModelProto``.
        model_output: Where to write the quantized model.
        reader: Calibration data (may be None on a cache hit).
        config: The native config (its ``calibration_cache`` is ignored).
        cache_path: onnxruntime's calibration cache file.
        method: The calibration method asked for.

    Raises:
        CalibrationCacheError: The cache was made with another method, or it is missing (or
            stale) and there is no reader.
    """
    if config.smooth_quant:
        check_calibration_source(reader, smooth_quant=True)
    path = Path(cache_path)
    if path.exists() and not path.is_file():
        raise CalibrationCacheError(f"calibration_cache_path is not a file: {path}")
    cached = _usable_cache(path, config.smooth_quant, method)
    with tempfile.TemporaryDirectory(prefix="onnxquant-ort-cache-") as folder:
        native = Path(folder) / _NATIVE_FILE
        if cached is not None:
            return api.quantize_static(model_input, model_output, reader,
                                       _config_for_ranges(cached, config, native))
        check_calibration_source(reader, smooth_quant=config.smooth_quant)
        run_config = dataclasses.replace(config, calibration_cache=native)
        try:
            return api.quantize_static(model_input, model_output, reader, run_config)
        finally:
            if native.exists():
                save_tensors_data(_from_native(native, run_config.calibration_settings(), method),
                                  path, smooth_quant=config.smooth_quant)
                logger.info("calibration ranges saved to '%s'", path)


def _usable_cache(path: Path, smooth_quant: bool, method: CalibrationMethod
                  ) -> TensorsData | None:
    """The cached ranges when the cache exists and was made with this ``smooth_quant``."""
    if not path.is_file():
        return None
    stored = cached_smooth_quant(path)
    if stored != smooth_quant:
        logger.warning("Calibration cache at %s was produced with smooth_quant=%s; this run uses "
                       "smooth_quant=%s. Recomputing the ranges and overwriting the cache.",
                       path, stored, smooth_quant)
        return None
    cached = load_tensors_data(path)
    if getattr(cached.calibration_method, "name", None) != method.name:
        raise CalibrationCacheError(
            f"Calibration cache at {path} was produced with {cached.calibration_method}, but "
            f"quantize_static was called with calibrate_method={method}. Delete the cache or "
            "pass a matching calibrate_method.")
    logger.info("calibration ranges loaded from '%s'", path)
    return cached


def _config_for_ranges(cached: TensorsData, config: StaticQuantConfig, native: Path
                       ) -> StaticQuantConfig:
    """A config that quantizes with exactly the cached ranges: MinMax over a native cache
    holding one observation ``(lowest, highest)`` per tensor."""
    exact = dataclasses.replace(config, calibration_method=NativeMethod.MINMAX,
                                symmetric_ranges=False, moving_average=False,
                                calibration_cache=native)
    statistics: dict[str, Observer] = {
        name: _observer(data) for name, data in cached.items()
        if hasattr(data, "lowest") and hasattr(data, "highest")}
    save_cache(native, statistics, 0, exact.calibration_settings())
    return exact


def _observer(data: TensorData) -> MinMaxObserver:
    """An observer that reports ``data``'s range (unobserved when it is not finite)."""
    lowest, highest = data.range_value
    low = float(np.min(np.asarray(lowest, np.float64)))
    high = float(np.max(np.asarray(highest, np.float64)))
    if not (np.isfinite(low) and np.isfinite(high)):
        return MinMaxObserver()
    return MinMaxObserver(low=low, high=high, batches=1)


def _from_native(native: Path, settings: CalibrationSettings, method: CalibrationMethod
                 ) -> TensorsData:
    """onnxruntime's ``TensorsData`` of the ranges the native statistics give."""
    statistics, _ = load_cache(native, settings, set())
    data = {name: _tensor_data(obs, settings) for name, obs in statistics.items()
            if obs.observed}
    return TensorsData(method, data)


def _tensor_data(observer: Observer, settings: CalibrationSettings) -> TensorData:
    low, high = tensor_range(observer, settings)
    fields: dict[str, Any] = {"lowest": np.array(low, _F32), "highest": np.array(high, _F32)}
    if isinstance(observer, HistogramObserver):
        fields.update(hist=observer.counts.copy(), hist_edges=observer.edges().astype(_F32))
        if observer.moments:
            avg, std = distribution_stats(observer)
            fields.update(avg=np.array(avg, _F32), std=np.array(std, _F32))
    return TensorData(**fields)
