"""Calibration names of ``onnxruntime.quantization.calibrate``.

:class:`CalibrationDataReader` is onnxquant's own reader base class, which already follows
onnxruntime's interface (``get_next()`` returning a feed dict or ``None``); any object with a
callable ``get_next`` counts as one, including subclasses of onnxruntime's class.

The calibrator classes (:class:`MinMaxCalibrater`, :class:`EntropyCalibrater`, ...) and
:func:`create_calibrator` have onnxruntime's signatures and return :class:`TensorsData`; they
run on onnxquant's calibration machinery (see :mod:`onnxquant.ort._calibrators` for the
differences, all deliberate).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from onnxquant.calibration.readers import CalibrationDataReader
from onnxquant.ort._calib_cache import entropy, load_tensors_data, rel_entr, save_tensors_data
from onnxquant.ort._calib_enum import CalibrationMethod
from onnxquant.ort._calibrators import CalibraterBase, MinMaxCalibrater
from onnxquant.ort._errors import InvalidOptionError
from onnxquant.ort._histogram_calibrators import (
    DistributionCalibrater,
    EntropyCalibrater,
    HistogramCalibrater,
    PercentileCalibrater,
)
from onnxquant.ort._tensors_data import TensorData, TensorsData

__all__ = [
    "CalibrationMethod",
    "CalibrationDataReader",
    "TensorData",
    "TensorsData",
    "CalibraterBase",
    "MinMaxCalibrater",
    "HistogramCalibrater",
    "EntropyCalibrater",
    "PercentileCalibrater",
    "DistributionCalibrater",
    "create_calibrator",
    "save_tensors_data",
    "load_tensors_data",
    "entropy",
    "rel_entr",
]

# extra_options keys create_calibrator reads per method, with onnxruntime's defaults.
_OPTIONS: dict[CalibrationMethod, dict[str, Any]] = {
    CalibrationMethod.MinMax: {"symmetric": False, "moving_average": False,
                               "averaging_constant": 0.01, "max_intermediate_outputs": None,
                               "per_channel": False},
    CalibrationMethod.Entropy: {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128},
    CalibrationMethod.Percentile: {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
    CalibrationMethod.Distribution: {"num_bins": 2048, "scenario": "same"},
}
_CLASSES: dict[CalibrationMethod, type[CalibraterBase]] = {
    CalibrationMethod.MinMax: MinMaxCalibrater,
    CalibrationMethod.Entropy: EntropyCalibrater,
    CalibrationMethod.Percentile: PercentileCalibrater,
    CalibrationMethod.Distribution: DistributionCalibrater,
}


def _method(value: Any) -> CalibrationMethod:
    if isinstance(value, CalibrationMethod):
        return value
    name = getattr(value, "name", value)  # onnxruntime's own enum members
    for member in CalibrationMethod:
        if name == member.name or value == member.value:
            return member
    raise InvalidOptionError(f"unknown calibrate_method {value!r}; use one of "
                             f"{', '.join(m.name for m in CalibrationMethod)}")


def create_calibrator(
    model: str | os.PathLike | Any,
    op_types_to_calibrate: Sequence[str] | None = None,
    augmented_model_path: str | os.PathLike = "augmented_model.onnx",
    calibrate_method: Any = CalibrationMethod.MinMax,
    use_external_data_format: bool = False,
    providers: Sequence[str] | None = None,
    extra_options: Mapping[str, Any] | None = None,
) -> CalibraterBase:
    """A calibrator for ``calibrate_method``, with its augmented model saved and its session
    created, as onnxruntime's ``create_calibrator`` does.

    Args:
        model: Path of the float model (or an ``onnx.ModelProto``).
        op_types_to_calibrate: Calibrate inputs/outputs of these op types only.
        augmented_model_path: Where the augmented model is saved.
        calibrate_method: A :class:`CalibrationMethod` (or onnxruntime's) member, name or value.
        use_external_data_format: Save the augmented model's weights as external data.
        providers: onnxruntime execution providers (CPU by default).
        extra_options: Per-method keys, as in onnxruntime: MinMax ``symmetric``,
            ``moving_average``, ``averaging_constant``, ``max_intermediate_outputs``,
            ``per_channel``; Entropy ``symmetric``, ``num_bins``, ``num_quantized_bins``;
            Percentile ``symmetric`` (default True), ``num_bins``, ``percentile``;
            Distribution ``num_bins`` (2048), ``scenario``.

    Raises:
        InvalidOptionError: An unknown method, or an extra option the method does not read.
    """
    method = _method(calibrate_method)
    options = dict(_OPTIONS[method])
    extra = dict(extra_options or {})
    unknown = sorted(set(extra) - set(options))
    if unknown:
        raise InvalidOptionError(
            f"extra_options {unknown} are not read by the {method.name} calibrator; "
            f"it reads {sorted(options)}")
    options.update(extra)
    calibrator = _CLASSES[method](
        model, op_types_to_calibrate, augmented_model_path,
        use_external_data_format=use_external_data_format, **options)
    calibrator.augment_graph()
    calibrator.set_execution_providers(list(providers) if providers else None)
    return calibrator
