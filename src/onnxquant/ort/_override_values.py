"""Value coercion for ``TensorQuantOverrides`` entries: onnxruntime's users pass numpy
scalars, one-element arrays and onnxruntime's own ``QuantType`` members where numbers, booleans
and types are meant."""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any

import numpy as np

from onnxquant.ort.quant_utils import QuantType

__all__: list[str] = []


def _quant_type(value: Any) -> QuantType | None:
    """Our QuantType for ours, onnxruntime's same-named enum member or a name; else None."""
    if isinstance(value, QuantType):
        return value
    if isinstance(value, enum.Enum) and value.name in QuantType.__members__:
        return QuantType[value.name]
    if isinstance(value, str):
        try:
            return QuantType.from_string(value)
        except ValueError:
            return None
    return None


def _item(value: Any) -> Any:
    """A Python scalar from a number, numpy scalar or one-element array (else ``value``)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(()).item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _real(value: Any) -> float | None:
    value = _item(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _integer(value: Any) -> int | None:
    value = _item(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _bool(value: Any) -> bool | None:
    value = _item(value)
    return value if isinstance(value, bool) else None
