"""Parameters of tensors the input model already dequantizes (a ``DequantizeLinear`` with
constant scale and zero point): their grid is fixed, and the planner reads it where it needs an
input's scale (the int32 bias of a Conv/Gemm whose input or weight is pre-quantized)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.core.plan import TensorQuant

__all__: list[str] = []

PREQUANTIZED = "prequantized"  # TensorQuant.role of such a grid (never emitted)


def dequantize_params(value: ir.Value | None) -> TensorQuant | None:
    """The grid of the ``DequantizeLinear`` that produces ``value`` (None when another op
    produces it, or its scale or zero point is not a constant)."""
    producer = value.producer() if value is not None else None
    if (value is None or producer is None or producer.op_type != "DequantizeLinear"
            or len(producer.inputs) < 2):
        return None
    scale_value = producer.inputs[1]
    zp_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    if scale_value is None or scale_value.const_value is None:
        return None
    scale = np.asarray(scale_value.const_value.numpy(), dtype=np.float64).reshape(-1)
    if zp_value is not None and zp_value.const_value is not None:
        zero_point = np.asarray(zp_value.const_value.numpy(), dtype=np.int64).reshape(-1)
        qtype = zp_value.const_value.dtype.name.lower()
    elif zp_value is None:
        zero_point, qtype = np.zeros(scale.shape, np.int64), "uint8"
    else:
        return None
    axis_attr = producer.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) if scale.size > 1 else None
    return TensorQuant(value.name or "", PREQUANTIZED, qtype, [float(s) for s in scale],
                       [int(z) for z in zero_point], axis,
                       f"dequantized:{producer.name}")
