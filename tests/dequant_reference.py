"""Independent numpy dequantization of the weights a quantized ONNX model stores, for the
``qdq_loss_debug`` and matching tests.

Written from the operator specifications (ONNX DequantizeLinear, the com.microsoft integer
ops, MatMulNBits' packing), on ``onnx.ModelProto`` with plain numpy and int64 arithmetic, so it
shares no code with :mod:`onnxquant.debug`. :func:`quantized_constants` lists what a model
stores quantized by where it is consumed, without asking the module under test.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["STORAGE_TYPES", "constants", "dequantize", "quantized_constants", "sqnr_db"]

_INT4 = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))
STORAGE_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
"""Element types of quantized data (int4/uint4 too); int64 constants are shapes and axes."""

# Integer ops: (data, scale, zero point) slots of every quantized operand; the int32 bias's
# (data, activation scale, weight scale) slots.
_TRIPLES = {
    "QLinearConv": [(0, 1, 2), (3, 4, 5)],
    "QLinearMatMul": [(0, 1, 2), (3, 4, 5)],
    "QGemm": [(0, 1, 2), (3, 4, 5)],
    "QLinearAdd": [(0, 1, 2), (3, 4, 5)],
    "QLinearMul": [(0, 1, 2), (3, 4, 5)],
    "DynamicQuantizeMatMul": [(1, 2, 3)],
    "MatMulIntegerToFloat": [(0, 2, 4), (1, 3, 5)],
}
_BIAS = {"QLinearConv": (8, 1, 4), "QGemm": (6, 1, 4)}
# Slots that hold zero points or output parameters (not data).
_PARAM_SLOTS = {
    "QuantizeLinear": {2}, "DequantizeLinear": {2},
    "QLinearConv": {2, 5, 7}, "QLinearMatMul": {2, 5, 7}, "QGemm": {2, 5, 8},
    "QLinearAdd": {2, 5, 7}, "QLinearMul": {2, 5, 7},
    "QLinearAveragePool": {2, 4}, "QLinearGlobalAveragePool": {2, 4},
    "QLinearSigmoid": {2, 4}, "QLinearLeakyRelu": {2, 4}, "QLinearSoftmax": {2, 4},
    "MatMulNBits": {3}, "DynamicQuantizeMatMul": {3}, "MatMulIntegerToFloat": {4, 5},
    "MatMulInteger": {2, 3}, "ConvInteger": {2, 3},
}
_DATA_SLOTS = {
    "DequantizeLinear": {0}, "QLinearConv": {0, 3, 8}, "QLinearMatMul": {0, 3},
    "QGemm": {0, 3, 6}, "QLinearAdd": {0, 3}, "QLinearMul": {0, 3}, "MatMulNBits": {1},
    "DynamicQuantizeMatMul": {1}, "MatMulIntegerToFloat": {0, 1}, "MatMulInteger": {0, 1},
    "ConvInteger": {0, 1}, "Gather": {0}, "Slice": {0},
}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of the main graph."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _is_storage(array: np.ndarray) -> bool:
    return array.dtype in _INT4 or any(array.dtype == t for t in STORAGE_TYPES)


def quantized_constants(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    """``{constant: (consumer, slot)}`` for every integer constant read as quantized data.

    Raises AssertionError when an integer constant feeds a slot this table does not know, so
    a new quantized form cannot go unnoticed.
    """
    values = constants(model)
    found: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in values or not _is_storage(values[name]):
                continue
            if slot in _DATA_SLOTS.get(node.op_type, ()):
                found.setdefault(name, (node, slot))
            else:
                assert slot in _PARAM_SLOTS.get(node.op_type, ()), (
                    f"integer constant {name} feeds {node.op_type} input {slot}: unknown form")
    return found


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _affine(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int | None,
            block: int = 0) -> np.ndarray:
    """``(q − zero) · scale`` in int64/float64, per tensor, per axis or per block."""
    q = q.astype(np.int64)
    scale = np.asarray(scale, np.float64)
    zero = np.zeros(scale.shape, np.int64) if zero is None else np.asarray(zero).astype(np.int64)
    if scale.size == 1 and not block:
        return (q - zero.reshape(())).astype(np.float64) * scale.reshape(())
    assert axis is not None
    axis %= q.ndim
    if block:
        keep = tuple(slice(0, n) for n in q.shape)
        scale = np.repeat(scale, block, axis=axis)[keep]
        zero = np.repeat(zero, block, axis=axis)[keep]
    else:
        view = [1] * q.ndim
        view[axis] = -1
        scale, zero = scale.reshape(view), zero.reshape(view)
    return (q - zero).astype(np.float64) * scale


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values packed little-endian into bytes (first value in the low bits), last axis."""
    per_byte = 8 // bits
    values = [(packed.astype(np.int64) >> (bits * i)) & ((1 << bits) - 1)
              for i in range(per_byte)]
    return np.stack(values, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def _matmul_nbits(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray:
    """The [K, N] float weight of a MatMulNBits node."""
    attrs = _attrs(node)
    k, n, bits, block = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))  # type: ignore[call-overload]
    blocks = math.ceil(k / block)
    q = _unpack(values[node.input[1]].reshape(n, blocks, -1), bits, block).reshape(n, -1)
    scale = values[node.input[2]].astype(np.float64).reshape(n, blocks)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if not zp_name:
        zero = np.full((n, blocks), 1 << (bits - 1), np.int64)
    elif values[zp_name].dtype == np.uint8:
        zero = _unpack(values[zp_name].reshape(n, -1), bits, blocks)
    else:
        zero = values[zp_name].astype(np.float64).reshape(n, blocks)
    w = (q - np.repeat(zero, block, axis=1)) * np.repeat(scale, block, axis=1)
    return w[:, :k].T


