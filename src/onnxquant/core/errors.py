"""The small error hierarchy of onnxquant.

Every error says what was wrong, where (file, node, tensor or input name) and how to fix it.
Lower-level exceptions are chained with ``raise ... from err``.
"""

from __future__ import annotations

__all__ = [
    "QuantizationError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CalibrationError",
    "FeedError",
    "EvaluationError",
    "NumericsError",
    "OutputPathError",
]


class QuantizationError(Exception):
    """Base class of every error raised by onnxquant."""


class ModelLoadError(QuantizationError):
    """The model file or object could not be read."""


class UnsupportedModelError(QuantizationError):
    """The model is valid ONNX but outside what can be quantized (e.g. opset below 10)."""


class CalibrationError(QuantizationError):
    """Calibration could not produce ranges (empty reader, failed inference, NaN/Inf ranges)."""


class FeedError(CalibrationError):
    """A calibration feed does not match the model's inputs (name, dtype or rank)."""


class EvaluationError(QuantizationError):
    """The float and the quantized model could not be compared on the evaluation data
    (onnxruntime failed on a feed, or the outputs do not match)."""


class NumericsError(QuantizationError, ValueError):
    """A numeric input cannot be quantized (NaN/Inf values, invalid range or scale)."""


class OutputPathError(QuantizationError):
    """The output path is unusable (equal to the input model, missing folder, ...)."""
