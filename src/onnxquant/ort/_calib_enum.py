"""onnxruntime's ``CalibrationMethod`` enum (re-exported by :mod:`onnxquant.ort.calibrate`)."""

from __future__ import annotations

import enum

__all__ = ["CalibrationMethod"]


class CalibrationMethod(enum.Enum):
    """How activation ranges are found, as in onnxruntime (``MinMax`` = 0 … ``Distribution`` = 3).

    ``quantize_static`` maps each member to onnxquant's method of the same name.
    """

    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3
