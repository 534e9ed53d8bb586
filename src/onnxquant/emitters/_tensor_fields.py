"""Small parameter tensors stored the way onnxruntime's quantizer stores them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["typed_fields"]

_FIELD_TYPES = frozenset({np.dtype(t) for t in (np.float32, np.int8, np.uint8, np.int16,
                                                 np.uint16, np.int32)})

_FOUR_BIT = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def typed_fields(array: np.ndarray) -> np.ndarray | ir.TensorProtocol:
    """Scale and zero-point tensors stored in the typed fields of TensorProto (``float_data``,
    ``int32_data``) rather than ``raw_data``, as onnxruntime writes them: code written for
    onnxruntime's models reads those fields. Other element types stay raw."""
    if array.dtype.name in _FOUR_BIT:  # packed two per int32_data entry by make_tensor
        values = array.astype(np.int8).flatten().tolist()
        proto = onnx.helper.make_tensor("", _FOUR_BIT[array.dtype.name], list(array.shape),
                                        values)
        return ir.TensorProtoTensor(proto)
    if array.dtype not in _FIELD_TYPES:
        return array
    proto = onnx.helper.make_tensor("", onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                    list(array.shape), array.flatten().tolist())
    return ir.TensorProtoTensor(proto)