def _integer_product(model: onnx.ModelProto, node: onnx.NodeProto,
                     values: dict[str, np.ndarray]) -> np.ndarray:
    """The weight (input 1) of MatMulInteger/ConvInteger after DynamicQuantizeLinear: its
    scale is the constant that a Mul multiplies the run-time input scale by."""
    source = next(n for n in model.graph.node if node.input[0] in n.output)
    assert source.op_type == "DynamicQuantizeLinear"
    mul = next(n for n in model.graph.node
               if n.op_type == "Mul" and source.output[1] in n.input)
    scale = values[next(v for v in mul.input if v != source.output[1])]
    zero = values[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    q = values[node.input[1]]
    axis = 0 if node.op_type == "ConvInteger" else q.ndim - 1
    if scale.size > 1 and zero is not None and zero.size == 1:
        zero = np.broadcast_to(zero.reshape(-1), scale.reshape(-1).shape)
    return _affine(q, scale.reshape(-1) if scale.size > 1 else scale, zero, axis)


def dequantize(model: onnx.ModelProto, stored: str) -> np.ndarray:
    """The float64 value of the quantized constant ``stored``, in the layout its consumer
    reads it (MatMulNBits: [K, N])."""
    values = constants(model)
    node, slot = quantized_constants(model)[stored]
    q = values[stored]
    op = node.op_type
    if op == "DequantizeLinear":
        attrs = _attrs(node)
        zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        return _affine(q, values[node.input[1]], zero, int(attrs.get("axis", 1)),  # type: ignore[call-overload]
                       int(attrs.get("block_size", 0)))  # type: ignore[call-overload]
    if op == "MatMulNBits":
        return _matmul_nbits(node, values)
    if op in ("Gather", "Slice"):  # a quantized table: its output's DequantizeLinear
        dq = next(n for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0])
        scale = values[dq.input[1]]
        axis = int(_attrs(dq).get("axis", 1))  # type: ignore[call-overload]
        if scale.size > 1:
            assert op == "Slice" or axis < 0, "only trailing axes of a Gather output are known"
        return _affine(q, scale, values[dq.input[2]], axis if scale.size > 1 else None)
    if op in ("MatMulInteger", "ConvInteger"):
        return _integer_product(model, node, values)
    if op in _BIAS and slot == _BIAS[op][0]:
        _, x_scale, w_scale = _BIAS[op]
        scale = values[node.input[x_scale]].astype(np.float64) * \
            values[node.input[w_scale]].astype(np.float64)
        return _affine(q, scale.reshape(-1) if scale.size > 1 else scale, None, 0)
    data_i, scale_i, zp_i = next(t for t in _TRIPLES[op] if t[0] == slot)
    scale = values[node.input[scale_i]]
    zero = values[node.input[zp_i]] if len(node.input) > zp_i and node.input[zp_i] else None
    trans_b = bool(_attrs(node).get("transB", 0))
    axis = 0 if op == "QLinearConv" or (op == "QGemm" and trans_b) else q.ndim - 1
    return _affine(q, scale, zero, axis if scale.size > 1 else None)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """``20·log10(‖reference‖ / ‖reference − approx‖)`` in float64."""
    ref = np.asarray(reference, np.float64).ravel()
    noise = np.linalg.norm(ref - np.asarray(approx, np.float64).ravel())
    return 20 * math.log10(np.linalg.norm(ref) / max(noise, np.finfo(float).eps))
