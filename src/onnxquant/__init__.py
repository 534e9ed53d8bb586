"""onnxquant: quantize ONNX models for ONNX Runtime.

The native API is typed: ``quantize_static(model_in, model_out, calibration_data, config)`` with
a :class:`StaticQuantConfig`, ``quantize_dynamic(model_in, model_out, config)`` with a
:class:`DynamicQuantConfig`, and ``quantize_weights(model_in, model_out, config)`` (block-wise
2/4/8-bit weight-only) with a :class:`WeightOnlyConfig`. ``preprocess(model_in, model_out,
config)`` with a :class:`PreprocessConfig` prepares a float model first (shapes inferred, graph
optimized). Code written for ``onnxruntime.quantization`` runs unchanged with
``onnxquant.ort``.
"""

from __future__ import annotations

from onnxquant.calibration.readers import CalibrationDataReader
from onnxquant.calibration.runner import CalibrationResult
from onnxquant.core.errors import (
    CalibrationError,
    FeedError,
    ModelLoadError,
    NumericsError,
    OutputPathError,
    QuantizationError,
    UnsupportedModelError,
)
from onnxquant.core.objective import Objective
from onnxquant.core.plan import QuantPlan
from onnxquant.core.qtypes import (
    FLOAT8E4M3FN,
    INT4,
    INT8,
    INT16,
    UINT4,
    UINT8,
    UINT16,
    PerAxis,
    PerBlock,
    PerTensor,
    QuantType,
)
from onnxquant.debug import ComparisonReport, compare
from onnxquant.dynamic.api import DynamicQuantizationResult, quantize_dynamic
from onnxquant.dynamic.config import DynamicQuantConfig

# ``onnxquant.preprocess`` is the function; the subpackage of the same name stays importable
# by module path (``from onnxquant.preprocess.passes import ...``), never as an attribute.
from onnxquant.preprocess.api import preprocess
from onnxquant.preprocess.config import PreprocessConfig
from onnxquant.preprocess.result import PreprocessResult
from onnxquant.static.api import QuantizationResult, calibrate, quantize_static
from onnxquant.static.config import (
    CalibrationMethod,
    QuantFormat,
    StaticQuantConfig,
    TensorConvert,
    TensorOverride,
)
from onnxquant.target import AccuracyTarget
from onnxquant.weight_only.api import WeightOnlyResult, quantize_weights
from onnxquant.weight_only.config import (
    GPTQSettings,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
    WeightOnlyConfigError,
)

__version__ = "0.1.0"

__all__ = [
    "preprocess",
    "PreprocessConfig",
    "PreprocessResult",
    "quantize_static",
    "quantize_dynamic",
    "quantize_weights",
    "compare",
    "ComparisonReport",
    "AccuracyTarget",
    "DynamicQuantConfig",
    "DynamicQuantizationResult",
    "calibrate",
    "WeightOnlyConfig",
    "WeightOnlyAlgorithm",
    "GPTQSettings",
    "WeightOnlyResult",
    "WeightOnlyConfigError",
    "CalibrationResult",
    "QuantizationResult",
    "StaticQuantConfig",
    "TensorOverride",
    "TensorConvert",
    "QuantFormat",
    "Objective",
    "CalibrationMethod",
    "CalibrationDataReader",
    "QuantPlan",
    "QuantType",
    "INT4",
    "UINT4",
    "INT8",
    "UINT8",
    "INT16",
    "UINT16",
    "FLOAT8E4M3FN",
    "PerTensor",
    "PerAxis",
    "PerBlock",
    "QuantizationError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CalibrationError",
    "FeedError",
    "NumericsError",
    "OutputPathError",
]
