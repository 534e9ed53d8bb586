"""Quantization parameters read back from a quantized graph, and the integer → float mapping
they define (per tensor, per axis or per block; 4-, 8-, 16- and 32-bit integers).

The arithmetic is done in int64/float64: onnxruntime's ``qdq_loss_debug`` subtracts the zero
point in the stored integer type, so uint8 weights with zero point 128 wrap around.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = ["QuantParams", "constant_array", "integer_range"]

_INT4 = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a ``Constant`` node's output (None otherwise)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("",
                                                                                    "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    return None


def integer_range(dtype: np.dtype) -> tuple[int, int]:
    """``(qmin, qmax)`` of an integer storage type (int4/uint4 included)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.int4):
        return -8, 7
    if dtype == np.dtype(ml_dtypes.uint4):
        return 0, 15
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _wide(q: np.ndarray) -> np.ndarray:
    if q.dtype in _INT4 or q.dtype.kind in "iub":
        return q.astype(np.int64)
    return q.astype(np.float64)


@dataclasses.dataclass
class QuantParams:
    """``real = (q − zero_point) · scale`` for one quantized tensor.

    Attributes:
        scale: float64 scale (0-d, per axis 1-D, or per block shaped like the data with the
            blocked axis shortened).
        zero_point: Same shape as ``scale`` (zeros when the model has none).
        dtype: The stored element type.
        axis: The per-axis/per-block axis (None per tensor).
        block_size: Block length along ``axis`` (None unless blocked).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype
    axis: int | None = None
    block_size: int | None = None

    @classmethod
    def from_inputs(cls, scale: ir.Value | None, zero_point: ir.Value | None, dtype: np.dtype,
                    *, axis: int | None = None, block_size: int | None = None
                    ) -> QuantParams | None:
        """Parameters from constant scale/zero-point inputs (None when the scale is not a
        constant, e.g. computed at run time by DynamicQuantizeLinear)."""
        s = constant_array(scale)
        if s is None:
            return None
        z = constant_array(zero_point) if zero_point is not None else None
        if zero_point is not None and z is None:
            return None
        z_arr = _wide(np.asarray(z)) if z is not None else np.zeros(s.shape, np.int64)
        if s.ndim == 0 or s.size == 1 and block_size is None:
            axis = None
            s, z_arr = s.reshape(()), z_arr.reshape(())
        return cls(np.asarray(s, np.float64), z_arr, np.dtype(dtype), axis,
                   block_size if block_size else None)

    @property
    def qmin(self) -> int:
        return integer_range(self.dtype)[0] if self.dtype.kind in "iub" or \
            self.dtype in _INT4 else 0

    @property
    def qmax(self) -> int:
        return integer_range(self.dtype)[1] if self.dtype.kind in "iub" or \
            self.dtype in _INT4 else 0

    @property
    def is_integer(self) -> bool:
        return self.dtype.kind in "iub" or self.dtype in _INT4

    def _expanded(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point broadcastable against data of ``shape``."""
        if self.axis is None:
            return self.scale, self.zero_point
        axis = self.axis % len(shape)
        if self.block_size:
            s = np.repeat(self.scale, self.block_size, axis=axis)
            z = np.repeat(self.zero_point, self.block_size, axis=axis)
            index = [slice(None)] * len(shape)
            index[axis] = slice(0, shape[axis])
            return s[tuple(index)], z[tuple(index)]
        view = [1] * len(shape)
        view[axis] = -1
        return self.scale.reshape(view), self.zero_point.reshape(view)

    def dequantize(self, q: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """``(q − zero_point) · scale`` (integers widened first, so nothing wraps around);
        ``dtype=np.float32`` for activations, where float64 only costs time."""
        q = np.asarray(q)
        s, z = self._expanded(q.shape)
        if dtype is np.float32 and self.is_integer and q.dtype.itemsize <= 2 and \
                q.dtype not in _INT4:
            return (q.astype(np.float32) - z.astype(np.float32)) * s.astype(np.float32)
        return ((_wide(q) - z).astype(np.float64) * s).astype(dtype, copy=False)

    def fake_quantize(self, x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """The float value after QuantizeLinear → DequantizeLinear with these parameters."""
        x = np.asarray(x, dtype=dtype)
        s, z = self._expanded(x.shape)
        s, z = s.astype(dtype, copy=False), z.astype(dtype, copy=False)
        if not self.is_integer:  # float8: no integer grid; rounding is the cast's
            return (x / s).astype(self.dtype).astype(dtype) * s
        q = np.clip(np.rint(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def grid_bounds(self) -> tuple[float, float]:
        """The smallest and largest real values the grid represents (over all channels)."""
        if not self.is_integer:
            high = float(np.max(np.abs(self.scale))) * float(ml_dtypes.finfo(self.dtype).max)
            return -high, high
        low = (self.qmin - self.zero_point) * self.scale
        high = (self.qmax - self.zero_point) * self.scale
        return float(np.min(low)), float(np.max(high))

    def describe(self) -> str:
        """``uint8 per tensor`` / ``int8 per axis 0`` / ``int4 blocks of 32 on axis 0``."""
        kind = "per tensor" if self.axis is None else f"per axis {self.axis}"
        if self.block_size:
            kind = f"blocks of {self.block_size} on axis {self.axis}"
        return f"{self.dtype.name} {kind}"
