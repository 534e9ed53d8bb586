"""Drop-in replacement for ``onnxruntime.quantization``: change the import, keep the code.

``from onnxquant.ort import quantize_static, QuantFormat, QuantType, CalibrationMethod,
CalibrationDataReader`` gives onnxruntime's names, signatures, enum values and ``extra_options``
keys, backed by onnxquant's static QDQ quantizer. Module paths mirror onnxruntime's:
:mod:`onnxquant.ort.quantize`, :mod:`onnxquant.ort.quant_utils`, :mod:`onnxquant.ort.calibrate`,
:mod:`onnxquant.ort.shape_inference` (``quant_pre_process``; its command line is
``python -m onnxquant.ort.preprocess``).

What is supported, what differs on purpose and how each ``extra_options`` key is handled is
listed in :mod:`onnxquant.ort.quantize` and :mod:`onnxquant.ort._options`. This package never
imports ``onnxruntime.quantization``.
"""

from __future__ import annotations

from onnxquant.ort._qdq_config import get_qdq_config
from onnxquant.ort.calibrate import (
    CalibraterBase,
    CalibrationDataReader,
    CalibrationMethod,
    EntropyCalibrater,
    MinMaxCalibrater,
    PercentileCalibrater,
    create_calibrator,
    load_tensors_data,
    save_tensors_data,
)
from onnxquant.ort.qdq_quantizer import QDQQuantizer
from onnxquant.ort.quant_utils import (
    QuantFormat,
    QuantizationMode,
    QuantType,
    write_calibration_table,
)
from onnxquant.ort.quantize import (
    DynamicQuantConfig,
    QuantConfig,
    StaticQuantConfig,
    quantize,
    quantize_dynamic,
    quantize_static,
)
from onnxquant.ort.shape_inference import quant_pre_process

__all__ = [
    "quantize_static",
    "quantize_dynamic",
    "quantize",
    "get_qdq_config",
    "QDQQuantizer",
    "DynamicQuantConfig",
    "QuantConfig",
    "StaticQuantConfig",
    "QuantFormat",
    "QuantType",
    "QuantizationMode",
    "CalibrationMethod",
    "CalibrationDataReader",
    "quant_pre_process",
    "CalibraterBase",
    "MinMaxCalibrater",
    "EntropyCalibrater",
    "PercentileCalibrater",
    "create_calibrator",
    "write_calibration_table",
    "load_tensors_data",
    "save_tensors_data",
]
