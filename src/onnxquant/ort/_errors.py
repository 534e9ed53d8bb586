"""Errors of the ORT-compatible layer that are also the builtin exceptions onnxruntime raises.

Code written for ``onnxruntime.quantization`` catches ``ValueError`` (bad option values or type
combinations) and ``TypeError`` (``quantize`` with an unknown config). These classes are both that
builtin and a :class:`~onnxquant.core.errors.QuantizationError`, so old and new handlers both work.
"""

from __future__ import annotations

from onnxquant.core.errors import QuantizationError

__all__ = ["InvalidOptionError", "UnsupportedConfigError"]


class InvalidOptionError(QuantizationError, ValueError):
    """An argument or ``extra_options`` value is invalid (wrong type, value or combination)."""


class UnsupportedConfigError(QuantizationError, TypeError):
    """``quantize()`` got a config type it cannot (yet) handle."""
