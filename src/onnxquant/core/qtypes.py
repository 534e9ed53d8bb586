"""Quantized element types and granularities as small frozen value objects.

A :class:`QuantType` describes the integer (or, later, float8) grid a tensor is quantized to;
a granularity (:class:`PerTensor`, :class:`PerAxis`, :class:`PerBlock`) describes how many
(scale, zero point) pairs a tensor gets. Nothing here knows about graphs.
"""

from __future__ import annotations

import dataclasses
import enum

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = [
    "QuantFormat",
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
    "Granularity",
    "quant_type_from_name",
]


@dataclasses.dataclass(frozen=True)
class QuantType:
    """A quantized element type.

    Attributes:
        name: Short lower-case name (``"int8"``), used in JSON and the CLI.
        bits: Storage width in bits.
        signed: Whether the integer grid includes negative values.
        is_float: True for float8 types (scale only, no integer grid).
        onnx_dtype: The ONNX element type of the stored tensor.
    """

    name: str
    bits: int
    signed: bool
    is_float: bool
    onnx_dtype: ir.DataType

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy (or ml_dtypes) dtype that stores one element."""
        return np.dtype(self.onnx_dtype.numpy())

    @property
    def qmin(self) -> int:
        """Smallest value of the full integer grid."""
        if self.is_float:
            raise ValueError(f"{self.name} has no integer grid")
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest value of the full integer grid."""
        if self.is_float:
            raise ValueError(f"{self.name} has no integer grid")
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def min_opset(self) -> int:
        """Lowest default-domain opset whose QuantizeLinear/DequantizeLinear accept this type."""
        if self.bits in (8,) and not self.is_float:
            return 10
        if self.is_float and self.bits == 8:
            return 19
        return 21  # int16/uint16 and int4/uint4

    def __str__(self) -> str:
        return self.name


INT4 = QuantType("int4", 4, True, False, ir.DataType.INT4)
UINT4 = QuantType("uint4", 4, False, False, ir.DataType.UINT4)
INT8 = QuantType("int8", 8, True, False, ir.DataType.INT8)
UINT8 = QuantType("uint8", 8, False, False, ir.DataType.UINT8)
INT16 = QuantType("int16", 16, True, False, ir.DataType.INT16)
UINT16 = QuantType("uint16", 16, False, False, ir.DataType.UINT16)
FLOAT8E4M3FN = QuantType("float8e4m3fn", 8, True, True, ir.DataType.FLOAT8E4M3FN)

_BY_NAME = {t.name: t for t in (INT4, UINT4, INT8, UINT8, INT16, UINT16, FLOAT8E4M3FN)}

# ml_dtypes registers int4/uint4 with numpy; referencing it keeps the import meaningful.
_ = ml_dtypes.int4


def quant_type_from_name(name: str) -> QuantType:
    """Return the QuantType called ``name`` (e.g. ``"int8"``, ``"uint16"``).

    Raises:
        ValueError: If the name is unknown; the message lists the known names.
    """
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise ValueError(f"unknown quantized type {name!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[key]


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclasses.dataclass(frozen=True)
class PerAxis:
    """One scale and zero point per slice along ``axis`` (per-channel)."""

    axis: int


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale and zero point per block of ``size`` consecutive elements along ``axis``."""

    axis: int
    size: int


Granularity = PerTensor | PerAxis | PerBlock


class QuantFormat(enum.Enum):
    """How a quantized model is represented."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear pairs around float operators
    QOPERATOR = "qoperator"  # operators with their own quantized definition (QLinearConv, ...)
