"""Calibration names of ``onnxruntime.quantization.calibrate``.

:class:`CalibrationDataReader` is onnxquant's own reader base class, which already follows
onnxruntime's interface (``get_next()`` returning a feed dict or ``None``); any object with a
callable ``get_next`` counts as one, including subclasses of onnxruntime's class.
"""

from __future__ import annotations

import enum

from onnxquant.calibration.readers import CalibrationDataReader

__all__ = ["CalibrationMethod", "CalibrationDataReader"]


class CalibrationMethod(enum.Enum):
    """How activation ranges are found, as in onnxruntime (``MinMax`` = 0 … ``Distribution`` = 3).

    This version implements ``MinMax`` only; the others raise a
    :class:`~onnxquant.core.errors.QuantizationError` in :func:`onnxquant.ort.quantize_static`.
    """

    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3
